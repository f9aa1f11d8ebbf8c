"""emtune's Ray Tune searcher over a persistent, multi-objective Optuna study.

Ray's OptunaSearch tells a stopped trial as COMPLETE with partial scores, leaves a NaN trial
RUNNING forever, and sets neither constraints nor user attrs. This searcher keeps
Ray Tune for execution and owns the Optuna side:

- the study lives in persistent storage in the study directory (optuna-dashboard opens it);
- ``suggest`` asks Optuna, records the Ray trial id on the Optuna trial;
- ``on_trial_complete`` tells COMPLETE with every objective, FAIL (with a ``fail_reason``) for an
  error, a missing or non-finite objective, and PRUNED (with the reason) for a trial that pruning
  or a scheduler stopped; constraint values are set before ``tell``; the MLflow run id and adapter
  URI become user attrs;
- the checkpoints a trial evaluated during training are told first, each as a COMPLETE trial of
  its own (:mod:`emtune.study.candidates` says why), so the sampler learns from every candidate;
- with ``search.pruning`` on, each suggestion carries the pruning rule and the judge-free values
  the trial is compared with at each evaluation point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import Searcher

from emtune.config import StudySpec
from emtune.evaluation.checkpoint_checks import pruning_metrics
from emtune.study.candidates import final_point_attrs, pruning_config, tell_candidates
from emtune.study.failures import tune_trial_error
from emtune.study.internals import reattach_trial, tune_trial_folders
from emtune.study.outcomes import (
    RESULT_ATTRS, baseline_key, baseline_record, baseline_trials, constraint_violations, outcome, study_baselines,
)
from emtune.study.space import build_sampler, suggest


def open_study(spec: StudySpec, storage_url: str) -> optuna.Study:
    """Create or load the study's Optuna study, with the sampler built explicitly from the spec."""
    import sqlalchemy.exc

    per_trial = 1 + len(set(spec.evaluation.at))  # candidates a fine-tune is told as (build_sampler)
    sampler, description = build_sampler(spec.search, spec.seed, candidates_per_trial=per_trial)
    for attempt in range(3):
        try:
            study = optuna.create_study(
                storage=storage_url,
                study_name=spec.name,
                directions=[o.direction for o in spec.objectives],
                sampler=sampler,
                load_if_exists=True,
            )
            break
        except sqlalchemy.exc.IntegrityError:
            # another process (optuna-dashboard, `emtune pareto`) created the same new storage's
            # schema at the same moment: it exists now, so opening it again succeeds
            if attempt == 2:
                raise
    existing = len(study.get_trials(deepcopy=False))
    if existing:  # a resumed or extended study: fresh random draws, still reproducible
        study.sampler, _ = build_sampler(spec.search, spec.seed, offset=existing, candidates_per_trial=per_trial)
    study.set_user_attr("sampler", description)
    study.set_user_attr("objectives", [o.name for o in spec.objectives])
    return study


class EmtuneSearcher(Searcher):
    """A Tune Searcher whose suggestions and outcomes live in an Optuna study."""

    def __init__(self, spec: StudySpec, storage_url: str):
        super().__init__(metric=None, mode=None)
        self._spec = spec
        self._storage_url = storage_url
        self._study: optuna.Study | None = None
        self._live: dict[str, optuna.Trial | int] = {}  # Ray trial id -> Optuna trial (number once pickled)
        self._baselines_live: dict[str, list[str]] = {}  # Ray trial id -> the baseline kinds it measures
        self._deferred: list[tuple[int, dict | None, bool]] = []  # results waiting for a baseline
        #: Where Ray Tune keeps its trial folders: the error it recorded for a trial whose
        #: function raised (or whose process died) is read from there, so FAIL says why.
        self.trials_root: Path | None = None

    @property
    def study(self) -> optuna.Study:
        """The Optuna study, opened on first use (not pickled with the searcher)."""
        if self._study is None:
            self._study = open_study(self._spec, self._storage_url)
        return self._study

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True

    def pending_baselines(self) -> list[list[str]]:
        """Baseline trials still to run: the kinds each measures, for the kinds neither finished
        (in the study's attrs) nor running (one undefended fine-tune serves two kinds)."""
        if not self._spec.baselines.enabled:
            return []
        running = {k for kinds in self._baselines_live.values() for k in kinds}
        return baseline_trials([k for k in self._spec.baselines.kinds
                                if baseline_key(k) not in self.study.user_attrs and k not in running])

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        pending = self.pending_baselines()
        if pending:  # baselines first: relative objectives and the report need them
            kinds = pending[0]
            self._baselines_live[trial_id] = kinds
            return {"baseline": "base" if kinds == ["base"] else "undefended", "baseline_kinds": kinds,
                    "params": {}}
        pruning = pruning_config(self._spec, self.study, pruning_metrics(self._spec))
        trial = self.study.ask()
        params = suggest(trial, self._spec.search)
        trial.set_user_attr("ray_trial_id", trial_id)
        self._live[trial_id] = trial
        return {"params": params, "optuna_trial": trial.number, "pruning": pruning}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        root = getattr(self, "trials_root", None)  # absent from searchers pickled by older versions
        if error and not (result or {}).get("error"):
            reason = tune_trial_error(tune_trial_folders(root, trial_id))
            if reason:
                result = {**(result or {}), "error": reason}
        if trial_id in self._baselines_live:
            for kind in self._baselines_live.pop(trial_id):
                self.study.set_user_attr(baseline_key(kind), baseline_record(result, error, kind))
            self._flush_deferred()
            return
        trial = self._live.pop(trial_id, None)
        if trial is None:  # a restored searcher whose saved state predates this trial's suggest
            trial = next((t.number for t in self.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if t.user_attrs.get("ray_trial_id") == trial_id), None)
        if trial is None:
            return
        number = trial if isinstance(trial, int) else trial.number
        if self.study.get_trials(deepcopy=False)[number].state.is_finished():
            return  # told before the driver stopped; a restored Tuner reports it again
        if self._needs_pending_baseline():
            self._deferred.append((number, result, error))
            return
        self._tell(trial, result, error)

    def _needs_pending_baseline(self) -> bool:
        needed = {item.relative.to for item in (*self._spec.objectives, *self._spec.constraints) if item.relative}
        return any(baseline_key(k) not in self.study.user_attrs for k in needed)

    def _flush_deferred(self) -> None:
        """Tell the trials that waited for a baseline (relative objectives) once all are in."""
        if self._needs_pending_baseline():
            return
        waiting, self._deferred = self._deferred, []
        for number, result, error in waiting:
            self._tell(number, result, error)

    def _tell(self, trial: Any, result: dict | None, error: bool) -> None:
        """Set result attrs and constraints, then tell Optuna the outcome."""
        if isinstance(trial, int):  # restored from a checkpoint: reattach to the stored trial
            trial = reattach_trial(self.study, trial)
        baselines = study_baselines(self._spec, self.study)
        state, values, reason = outcome(self._spec, result, error, baselines)
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        tell_candidates(self.study, self._spec, frozen, None if error else result, baselines)
        for key, value in final_point_attrs(None if error else result).items():
            trial.set_user_attr(key, value)
        for key in RESULT_ATTRS:
            if result and result.get(key):
                trial.set_user_attr(key, result[key])
        if reason:
            trial.set_user_attr("fail_reason", reason)
        if self._spec.constraints and result is not None:
            for name, value in constraint_violations(self._spec.constraints, result, baselines).items():
                trial.set_constraint(name, value)
        self.study.tell(trial, values if state == optuna.trial.TrialState.COMPLETE else None, state=state)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"] = None  # SQLAlchemy engines do not pickle; reopened on use
        state["_live"] = {k: t if isinstance(t, int) else t.number for k, t in self._live.items()}
        return state

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
