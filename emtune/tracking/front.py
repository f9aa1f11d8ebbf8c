"""The study's Pareto front as a table, computed from the persistent Optuna study.

The Optuna storage is the source of truth for trial outcomes (it is written by the searcher
before any callback runs), so ``emtune pareto`` works without MLflow and the parent run's front
artifacts always agree with it.

Rows are candidates: a trial's own (final) point, and each checkpoint evaluated during its
training, which the searcher stores as an Optuna trial of its own (``candidate_of`` = the trial's
number, ``eval_step`` / ``eval_point`` = where; :mod:`emtune.study.candidates`). Every row says its
``trial`` and ``step`` ("trial 7 @ step 300"); counts by state are of trials (fine-tunes), and
candidates are counted apart.

One order everywhere (table, JSON, CSV): the front first, then higher ranks, then infeasible
candidates, then unfinished or failed ones; within a rank by the first objective (ascending), then
by Optuna number. Numbers in the table get as many significant digits as it takes to tell every
shown value of a column apart (at least 4); JSON and CSV carry full precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import optuna

from emtune.numbers import distinct_digits, format_number, reported_metrics
from emtune.tracking.pareto import hypervolume_history, pareto_ranks, reference_from_points

#: User attrs of a checkpoint candidate: the number of the trial it belongs to, its training step
#: and its evaluation point's label (a trial's own point has the step and label too).
CANDIDATE_OF, EVAL_STEP, EVAL_POINT = "candidate_of", "eval_step", "eval_point"
#: Study user attr: numbers of the candidates whose adapters the storage policy removed.
ADAPTERS_REMOVED = "adapters_removed"


@dataclass
class TrialRow:
    """One candidate of the study as shown in front tables: a trial's own (final) point, or one
    of its checkpoints (``trial`` is then the trial it belongs to, ``number`` its own Optuna number)."""

    number: int
    state: str
    params: dict[str, Any]
    values: list[float] | None
    feasible: bool
    rank: int | None = None
    mlflow_run_id: str | None = None
    ray_trial_id: str | None = None
    fail_reason: str | None = None
    trial: int = -1
    step: int | None = None
    point: str | None = None
    adapter_uri: str | None = None

    def __post_init__(self) -> None:
        if self.trial < 0:
            self.trial = self.number

    @property
    def checkpoint(self) -> bool:
        """True for a checkpoint evaluated during training (not the trial's own point)."""
        return self.trial != self.number

    @property
    def label(self) -> str:
        """``7 @ step 300`` for a checkpoint of trial 7, ``7`` for the trial's own (final) point."""
        return f"{self.trial} @ step {self.step}" if self.checkpoint else str(self.trial)


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

    hypervolume_trials: list[float] = field(default_factory=list)

    @property
    def front(self) -> list[TrialRow]:
        """Rank-0 candidates in the table's order (by the first objective, then Optuna number)."""
        return [r for r in self.ordered() if r.rank == 0]

    def ordered(self, all_trials: bool = True) -> list[TrialRow]:
        """Every candidate (or the front only) in the one order tables, JSON and CSV share."""
        def key(r: TrialRow) -> tuple:
            group = 0 if r.rank is not None else 1 if r.state == "COMPLETE" and r.values else 2
            return (group, r.rank or 0, r.values[0] if r.values else 0.0, r.number)

        rows = sorted(self.rows, key=key)
        return rows if all_trials else [r for r in rows if r.rank == 0]

    def named(self, values: list[float] | None) -> dict[str, float] | None:
        """Objective values keyed by objective name."""
        return None if values is None else dict(zip(self.objectives, values))

    def row_dict(self, row: TrialRow) -> dict[str, Any]:
        """One candidate, JSON-ready, with its objective values named."""
        out = asdict(row)
        out["values"] = self.named(row.values)
        return out

    def records(self, all_trials: bool = False) -> list[dict[str, Any]]:
        """Flat rows for CSV: the baselines (``stopped_early`` one row per stop point), then the
        candidates in table order, each with its trial and step."""
        params = sorted({k for r in self.ordered(all_trials) for k in r.params})
        out = [{"kind": "baseline", "trial": kind, "step": point.get("step", ""), "rank": "",
                "state": "FAIL" if "error" in point else "COMPLETE", "feasible": "",
                **{n: point.get(n, "") for n in self.objectives}, **{p: "" for p in params},
                "mlflow_run_id": "", "note": point.get("error", "")}
               for kind, values in sorted(self.baselines.items()) for _, point in baseline_points(kind, values)]
        for r in self.ordered(all_trials):
            values = self.named(r.values) or {}
            out.append({"kind": "checkpoint" if r.checkpoint else "trial", "trial": r.trial,
                        "step": "" if r.step is None else r.step, "rank": "" if r.rank is None else r.rank,
                        "state": r.state, "feasible": r.feasible,
                        **{n: values.get(n, "") for n in self.objectives},
                        **{p: r.params.get(p, "") for p in params},
                        "mlflow_run_id": r.mlflow_run_id or "", "note": (r.fail_reason or "").splitlines()[0]
                        if r.fail_reason else ""})
        return out

    def counts(self) -> dict[str, int]:
        """Trials (fine-tunes, not their checkpoints) per Optuna state."""
        out: dict[str, int] = {}
        for row in self.rows:
            if not row.checkpoint:
                out[row.state] = out.get(row.state, 0) + 1
        return out

    def stopped_early(self) -> list[tuple[str, list[float]]]:
        """The ``stopped_early`` baseline's points with every objective: ``("step 6", values)``."""
        record = self.baselines.get("stopped_early") or {}
        return [(f"step {p.get('step')}", [p[n] for n in self.objectives]) for p in record.get("points", [])
                if all(n in p for n in self.objectives)]

    @property
    def candidates(self) -> int:
        """Completed candidates (trials' own points and checkpoints)."""
        return sum(1 for r in self.rows if r.state == "COMPLETE" and r.values is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``emtune pareto --format json`` and the parent run's artifact)."""
        return {
            "objectives": [{"name": n, "direction": d} for n, d in zip(self.objectives, self.directions)],
            "reference": self.reference,
            "reference_source": self.reference_source,
            "hypervolume": self.hypervolume[-1] if self.hypervolume else None,
            "hypervolume_by_trial": self.hypervolume_trials,
            "counts": self.counts(),
            "candidates": self.candidates,
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
    removed = set(study.user_attrs.get(ADAPTERS_REMOVED, []))
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
            trial=int(t.user_attrs.get(CANDIDATE_OF, t.number)),
            step=t.user_attrs.get(EVAL_STEP),
            point=t.user_attrs.get(EVAL_POINT),
            adapter_uri=None if t.number in removed else t.user_attrs.get("adapter_uri"),
        ))
    done = [r for r in rows if r.state == "COMPLETE" and r.values is not None]
    # studies written before baselines were filtered hold Ray's bookkeeping (pid, config/...) too
    # (stopped_early's record holds its points, each already reduced to its metrics)
    baselines = {k.split(":", 1)[1]: v if "error" in v or "points" in v else reported_metrics(v)
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
    finished = {t.number: t.datetime_complete for t in trials}
    ordered = sorted(done, key=lambda r: (finished[r.number] is None, finished[r.number] or 0, r.number))
    table.hypervolume = hypervolume_history([r.values for r in ordered], directions, reference,
                                            [r.feasible for r in ordered])
    # after each trial's last candidate: hypervolume by finished fine-tune
    last = {r.trial: i for i, r in enumerate(ordered)}
    table.hypervolume_trials = [table.hypervolume[i] for i in sorted(last.values())]
    return table


def format_table(table: FrontTable, all_trials: bool = False) -> str:
    """A plain-text table of the front (or of every trial), baselines below it."""
    rows = table.ordered(all_trials)
    params = sorted({k for r in rows for k in r.params})
    points = [p for kind, values in sorted(table.baselines.items()) for _, p in baseline_points(kind, values)]
    columns = [[r.values[i] if r.values else None for r in rows] + [p.get(n) for p in points]
               for i, n in enumerate(table.objectives)]
    digits = [distinct_digits(c) for c in columns]
    pdigits = {p: distinct_digits([r.params.get(p) for r in rows]) for p in params}
    steps = any(r.step is not None for r in table.rows)  # a study that records where it evaluated
    header = ["trial", *(["step"] if steps else []), "rank", *table.objectives, *params, "state"]
    lines = [header]
    for r in rows:
        values = [format_number(v, d) for v, d in zip(r.values, digits)] if r.values else ["-"] * len(digits)
        shown = [format_number(r.params.get(p), pdigits[p]) for p in params]
        rank = "-" if r.rank is None else str(r.rank)
        rank = "infeasible" if r.state == "COMPLETE" and r.values and not r.feasible else rank
        step = ["-" if r.step is None else f"{r.step}" + ("" if r.checkpoint else " (end)")] if steps else []
        lines.append([str(r.trial), *step, rank, *values, *shown, r.state])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    hv = f"{table.hypervolume[-1]:.6g}" if table.hypervolume else "n/a"
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(table.counts().items()))
    for kind, values in sorted(table.baselines.items()):
        for where, point in baseline_points(kind, values):
            shown = point.get("error") or ", ".join(
                f"{name} {format_number(point[name], d)}" for name, d in zip(table.objectives, digits) if name in point)
            text.append(f"baseline {kind}{where}: {shown}")
    checkpoints = sum(1 for r in table.rows if r.checkpoint and r.state == "COMPLETE" and r.values is not None)
    text.append(f"\nfront size {len(table.front)}; hypervolume {hv} "
                f"(reference {table.reference}, {table.reference_source}); trials: {counts or 'none'}"
                + (f"; candidates {table.candidates} ({checkpoints} checkpoints)" if checkpoints else ""))
    return "\n".join(text)


def baseline_points(kind: str, record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A baseline's record as ``(where, metrics)`` pairs: one for ``base`` and ``undefended``,
    one per stop point (`` @ step N``) for ``stopped_early``."""
    if "points" not in record:
        return [("", record)]
    return [(f" @ step {p.get('step')}", p) for p in record["points"]]
