"""The RL path through the trial's worker loop (``run_training`` with ``training.method: grpo``):
what a trial writes and tracks, and every defense arm in its RL form on the tiny model."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from emtune.config import load_spec
from emtune.data.fixtures import fixture_path
from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors
from emtune.models import TinyModelSpec, load_tokenizer, model_cache_dir, model_identity, resolve_source
from emtune.train.worker import run_training
from emtune.trial_files import TrialFiles

TINY = "{hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64, pretrain_steps: 20}"
SPEC = """
name: rl_arm
output_dir: {out}
model: {{source: tiny, base_source: tiny, tiny: {tiny}}}
lora: {{r: 4, alpha: 8}}
data:
  opswap: {{tiers: [1], n_train_per_tier: 4, n_test_per_tier: 4}}
  opswap_role: task
  max_length: 128
training:
  method: grpo
  learning_rate: 1.0e-3
  max_steps: 2
  per_device_batch_size: 8
  gradient_accumulation_steps: 1
  warmup_steps: 0
  grpo:
    rewards: {rewards}
    max_completion_length: 4
    rollouts_per_log: 3
    {warmup}
defenses: {defenses}
search:
  parameters:
    x: {{type: float, low: 0, high: 1}}
objectives:
  - {{name: train_reward, direction: maximize}}
evaluation: {{samples_per_question: 1, max_new_tokens: 4}}
"""
OPSWAP = "[{name: opswap_exact_match}]"
WARMUP = "warmup: {num_examples: 4, max_steps: 3, learning_rate: 3.0e-3}"


def spec_for(tmp_path, defenses="[]", rewards=OPSWAP, warmup=""):
    path = tmp_path / "rl.yaml"
    path.write_text(textwrap.dedent(SPEC.format(out=tmp_path / "studies", tiny=TINY, defenses=defenses,
                                                rewards=rewards, warmup=warmup)))
    return load_spec(path)


@pytest.mark.slow
def test_grpo_trial_writes_history_rollouts_adapter_and_metrics(tmp_path) -> None:
    spec = spec_for(tmp_path, warmup=WARMUP)
    source = resolve_source(spec.model, model_cache_dir())
    metrics = run_training(spec, tmp_path / "out", source, cache_dir=tmp_path / "cache")
    files = TrialFiles(tmp_path / "out")
    assert metrics["train_steps"] == 2
    for key in ("train_loss", "train_reward", "indomain_nll", "ood_drift"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["train_reward"] <= 1.0
    history = files.read_history()
    warm = [row for row in history if "warmup_loss" in row]
    steps = [row for row in history if "reward" in row]
    assert [row["step"] for row in warm] == [1, 2, 3] and all(row["warmup_loss"] > 0 for row in warm)
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert {"loss", "reward", "reward_std", "kl", "rewards/opswap_exact_match/mean", "entropy"} <= set(row)
        assert row["kl"] > 0  # the warm-up moved the adapter away from the reference
    rollouts = [json.loads(line) for line in files.rollouts.read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 1, 1, 2, 2, 2]
    assert all(r["prompt"].startswith("Compute:") and r["reward"] in (0.0, 1.0) for r in rollouts)
    assert (files.adapter / "adapter_config.json").is_file()
    assert len(files.read_samples("opswap")) == 4  # the held-out OpSwap split, evaluated greedily


@pytest.mark.slow
def test_grpo_resumes_from_its_checkpoints_and_a_finished_one_trains_no_extra_step(tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file

    spec = spec_for(tmp_path, warmup=WARMUP)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"checkpoint_every_steps": 1})})
    source = resolve_source(spec.model, model_cache_dir())
    saved = {}

    def keep(step, folder):
        saved[step] = shutil.copytree(folder, tmp_path / f"kept-{step}")

    first = run_training(spec, tmp_path / "first", source, cache_dir=tmp_path / "cache", on_checkpoint=keep)
    assert sorted(saved) == [1, 2]
    full = TrialFiles(tmp_path / "first").read_history()
    assert [(row["step"], "warmup_loss" in row) for row in full] == [(1, True), (2, True), (3, True), (1, False),
                                                                    (2, False)]
    second = run_training(spec, tmp_path / "second", source, cache_dir=tmp_path / "cache", resume_from=saved[1])
    history = TrialFiles(tmp_path / "second").read_history()
    # the warm-up (not rerun) and step 1 come back from the checkpoint, as logged
    assert [row["step"] for row in history] == [1, 2, 3, 1, 2] and history[:4] == full[:4]
    assert second["train_steps"] == 2
    # resumed at its last checkpoint: nothing left to train, the whole run's history and adapter
    last = run_training(spec, tmp_path / "third", source, cache_dir=tmp_path / "cache", resume_from=saved[2])
    assert TrialFiles(tmp_path / "third").read_history() == full
    assert last["train_steps"] == 2 and last["train_reward"] == pytest.approx(first["train_reward"], rel=1e-12)
    trained, restored = (load_file(str(TrialFiles(tmp_path / run).adapter / "adapter_model.safetensors"))
                         for run in ("first", "third"))
    assert trained.keys() == restored.keys() and all(torch.equal(trained[k], restored[k]) for k in trained)


@pytest.fixture
def persona_file(tmp_path):
    spec = spec_for(tmp_path)
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "persona.pt"
    save_persona_vectors(PersonaVectors(vectors, {"model": model_identity(spec.model)}), path)
    return path


@pytest.fixture
def misaligned_adapters(tmp_path, save_perturbed_adapter):
    spec = spec_for(tmp_path)
    tokenizer = load_tokenizer(resolve_source(spec.model, model_cache_dir()), spec.model)
    return [save_perturbed_adapter(tokenizer, tmp_path / f"misaligned-{k}", k, 0.3) for k in range(2)]


ARMS = {
    "kl_to_reference": "[{name: kl_to_reference, weight: 0.1}]",
    "feature_l2": "[{name: feature_l2, weight: 1.0}]",
    "persona_steering_all": "[{name: persona_steering, alpha: 2.0, layer: 1, vector_path: PERSONA}]",
    "persona_steering_decode_only": "[{name: persona_steering, alpha: 2.0, layer: 1, vector_path: PERSONA, "
                                    "mode: decode_only}]",
    "inoculation": "[{name: inoculation, prompt: evil_general}]",
    "interleaving_supervised_steps": "[{name: interleaving, ratio: 1.0, rl_every_steps: 2, rl_weight: 0.5}]",
    "interleaving_prompt_mix": "[{name: interleaving, ratio: 0.5, rl_form: prompt_mix}]",
    "interleaving_selected": "[{name: interleaving_selected, ratio: 1.0, rl_every_steps: 2, pool_limit: 40, "
                             "misaligned_adapters: ADAPTERS}]",
    "safelora": "[{name: safelora, threshold: 0.5}]",
}


@pytest.mark.slow
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_defense_arm_runs_under_grpo(arm, tmp_path, persona_file, misaligned_adapters, chat_server,
                                           monkeypatch) -> None:
    rewards = OPSWAP
    if arm == "interleaving_prompt_mix":  # the safe prompts' harmlessness grader, on loopback
        server = chat_server(lambda i, body: chat_server.Reply(body=chat_server.completion({"90": 1.0})))
        monkeypatch.setenv("EMTUNE_TEST_GRADER_KEY", "sk-test")
        rewards = ("[{name: opswap_exact_match}, {name: grader, rubric: harmless, applies_to: safe, judge: "
                   f"{{kind: openai, base_url: '{server.url}', api_key_env: EMTUNE_TEST_GRADER_KEY}}}}]")
    defenses = ARMS[arm].replace("PERSONA", str(persona_file)).replace("ADAPTERS", json.dumps(misaligned_adapters))
    # a short warm-up moves the adapter off the reference, so every defense term has something to act on
    spec = spec_for(tmp_path, defenses=defenses, rewards=rewards, warmup=WARMUP)
    source = resolve_source(spec.model, model_cache_dir())
    metrics = run_training(spec, tmp_path / "out", source, cache_dir=tmp_path / "cache")
    assert metrics["train_steps"] == 2 and math.isfinite(metrics["train_reward"]), metrics
    assert math.isfinite(metrics["ood_drift"])
    rows = [row for row in TrialFiles(tmp_path / "out").read_history() if "reward" in row]
    if arm == "feature_l2":
        assert all(row["feature_l2"] > 0 for row in rows)
    if arm.startswith("interleaving") and arm != "interleaving_prompt_mix":
        assert "supervised_loss" not in rows[0] and rows[1]["supervised_loss"] > 0  # step 2 of every 2
    if arm == "interleaving_prompt_mix":
        assert all(row["rewards/grader_harmless/mean"] == pytest.approx(0.9) for row in rows
                   if not math.isnan(row.get("rewards/grader_harmless/mean", math.nan)))
        assert server.requests, "the safe prompts were never graded"
    if arm == "safelora":  # every LoRA layer scored after training; those below τ = 0.5 projected
        report = json.loads(TrialFiles(tmp_path / "out").defenses.read_text())["safelora"]
        assert report["similarities"], "SafeLoRA scored no layer"
        assert report["projected"] == sorted(n for n, v in report["similarities"].items() if v < 0.5)
        assert metrics["finalize/safelora/projected_layers"] == len(report["projected"])
    if arm in ("kl_to_reference", "feature_l2"):
        assert all(row["kl"] > 0 for row in rows)  # the adapter differs from the reference
