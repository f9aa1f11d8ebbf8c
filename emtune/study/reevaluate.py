"""Finish evaluations that failed after training, once the judge or tracking server is back.

A trial whose fine-tune succeeded but whose judge or MLflow server stayed down past its retries
ends FAIL (the search must go on), and leaves a *pending evaluation* record in
``<study>/pending_evaluations/``: its Ray trial id, params, the metrics it already has (training
and judge-free evaluation), the failure reason and its saved checkpoint (adapter and generated
samples). ``emtune resume`` runs :func:`reevaluate_pending` first: it re-runs the trial's
evaluation-and-tracking step (:func:`emtune.study.trial.evaluate_and_track`) from that
checkpoint, without training again, and

- tells Optuna the outcome as a new trial with the same params and distributions and a
  ``reevaluates`` user attr naming the failed one (Optuna never changes a finished trial; the
  front shows the failed one as ``REEVALUATED``), or for a baseline trial updates its record;
- closes the trial's existing MLflow run FINISHED with the metrics (no second run).

A record whose evaluation fails again stays pending, with the new reason printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import optuna

from emtune.study.outcomes import (
    RESULT_ATTRS, baseline_key, baseline_record, constraint_violations, outcome, study_baselines,
)
from emtune.study.candidates import final_point_attrs, tell_candidates
from emtune.study.pending import PendingEvaluation, load_pending, resolve_pending
from emtune.study.trial import close_run, evaluate_and_track, evaluation_reason
from emtune.tracking import mlflow_runs as runs

REEVALUATES = "reevaluates"


def reevaluate_pending(spec: Any, study: Any, client: Any, experiment_id: str, parent_run_id: str,
                       log: Callable[[str], None] = print) -> tuple[int, int]:
    """Finish every pending evaluation; returns (finished, still pending)."""
    finished = failed = 0
    for record in load_pending(spec.study_dir):
        if record.optuna_trial is not None and _superseded(study, record.optuna_trial):
            resolve_pending(spec.study_dir, record)  # told before a crash: nothing left to do
            continue
        trial_spec = spec.with_overrides(record.params)
        if record.baseline:
            trial_spec = trial_spec.model_copy(update={"defenses": ()})
        checkpoint = Path(record.checkpoint_path)
        try:
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"the trial's checkpoint {checkpoint} is gone")
            run_id = runs.start_trial_run(client, experiment_id, parent_run_id, spec.name, record.ray_trial_id,
                                          record.params, trial_spec, baseline=record.baseline)
            metrics = evaluate_and_track(trial_spec, checkpoint, client, run_id, dict(record.metrics),
                                         trial_id=record.ray_trial_id, params=record.params)
        except Exception as exc:  # noqa: BLE001 - still down: keep the record, say why
            reason = evaluation_reason(exc, runs.tracking_uri(spec), spec)
            if record.mlflow_run_id:
                close_run(client, record.mlflow_run_id, reason, pending=True)
            log(f"trial {record.ray_trial_id}: evaluation still pending: {reason}")
            failed += 1
            continue
        number = _tell(spec, study, record, metrics)
        resolve_pending(spec.study_dir, record)
        finished += 1
        told = f"Optuna trial {number}" if number is not None else f"baseline {record.baseline!r}"
        log(f"trial {record.ray_trial_id}: evaluation finished ({told})")
    return finished, failed


def _superseded(study: Any, number: int) -> bool:
    return any(t.user_attrs.get(REEVALUATES) == number for t in study.get_trials(deepcopy=False))


def _tell(spec: Any, study: Any, record: PendingEvaluation, metrics: dict[str, Any]) -> int | None:
    """Record the finished evaluation in Optuna; the new trial's number (None for a baseline)."""
    if record.baseline:
        kinds = [record.baseline]
        if record.baseline == "undefended" and "stopped_early" in spec.baselines.kinds:
            kinds.append("stopped_early")  # one undefended fine-tune measures both
        for kind in kinds:
            study.set_user_attr(baseline_key(kind), baseline_record(metrics, False, kind))
        return None
    baselines = study_baselines(spec, study)
    state, values, reason = outcome(spec, metrics, False, baselines)
    attrs = {key: metrics[key] for key in RESULT_ATTRS if metrics.get(key)}
    attrs["ray_trial_id"] = record.ray_trial_id
    constraints = None
    if record.optuna_trial is not None:
        failed = study.trials[record.optuna_trial]
        params, distributions = failed.params, failed.distributions
        attrs[REEVALUATES] = record.optuna_trial
    else:  # the trial's Optuna number was not recorded: keep its Tune params
        params, distributions = {}, {}
    if reason:
        attrs["fail_reason"] = reason
    if spec.constraints:
        constraints = constraint_violations(spec.constraints, metrics, baselines)
    attrs.update(final_point_attrs(metrics))
    frozen = optuna.trial.create_trial(state=state, values=values, params=params, distributions=distributions,
                                       user_attrs=attrs, constraints=constraints)
    study.add_trial(frozen)
    told = study.trials[-1]
    tell_candidates(study, spec, told, metrics, baselines)
    return told.number
