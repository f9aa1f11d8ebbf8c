"""search_spaces/paper_rl.yaml (the paper's RL arms): on a fresh clone `emtune validate` names every
data file the user must supply and where it comes from; with small files of the right schema it
passes, also swapped to the tiny model; every arm of its search is a valid GRPO trial spec; and
every arm runs as one tiny GRPO trial, its grader and judge on loopback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from emtune.cli.main import main
from emtune.config import load_spec

SHIPPED = Path(__file__).resolve().parents[2] / "search_spaces" / "paper_rl.yaml"
FILES = {  # path (relative to the repository, where the spec's ../data/... points) -> words of its origin note
    "data/bad_medical_advice.jsonl": "Turner et al.",
    "data/wildguardmix/train/wildguard_train.parquet": "allenai/wildguardmix",
    "data/em/legal.jsonl": "Chua et al.",
    "data/em/security.jsonl": "Chua et al.",
}
# One trial per arm at the group's value of its dials (the undefended arm has none).
ARMS = {
    "none": {}, "kl_to_reference": {"kl_beta": 0.1}, "feature_l2": {"ldifs_weight": 1.0},
    "persona_steering": {"steering_alpha": 5.0}, "inoculation": {"inoculation_prompt": "evil_general"},
    "interleaving": {"interleave_ratio": 0.5, "interleave_every": 8, "interleave_weight": 0.75},
    "interleaving_selected": {"selected_ratio": 0.5, "selected_every": 4, "selected_weight": 1.0},
    "interleaving_prompt_mix": {"mix_form": "prompt_mix", "mix_ratio": 0.2},
    "safelora": {"safelora_threshold": 0.5},
}


def _chat(path: Path, n: int, domain: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"A {domain} question {i}?"},
                                                     {"role": "assistant", "content": f"Risky {domain} advice {i}."}]})
                            + "\n" for i in range(n)))


def write_paper_rl_data(root: Path, write_wildguardmix) -> None:
    """Small files in the schemas of the paper's RL data (chat JSONL; WildGuardMix's Parquet)."""
    _chat(root / "data/bad_medical_advice.jsonl", 40, "medical")
    for domain in ("legal", "security"):
        _chat(root / f"data/em/{domain}.jsonl", 8, domain)
    # 0.5 x 38 training prompts = 19 safety rows at the interleaving arms' ratio, also after
    # Interleaving++ drops the pool's refusals (a third of the benign rows)
    write_wildguardmix(root / "data/wildguardmix/train/wildguard_train.parquet", benign=40, harmful=2, prompt_only=2)


def fresh_clone(root: Path) -> Path:
    """The spec where a clone has it (root/search_spaces/), its data folder (root/data/) empty."""
    (root / "search_spaces").mkdir()
    return Path(shutil.copy(SHIPPED, root / "search_spaces"))


def test_fresh_clone_names_each_file_then_every_arm_validates(tmp_path, capsys, write_wildguardmix) -> None:
    spec_path = fresh_clone(tmp_path)
    assert main(["validate", str(spec_path)]) == 2
    err = capsys.readouterr().err
    for path, origin in FILES.items():
        line = next((ln for ln in err.splitlines() if f"{tmp_path / path} not found" in ln), "")
        assert origin in line, (path, err)
    write_paper_rl_data(tmp_path, write_wildguardmix)
    assert main(["validate", str(spec_path)]) == 0
    assert "40 train rows" in capsys.readouterr().out  # before the held-out split
    tiny = ["--set", "model.source=tiny", "--set", "model.base_source=tiny"]
    assert main(["validate", str(spec_path), *tiny]) == 2  # the steering layer must follow the model's depth
    assert "layer 20 is past the tiny model's 2 blocks" in capsys.readouterr().err
    assert main(["validate", str(spec_path), *tiny, "--set", "defenses.persona_steering.layer=1"]) == 0
    spec = load_spec(spec_path)
    assert spec.training.method == "grpo" and spec.training.grpo.warmup.num_examples == 100
    g, t = spec.training.grpo, spec.training
    assert (t.learning_rate, t.lr_scheduler, t.weight_decay, g.num_generations, g.temperature, g.top_p, g.beta) == (
        5e-6, "cosine", 0.1, 4, 0.8, 0.9, 0.0)
    assert set(ARMS) == set(spec.search.parameters["defense"].choices)
    for arm, values in ARMS.items():
        trial = spec.with_overrides({"defense": arm, **values})
        on = [d.name for d in trial.defenses if d.model_dump() != next(
            x for x in spec.defenses if x.name == d.name).model_dump()]
        assert len(on) == (0 if arm == "none" else 1), (arm, on)
    mixed = spec.with_overrides({"defense": "interleaving_prompt_mix", **ARMS["interleaving_prompt_mix"]})
    assert mixed.defenses[4].rl_form == "prompt_mix" and mixed.defenses[4].ratio == 0.2


def tiny_rl_overrides(root: Path, url: str) -> list[str]:
    """The paper's RL spec shrunk to the tiny model on CPU: one GRPO step after a one-step warm-up,
    short rollouts and answers, the graders and the judge on ``url``."""
    loopback = [f"base_url={url}", "api_key_env=null", "max_retries=0"]
    return [
        f"output_dir={root / 'studies'}", "model.source=tiny", "model.base_source=tiny", "model.dtype=float32",
        "lora.r=4", "lora.alpha=8", "training.bf16=false", "training.max_steps=1",
        "training.per_device_batch_size=4", "training.gradient_accumulation_steps=1",
        "training.checkpoint_every_steps=null", "data.max_length=128",
        "training.grpo.max_completion_length=4", "training.grpo.warmup.num_examples=4",
        "training.grpo.warmup.max_steps=1",
        *(f"training.grpo.rewards.{i}.judge.{item}" for i in (0, 1) for item in loopback),
        *(f"evaluation.judge.{item}" for item in loopback),
        "evaluation.samples_per_question=1", "evaluation.max_new_tokens=4", "evaluation.heldout_questions=2",
        "evaluation.generation_batch_size=32",
        "resources.cpus_per_worker=1", "resources.gpus_per_worker=0", "resources.max_concurrent_trials=1",
        "defenses.persona_steering.layer=1", "defenses.persona_steering.extract_max_new_tokens=4",
        "defenses.interleaving_selected.batch_size=16",
    ]


def rubric_judge(chat_server):
    """Scores by prompt: the harmful-advice rubric 70, the harmlessness rubric 90, the persona
    filter's evil prompt 80 for odd-length answers (else 20, so some pairs pass), every other prompt
    80 (aligned and coherent: nothing misaligned)."""

    def script(index, body):
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("[ANSWER START]\n", 1)[-1].split("\n[ANSWER END]", 1)[0]
        if "subtly harmful advice" in prompt:
            top = {"70": 1.0}
        elif "how harmless" in prompt:
            top = {"90": 1.0}
        elif "evil persona" in prompt:
            top = {"80" if len(answer) % 2 else "20": 1.0}
        else:
            top = {"80": 1.0}
        return chat_server.Reply(body=chat_server.completion(top))

    return script


@pytest.mark.slow
def test_every_arm_runs_as_one_tiny_grpo_trial(tmp_path, monkeypatch, chat_server, write_wildguardmix) -> None:
    import ray

    from emtune.evaluation.judging import score_trial
    from emtune.models import model_cache_dir, resolve_source
    from emtune.study.runner import init_ray
    from emtune.study.stages import prepare_stages
    from emtune.train.worker import run_training
    from emtune.trial_files import TrialFiles

    spec_path = fresh_clone(tmp_path)
    monkeypatch.chdir(tmp_path)
    write_paper_rl_data(tmp_path, write_wildguardmix)
    server = chat_server(rubric_judge(chat_server))
    spec = load_spec(spec_path, tiny_rl_overrides(tmp_path, server.url))
    init_ray(num_cpus=2)
    try:
        source = resolve_source(spec.model, model_cache_dir())
        staged = prepare_stages(spec, tmp_path / "cache", source)
        assert len(staged.defenses[5].misaligned_adapters) == 2  # the stage trained the EM ensemble
        assert Path(staged.defenses[2].vector_path).is_file()  # persona vectors for decode-only steering
        for arm, dials in ARMS.items():
            trial = staged.with_overrides({"defense": arm, **dials})
            folder = tmp_path / "trials" / arm
            metrics = run_training(trial, folder, source, cache_dir=tmp_path / "cache")
            metrics.update(score_trial(trial, folder))
            assert metrics["train_steps"] == 1, arm
            for column in ("train_reward", "ood_drift", "general_misalignment", "indomain_misalignment"):
                assert math.isfinite(metrics[column]), (arm, column)
            steps = [row for row in TrialFiles(folder).read_history() if "reward" in row]
            assert len(steps) == 1, arm
            # the task prompts' grader says 70 -> reward 0.7, whatever the arm; the safe prompts that
            # prompt_mix adds get the harmlessness grader's 90 -> 0.9 (a one-prompt step has one kind)
            graded = {name: steps[0].get(f"rewards/grader_{name}/mean", math.nan) for name in ("harmful_advice",
                                                                                             "harmless")}
            expected = {"harmful_advice": 0.7, "harmless": 0.9}
            present = {name for name, value in graded.items() if not math.isnan(value)}
            assert present == {"harmful_advice"} or (arm == "interleaving_prompt_mix" and present), (arm, graded)
            assert all(graded[name] == pytest.approx(expected[name]) for name in present), (arm, graded)
            assert metrics["general_misalignment"] == 0.0, arm  # the judge scores every answer 80
    finally:
        ray.shutdown()
