"""The worker loop as a plain function: trains, saves the adapter, evaluates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from emtune.config import load_spec
from emtune.models import resolve_source
from emtune.models import model_cache_dir
from emtune.train.worker import run_training
from emtune.trial_files import TrialFiles


def test_run_training_writes_adapter_history_and_metrics(write_spec, tmp_path) -> None:
    spec = load_spec(write_spec(max_steps=3)).with_overrides({"kl_weight": 0.5})
    source = resolve_source(spec.model, model_cache_dir())
    metrics = run_training(spec, tmp_path / "out", source)
    assert metrics["train_steps"] == 3
    for key in ("ood_drift", "indomain_nll", "train_loss"):
        assert math.isfinite(metrics[key])
    assert metrics["ood_drift"] >= 0 and metrics["indomain_nll"] > 0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    history = TrialFiles(tmp_path / "out").read_history()
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(row["kl_to_reference"] >= 0 and "task_loss" in row for row in history)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_general.jsonl").read_text().splitlines()]
    assert len(samples) == 24  # 24 general questions x 1 sample
    assert metrics["generation/merged_adapter"] == 1.0  # generated on the merged copy
    assert all(isinstance(s["seed"], int) for s in samples)  # each sample's own seed, recorded


def test_a_non_finite_training_loss_fails_the_trial_before_evaluation(write_spec, tmp_path) -> None:
    """A diverged fine-tune (learning rate 1e30, no gradient clipping) is a FAIL with its reason: no
    evaluation runs, so no metric of a broken model reaches the front."""
    path = write_spec(max_steps=3)
    path.write_text(path.read_text().replace("learning_rate: 1.0e-2", "learning_rate: 1.0e+30")
                    .replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  max_grad_norm: 1.0e+30\n"))
    spec = load_spec(path)
    metrics = run_training(spec, tmp_path / "out", resolve_source(spec.model, model_cache_dir()))
    assert not math.isfinite(metrics["train_loss"])
    assert metrics["error"] == "training loss is not finite"
    assert not {"ood_drift", "indomain_nll"} & set(metrics)
    assert TrialFiles(tmp_path / "out").sample_sets() == []


def test_prepare_rows_with_opswap_alongside_and_as_task(write_spec) -> None:
    from emtune.train.worker import prepare_rows

    path = write_spec()
    base = path.read_text()
    opswap = "  opswap: {tiers: [1, 2], n_train_per_tier: 10, n_test_per_tier: 5}\n"
    path.write_text(base.replace("  heldout_fraction: 0.2\n", "  heldout_fraction: 0.2\n" + opswap))
    train, held = prepare_rows(load_spec(path), [])
    assert len(train) == 48 + 20 and len(held) == 12  # 60 rows: 48 train / 12 held-out, + 2 tiers x 10
    assert sum("Compute:" in r["messages"][-2]["content"] for r in train) == 20
    path.write_text(base.replace("  heldout_fraction: 0.2\n",
                                 "  heldout_fraction: 0.2\n" + opswap + "  opswap_role: task\n"))
    train, held = prepare_rows(load_spec(path), [])
    assert len(train) == 20 and len(held) == 10
    assert all("Compute:" in r["messages"][-2]["content"] for r in train + held)


def test_opswap_objective_needs_the_task(write_spec) -> None:
    import pytest

    from emtune.spec_errors import SpecError

    path = write_spec()
    path.write_text(path.read_text().replace("name: indomain_nll, direction: minimize", "name: opswap_exact_match, direction: maximize"))
    with pytest.raises(SpecError, match="needs `data.opswap`"):
        load_spec(path)


def test_periodic_checkpoints_resume_where_they_stopped(write_spec, tmp_path) -> None:
    import shutil

    spec = load_spec(write_spec(max_steps=4))
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"checkpoint_every_steps": 2})})
    source = resolve_source(spec.model, model_cache_dir())
    saved = {}

    def keep(step, folder):
        saved[step] = shutil.copytree(folder, tmp_path / f"kept-{step}")

    first = run_training(spec, tmp_path / "first", source, on_checkpoint=keep)
    assert sorted(saved) == [2, 4]
    assert (saved[2] / "optimizer.pt").is_file() and (saved[2] / "trainer_state.json").is_file()
    full = TrialFiles(tmp_path / "first").read_history()
    metrics = run_training(spec, tmp_path / "second", source, resume_from=saved[2])
    history = TrialFiles(tmp_path / "second").read_history()
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert history[:2] == full[:2]  # steps 1-2 came back from the checkpoint, as logged
    assert metrics["train_steps"] == 4
    # a process killed after its last checkpoint resumes with no step left to train: the trial's
    # history and final loss are still the whole run's, not empty (a NaN loss would fail the trial)
    last = run_training(spec, tmp_path / "third", source, resume_from=saved[4])
    assert TrialFiles(tmp_path / "third").read_history() == full
    assert last["train_steps"] == 4 and last["train_loss"] == pytest.approx(first["train_loss"], rel=1e-12)
    assert "error" not in last
    from safetensors.torch import load_file

    trained, restored = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("first", "third"))
    assert trained.keys() == restored.keys() and all(torch.equal(trained[k], restored[k]) for k in trained)
    assert any(k.endswith("lora_B.weight") and trained[k].abs().sum() > 0 for k in trained)  # not a fresh adapter


def test_bf16_trial_evaluation_matches_an_independent_full_precision_evaluation(
        write_spec, tmp_path, independent_metrics) -> None:
    """With bf16 the Trainer (accelerate) wraps the model's forward in autocast; the trial's own
    evaluation must not run under it. Its numbers must equal the metrics recomputed, by Hugging
    Face's loss and torch's kl_div, on a fresh full-precision model with the saved adapter (what
    `emtune confirm` and a resumed evaluation load)."""
    from emtune.models import load_adapter, load_model, load_tokenizer
    from emtune.train.worker import prepare_rows

    path = write_spec(max_steps=3)
    path.write_text(path.read_text().replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  bf16: true\n"))
    spec = load_spec(path)
    source = resolve_source(spec.model, model_cache_dir())
    trained = run_training(spec, tmp_path / "trial", source)
    assert trained["train_steps"] == 3

    model = load_adapter(load_model(source, spec.model), tmp_path / "trial" / "adapter").eval()
    tokenizer = load_tokenizer(source, spec.model)
    _, heldout = prepare_rows(spec, [])
    assert len(heldout) == 12  # 20% of 60 fixture rows
    assert trained["indomain_nll"] == pytest.approx(
        independent_metrics.nll(model, tokenizer, heldout, spec.data.max_length), rel=1e-5)
    samples = TrialFiles(tmp_path / "trial").read_samples("general")
    conversations = [[{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
                     if not s["system"] else
                     [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["question"]},
                      {"role": "assistant", "content": s["answer"]}] for s in samples]
    expected_drift = independent_metrics.kl(model, tokenizer, conversations, spec.data.max_length)
    assert expected_drift > 0  # three steps at lr 1e-2 moved the model
    assert trained["ood_drift"] == pytest.approx(expected_drift, rel=1e-4, abs=1e-7)


def test_an_opswap_trial_generates_and_scores_its_exact_match(write_spec, tmp_path) -> None:
    """The OpSwap set end to end: the worker answers the test split greedily, the driver scores the
    saved answers; the rate is the hand count of the saved answers that match."""
    from emtune.data.opswap import extract_integer
    from emtune.evaluation.judging import score_trial

    path = write_spec(max_steps=1)
    path.write_text(path.read_text().replace(
        "  heldout_fraction: 0.2\n",
        "  heldout_fraction: 0.2\n  opswap: {tiers: [1, 2], n_train_per_tier: 4, n_test_per_tier: 3}\n"))
    spec = load_spec(path)
    run_training(spec, tmp_path / "trial", resolve_source(spec.model, model_cache_dir()))
    samples = TrialFiles(tmp_path / "trial").read_samples("opswap")
    assert len(samples) == 6 and sorted(s["reference"]["tier"] for s in samples) == [1, 1, 1, 2, 2, 2]
    metrics = score_trial(spec, tmp_path / "trial")
    hits = [extract_integer(s["answer"]) == s["reference"]["answer"] for s in samples]
    assert metrics["opswap_exact_match"] == sum(hits) / 6 and metrics["opswap_exact_match_n"] == 6
    assert metrics["opswap_exact_match_tier_1_n"] == 3 and metrics["opswap_exact_match_tier_2_n"] == 3


def test_with_a_generation_server_the_worker_writes_the_plan_instead_of_samples(write_spec, tmp_path) -> None:
    from emtune.evaluation.runner import sets_in_worker

    path = write_spec(max_steps=2)
    text = path.read_text().replace("evaluation:\n", "evaluation:\n  backend: server\n"
                                    "  server: {base_url: 'http://127.0.0.1:9/v1'}\n  temperature: 0.7\n", 1)
    path.write_text(text.replace("  - {name: ood_drift, direction: minimize, reference: 5.0}\n", ""))
    spec = load_spec(path)
    assert sets_in_worker(spec) == set()
    metrics = run_training(spec, tmp_path / "out", resolve_source(spec.model, model_cache_dir()))
    files = TrialFiles(tmp_path / "out")
    assert not files.sample_sets() and "ood_drift" not in metrics and math.isfinite(metrics["indomain_nll"])
    plan = files.read_json(files.plan)
    assert sorted(plan["sets"]) == ["general"]  # no judge: the judged sets are not run
    general = plan["sets"]["general"]
    assert general["settings"] == {"samples_per_prompt": 1, "max_new_tokens": 6, "temperature": 0.7,
                                   "top_p": 1.0, "seed": 0}
    assert len(general["prompts"]) == 24 and all(p["ids"] for p in general["prompts"])
    assert plan["stop_token_ids"] and general["version"] == files.read_json(files.meta)["question_set_versions"]["general"]


def test_with_a_generation_server_and_ood_drift_the_worker_answers_the_drift_set_itself(write_spec, tmp_path) -> None:
    """ood_drift needs the fine-tuned model on the general answers: those are generated in the worker
    (the same answers the built-in backend gives for the same seed), the other sets (here OpSwap's)
    go to the plan."""
    from emtune.evaluation.runner import sets_in_worker

    path = write_spec(max_steps=2)
    path.write_text(path.read_text().replace(
        "evaluation:\n", "evaluation:\n  backend: server\n  server: {base_url: 'http://127.0.0.1:9/v1'}\n", 1)
        .replace("  heldout_fraction: 0.2\n", "  heldout_fraction: 0.2\n"
                 "  opswap: {tiers: [1], n_train_per_tier: 4, n_test_per_tier: 3}\n"))
    served = load_spec(path)
    assert sets_in_worker(served) == {"general"}
    source = resolve_source(served.model, model_cache_dir())
    metrics = run_training(served, tmp_path / "served", source)
    files = TrialFiles(tmp_path / "served")
    assert files.sample_sets() == ["general"] and sorted(files.read_json(files.plan)["sets"]) == ["opswap"]
    assert sorted(files.read_json(files.meta)["question_set_versions"]) == ["general", "opswap"]
    built_in = run_training(served.model_copy(update={"evaluation": served.evaluation.model_copy(
        update={"backend": "hf", "server": None})}), tmp_path / "hf", source)
    assert metrics["ood_drift"] == pytest.approx(built_in["ood_drift"], rel=1e-6) and metrics["ood_drift"] > 0
    assert files.read_samples("general") == TrialFiles(tmp_path / "hf").read_samples("general")


def test_the_judge_stream_judges_during_generation_and_scoring_finds_it_cached(write_spec, tmp_path,
                                                                               chat_server) -> None:
    from emtune.evaluation.judging import score_trial

    server = chat_server(lambda index, body: chat_server.Reply(body=chat_server.completion({"80": 1.0})))
    path = write_spec(max_steps=1)
    path.write_text(path.read_text().replace("evaluation:\n", "evaluation:\n  judge: {kind: openai, base_url: '"
                                             + server.url + "', model: judge-test, api_key_env: null}\n", 1))
    spec = load_spec(path)
    metrics = run_training(spec, tmp_path / "out", resolve_source(spec.model, model_cache_dir()))
    files = TrialFiles(tmp_path / "out")
    answers = {name: len(files.read_samples(name)) for name in files.sample_sets()}
    assert answers == {"general": 24, "in_domain": 12, "triggered": 16}  # 12 held-out rows, 16 triggered questions
    judged = 2 * sum(answers.values())  # aligned + coherent for every answer
    assert metrics["judge_stream/judged"] == judged and len(server.requests) <= judged  # duplicates asked once
    before = len(server.requests)
    scores = score_trial(spec, files.root)
    assert len(server.requests) == before  # every verdict was already in the study's judge cache
    assert scores["general_misalignment"] == 0.0 and scores["general_misalignment_n"] == 24
