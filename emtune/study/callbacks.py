"""Tune callbacks in the study driver: the live front in MLflow, and progress lines.

Callbacks run after the searcher has told Optuna the trial's outcome (Ray's controller calls the
search algorithm first), so the front read from the Optuna study already includes the trial.
"""

from __future__ import annotations

import sys
import time
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from emtune.config import StudySpec
from emtune.tracking import mlflow_runs as runs
from emtune.tracking.front import ADAPTERS_REMOVED, FrontTable, front_table
from emtune.tracking.plots import plot_front


def study_front(spec: StudySpec, study: Any) -> FrontTable:
    """The study's current front table, with the spec's reference point when it gives one."""
    references = [o.reference for o in spec.objectives]
    return front_table(study, [o.name for o in spec.objectives], [o.direction for o in spec.objectives],
                       None if None in references else references)


def publish_front(client: Any, parent_run_id: str, spec: StudySpec, study: Any) -> FrontTable:
    """Write the current front to the parent run and ``pareto_rank`` tags to the candidates' runs
    (trials and their checkpoints); apply the adapter storage policy."""
    objectives = [o.name for o in spec.objectives]
    table = study_front(spec, study)
    for row in table.rows:
        if row.mlflow_run_id and row.state == "COMPLETE":
            runs.set_tags(client, row.mlflow_run_id, {
                "pareto_rank": "infeasible" if row.rank is None else str(row.rank),
                "optuna_trial": str(row.number),
                "trial": str(row.trial),
            })
    drop_dominated_adapters(client, spec, study, table)
    runs.log_json(client, parent_run_id, table.to_dict(), "front/front.json")
    front = table.front
    if front:
        columns: dict[str, list[Any]] = {"trial": [r.trial for r in front], "step": [r.step for r in front],
                                         "candidate": [r.label for r in front],
                                         "mlflow_run_id": [r.mlflow_run_id for r in front],
                                         "adapter_uri": [r.adapter_uri for r in front]}
        for i, name in enumerate(objectives):
            columns[name] = [r.values[i] for r in front]
        for key in sorted({k for r in front for k in r.params}):
            columns[key] = [r.params.get(key) for r in front]
        client.log_table(parent_run_id, data=columns, artifact_file="front/front_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_front(table, Path(tmp) / "front.png", title=f"{spec.name}: Pareto front",
                             stopped_early=not any(o.relative for o in spec.objectives))
            client.log_artifact(parent_run_id, str(png), "front")
    if table.hypervolume:
        step = len(table.hypervolume_trials)  # finished fine-tunes
        client.log_metric(parent_run_id, "hypervolume", table.hypervolume[-1], step=step)
        client.log_metric(parent_run_id, "front_size", len(front), step=step)
        client.log_metric(parent_run_id, "candidates", table.candidates, step=step)
    counts = table.counts()
    runs.set_tags(client, parent_run_id, {"trials." + k.lower(): str(v) for k, v in counts.items()})
    return table


def drop_dominated_adapters(client: Any, spec: StudySpec, study: Any, table: FrontTable) -> int:
    """``evaluation.keep_adapters``: remove the adapters of candidates that are off the front for
    good (dominated or infeasible: later trials can only add dominating points) unless the policy
    keeps them (``final``: every trial's own adapter; ``all``: every adapter). A finished Optuna
    trial cannot change, so the removed ones are listed in the study's ``adapters_removed`` attr
    (front tables show no adapter for them) and tagged ``adapter_removed`` in MLflow; returns how
    many were removed now."""
    policy = spec.evaluation.keep_adapters
    if policy == "all":
        return 0
    removed = list(study.user_attrs.get(ADAPTERS_REMOVED, []))
    for row in table.rows:
        if row.rank == 0 or row.state != "COMPLETE" or not row.adapter_uri or not row.mlflow_run_id:
            continue
        if policy == "final" and not row.checkpoint:
            continue
        runs.delete_artifacts(client, runs.tracking_uri(spec), row.mlflow_run_id, "adapter")
        reason = f"{'dominated' if row.rank is not None else 'infeasible'} (evaluation.keep_adapters = {policy})"
        runs.set_tags(client, row.mlflow_run_id, {"adapter_removed": reason})
        row.adapter_uri = None
        removed.append(row.number)
    count = len(removed) - len(study.user_attrs.get(ADAPTERS_REMOVED, []))
    if count:
        study.set_user_attr(ADAPTERS_REMOVED, removed)
    return count


class StudyProgress(Callback):
    """Keeps the parent run's front current and prints one progress line per trial event."""

    def __init__(self, spec: StudySpec, client: Any, parent_run_id: str, searcher: Any, total: int | None = None):
        self._spec = spec
        # what this Tuner runs, baselines included (a topped-up or extended study runs fewer)
        self._total = spec.trial_count if total is None else total
        self._client = client
        self._parent = parent_run_id
        self._searcher = searcher
        self._front_size = 0
        self._failed = 0
        self._started = time.monotonic()

    def _line(self, trials: list[Any], event: str, reason: str | None = None) -> None:
        states: dict[str, int] = {}
        for trial in trials:
            states[trial.status] = states.get(trial.status, 0) + 1
        # Failed fine-tunes report their reason and end TERMINATED in Tune: count them from Optuna
        failed = self._failed + states.get("ERROR", 0)
        done = max(0, states.get("TERMINATED", 0) - self._failed)
        elapsed = int(time.monotonic() - self._started)
        print(
            f"[emtune {elapsed // 60}:{elapsed % 60:02d}] {event}: {done} done, {states.get('RUNNING', 0)} running, "
            f"{failed} failed, {states.get('PENDING', 0)} pending of {self._total} "
            f"(baselines included); front size {self._front_size}",
            file=sys.stdout, flush=True,  # looked up per call: Tune pickles callbacks
        )
        if reason:  # the root cause and its last frames, indented under the line
            print("\n".join("    " + line.strip() for line in str(reason).splitlines()), file=sys.stdout, flush=True)

    def _refresh(self) -> None:
        try:
            table = publish_front(self._client, self._parent, self._spec, self._searcher.study)
        except Exception as exc:  # the tracking server is down past its retries: the study goes on
            if not runs.tracking_outage(exc):
                raise
            print(f"[emtune] MLflow unreachable, front not published yet: {str(exc).splitlines()[0][:200]}",
                  file=sys.stdout, flush=True)
            return
        self._front_size = len(table.front)
        self._failed = table.counts().get("FAIL", 0)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, f"trial {trial.trial_id} started")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._refresh()
        error = (trial.last_result or {}).get("error")
        self._line(trials, f"trial {trial.trial_id} {'FAILED' if error else 'finished'}", error)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._refresh()
        reason = self._stored_reason(trial.trial_id)
        self._close_trial_run(trial.trial_id, reason)
        self._line(trials, f"trial {trial.trial_id} FAILED", reason)

    def _close_trial_run(self, trial_id: str, reason: str | None) -> None:
        """The MLflow run of a trial whose function raised or died, closed FAILED with the reason
        (the function could not close it itself)."""
        try:
            experiment_id = self._client.get_run(self._parent).info.experiment_id
            run = runs.find_trial_run(self._client, experiment_id, self._parent, trial_id)
            if run is not None and run.info.status == "RUNNING":
                runs.finish_run(self._client, run.info.run_id, "FAILED", reason or "the trial raised an error")
        except Exception as exc:  # noqa: BLE001 - the tracking server may be down: the study goes on
            if not runs.tracking_outage(exc):
                raise

    def _stored_reason(self, trial_id: str) -> str | None:
        """The reason the searcher told Optuna for a trial whose function raised."""
        try:
            stored = [t for t in self._searcher.study.get_trials(deepcopy=False)
                      if t.user_attrs.get("ray_trial_id") == trial_id]
        except Exception:  # noqa: BLE001 - progress output never fails the study
            return None
        return stored[-1].user_attrs.get("fail_reason") if stored else None
