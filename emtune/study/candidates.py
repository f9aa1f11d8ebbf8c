"""Checkpoint candidates: every evaluated point of a trial is a point of the study's front.

A trial evaluated at several points of its training (``evaluation.at``) offers one candidate per
point: "trial 7 @ step 300" is trial 7's fine-tune stopped at step 300. This module carries them
from the trial's folder to MLflow and to Optuna:

- :func:`track_checkpoints` (trial driver): one MLflow run per checkpoint, nested under the
  trial's run, with its judge-free metrics from the worker, the judge's where the spec asks
  (``evaluation.judge_points``), its answers (generated here on the generation server with
  ``evaluation.backend: server``, as the final point's are) and its adapter; the trial's run
  also gets every point's metrics stepped by training step, so its charts show them over
  training.
- :func:`tell_candidates` (searcher, re-evaluation): each checkpoint becomes an Optuna trial of
  its own, COMPLETE with its objective values and constraints. The final point is the trial itself.

Why each checkpoint is its own Optuna trial, with the trial's parameters and no stop-point
parameter: the sampler (TPE, GP, NSGA-II) then learns from every candidate through the storage it
already reads, with no change to it. Every trial is evaluated at every point, so the stop point is
not something the sampler proposes: what the next proposal needs is which parameters have *some*
good checkpoint, which is exactly the marginal over stop points these trials give it. A stop-point
parameter on the candidates but not on the asked trials would drop out of TPE's and GP's
intersection search space anyway. The stop point is kept as user attrs (``eval_step``,
``eval_point``, ``candidate_of`` = the trial's number) for tables, reports and the dashboard;
NSGA-II's generation attrs are copied from the trial, so a candidate is an individual of the
trial's generation. Candidates count toward TPE's start-up trials (that is the point: more
observations per fine-tune), never toward ``search.num_trials``.

:func:`pruning_config` builds what the worker's pruning rule compares against: each point's
judge-free values of the trials finished so far (:mod:`emtune.train.checkpoints`).
"""

from __future__ import annotations

from typing import Any

import optuna

from emtune.evaluation.config import without_judge
from emtune.evaluation.points import FINAL
from emtune.evaluation.sets import known_metrics
from emtune.numbers import finite_numbers
from emtune.study.outcomes import checkpoint_records, constraint_violations, outcome
from emtune.tracking.front import CANDIDATE_OF, EVAL_POINT, EVAL_STEP
from emtune.trial_files import TrialFiles

#: User attr holding a candidate's judge-free metrics (what pruning compares).
JUDGE_FREE = "judge_free"
#: Trial system attrs that belong to one Optuna trial only (not copied to its candidates).
_OWN_SYSTEM_ATTRS = ("constraints",)


def judge_free(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite judge-free metrics among ``metrics`` (the monitor, NLL, drift, losses)."""
    known = known_metrics()
    return {k: v for k, v in finite_numbers(metrics).items() if k in known and not known[k].judged}


# --- trial driver: MLflow ---------------------------------------------------------------------


def track_checkpoints(trial_spec: Any, files: TrialFiles, client: Any, run_id: str, trial_id: str,
                      params: dict[str, Any]) -> list[dict[str, Any]]:
    """Log every checkpoint of a trial folder as its own MLflow run (idempotent: a run already
    made for a checkpoint is reused); returns one record per checkpoint, by step."""
    from emtune.evaluation.judging import score_trial
    from emtune.evaluation.server_backend import generate_with_judge_stream
    from emtune.tracking import mlflow_runs as runs  # mlflow

    records = []
    judged = trial_spec.evaluation.judge_points == "all"
    score_spec = trial_spec if judged else without_judge(trial_spec)
    for point_files in files.checkpoints():
        point = point_files.read_point()
        candidate = runs.start_candidate_run(client, run_id, trial_id, point["step"], point["label"], params)
        if trial_spec.evaluation.backend == "server":  # the sets the worker planned for the server
            generate_with_judge_stream(score_spec, point_files.root)
        for name in point_files.sample_sets():
            runs.log_samples_table(client, candidate, point_files.samples(name), name)
        metrics = dict(point["metrics"])
        record = {"step": point["step"], "point": point["label"], "mlflow_run_id": candidate}
        if point_files.adapter.is_dir():
            runs.log_dir(client, candidate, point_files.adapter, "adapter")
            record["adapter_uri"] = f"runs:/{candidate}/adapter"
            runs.set_tags(client, candidate, {"adapter_uri": record["adapter_uri"]})
        metrics.update(score_trial(score_spec, point_files.root, client, candidate))
        runs.log_final_metrics(client, candidate, metrics, step=point["step"])
        runs.log_final_metrics(client, run_id, metrics, step=point["step"])
        if point.get("pruned"):
            runs.set_tags(client, candidate, {"pruned": point["pruned"]})
        runs.finish_run(client, candidate, "FINISHED")
        records.append({**record, "metrics": finite_numbers(metrics)})
    return records


def tracked_checkpoints(client: Any, run_id: str) -> list[dict[str, Any]]:
    """The checkpoint records of an already tracked trial, read back from its candidate runs."""
    from emtune.tracking import mlflow_runs as runs  # mlflow

    out = []
    for run in runs.candidate_runs(client, run_id):
        record = {"step": int(run.data.tags[EVAL_STEP]), "point": run.data.tags[EVAL_POINT],
                  "mlflow_run_id": run.info.run_id, "metrics": dict(run.data.metrics)}
        if run.data.tags.get("adapter_uri"):
            record["adapter_uri"] = run.data.tags["adapter_uri"]
        out.append(record)
    return sorted(out, key=lambda r: r["step"])


# --- searcher: Optuna -------------------------------------------------------------------------


def tell_candidates(study: optuna.Study, spec: Any, trial: Any, result: dict[str, Any] | None,
                    baselines: dict[str, dict]) -> list[int]:
    """Add the checkpoints of ``result`` as COMPLETE Optuna trials beside ``trial`` (a frozen
    trial: its params, distributions and generation); returns their numbers. A checkpoint that
    lacks an objective (e.g. a judged one with ``judge_points: final``) is no candidate."""
    numbers = []
    system = {k: v for k, v in trial.system_attrs.items() if not k.startswith(_OWN_SYSTEM_ATTRS)}
    for record in checkpoint_records(result):
        metrics = record["metrics"]
        state, values, _ = outcome(spec, metrics, False, baselines)
        if state != optuna.trial.TrialState.COMPLETE:
            continue
        attrs = {CANDIDATE_OF: trial.number, EVAL_STEP: record["step"], EVAL_POINT: record["point"],
                 JUDGE_FREE: judge_free(metrics), "mlflow_run_id": record.get("mlflow_run_id"),
                 "adapter_uri": record.get("adapter_uri"), "ray_trial_id": trial.user_attrs.get("ray_trial_id")}
        attrs = {k: v for k, v in attrs.items() if v is not None}
        constraints = constraint_violations(spec.constraints, metrics, baselines) if spec.constraints else None
        study.add_trial(optuna.trial.create_trial(
            state=state, values=values, params=trial.params, distributions=trial.distributions,
            user_attrs=attrs, system_attrs=system, constraints=constraints))
        numbers.append(study.trials[-1].number)
    return numbers


def final_point_attrs(result: dict[str, Any] | None) -> dict[str, Any]:
    """User attrs of a trial's own (final) point: its step, label and judge-free metrics."""
    if not result or "train_steps" not in result:
        return {}
    if result.get("pruned"):  # its points are its checkpoints; the step says where it stopped
        return {EVAL_STEP: int(result["train_steps"])}
    return {EVAL_STEP: int(result["train_steps"]), EVAL_POINT: FINAL, JUDGE_FREE: judge_free(result)}


def pruning_config(spec: Any, study: optuna.Study, metrics: list[tuple[str, str]]) -> dict[str, Any] | None:
    """What a new trial's pruning rule compares against: per point label, the judge-free values
    of ``metrics`` (``(name, direction)`` pairs) of every finished trial that reached the point."""
    pruning = spec.search.pruning
    if not pruning.enabled or not metrics:
        return None
    names = [name for name, _ in metrics]
    board: dict[str, dict[int, list[float]]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)):
        values, label = t.user_attrs.get(JUDGE_FREE) or {}, t.user_attrs.get(EVAL_POINT)
        if label and all(n in values for n in names):
            owner = t.user_attrs.get(CANDIDATE_OF, t.number)
            board.setdefault(label, {})[owner] = [float(values[n]) for n in names]
    return {"metrics": names, "directions": [d for _, d in metrics], "min_share": pruning.min_share,
            "min_trials": pruning.min_trials, "board": {k: list(v.values()) for k, v in board.items()}}


def is_candidate(trial: Any) -> bool:
    """True for a checkpoint candidate (an Optuna trial that is not a fine-tune of its own)."""
    return CANDIDATE_OF in trial.user_attrs
