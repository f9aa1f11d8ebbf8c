"""How a finished trial is told to Optuna: its state, objective values, constraint values and
failure reason, with objectives and constraints optionally relative to a baseline trial.

Plain functions over a spec and a result dict, shared by the searcher (live trials) and by
re-evaluation (pending evaluations finished later), so both tell Optuna the same thing.
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from emtune.numbers import finite_numbers, is_finite_number, reported_metrics

#: Result keys kept as Optuna user attrs of the trial.
RESULT_ATTRS = ("mlflow_run_id", "adapter_uri", "evaluation_pending", "checkpoint_path")
#: The value a constraint gets when its metric is missing: always violated.
MISSING_METRIC_VIOLATION = 1e9


def baseline_key(kind: str) -> str:
    """Study user attr holding a baseline's metrics."""
    return f"baseline:{kind}"


def baseline_record(result: dict | None, error: bool, kind: str = "undefended") -> dict[str, Any]:
    """The finite numeric metrics a baseline trial reported (no Ray bookkeeping), or its failure
    reason. For ``stopped_early``: ``{"points": [...]}``, every evaluated point's step, label and
    metrics (the checkpoints, then the end of training)."""
    if error or not result or result.get("error"):
        return {"error": str((result or {}).get("error") or "the baseline trial failed")}
    metrics = reported_metrics(result)
    if kind != "stopped_early":
        return metrics
    points = [{"step": c["step"], "point": c["point"], **finite_numbers(c["metrics"])}
              for c in checkpoint_records(result)]
    points.append({"step": int(result.get("train_steps", 0)), "point": "final", **metrics})
    return {"points": points}


def checkpoint_records(result: dict | None) -> list[dict[str, Any]]:
    """The checkpoints a trial's result carries, by step. The trial reports them as one JSON
    string: Ray Tune flattens nested dicts before the searcher sees a result, and its
    TensorBoard logger warns about lists, while it passes a string through untouched."""
    found = (result or {}).get("checkpoints") or []
    records = json.loads(found) if isinstance(found, str) else list(found)
    return sorted(records, key=lambda r: r["step"])


def study_baselines(spec: Any, study: Any) -> dict[str, dict]:
    """The baselines' records stored in the study's user attrs (empty for one not run yet)."""
    return {k: study.user_attrs.get(baseline_key(k), {}) for k in spec.baselines.kinds}


def baseline_trials(kinds: list[str]) -> list[list[str]]:
    """The baseline kinds grouped by the trial that measures them: one undefended fine-tune
    serves both ``undefended`` and ``stopped_early``; ``base`` is a trial of its own."""
    shared = [k for k in kinds if k in ("undefended", "stopped_early")]
    return [[k] for k in kinds if k not in shared] + ([shared] if shared else [])


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


def constraint_violations(constraints: tuple[Any, ...], metrics: dict[str, Any],
                          baselines: dict[str, dict] | None = None) -> dict[str, float]:
    """One value per bound, <= 0 when met (Optuna's convention); a missing or non-finite metric
    violates. A constraint with ``relative`` bounds the metric's difference or ratio to its baseline."""
    out: dict[str, float] = {}
    for c in constraints:
        value = metrics.get(c.metric)
        missing = not is_finite_number(value)
        if not missing:
            value, problem = relative_value(float(value), c, baselines or {})
            missing = problem is not None
        if c.max is not None:
            out[f"{c.metric}<={c.max:g}"] = MISSING_METRIC_VIOLATION if missing else float(value) - c.max
        if c.min is not None:
            out[f"{c.metric}>={c.min:g}"] = MISSING_METRIC_VIOLATION if missing else c.min - float(value)
    return out


def outcome(spec: Any, result: dict | None, error: bool,
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
    if result.get("pruned"):
        return optuna.trial.TrialState.PRUNED, None, str(result["pruned"])
    if result.get("error"):
        return FAIL, None, str(result["error"])
    values = []
    for objective in spec.objectives:
        value = result.get(objective.name)
        if value is None:
            return FAIL, None, f"objective {objective.name!r} is missing from the trial's result"
        if not is_finite_number(value):
            return FAIL, None, f"objective {objective.name!r} is not a finite number ({value!r})"
        value, problem = relative_value(float(value), objective, baselines or {})
        if problem:
            return FAIL, None, problem
        values.append(value)
    return optuna.trial.TrialState.COMPLETE, values, None
