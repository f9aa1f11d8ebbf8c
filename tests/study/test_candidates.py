"""Checkpoint candidates through the searcher (a real persistent Optuna study), the front table,
the MLflow front and the adapter storage policy (a real MLflow store), without Ray."""

from __future__ import annotations

import json

import optuna
import pytest

from emtune.config import load_spec
from emtune.evaluation.checkpoint_checks import pruning_metrics
from emtune.study.candidates import pruning_config
from emtune.study.searcher import EmtuneSearcher
from emtune.tracking.front import front_table

STATES = optuna.trial.TrialState


def _spec(write_spec, extra: str = "", at: str = "[0.25, 0.5]"):
    path = write_spec(max_steps=8)
    text = path.read_text().replace("  max_new_tokens: 6\n", f"  max_new_tokens: 6\n  at: {at}\n{extra}")
    text = text.replace("  num_trials: 2\n", "  num_trials: 2\n  pruning: {enabled: true, min_trials: 1, min_share: 0.5}\n")
    path.write_text(text)
    return load_spec(path)


def _checkpoint(step, point, drift, nll, run=None):
    return {"step": step, "point": point, "mlflow_run_id": run, "adapter_uri": f"runs:/{run}/adapter" if run else None,
            "metrics": {"ood_drift": drift, "indomain_nll": nll, "train_loss": 5.0}}


def _candidates(study):
    """(trial number, step) -> the checkpoint candidate's Optuna trial."""
    return {(t.user_attrs["candidate_of"], t.user_attrs["eval_step"]): t for t in study.get_trials()
            if "candidate_of" in t.user_attrs}


def test_every_checkpoint_is_an_optuna_trial_and_a_pruned_trial_keeps_its_candidates(write_spec, tmp_path) -> None:
    spec = _spec(write_spec)
    searcher = EmtuneSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")
    first = searcher.suggest("ray-a")
    assert first["pruning"] == {"metrics": ["ood_drift", "indomain_nll"], "directions": ["minimize", "minimize"],
                                "min_share": 0.5, "min_trials": 1, "board": {}}  # nobody finished yet
    searcher.on_trial_complete("ray-a", {
        "ood_drift": 0.3, "indomain_nll": 4.0, "train_loss": 4.5, "train_steps": 8, "mlflow_run_id": "ra",
        "adapter_uri": "runs:/ra/adapter",
        "checkpoints": [_checkpoint(2, "25%", 0.1, 5.0, "ra2"), _checkpoint(4, "50%", 0.2, 4.5, "ra4")]})
    second = searcher.suggest("ray-b")
    # what trial b is compared with at each point: trial a's values there
    assert second["pruning"]["board"] == {"25%": [[0.1, 5.0]], "50%": [[0.2, 4.5]], "final": [[0.3, 4.0]]}
    reason = "pruned at step 4: dominated by 1 of 1 trials on [ood_drift, indomain_nll]"
    # as a trial reports them through Ray Tune: one JSON string (Tune flattens dicts, warns on lists)
    searcher.on_trial_complete("ray-b", {
        "pruned": reason, "train_steps": 4, "mlflow_run_id": "rb",
        "checkpoints": json.dumps([_checkpoint(4, "50%", 0.25, 4.6, "rb4"), _checkpoint(2, "25%", 0.05, 6.0, "rb2")])})

    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = _candidates(study)
    a, b = study.trials[first["optuna_trial"]], study.trials[second["optuna_trial"]]
    assert a.state == STATES.COMPLETE and a.values == [0.3, 4.0]
    assert (a.user_attrs["eval_point"], a.user_attrs["judge_free"]) == ("final", {"ood_drift": 0.3, "indomain_nll": 4.0,
                                                                                "train_loss": 4.5})
    assert b.state == STATES.PRUNED and b.user_attrs["fail_reason"] == reason and b.values is None
    for owner, step, values, run in [(a.number, 2, [0.1, 5.0], "ra2"), (a.number, 4, [0.2, 4.5], "ra4"),
                                     (b.number, 2, [0.05, 6.0], "rb2"), (b.number, 4, [0.25, 4.6], "rb4")]:
        candidate = trials[(owner, step)]
        assert candidate.number != owner and candidate.state == STATES.COMPLETE and candidate.values == values
        assert candidate.params == study.trials[owner].params  # the trial's own params
        assert candidate.distributions == a.distributions
        assert (candidate.user_attrs["mlflow_run_id"], candidate.user_attrs["adapter_uri"]) == (run, f"runs:/{run}/adapter")
        assert candidate.user_attrs["ray_trial_id"] == ("ray-a" if owner == a.number else "ray-b")
    # the board now holds both trials at 25% and 50%, and only a at the end
    board = pruning_config(spec, study, pruning_metrics(spec))["board"]
    assert sorted(board["25%"]) == [[0.05, 6.0], [0.1, 5.0]] and board["final"] == [[0.3, 4.0]]

    table = front_table(study, ["ood_drift", "indomain_nll"], ["minimize", "minimize"], [5.0, 8.0])
    assert table.counts() == {"COMPLETE": 1, "PRUNED": 1} and table.candidates == 5
    # front: b@2 (0.05, 6.0), a@2 (0.1, 5.0), a@4 (0.2, 4.5), a (0.3, 4.0); b@4 (0.25, 4.6) is dominated by a@4
    assert [r.label for r in table.front] == [f"{b.number} @ step 2", f"{a.number} @ step 2",
                                               f"{a.number} @ step 4", f"{a.number}"]
    rows = {r["number"]: r for r in table.to_dict()["trials"]}
    assert rows[trials[(b.number, 4)].number]["trial"] == b.number and rows[trials[(b.number, 4)].number]["step"] == 4
    assert rows[a.number]["step"] == 8 and rows[a.number]["point"] == "final"
    # hypervolume after each finished trial (a with its checkpoints, then b's): reference (5, 8)
    hv_a = 0.1 * 3.0 + 0.1 * 3.5 + 4.7 * 4.0  # slabs at drift 0.1, 0.2, 0.3 .. 5
    assert table.hypervolume_trials == pytest.approx([hv_a, hv_a + 0.05 * 2.0])


def test_a_checkpoint_without_its_objectives_is_no_candidate(write_spec, tmp_path) -> None:
    spec = _spec(write_spec)
    searcher = EmtuneSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher.suggest("ray-a")
    searcher.on_trial_complete("ray-a", {"ood_drift": 0.3, "indomain_nll": 4.0, "train_steps": 8, "checkpoints": [
        {"step": 2, "point": "25%", "metrics": {"indomain_nll": 5.0}}]})
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.get_trials()) == 1


@pytest.mark.parametrize("policy, removed", [("all", set()), ("final", {"ra2"}), ("front", {"ra2", "rb"})])
def test_the_mlflow_front_shows_candidates_and_the_storage_policy_drops_dominated_adapters(
        write_spec, tmp_path, policy, removed) -> None:
    from mlflow.tracking import MlflowClient

    from emtune.study.callbacks import publish_front
    from emtune.tracking import mlflow_runs as runs

    spec = _spec(write_spec, f"  keep_adapters: {policy}\n", at="[0.25]")
    client = MlflowClient(runs.tracking_uri(spec))
    parent = runs.start_parent_run(client, spec, "spec")
    experiment = client.get_run(parent).info.experiment_id
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    ids = {}
    for name in ("a", "b"):
        ids[f"r{name}"] = runs.start_trial_run(client, experiment, parent, spec.name, f"ray-{name}", {}, spec)
        ids[f"r{name}2"] = runs.start_candidate_run(client, ids[f"r{name}"], f"ray-{name}", 2, "25%", {})
    for run in ids.values():
        runs.log_dir(client, run, adapter, "adapter")
    searcher = EmtuneSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")
    # trial a: its step-2 checkpoint (0.5, 6) is dominated by trial b's end (0.2, 5); b's end by a's
    for name, final, early in [("a", (0.1, 4.0), (0.5, 6.0)), ("b", (0.2, 5.0), (0.05, 7.0))]:
        searcher.suggest(f"ray-{name}")
        searcher.on_trial_complete(f"ray-{name}", {
            "ood_drift": final[0], "indomain_nll": final[1], "train_steps": 8, "mlflow_run_id": ids[f"r{name}"],
            "adapter_uri": f"runs:/{ids[f'r{name}']}/adapter",
            "checkpoints": [_checkpoint(2, "25%", *early, ids[f"r{name}2"])]})
    table = publish_front(client, parent, spec, searcher.study)
    # trial a is Optuna trial 0 (its checkpoint 1), trial b is 2: the front is a's end and b's checkpoint
    assert sorted(r.label for r in table.front) == ["0", "2 @ step 2"]
    for key, run in ids.items():
        artifacts = [a.path for a in client.list_artifacts(run)]
        assert ("adapter" in artifacts) == (key not in removed), (key, artifacts)
    assert client.get_run(ids["ra2"]).data.tags["pareto_rank"] == "2"  # behind b's end, which a's end dominates
    assert client.get_run(ids["rb2"]).data.tags["pareto_rank"] == "0"
    assert client.get_run(ids["rb2"]).data.tags["trial"] == "2"
    import json

    logged = json.loads(open(client.download_artifacts(parent, "front/front_table.json", str(tmp_path))).read())
    front = dict(zip(logged["columns"], zip(*logged["data"])))
    assert sorted(front["candidate"]) == ["0", "2 @ step 2"] and sorted(front["step"]) == [2, 8]
    kept = {r.label: r.adapter_uri for r in front_table(searcher.study, ["ood_drift", "indomain_nll"],
                                                        ["minimize", "minimize"]).rows}
    assert (kept["0 @ step 2"] is None) == ("ra2" in removed) and (kept["2"] is None) == ("rb" in removed)
