"""`emtune recommend STUDY --max METRIC=VALUE ...`: the best setting under stated ceilings.

Among the study's completed candidates that meet the study's own constraints and every
``--max METRIC=VALUE`` (value <= VALUE) and ``--min METRIC=VALUE`` (value >= VALUE), pick the one
with the best task score and print its evidence: params, every metric, the MLflow run id (with
the tracking URI and a UI link) and the adapter URI. Candidates are the trials' own (final) points
and, with ``evaluation.at``, every checkpoint evaluated during training ("trial 7 @ step 300":
trial 7's fine-tune stopped at step 300, with its own adapter); ``--final-only`` considers the
trials' own points alone.

Task score: ``--maximize METRIC`` or ``--minimize METRIC``; by default ``--minimize indomain_nll``
(held-out NLL on the narrow task: how well the requested task was learned) when the trials report
it, else the study's first objective in its direction. Ties go to the lower trial number.

Metrics are those the trials logged to MLflow (judge rates come with ``_low``/``_high`` Wilson
bounds, so ``--max general_misalignment_high=0.05`` is a ceiling on the upper bound), with the
objective values from Optuna. A trial that lacks a constrained metric does not qualify.

Each candidate (the qualifying trials, best first) is shown with its difference from the
``undefended`` baseline (the same fine-tune with no defense) for the task score and every bounded
metric. When nothing qualifies, the answer says which bound eliminated how many trials and the
best value any completed trial reaches for each bound, and the exit status is 3. Exit 2 for an
unknown metric or a malformed bound.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from emtune.cli.common import NOTHING_QUALIFIES, OK, UserError, fail, load_study_spec, resolve_study_dir
from emtune.cli.output import add_format_argument, print_csv, print_json

DEFAULT_SCORE = "indomain_nll"
#: Qualifying trials listed after the recommended one.
CANDIDATES = 5


@dataclass(frozen=True)
class Bound:
    """A ceiling (``kind='max'``: value <= limit) or floor (``kind='min'``: value >= limit)."""

    metric: str
    limit: float
    kind: str

    def holds(self, value: float | None) -> bool:
        """True when ``value`` exists and is within the bound."""
        if value is None:
            return False
        return value <= self.limit if self.kind == "max" else value >= self.limit

    def __str__(self) -> str:
        return f"--{self.kind} {self.metric}={self.limit:g}"


def parse_bound(text: str, kind: str) -> Bound:
    """``METRIC=VALUE`` -> Bound; raises UserError on anything else."""
    metric, sep, value = text.partition("=")
    try:
        limit = float(value)
    except ValueError:
        limit = None
    if not sep or not metric.strip() or limit is None:
        raise UserError(f"--{kind} {text!r}: expected METRIC=VALUE with a number, e.g. general_misalignment=0.01")
    return Bound(metric.strip(), limit, kind)


@dataclass
class Recommendation:
    """The chosen trial and how the field was narrowed."""

    record: Any  # emtune.report.TrialRecord
    score: str
    direction: str
    completed: int
    qualifying: int
    eliminated: list[tuple[str, int, int]]  # (constraint, trials eliminated, of which lacked the metric)
    candidates: list[Any] = field(default_factory=list)  # the qualifying records, best first
    noun: str = "completed trials"  # what was counted: trials, or trials and their checkpoints


class NotYet(UserError):
    """The study has no completed trial to recommend (exit 3)."""


class NothingQualifies(UserError):
    """No completed trial meets every bound; ``reachable`` holds the best value of each bound's
    metric (and of the score) among the feasible completed trials."""

    def __init__(self, message: str, completed: int, eliminated: list[tuple[str, int, int]],
                 reachable: list[dict[str, Any]]):
        super().__init__(message)
        self.completed, self.eliminated, self.reachable = completed, eliminated, reachable


def default_score(study: Any, known: set[str]) -> tuple[str, str]:
    """``(indomain_nll, minimize)`` when reported, else the first objective and its direction."""
    if DEFAULT_SCORE in known:
        return DEFAULT_SCORE, "minimize"
    first = study.spec.objectives[0]
    return first.name, first.direction


def check_metric(study: Any, name: str, known: set[str]) -> None:
    """Raise UserError naming the metric, close names and what the trials do report."""
    if name in known:
        return
    from emtune.evaluation.sets import known_metrics

    hint = difflib.get_close_matches(name, sorted(known), n=1)
    why = ""
    info = known_metrics().get(name)
    if info is not None and info.judged and study.spec.evaluation.judge.kind == "none":
        why = " (it needs a judge; this study ran with evaluation.judge.kind = none)"
    parts = [f"unknown metric {name!r}: no completed trial of study {study.name!r} reports it{why}"]
    if hint:
        parts.append(f"did you mean {hint[0]!r}?")
    parts.append(f"known: {', '.join(sorted(known)) or 'none'}")
    raise UserError("; ".join(parts))


def recommend(study: Any, bounds: list[Bound], score: tuple[str, str] | None = None,
              final_only: bool = False) -> Recommendation:
    """Pick the best qualifying candidate of ``study`` (a StudyData; checkpoints included unless
    ``final_only``); raises UserError when none does."""
    done = [r for r in study.trials if r.row.state == "COMPLETE" and r.row.values
            and not (final_only and r.row.checkpoint)]
    if not done:
        counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(study.table.counts().items())) or "no trials"
        raise NotYet(f"study {study.name!r} has no completed trial yet ({counts})")
    noun = "candidates (trials and their checkpoints)" if any(r.row.checkpoint for r in done) else "completed trials"
    known = {k for r in done for k in r.metrics}
    name, direction = score or default_score(study, known)
    for metric in [b.metric for b in bounds] + [name]:
        check_metric(study, metric, known)
    feasible = [r for r in done if r.row.feasible]
    eliminated = []
    if len(feasible) < len(done):
        eliminated.append(("the study's own constraints (spec `constraints`)", len(done) - len(feasible), 0))
    for bound in bounds:
        values = [r.metrics.get(bound.metric) for r in feasible]
        out, missing = sum(not bound.holds(v) for v in values), sum(v is None for v in values)
        if out:
            eliminated.append((str(bound), out, missing))
    lacking = sum(r.metrics.get(name) is None for r in feasible)
    if lacking:
        eliminated.append((f"a missing task score {name}", lacking, 0))
    qualifying = [r for r in feasible if r.metrics.get(name) is not None
                  and all(b.holds(r.metrics.get(b.metric)) for b in bounds)]
    if not qualifying:
        detail = "; ".join(f"{label} eliminated {n}" + (f" ({m} lack the metric)" if m else "")
                           for label, n, m in eliminated)
        raise NothingQualifies(f"no trial of study {study.name!r} qualifies: of {len(done)} {noun}, {detail}",
                               len(done), eliminated, _reachable(feasible, bounds, name, direction))
    sign = 1.0 if direction == "minimize" else -1.0
    ranked = sorted(qualifying, key=lambda r: (sign * r.metrics[name], r.row.trial, r.row.step or 0))
    return Recommendation(ranked[0], name, direction, len(done), len(qualifying), eliminated, ranked, noun)


def _reachable(records: list[Any], bounds: list[Bound], score: str, direction: str) -> list[dict[str, Any]]:
    """The best value each bound's metric (and the score) reaches among ``records``."""
    out = []
    wanted = [(b.metric, "minimize" if b.kind == "max" else "maximize", str(b)) for b in bounds]
    for metric, way, label in wanted + [(score, direction, "task score")]:
        have = [r for r in records if r.metrics.get(metric) is not None]
        if not have:
            out.append({"metric": metric, "bound": label, "best": None, "trial": None, "step": None})
            continue
        sign = 1.0 if way == "minimize" else -1.0
        best = min(have, key=lambda r: (sign * r.metrics[metric], r.row.number))
        out.append({"metric": metric, "bound": label, "best": best.metrics[metric], "trial": best.row.trial,
                    "step": best.row.step if best.row.checkpoint else None})
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser(
        "recommend", help="pick the best task score under metric ceilings, with its evidence",
        description=__doc__.split("\n\n", 1)[1].replace("``", "`"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    p.add_argument("--max", action="append", default=[], metavar="METRIC=VALUE",
                   help="ceiling: keep trials with METRIC <= VALUE (repeatable)")
    p.add_argument("--min", action="append", default=[], metavar="METRIC=VALUE",
                   help="floor: keep trials with METRIC >= VALUE (repeatable)")
    score = p.add_mutually_exclusive_group()
    score.add_argument("--maximize", metavar="METRIC", help="task score to maximize")
    score.add_argument("--minimize", metavar="METRIC",
                       help=f"task score to minimize (default: {DEFAULT_SCORE} when reported, "
                            "else the first objective)")
    p.add_argument("--final-only", action="store_true",
                   help="consider the trials' own (final) points only, not their checkpoints")
    add_format_argument(p, "candidate trial")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print the recommended trial and its evidence; exit 3 when nothing qualifies."""
    from emtune.report import NotStarted, ReportError, load_study_data

    fmt = getattr(args, "format", "table")
    try:
        bounds = [parse_bound(t, "max") for t in args.max or []] + [parse_bound(t, "min") for t in args.min or []]
        study_dir = resolve_study_dir(args.study)
        load_study_spec(study_dir)  # prints every spec problem, exit 2
        study = load_study_data(study_dir)
        score = None
        if getattr(args, "maximize", None):
            score = (args.maximize, "maximize")
        elif getattr(args, "minimize", None):
            score = (args.minimize, "minimize")
        rec = recommend(study, bounds, score, final_only=getattr(args, "final_only", False))
    except NothingQualifies as none:
        _print_none(study, none, bounds, fmt)
        fail(str(none), NOTHING_QUALIFIES)
    except (NotStarted, NotYet) as err:
        fail(str(err), NOTHING_QUALIFIES)
    except (UserError, ReportError) as err:
        fail(str(err))
    evidence = _evidence(study, rec, bounds)
    if fmt == "json":
        print_json(evidence)
    elif fmt == "csv":
        print_csv(evidence["candidates"])
    else:
        print(_text(evidence))
    return OK


def _baseline(study: Any) -> dict[str, float] | None:
    """The undefended baseline's metrics, when the study ran it and it succeeded."""
    values = study.table.baselines.get("undefended")
    return None if not values or "error" in values else values


def _deltas(metrics: dict[str, float], names: list[str], baseline: dict[str, float] | None) -> dict[str, Any]:
    """metric - undefended baseline, for each name both report (None otherwise)."""
    if baseline is None:
        return {n: None for n in names}
    return {n: (metrics[n] - baseline[n]) if metrics.get(n) is not None and baseline.get(n) is not None else None
            for n in names}


def _print_none(study: Any, none: NothingQualifies, bounds: list[Bound], fmt: str) -> None:
    """The answer when nothing qualifies: what eliminated what, and the best reachable values."""
    document = {"study": study.name, "recommended": None, "reason": str(none), "completed": none.completed,
                "constraints": [str(b) for b in bounds],
                "eliminated": [{"by": label, "trials": n} for label, n, _ in none.eliminated],
                "best_reachable": none.reachable}
    if fmt == "json":
        print_json(document)
    elif fmt == "csv":
        print_csv(none.reachable, ["metric", "bound", "best", "trial"])
    else:
        from emtune.report import fmt_value

        lines = ["nothing qualifies; best values reached by a completed trial (that meets the study's constraints):"]
        for r in none.reachable:
            where = "" if r["trial"] is None else f" (trial {r['trial']}" + (
                f" @ step {r['step']})" if r["step"] is not None else ")")
            lines.append(f"  {r['metric']}: {fmt_value(r['best'])}{where}   [{r['bound']}]")
        print("\n".join(lines))


def _evidence(study: Any, rec: Recommendation, bounds: list[Bound]) -> dict[str, Any]:
    from emtune.report import shown_path

    row = rec.record.row
    baseline = _baseline(study)
    compared = list(dict.fromkeys([rec.score, *(b.metric for b in bounds), *study.table.objectives]))
    candidates = [{"rank": i + 1, "trial": r.row.trial, "step": r.row.step if r.row.checkpoint else None,
                   "candidate": r.row.label, "score": r.metrics[rec.score],
                   **{f"delta_{n}": d for n, d in _deltas(r.metrics, compared, baseline).items()},
                   "params": r.row.params, "mlflow_run_id": r.row.mlflow_run_id}
                  for i, r in enumerate(rec.candidates[:CANDIDATES])]
    return {
        "study": study.name,
        "study_dir": shown_path(study.study_dir),
        "trial": row.trial,
        "step": row.step,
        "checkpoint": row.checkpoint,
        "candidate": row.label,
        "optuna_trial": row.number,
        "score": {"metric": rec.score, "direction": rec.direction, "value": rec.record.metrics[rec.score]},
        "constraints": [str(b) for b in bounds],
        "qualifying": rec.qualifying,
        "completed": rec.completed,
        "counted": rec.noun,
        "eliminated": [{"by": label, "trials": n} for label, n, _ in rec.eliminated],
        "pareto_rank": row.rank,
        "params": row.params,
        "defense_params": {k: v for k, v in rec.record.run_params.items() if k.startswith("defense.")},
        "metrics": dict(sorted(rec.record.metrics.items())),
        "mlflow_run_id": row.mlflow_run_id,
        "tracking_uri": study.tracking_uri,
        "mlflow_ui": study.run_url(row.mlflow_run_id) if row.mlflow_run_id else None,
        "adapter_uri": rec.record.adapter_uri,
        "ray_trial_id": row.ray_trial_id,
        "undefended_baseline": baseline,
        "delta_vs_undefended": _deltas(rec.record.metrics, compared, baseline),
        "candidates": candidates,
    }


def _text(ev: dict[str, Any]) -> str:
    from emtune.report import fmt_value

    under = ", ".join(ev["constraints"]) or "no ceilings"
    lines = [f"recommended: trial {ev['candidate']} of study {ev['study']!r}: best {ev['score']['metric']} "
             f"({ev['score']['direction']}) = {fmt_value(ev['score']['value'])} among {ev['qualifying']} of "
             f"{ev['completed']} {ev['counted']} meeting {under}"]
    if ev["checkpoint"]:
        lines.append(f"  a checkpoint: trial {ev['trial']}'s fine-tune stopped at step {ev['step']} (its own adapter below)")
    lines += [f"  eliminated by {e['by']}: {e['trials']}" for e in ev["eliminated"]]
    lines.append(f"pareto rank: {'infeasible' if ev['pareto_rank'] is None else ev['pareto_rank']}")
    lines += ["params:", *(f"  {k} = {fmt_value(v)}" for k, v in sorted(ev["params"].items()))]
    lines += [f"  {k} = {v}" for k, v in sorted(ev["defense_params"].items())]
    lines += ["metrics:", *(f"  {k} = {fmt_value(v)}" for k, v in ev["metrics"].items())]
    if ev["undefended_baseline"] is None:
        lines.append("vs the undefended baseline: not available (the study ran without baselines, or it failed)")
    else:
        lines.append("vs the undefended baseline (metric - baseline):")
        lines += [f"  {k}: {_signed(v)}" for k, v in ev["delta_vs_undefended"].items()]
    lines.append(f"candidates (best {len(ev['candidates'])} of {ev['qualifying']} qualifying):")
    for c in ev["candidates"]:
        deltas = ", ".join(f"{k[6:]} {_signed(v)}" for k, v in c.items() if k.startswith("delta_") and v is not None)
        lines.append(f"  {c['rank']}. trial {c['candidate']}: {ev['score']['metric']} = {fmt_value(c['score'])}"
                     + (f"; vs undefended: {deltas}" if deltas else ""))
    run = f"runs:/{ev['mlflow_run_id']}" if ev["mlflow_run_id"] else "-"
    lines += ["evidence:", f"  MLflow run: {run}", f"  tracking URI: {ev['tracking_uri']}"]
    if ev["mlflow_ui"]:
        lines.append(f"  MLflow UI: {ev['mlflow_ui']} (local stores: start it with `emtune ui {ev['study_dir']}`)")
    lines.append(f"  adapter: {ev['adapter_uri'] or '- (not kept: see evaluation.keep_adapters)'}")
    lines.append(f"  Ray trial: {ev['ray_trial_id'] or '-'}")
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4g}"
