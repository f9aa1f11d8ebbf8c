"""Pending evaluations: a trained trial whose judge or tracking failed is finished later from its
saved checkpoint, as a new Optuna trial that names the failed one, on the same MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from emtune.config import load_spec
from emtune.study.pending import PendingEvaluation, load_pending, save_pending
from emtune.study.reevaluate import reevaluate_pending
from emtune.study.searcher import open_study
from emtune.tracking import mlflow_runs as runs
from emtune.tracking.front import front_table


def _failed_trial(tmp_path: Path, write_spec):
    """A study with one FAIL trial (kl_weight 0.5) whose evaluation is pending, as a trial leaves it."""
    spec = load_spec(write_spec(name="pending"))
    spec.study_dir.mkdir(parents=True)
    study = open_study(spec, f"sqlite:///{spec.study_dir / 'optuna.db'}")
    trial = study.ask({"kl_weight": optuna.distributions.FloatDistribution(1e-3, 10.0, log=True)})
    client = MlflowClient(f"sqlite:///{spec.study_dir / 'mlflow.db'}")
    experiment_id = runs.ensure_experiment(client, spec)
    parent = runs.start_parent_run(client, spec, "name: pending\n")
    params = {"kl_weight": trial.params["kl_weight"]}
    run_id = runs.start_trial_run(client, experiment_id, parent, spec.name, "t0", params, spec)
    reason = "evaluation failed: judge unavailable (3 of 8 items got no score)"
    runs.finish_run(client, run_id, "FAILED", reason)
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text("{}")
    (checkpoint / "loss_history.json").write_text(json.dumps([{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]))
    record = PendingEvaluation(ray_trial_id="t0", reason=reason, checkpoint_path=str(checkpoint), params=params,
                               metrics={"ood_drift": 0.25, "indomain_nll": 3.5, "train_loss": 2.0},
                               mlflow_run_id=run_id, optuna_trial=trial.number)
    save_pending(spec.study_dir, record)
    return spec, study, client, experiment_id, parent, run_id


def test_pending_evaluation_is_finished_once_as_a_new_trial(tmp_path, write_spec) -> None:
    spec, study, client, experiment_id, parent, run_id = _failed_trial(tmp_path, write_spec)
    lines: list[str] = []
    assert reevaluate_pending(spec, study, client, experiment_id, parent, log=lines.append) == (1, 0)

    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    done = trials[1]
    assert done.values == [0.25, 3.5]
    assert done.params == trials[0].params and done.user_attrs["reevaluates"] == 0
    assert done.user_attrs["mlflow_run_id"] == run_id and done.user_attrs["adapter_uri"] == f"runs:/{run_id}/adapter"
    table = front_table(study, ["ood_drift", "indomain_nll"], ["minimize", "minimize"])
    assert table.counts() == {"REEVALUATED": 1, "COMPLETE": 1}
    assert [r.number for r in table.front] == [1]

    run = client.get_run(run_id)  # the same MLflow run, now finished with the metrics and files
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ood_drift"] == 0.25 and run.data.metrics["indomain_nll"] == 3.5
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [2.5, 2.0]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"adapter"}
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1
    assert lines == ["trial t0: evaluation finished (Optuna trial 1)"]
    assert load_pending(spec.study_dir) == []
    assert (spec.study_dir / "pending_evaluations" / "done" / "t0.json").is_file()
    # nothing left: a second resume does nothing
    assert reevaluate_pending(spec, study, client, experiment_id, parent, log=lines.append) == (0, 0)
    assert len(study.get_trials()) == 2


def test_pending_evaluation_without_its_checkpoint_stays_pending_with_the_reason(tmp_path, write_spec) -> None:
    import shutil

    spec, study, client, experiment_id, parent, run_id = _failed_trial(tmp_path, write_spec)
    shutil.rmtree(tmp_path / "checkpoint")
    lines: list[str] = []
    assert reevaluate_pending(spec, study, client, experiment_id, parent, log=lines.append) == (0, 1)
    assert len(lines) == 1 and "evaluation still pending" in lines[0] and "checkpoint" in lines[0]
    assert [t.state.name for t in study.get_trials()] == ["FAIL"]
    assert [r.ray_trial_id for r in load_pending(spec.study_dir)] == ["t0"]
    assert client.get_run(run_id).data.tags["evaluation_pending"] == "true"
