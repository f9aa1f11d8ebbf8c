"""The study's Pareto front as a table, computed from the persistent Optuna study.

The Optuna storage is the source of truth for trial outcomes (it is written by the searcher
before any callback runs), so ``emtune pareto`` works without MLflow and the parent run's front
artifacts always agree with it.

One order everywhere (table, JSON, CSV): the front first, then higher ranks, then infeasible
trials, then unfinished or failed ones; within a rank by the first objective (ascending), then by
trial number. Numbers in the table get as many significant digits as it takes to tell every
shown value of a column apart (at least 4); JSON and CSV carry full precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import optuna

from emtune.numbers import distinct_digits, format_number, reported_metrics
from emtune.tracking.pareto import hypervolume_history, pareto_ranks, reference_from_points


@dataclass
class TrialRow:
    """One trial of the study as shown in front tables."""

    number: int
    state: str
    params: dict[str, Any]
    values: list[float] | None
    feasible: bool
    rank: int | None = None
    mlflow_run_id: str | None = None
    ray_trial_id: str | None = None
    fail_reason: str | None = None


@dataclass
class FrontTable:
    """Every trial with its rank, the objectives, and the hypervolume history."""

    objectives: list[str]
    directions: list[str]
    rows: list[TrialRow]
    reference: list[float] | None = None
    reference_source: str = "spec"
    hypervolume: list[float] = field(default_factory=list)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def front(self) -> list[TrialRow]:
        """Rank-0 trials in the table's order (by the first objective, then trial number)."""
        return [r for r in self.ordered() if r.rank == 0]

    def ordered(self, all_trials: bool = True) -> list[TrialRow]:
        """Every trial (or the front only) in the one order tables, JSON and CSV share."""
        def key(r: TrialRow) -> tuple:
            group = 0 if r.rank is not None else 1 if r.state == "COMPLETE" and r.values else 2
            return (group, r.rank or 0, r.values[0] if r.values else 0.0, r.number)

        rows = sorted(self.rows, key=key)
        return rows if all_trials else [r for r in rows if r.rank == 0]

    def named(self, values: list[float] | None) -> dict[str, float] | None:
        """Objective values keyed by objective name."""
        return None if values is None else dict(zip(self.objectives, values))

    def row_dict(self, row: TrialRow) -> dict[str, Any]:
        """One trial, JSON-ready, with its objective values named."""
        out = asdict(row)
        out["values"] = self.named(row.values)
        return out

    def records(self, all_trials: bool = False) -> list[dict[str, Any]]:
        """Flat rows for CSV: the baselines, then the trials in table order."""
        params = sorted({k for r in self.ordered(all_trials) for k in r.params})
        out = [{"kind": "baseline", "trial": kind, "rank": "", "state": "FAIL" if "error" in values else "COMPLETE",
                "feasible": "",
                **{n: values.get(n, "") for n in self.objectives}, **{p: "" for p in params},
                "mlflow_run_id": "", "note": values.get("error", "")}
               for kind, values in sorted(self.baselines.items())]
        for r in self.ordered(all_trials):
            values = self.named(r.values) or {}
            out.append({"kind": "trial", "trial": r.number, "rank": "" if r.rank is None else r.rank,
                        "state": r.state, "feasible": r.feasible,
                        **{n: values.get(n, "") for n in self.objectives},
                        **{p: r.params.get(p, "") for p in params},
                        "mlflow_run_id": r.mlflow_run_id or "", "note": (r.fail_reason or "").splitlines()[0]
                        if r.fail_reason else ""})
        return out

    def counts(self) -> dict[str, int]:
        """Trials per Optuna state."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.state] = out.get(row.state, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``emtune pareto --format json`` and the parent run's artifact)."""
        return {
            "objectives": [{"name": n, "direction": d} for n, d in zip(self.objectives, self.directions)],
            "reference": self.reference,
            "reference_source": self.reference_source,
            "hypervolume": self.hypervolume[-1] if self.hypervolume else None,
            "baselines": self.baselines,
            "front": [self.row_dict(r) for r in self.front],
            "trials": [self.row_dict(r) for r in self.ordered()],
        }


def front_table(study: optuna.Study, objectives: list[str], directions: list[str],
                reference: list[float] | None = None) -> FrontTable:
    """Rank every COMPLETE trial (constraint-aware) and compute the hypervolume history.

    Without a reference point in the spec, one is derived from the completed points and marked
    ``derived`` (its history is then only comparable within one table).
    """
    rows = []
    trials = study.get_trials(deepcopy=False)
    # A FAIL trial whose evaluation was finished later (emtune.study.reevaluate) lives on as a
    # new trial; show it as REEVALUATED so counts do not call it both failed and complete.
    reevaluated = {t.user_attrs.get("reevaluates") for t in trials} - {None}
    for t in trials:
        violations = t.constraints.values()
        rows.append(TrialRow(
            number=t.number,
            state="REEVALUATED" if t.number in reevaluated and t.state.name == "FAIL" else t.state.name,
            params=dict(t.params),
            values=list(t.values) if t.values is not None else None,
            feasible=all(v <= 0 for v in violations),
            mlflow_run_id=t.user_attrs.get("mlflow_run_id"),
            ray_trial_id=t.user_attrs.get("ray_trial_id"),
            fail_reason=t.user_attrs.get("fail_reason"),
        ))
    done = [r for r in rows if r.state == "COMPLETE" and r.values is not None]
    # studies written before baselines were filtered hold Ray's bookkeeping (pid, config/...) too
    baselines = {k.split(":", 1)[1]: v if "error" in v else reported_metrics(v)
                 for k, v in study.user_attrs.items() if k.startswith("baseline:")}
    table = FrontTable(objectives, directions, rows, baselines=baselines)
    if not done:
        return table
    points = [r.values for r in done]
    feasible = [r.feasible for r in done]
    for row, rank in zip(done, pareto_ranks(points, directions, feasible)):
        row.rank = rank
    if reference is None:
        reference, table.reference_source = reference_from_points(points, directions), "derived"
    table.reference = list(reference)
    ordered = sorted(done, key=lambda r: study.trials[r.number].datetime_complete or 0)
    table.hypervolume = hypervolume_history([r.values for r in ordered], directions, reference,
                                            [r.feasible for r in ordered])
    return table


def format_table(table: FrontTable, all_trials: bool = False) -> str:
    """A plain-text table of the front (or of every trial), baselines below it."""
    rows = table.ordered(all_trials)
    params = sorted({k for r in rows for k in r.params})
    columns = [[r.values[i] if r.values else None for r in rows] + [b.get(n) for b in table.baselines.values()]
               for i, n in enumerate(table.objectives)]
    digits = [distinct_digits(c) for c in columns]
    pdigits = {p: distinct_digits([r.params.get(p) for r in rows]) for p in params}
    header = ["trial", "rank", *table.objectives, *params, "state"]
    lines = [header]
    for r in rows:
        values = [format_number(v, d) for v, d in zip(r.values, digits)] if r.values else ["-"] * len(digits)
        shown = [format_number(r.params.get(p), pdigits[p]) for p in params]
        rank = "-" if r.rank is None else str(r.rank)
        rank = "infeasible" if r.state == "COMPLETE" and r.values and not r.feasible else rank
        lines.append([str(r.number), rank, *values, *shown, r.state])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    hv = f"{table.hypervolume[-1]:.6g}" if table.hypervolume else "n/a"
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(table.counts().items()))
    for kind, values in sorted(table.baselines.items()):
        shown = values.get("error") or ", ".join(
            f"{name} {format_number(values[name], d)}" for name, d in zip(table.objectives, digits) if name in values)
        text.append(f"baseline {kind}: {shown}")
    text.append(f"\nfront size {len(table.front)}; hypervolume {hv} "
                f"(reference {table.reference}, {table.reference_source}); trials: {counts or 'none'}")
    return "\n".join(text)
