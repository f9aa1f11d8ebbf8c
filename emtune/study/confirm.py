"""Confirm the front: re-evaluate front members from their saved adapters with more samples and
several evaluation seeds, and report each objective with its spread.

Search trials are evaluated once, with few samples; a front point can be a lucky draw. This
re-runs the trial's evaluation (generation, judge-free metrics, and judges when configured) from
the adapter in MLflow, in this process (GPU when present), and logs ``confirm/<metric>_mean``,
``_std`` and ``_n`` on the trial's MLflow run. It also serves to re-run an evaluation that failed
(e.g. a judge outage) without training again.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emtune.config import StudySpec
from emtune.evaluation.judging import score_trial
from emtune.models import model_cache_dir, resolve_source
from emtune.numbers import is_finite_number
from emtune.tracking.front import ADAPTERS_REMOVED, front_table


@dataclass
class Confirmed:
    """One re-evaluated trial: per-metric values over seeds."""

    number: int
    run_id: str
    params: dict[str, Any]
    values: dict[str, list[float]]

    def summary(self, name: str) -> tuple[float, float, float]:
        """(mean, std, half-width of a normal 95% interval) of one metric over seeds."""
        xs = self.values.get(name, [])
        if not xs:
            return math.nan, math.nan, math.nan
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return statistics.fmean(xs), std, 1.96 * std / math.sqrt(len(xs))


def evaluate_adapter(spec: StudySpec, adapter_dir: Path, model_source: str, seed: int,
                     samples: int | None) -> dict[str, float]:
    """The trial's evaluation on a saved adapter with another seed (and sample count)."""
    from emtune.train.worker import run_training  # torch

    # Generated here with the built-in engine even for a study that used a generation server: the
    # model is already in this process, and the adapter sits in a temporary folder a server cannot read.
    evaluation = spec.evaluation.model_copy(update={
        "samples_per_question": samples or spec.evaluation.samples_per_question, "seed": seed,
        "backend": "hf", "server": None})
    spec = spec.model_copy(update={"evaluation": evaluation})  # data splits keep the study seed
    with tempfile.TemporaryDirectory(prefix="emtune-confirm-") as tmp:
        metrics = run_training(spec, Path(tmp), model_source, adapter_dir=adapter_dir)
        metrics.update(score_trial(spec, Path(tmp)))
    return metrics


def confirm_front(spec: StudySpec, study: Any, client: Any, seeds: int, samples: int | None,
                  trials: list[int] | None = None) -> list[Confirmed]:
    """Re-evaluate the front (or the given trial numbers) over ``seeds`` evaluation seeds."""
    objectives = [o.name for o in spec.objectives]
    table = front_table(study, objectives, [o.direction for o in spec.objectives])
    rows = [r for r in table.rows if r.number in trials] if trials else table.front
    model_source = resolve_source(spec.model, model_cache_dir())
    removed = set(study.user_attrs.get(ADAPTERS_REMOVED, []))  # evaluation.keep_adapters dropped them
    out = []
    for row in rows:
        if not row.mlflow_run_id or row.number in removed:
            continue
        trial_spec = spec.with_overrides(row.params)
        with tempfile.TemporaryDirectory(prefix="emtune-adapter-") as tmp:
            adapter = Path(client.download_artifacts(row.mlflow_run_id, "adapter", tmp))
            values: dict[str, list[float]] = {}
            for k in range(seeds):
                metrics = evaluate_adapter(trial_spec, adapter, model_source, spec.seed + 1 + k, samples)
                for name, value in metrics.items():
                    if is_finite_number(value):
                        values.setdefault(name, []).append(float(value))
        confirmed = Confirmed(row.number, row.mlflow_run_id, row.params, values)
        for name in objectives:
            mean, std, _ = confirmed.summary(name)
            if not math.isnan(mean):
                client.log_metric(row.mlflow_run_id, f"confirm/{name}_mean", mean)
                client.log_metric(row.mlflow_run_id, f"confirm/{name}_std", std)
                client.log_metric(row.mlflow_run_id, f"confirm/{name}_n", len(values[name]))
        out.append(confirmed)
    return out
