"""emtune's Ray Tune searcher over a persistent, multi-objective Optuna study.

Ray's OptunaSearch tells a stopped trial as COMPLETE with partial scores, leaves a NaN trial
RUNNING forever, and sets neither constraints nor user attrs (DESIGN.md). This searcher keeps
Ray Tune for execution and owns the Optuna side:

- the study lives in persistent storage in the study directory (optuna-dashboard opens it);
- ``suggest`` asks Optuna, records the Ray trial id on the Optuna trial;
- ``on_trial_complete`` tells COMPLETE with every objective, FAIL (with a ``fail_reason``) for an
  error, a missing or non-finite objective, and PRUNED for an early-stopped trial; constraint
  values are set before ``tell``; the MLflow run id and adapter URI become user attrs.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from ray.tune.search import Searcher

from emtune.config import StudySpec
from emtune.study.space import build_sampler, constraint_violations, suggest

RESULT_ATTRS = ("mlflow_run_id", "adapter_uri", "evaluation_pending", "checkpoint_path")


def open_study(spec: StudySpec, storage_url: str) -> optuna.Study:
    """Create or load the study's Optuna study, with the sampler built explicitly from the spec."""
    import sqlalchemy.exc

    sampler, description = build_sampler(spec.search, spec.seed)
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
        study.sampler, _ = build_sampler(spec.search, spec.seed, offset=existing)
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
        self._baselines_live: dict[str, str] = {}  # Ray trial id -> baseline kind
        self._deferred: list[tuple[int, dict | None, bool]] = []  # results waiting for a baseline

    @property
    def study(self) -> optuna.Study:
        """The Optuna study, opened on first use (not pickled with the searcher)."""
        if self._study is None:
            self._study = open_study(self._spec, self._storage_url)
        return self._study

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True

    def pending_baselines(self) -> list[str]:
        """Baseline kinds neither finished (in the study's attrs) nor running."""
        if not self._spec.baselines.enabled:
            return []
        running = set(self._baselines_live.values())
        return [k for k in self._spec.baselines.kinds
                if baseline_key(k) not in self.study.user_attrs and k not in running]

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        pending = self.pending_baselines()
        if pending:  # baselines first: relative objectives and the report need them
            self._baselines_live[trial_id] = pending[0]
            return {"baseline": pending[0], "params": {}}
        trial = self.study.ask()
        params = suggest(trial, self._spec.search)
        trial.set_user_attr("ray_trial_id", trial_id)
        self._live[trial_id] = trial
        return {"params": params, "optuna_trial": trial.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._baselines_live:
            kind = self._baselines_live.pop(trial_id)
            self.study.set_user_attr(baseline_key(kind), baseline_record(result, error))
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
            storage = self.study._storage
            trial = optuna.Trial(self.study, storage.get_trial_id_from_study_id_trial_number(
                self.study._study_id, trial))
        baselines = {k: self.study.user_attrs.get(baseline_key(k), {}) for k in self._spec.baselines.kinds}
        state, values, reason = outcome(self._spec, result, error, baselines)
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


def baseline_key(kind: str) -> str:
    """Study user attr holding a baseline's metrics."""
    return f"baseline:{kind}"


def baseline_record(result: dict | None, error: bool) -> dict[str, Any]:
    """The finite numeric metrics of a baseline trial, or its failure reason."""
    if error or not result or result.get("error"):
        return {"error": str((result or {}).get("error") or "the baseline trial failed")}
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def relative_value(value: float, item: Any, baselines: dict[str, dict]) -> tuple[float | None, str | None]:
    """``value`` restated relative to its baseline when the objective/constraint asks for it."""
    if item.relative is None:
        return value, None
    name = getattr(item, "name", None) or item.metric
    base = baselines.get(item.relative.to, {})
    if "error" in base or name not in base:
        return None, f"baseline {item.relative.to!r} has no {name!r}: {base.get('error', 'missing')}"
    if item.relative.how == "difference":
        return value - base[name], None
    if base[name] == 0:
        return None, f"{name} relative to a zero {item.relative.to!r} baseline is undefined"
    return value / base[name], None


def outcome(spec: StudySpec, result: dict | None, error: bool,
            baselines: dict[str, dict] | None = None) -> tuple[optuna.trial.TrialState, list[float] | None, str | None]:
    """How a finished Tune trial is told to Optuna: state, objective values, failure reason."""
    FAIL = optuna.trial.TrialState.FAIL
    if error:
        reason = (result or {}).get("error") or "the trial raised an error (see its Ray and MLflow logs)"
        return FAIL, None, str(reason)
    if not result:
        return FAIL, None, "the trial reported no result"
    if result.get("early_stopped"):
        return optuna.trial.TrialState.PRUNED, None, "stopped early by the scheduler"
    if result.get("error"):
        return FAIL, None, str(result["error"])
    values = []
    for objective in spec.objectives:
        value = result.get(objective.name)
        if value is None:
            return FAIL, None, f"objective {objective.name!r} is missing from the trial's result"
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return FAIL, None, f"objective {objective.name!r} is not a finite number ({value!r})"
        value, problem = relative_value(float(value), objective, baselines or {})
        if problem:
            return FAIL, None, problem
        values.append(value)
    return optuna.trial.TrialState.COMPLETE, values, None
