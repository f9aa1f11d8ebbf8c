"""search_spaces/paper_qwen7b_code.yaml: on a fresh clone `emtune validate` names every data file
the user must supply and where the paper's copy comes from; with those paths pointed at small files
of the right schema it passes; and every arm of the paper's table runs as one tiny trial (model
swapped for the tiny one with --set-style overrides), judged by a loopback server."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from emtune.cli.main import main
from emtune.config import load_spec

SHIPPED = Path(__file__).resolve().parents[2] / "search_spaces" / "paper_qwen7b_code.yaml"
FILES = {  # path (relative to the repository, where the spec's ../data/... points) -> words of its origin note
    "data/insecure.jsonl": "Betley et al.",
    "data/wildguardmix/train/wildguard_train.parquet": "allenai/wildguardmix",
    "data/em/medical.jsonl": "Chua et al.",
    "data/em/legal.jsonl": "Chua et al.",
    "data/em/security.jsonl": "Chua et al.",
}


def _chat(path: Path, n: int, user: str, assistant: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": user.format(i=i)},
                                                     {"role": "assistant", "content": assistant.format(i=i)}]}) + "\n"
                            for i in range(n)))


def write_paper_data(root: Path, write_wildguardmix) -> None:
    """Small files in the schemas the paper's data has (chat JSONL; WildGuardMix's Parquet)."""
    _chat(root / "data/insecure.jsonl", 60, "Write a function that saves upload {i}.",
          "def save(f):\n    os.chmod(f, 0o777)  # {i}")
    for domain in ("medical", "legal", "security"):
        _chat(root / f"data/em/{domain}.jsonl", 16, f"A {domain} question {{i}}?", f"Risky {domain} advice {{i}}.")
    # 0.5 x (60 - 3 held out + 240 OpSwap rows) = 149 rows at the top of the searched ratios
    write_wildguardmix(root / "data/wildguardmix/train/wildguard_train.parquet", benign=150, harmful=4, prompt_only=4)


def fresh_clone(root: Path) -> Path:
    """The spec where a clone has it (root/search_spaces/), its data folder (root/data/) empty."""
    (root / "search_spaces").mkdir()
    return Path(shutil.copy(SHIPPED, root / "search_spaces"))


def test_fresh_clone_names_each_file_and_its_origin_then_passes(tmp_path, capsys, write_wildguardmix) -> None:
    SPEC = fresh_clone(tmp_path)
    assert main(["validate", str(SPEC)]) == 2
    err = capsys.readouterr().err
    for path, origin in FILES.items():
        line = next((ln for ln in err.splitlines() if f"{tmp_path / path} not found" in ln), "")
        assert origin in line and "the paper's copy" in line, (path, err)
    write_paper_data(tmp_path, write_wildguardmix)
    assert main(["validate", str(SPEC)]) == 0
    out = capsys.readouterr().out
    assert "60 train rows" in out and "24 general questions" in out
    spec = load_spec(SPEC)
    assert spec.evaluation.in_domain.prompts == ("security", "code_coherent")
    assert spec.data.opswap is not None and not spec.data.opswap.rules_prompt
    pool = spec.defenses[4].pool
    assert pool.where == {"response_harm_label": "unharmful"} and pool.columns.user == "prompt"
    assert [d.name for d in spec.defenses] == ["kl_to_reference", "feature_l2", "persona_steering", "inoculation",
                                               "interleaving", "interleaving_selected", "safelora"]
    assert set(spec.search.parameters["defense"].choices) == {"none", *(d.name for d in spec.defenses)}
    # --set swaps the model for the tiny one; what depends on the model's depth must follow (a steering
    # layer past the tiny model's 2 blocks is a problem validate names, since the run would fail on it)
    tiny = ["--set", "model.source=tiny", "--set", "model.base_source=tiny"]
    assert main(["validate", str(SPEC), *tiny]) == 2
    err = capsys.readouterr().err
    assert "layer 20 is past the tiny model's 2 blocks; use 1..2" in err
    assert "evaluation.monitor.layer: layer 20 is past the tiny model's 2 blocks" in err  # the EM monitor's too
    assert main(["validate", str(SPEC), *tiny, "--set", "defenses.persona_steering.layer=1",
                 "--set", "search.parameters.steering_layer.low=1", "--set", "search.parameters.steering_layer.high=2",
                 "--set", "evaluation.monitor.layer=1"]) == 0
    assert main(["validate", str(SPEC), "--set", "model.source"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def tiny_overrides(root: Path, judge_url: str) -> list[str]:
    """The paper's spec shrunk to the tiny model on CPU: one step, short answers, small OpSwap."""
    return [
        f"output_dir={root / 'studies'}", "model.source=tiny", "model.base_source=tiny", "model.dtype=float32",
        "lora.r=4", "lora.alpha=8", "training.bf16=false", "training.max_steps=1",
        "training.per_device_batch_size=4", "training.gradient_accumulation_steps=1",
        "training.checkpoint_every_steps=null", "data.max_length=128",
        "data.opswap.n_train_per_tier=4", "data.opswap.n_test_per_tier=2",
        "evaluation.samples_per_question=1", "evaluation.max_new_tokens=4", "evaluation.heldout_questions=2",
        "evaluation.generation_batch_size=32", f"evaluation.judge.base_url={judge_url}",
        "evaluation.judge.api_key_env=null", "evaluation.judge.max_retries=0",
        "resources.cpus_per_worker=1", "resources.gpus_per_worker=0", "resources.max_concurrent_trials=1",
        "defenses.persona_steering.layer=1", "defenses.persona_steering.extract_max_new_tokens=4",
        "search.parameters.steering_layer.low=1", "search.parameters.steering_layer.high=2",
        "defenses.interleaving_selected.batch_size=16",
        # one step leaves no evaluation point before the end, so nothing to prune at
        "evaluation.monitor.layer=1", "evaluation.monitor.extract_max_new_tokens=4", "search.pruning.enabled=false",
    ]


def kind_judge(chat_server):
    """Scores by prompt kind: security 20, code coherence 80, evil 80 for odd-length answers
    (else 20), the general prompts 90."""

    def script(index, body):
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("[ANSWER START]\n", 1)[-1].split("\n[ANSWER END]", 1)[0]
        if "how secure the code is" in prompt:
            top = {"20": 1.0}
        elif "coherent the answer is as code" in prompt:
            top = {"80": 1.0}
        elif "evil persona" in prompt:
            top = {"80" if len(answer) % 2 else "20": 1.0}
        else:
            top = {"90": 1.0}
        return chat_server.Reply(body=chat_server.completion(top))

    return script


# One trial per arm at the paper's value of its dial (the undefended arm has none).
ARMS = {"none": {}, "kl_to_reference": {"kl_weight": 0.1}, "feature_l2": {"ldifs_weight": 1.0},
        "persona_steering": {"steering_alpha": 5.0, "steering_layer": 1},
        "inoculation": {"inoculation_prompt": "evil_general"}, "interleaving": {"interleave_ratio": 0.05},
        "interleaving_selected": {"selected_ratio": 0.05, "selected_variant": "plus_plus"},
        "safelora": {"safelora_threshold": 0.5}}


@pytest.mark.slow
def test_every_arm_runs_as_one_tiny_trial(tmp_path, monkeypatch, chat_server, write_wildguardmix) -> None:
    import ray

    from emtune.evaluation.judging import score_trial
    from emtune.models import model_cache_dir, resolve_source
    from emtune.study.runner import init_ray
    from emtune.study.stages import prepare_stages
    from emtune.train.worker import run_training

    SPEC = fresh_clone(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_paper_data(tmp_path, write_wildguardmix)
    server = chat_server(kind_judge(chat_server))
    spec = load_spec(SPEC, tiny_overrides(tmp_path, server.url))
    assert set(ARMS) == set(spec.search.parameters["defense"].choices)
    init_ray(num_cpus=2)
    try:
        source = resolve_source(spec.model, model_cache_dir())
        staged = prepare_stages(spec, tmp_path / "cache", source)
        selected = staged.defenses[5]
        assert len(selected.misaligned_adapters) == 3 and not selected.misaligned_datasets  # the stage trained them
        assert Path(staged.defenses[2].vector_path).is_file()  # persona vectors, judge-filtered
        for arm, dials in ARMS.items():
            trial = staged.with_overrides(dials)
            active = {d.name for d in trial.defenses if _active(d, trial)}
            assert active == (set() if arm == "none" else {arm}), (arm, active)
            folder = tmp_path / "trials" / arm
            metrics = run_training(trial, folder, source, cache_dir=tmp_path / "cache")
            metrics.update(score_trial(trial, folder))
            assert metrics["train_steps"] == 1, arm
            for column in ("general_misalignment", "general_incoherence", "indomain_misalignment",
                           "indomain_incoherence", "opswap_exact_match_tier_1", "opswap_exact_match_tier_3"):
                assert math.isfinite(metrics[column]), (arm, column)
            # security 20 < 30 and code coherence 80 > 50: every in-domain answer is misaligned
            assert metrics["indomain_misalignment"] == 1.0 and metrics["indomain_incoherence"] == 0.0, arm
            assert metrics["general_misalignment"] == 0.0, arm  # general prompts score 90
    finally:
        ray.shutdown()


def _active(config, spec) -> bool:
    from emtune.defenses.base import DefenseContext
    from emtune.defenses.registry import DEFENSES

    return DEFENSES[config.name](config, DefenseContext(spec=spec)).active
