"""Evaluation during training (the worker as a plain function): checkpoints evaluated at
`evaluation.at` without changing training, the monitor every M steps, and pruning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from emtune.config import load_spec
from emtune.evaluation.points import EvaluationPoint
from emtune.models import model_cache_dir, model_identity, resolve_source
from emtune.train.checkpoints import PruningRule
from emtune.train.worker import run_training
from emtune.trial_files import TrialFiles

MIN2 = ["minimize", "minimize"]


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_pruning_rule_by_hand() -> None:
    board = {"50%": [[0.1, 1.0], [0.2, 2.0], [0.5, 0.5], [0.3, 3.0]]}
    rule = PruningRule(["ood_drift", "indomain_nll"], MIN2, min_share=0.75, min_trials=4, board=board)
    point = EvaluationPoint("50%", 6)
    # (0.4, 3.5) is dominated by 3 of 4 ((0.5, 0.5) is not better in drift): 3 >= 0.75 * 4
    assert rule.decide(point, {"ood_drift": 0.4, "indomain_nll": 3.5}) == (
        "pruned at step 6: dominated by 3 of 4 trials on [ood_drift, indomain_nll]")
    assert rule.decide(point, {"ood_drift": 0.25, "indomain_nll": 3.5}) is None  # 2 of 4
    assert rule.decide(EvaluationPoint("25%", 3), {"ood_drift": 9, "indomain_nll": 9}) is None  # nobody there yet
    assert rule.decide(EvaluationPoint("final", 12), {"ood_drift": 9, "indomain_nll": 9}) is None  # never at the end
    few = PruningRule(["ood_drift"], ["minimize"], 0.5, min_trials=5, board=board)
    assert few.decide(point, {"ood_drift": 9.0}) is None  # 4 earlier trials < min_trials
    maximize = PruningRule(["opswap_exact_match"], ["maximize"], 1.0, 1, {"50%": [[0.9]]})
    assert maximize.decide(point, {"opswap_exact_match": 0.5}).startswith("pruned at step 6: dominated by 1 of 1")
    assert PruningRule.from_config(None) is None


@pytest.fixture
def tiny_points(write_spec, tmp_path):
    """The tiny spec trained for 4 steps and evaluated at step 2 (50%) and at the end."""
    path = write_spec(max_steps=4)
    path.write_text(path.read_text().replace("  max_new_tokens: 6\n", "  max_new_tokens: 6\n  at: [0.5]\n"))
    spec = load_spec(path).with_overrides({"kl_weight": 0.5})
    return spec, resolve_source(spec.model, model_cache_dir())


def test_checkpoints_are_evaluated_without_changing_training_and_pruning_stops_there(tiny_points, tmp_path) -> None:
    spec, source = tiny_points
    metrics = run_training(spec, tmp_path / "points", source)
    files = TrialFiles(tmp_path / "points")
    [checkpoint] = files.checkpoints()
    point = checkpoint.read_point()
    assert (point["label"], point["step"]) == ("50%", 2) and checkpoint.root.name == "step-2"
    assert set(point["metrics"]) >= {"ood_drift", "indomain_nll", "train_loss"}
    assert checkpoint.sample_sets() == ["general"] and len(checkpoint.read_samples("general")) == 24
    assert files.read_point()["label"] == "final" and files.read_point()["step"] == 4 == metrics["train_steps"]
    assert files.read_point()["metrics"]["ood_drift"] == metrics["ood_drift"]
    # the same trial evaluated only at the end trains to exactly the same adapter and metrics
    plain = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"at": ()})})
    alone = run_training(plain, tmp_path / "plain", source)
    final, other = _adapter(files.adapter), _adapter(tmp_path / "plain" / "adapter")
    assert all(torch.equal(final[k], other[k]) for k in final)
    assert (alone["ood_drift"], alone["indomain_nll"]) == (metrics["ood_drift"], metrics["indomain_nll"])
    assert not TrialFiles(tmp_path / "plain").checkpoints()
    # a board where 2 earlier trials dominate everything: pruned at step 2, nothing at the end
    board = {"metrics": ["ood_drift", "indomain_nll"], "directions": MIN2, "min_share": 1.0, "min_trials": 2,
             "board": {"50%": [[0.0, 0.0], [0.0, 0.1]]}}
    pruned = run_training(spec, tmp_path / "pruned", source, pruning=board)
    assert pruned["pruned"] == "pruned at step 2: dominated by 2 of 2 trials on [ood_drift, indomain_nll]"
    assert pruned["train_steps"] == 2 and "ood_drift" not in pruned
    stopped = TrialFiles(tmp_path / "pruned")
    assert not stopped.adapter.exists() and not stopped.point.exists()  # training ended at its checkpoint
    [kept] = stopped.checkpoints()
    assert kept.read_point()["pruned"] == pruned["pruned"]
    # the pruned trial's checkpoint is the unpruned trial's step-2 checkpoint, bit for bit
    a, b = _adapter(kept.adapter), _adapter(checkpoint.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert kept.read_point()["metrics"] == point["metrics"]


@pytest.mark.slow
def test_checkpoint_is_evaluated_unhooked_like_its_saved_adapter_and_the_monitor_logs(tiny_points, tmp_path) -> None:
    from emtune.defenses.persona_vectors import PersonaVectors, save_persona_vectors

    spec, source = tiny_points
    torch.manual_seed(1)
    hidden = spec.model.tiny.hidden_size
    vector = save_persona_vectors(PersonaVectors(torch.randn(spec.model.tiny.num_layers + 1, hidden),
                                                 {"model": model_identity(spec.model)}), tmp_path / "evil.pt")
    directions = tmp_path / "directions.pt"
    torch.save({"directions": {1: torch.randn(1, hidden)}}, directions)
    caft = {"name": "caft", "fraction": 1.0, "layers": [1], "directions_path": str(directions)}
    data = spec.model_dump(mode="python")
    data["defenses"] = [*data["defenses"], caft]
    data["evaluation"]["monitor"] = {"persona_vector": str(vector), "every_steps": 1}
    spec = type(spec).model_validate(data)
    metrics = run_training(spec, tmp_path / "out", source)
    files = TrialFiles(tmp_path / "out")
    rows = json.loads(files.monitor.read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == {"step", "ood_drift", "persona_projection", "persona_shift"} for r in rows)
    assert {"persona_projection", "persona_shift"} <= set(metrics)
    [checkpoint] = files.checkpoints()
    point = checkpoint.read_point()["metrics"]
    # re-evaluating the saved step-2 adapter on a fresh model (no CAFT hook) gives the same numbers
    again = run_training(spec, tmp_path / "again", source, adapter_dir=checkpoint.adapter)
    for name in ("indomain_nll", "ood_drift", "persona_projection", "persona_shift"):
        assert again[name] == pytest.approx(point[name], rel=1e-5, abs=1e-7), name


def test_a_resumed_trial_keeps_the_points_and_monitor_rows_of_its_earlier_attempt(tiny_points, tmp_path) -> None:
    """Both trial paths resume from a periodic Trainer checkpoint (Ray Train's, or the trial
    process's run folder): it carries the points evaluated before it, so a trial restarted after
    a crash still offers them as candidates and its monitor curve has no hole."""
    import shutil

    spec, source = tiny_points
    data = spec.model_dump(mode="python")
    data["training"]["checkpoint_every_steps"] = 2
    data["evaluation"]["at"] = (0.25,)  # step 1 of 4
    data["evaluation"]["monitor"] = {"every_steps": 1}
    spec = type(spec).model_validate(data)
    saved = {}

    def keep(step, folder):
        saved[step] = shutil.copytree(folder, tmp_path / f"kept-{step}")

    first = run_training(spec, tmp_path / "first", source, on_checkpoint=keep)
    whole = TrialFiles(tmp_path / "first")
    [point] = whole.checkpoints()
    assert point.root.name == "step-1" and sorted(saved) == [2, 4]
    carried = TrialFiles(saved[2])
    assert [c.read_point() for c in carried.checkpoints()] == [point.read_point()]
    assert [r["step"] for r in json.loads(carried.monitor.read_text())] == [1, 2]  # what existed at step 2
    # a fresh attempt (another temporary folder) resumes at step 2: step 1 is not trained or evaluated
    # again, yet the trial's folder offers it, and the monitor rows run 1..4
    resumed = run_training(spec, tmp_path / "second", source, resume_from=saved[2])
    again = TrialFiles(tmp_path / "second")
    [kept] = again.checkpoints()
    assert kept.read_point() == point.read_point()
    assert _adapter(kept.adapter).keys() == _adapter(point.adapter).keys()
    rows = json.loads(again.monitor.read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == json.loads(whole.monitor.read_text())[:2]
    assert resumed["train_steps"] == first["train_steps"] == 4


@pytest.mark.slow
def test_with_a_generation_server_a_checkpoint_is_answered_there_like_the_end(write_spec, tmp_path) -> None:
    """``evaluation.backend: server``: the worker writes each checkpoint's generation plan beside
    its drift answers (the monitor needs the model on those), and the driver's generation fills the
    checkpoint's planned sets exactly as the built-in engine answers them (greedy OpSwap)."""
    from emtune.evaluation.lora_server import LoraServer
    from emtune.evaluation.server_backend import generate_with_judge_stream

    path = write_spec(max_steps=4)
    spec = load_spec(path)
    source = resolve_source(spec.model, model_cache_dir())
    server = LoraServer(source).start()
    try:
        text = path.read_text().replace("evaluation:\n", "evaluation:\n  backend: server\n  server: {base_url: '"
                                        + server.url + "'}\n  at: [0.5]\n", 1)
        path.write_text(text.replace("  heldout_fraction: 0.2\n", "  heldout_fraction: 0.2\n"
                                     "  opswap: {tiers: [1], n_train_per_tier: 4, n_test_per_tier: 3}\n"))
        served = load_spec(path)
        run_training(served, tmp_path / "served", source)
        [checkpoint] = TrialFiles(tmp_path / "served").checkpoints()
        assert checkpoint.sample_sets() == ["general"] and sorted(checkpoint.read_json(checkpoint.plan)["sets"]) == ["opswap"]
        assert "ood_drift" in checkpoint.read_point()["metrics"]
        generate_with_judge_stream(served, checkpoint.root)  # what the driver's track_checkpoints does
    finally:
        server.stop()
    assert checkpoint.sample_sets() == ["general", "opswap"]
    built_in = served.model_copy(update={"evaluation": served.evaluation.model_copy(update={"backend": "hf", "server": None})})
    run_training(built_in, tmp_path / "hf", source)
    [alone] = TrialFiles(tmp_path / "hf").checkpoints()
    assert checkpoint.read_samples("opswap") == alone.read_samples("opswap") and len(alone.read_samples("opswap")) == 3
