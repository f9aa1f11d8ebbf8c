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

RESULT_ATTRS = ("mlflow_run_id", "adapter_uri")


def open_study(spec: StudySpec, storage_url: str) -> optuna.Study:
    """Create or load the study's Optuna study, with the sampler built explicitly from the spec."""
    sampler, description = build_sampler(spec.search, spec.seed)
    study = optuna.create_study(
        storage=storage_url,
        study_name=spec.name,
        directions=[o.direction for o in spec.objectives],
        sampler=sampler,
        load_if_exists=True,
    )
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

    @property
    def study(self) -> optuna.Study:
        """The Optuna study, opened on first use (not pickled with the searcher)."""
        if self._study is None:
            self._study = open_study(self._spec, self._storage_url)
        return self._study

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        trial = self.study.ask()
        params = suggest(trial, self._spec.search)
        trial.set_user_attr("ray_trial_id", trial_id)
        self._live[trial_id] = trial
        return {"params": params, "optuna_trial": trial.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._live.pop(trial_id, None)
        if trial is None:  # a restored searcher whose saved state predates this trial's suggest
            trial = next((t.number for t in self.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if t.user_attrs.get("ray_trial_id") == trial_id), None)
        if trial is None:
            return
        if isinstance(trial, int):  # restored from a checkpoint: reattach to the stored trial
            storage = self.study._storage
            trial = optuna.Trial(self.study, storage.get_trial_id_from_study_id_trial_number(
                self.study._study_id, trial))
        if self.study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            return  # told before the driver stopped; a restored Tuner reports it again
        state, values, reason = outcome(self._spec, result, error)
        for key in RESULT_ATTRS:
            if result and result.get(key):
                trial.set_user_attr(key, result[key])
        if reason:
            trial.set_user_attr("fail_reason", reason)
        if self._spec.constraints and result is not None:
            for name, value in constraint_violations(self._spec.constraints, result).items():
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


def outcome(spec: StudySpec, result: dict | None, error: bool) -> tuple[optuna.trial.TrialState, list[float] | None, str | None]:
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
        values.append(float(value))
    return optuna.trial.TrialState.COMPLETE, values, None
