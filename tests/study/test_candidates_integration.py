"""Checkpoint candidates and pruning in a real study: local Ray, SQLite MLflow, Optuna."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow


def test_candidates_per_checkpoint_and_a_pruned_trial_keeps_its_candidates(write_spec, capsys, ray_session) -> None:
    path = write_spec(name="cands", max_steps=4, num_trials=2, baselines="true")
    text = path.read_text().replace("  max_new_tokens: 6\n", "  max_new_tokens: 6\n  at: [0.25, 0.5]\n")
    text = text.replace("  num_trials: 2\n", "  num_trials: 2\n  pruning: {enabled: true, min_trials: 2, min_share: 0.5}\n")
    path.write_text(text.replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1}"))
    study_dir = path.parent / "studies" / "cands"
    study_dir.mkdir(parents=True)
    # an earlier study's point at 50% that dominates everything: the second real trial (the first
    # then also has a value there: min_trials 2) is dominated by 1 or 2 of 2 and pruned at step 2
    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="cands", storage=storage, directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params={"kl_weight": 1.0},
        distributions={"kl_weight": optuna.distributions.FloatDistribution(1e-3, 10.0, log=True)},
        user_attrs={"candidate_of": 99, "eval_step": 2, "eval_point": "50%",
                    "judge_free": {"ood_drift": 0.0, "indomain_nll": 0.0}}))
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    capsys.readouterr()

    study = optuna.load_study(study_name="cands", storage=storage)
    trials = [t for t in study.get_trials() if "candidate_of" not in t.user_attrs]
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    done, pruned = trials
    reason = pruned.user_attrs["fail_reason"]
    assert re.fullmatch(r"pruned at step 2: dominated by [12] of 2 trials on \[ood_drift, indomain_nll\]", reason)
    candidates = {(t.user_attrs["candidate_of"], t.user_attrs["eval_step"]): t for t in study.get_trials()
                  if t.user_attrs.get("candidate_of") in (done.number, pruned.number)}
    # Optuna: one COMPLETE trial per checkpoint, the trial's own params; the pruned trial keeps its two
    assert sorted(candidates) == [(done.number, 1), (done.number, 2), (pruned.number, 1), (pruned.number, 2)]
    assert all(c.state.name == "COMPLETE" and len(c.values) == 2 for c in candidates.values())
    assert candidates[(pruned.number, 2)].params == pruned.params and done.user_attrs["eval_step"] == 4

    # MLflow: each checkpoint is a run nested under its trial's run, with its metrics and adapter
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    for trial in (done, pruned):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        nested = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert sorted(int(r.data.tags["eval_step"]) for r in nested) == [1, 2]
        for child in nested:
            candidate = candidates[(trial.number, int(child.data.tags["eval_step"]))]
            assert candidate.user_attrs["mlflow_run_id"] == child.info.run_id
            assert child.data.metrics["ood_drift"] == pytest.approx(candidate.values[0])
            # kept while on the front; a dominated checkpoint's adapter goes (keep_adapters: final)
            rank = child.data.tags["pareto_rank"]
            kept = "adapter" in {a.path for a in client.list_artifacts(child.info.run_id)}
            assert kept == (rank == "0") == (candidate.number not in study.user_attrs.get("adapters_removed", []))
        # the trial's own run charts every point's metrics by training step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "indomain_nll")]
        assert steps == ([1, 2, 4] if trial is done else [1, 2])
    assert client.get_run(pruned.user_attrs["mlflow_run_id"]).data.tags["pruned"] == reason

    # pareto --format json: every candidate with its trial and step, the stopped-early baseline
    assert main(["pareto", str(study_dir), "--all", "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    # the pruned trial's own row (PRUNED, at the step it stopped) shares its step with its last checkpoint
    [stopped] = [r for r in table["trials"] if r["number"] == pruned.number]
    assert (stopped["state"], stopped["trial"], stopped["step"], stopped["values"]) == ("PRUNED", pruned.number, 2, None)
    rows = {(r["trial"], r["step"]): r for r in table["trials"] if r["state"] == "COMPLETE"}
    for (owner, step), candidate in candidates.items():
        assert rows[(owner, step)]["number"] == candidate.number
        assert rows[(owner, step)]["values"] == dict(zip(["ood_drift", "indomain_nll"], candidate.values))
    assert rows[(done.number, 4)]["point"] == "final" and rows[(pruned.number, 2)]["state"] == "COMPLETE"
    assert all({"trial", "step"} <= set(r) for r in table["front"])
    assert table["counts"] == {"COMPLETE": 1, "PRUNED": 1} and table["candidates"] == 5
    assert [p["step"] for p in table["baselines"]["stopped_early"]["points"]] == [1, 2, 4]


def test_a_worker_group_trial_offers_its_checkpoints_too(write_spec, capsys, ray_session) -> None:
    """The same candidates when the trial trains in a Ray Train worker group (train_process:
    workers) instead of its own process, with periodic checkpoints reported to Ray Train."""
    path = write_spec(name="grouped", max_steps=4, num_trials=1)
    text = path.read_text().replace("  max_new_tokens: 6\n", "  max_new_tokens: 6\n  at: [0.5]\n")
    text = text.replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1, train_process: workers}")
    path.write_text(text.replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  checkpoint_every_steps: 2\n"))
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    capsys.readouterr()
    study_dir = path.parent / "studies" / "grouped"
    study = optuna.load_study(study_name="grouped", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    [trial] = [t for t in study.get_trials() if "candidate_of" not in t.user_attrs]
    [candidate] = [t for t in study.get_trials() if t.user_attrs.get("candidate_of") == trial.number]
    assert trial.state.name == "COMPLETE" and trial.user_attrs["eval_step"] == 4
    assert candidate.state.name == "COMPLETE" and candidate.user_attrs["eval_step"] == 2
    assert candidate.params == trial.params and candidate.user_attrs["mlflow_run_id"] != trial.user_attrs["mlflow_run_id"]
    assert main(["pareto", str(study_dir), "--all", "--format", "json"]) == 0
    rows = {(r["trial"], r["step"]) for r in json.loads(capsys.readouterr().out)["trials"]}
    assert {(trial.number, 2), (trial.number, 4)} <= rows
