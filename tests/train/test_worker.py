"""The worker loop as a plain function: trains, saves the adapter, evaluates."""

from __future__ import annotations

import math

import pytest

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
    samples = (tmp_path / "out" / "samples_general.jsonl").read_text().splitlines()
    assert len(samples) == 24  # 24 general questions x 1 sample


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

    run_training(spec, tmp_path / "first", source, on_checkpoint=keep)
    assert sorted(saved) == [2, 4]
    assert (saved[2] / "optimizer.pt").is_file() and (saved[2] / "trainer_state.json").is_file()
    metrics = run_training(spec, tmp_path / "second", source, resume_from=saved[2])
    history = TrialFiles(tmp_path / "second").read_history()
    assert [row["step"] for row in history] == [3, 4]  # steps 1-2 came from the checkpoint
    assert metrics["train_steps"] == 4


def test_bf16_trial_evaluates_like_a_re_evaluation_of_its_adapter(write_spec, tmp_path) -> None:
    """With bf16 the Trainer (accelerate) wraps the model's forward in autocast; the trial's own
    evaluation must not run under it, or `emtune confirm` / a resumed evaluation (a fresh model
    with the saved adapter, full precision) would report different numbers for the same adapter."""
    path = write_spec(max_steps=3)
    path.write_text(path.read_text().replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  bf16: true\n"))
    spec = load_spec(path)
    source = resolve_source(spec.model, model_cache_dir())
    trained = run_training(spec, tmp_path / "trial", source)
    again = run_training(spec, tmp_path / "again", source, adapter_dir=tmp_path / "trial" / "adapter")
    assert trained["train_steps"] == 3 and again["train_steps"] == 0
    for key in ("indomain_nll", "ood_drift"):
        assert again[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-7), key
