"""Two comparisons a study's page makes beside its front.

- **Early stopping as an arm**: the ``stopped_early`` baseline (the undefended fine-tune
  evaluated at its stop points) against the study's candidates: for each stop point, its
  objective values and how many front candidates dominate it. A defense earns its cost where the
  front dominates every stopped-early point; a stop point no candidate dominates means stopping
  early alone reaches a trade-off the defense does not.
- **Can the judge-free monitor be trusted here?**: per monitor signal (``ood_drift``,
  ``persona_projection``, ``persona_shift``), Spearman's ρ with the judged general misalignment
  over every evaluated candidate of the study (trials, their checkpoints and the baselines), with
  its 95% interval (:func:`emtune.evaluation.monitor.spearman`).

Pure string building over :class:`~emtune.report.data.StudyData`.
"""

from __future__ import annotations

from typing import Any

from emtune.evaluation.monitor import JUDGED_TARGET, signal_correlations
from emtune.evaluation.sets import monitor_signals
from emtune.report.data import ARROWS, StudyData, fmt_value
from emtune.tracking.pareto import dominating_count


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def early_stopping_section(study: StudyData) -> list[str]:
    """The stopped-early baseline's points against the study's front (empty without it)."""
    record = study.table.baselines.get("stopped_early")
    if not record:
        return []
    out = ["### Early stopping as an arm", ""]
    if "error" in record:
        return out + [f"The stopped-early baseline failed: {record['error']}", ""]
    t = study.table
    relative = [o.name for o in study.spec.objectives if o.relative is not None]
    front = [r.values for r in t.front]
    header = ["stop point", "step", *(f"{n} {ARROWS[d]}" for n, d in zip(t.objectives, t.directions)),
              "front candidates dominating it"]
    rows, undominated = [], 0
    for point in record["points"]:
        values = [point.get(name) for name in t.objectives]
        count: Any = "-"
        if None not in values and not relative and front:
            count = dominating_count(values, front, t.directions)
            undominated += count == 0
        rows.append([point.get("point"), point.get("step"), *(fmt_value(v) for v in values), count])
    out += ["The undefended fine-tune evaluated at its stop points (`baselines.stop_points`): the cheapest "
            "thing that might work. A defense is worth its cost where front candidates dominate these points.", ""]
    out += _table(header, rows)
    if relative:
        out += ["", f"Dominance not computed: objectives {relative} are relative to a baseline."]
    elif front:
        verdict = ("every stop point is dominated by the front" if not undominated else
                   f"{undominated} stop point(s) are dominated by no front candidate: stopping early alone "
                   "reaches trade-offs this study's defenses do not")
        out += ["", f"Verdict: {verdict}."]
    return out + [""]


def monitor_section(study: StudyData) -> list[str]:
    """Per monitor signal, its rank correlation with judged misalignment over the candidates."""
    signals = [m.name for m in monitor_signals() if any(m.name in c for c in study.evaluated)]
    if not signals:
        return []
    out = ["### Can the judge-free monitor be trusted here?", ""]
    if not any(JUDGED_TARGET in c for c in study.evaluated):
        return out + [f"No candidate has a judged `{JUDGED_TARGET}` (this study ran without a judge), so the "
                      f"monitor's signals ({', '.join(signals)}) cannot be checked against it here.", ""]
    correlations = signal_correlations(study.evaluated, signals)
    rows = []
    for name, c in correlations.items():
        interval = "-" if c.low is None else f"[{c.low:.2f}, {c.high:.2f}]"
        rows.append([name, "-" if c.rho is None else f"{c.rho:.2f}", interval, c.n])
    out += [f"Spearman's ρ between each monitor signal and the judged `{JUDGED_TARGET}`, over every evaluated "
            "candidate (trials, their checkpoints, baselines); 95% interval by Fisher's z with the "
            "Fieller–Hartley–Pearson variance. ρ near 1 with an interval clear of 0: the signal ranks "
            "candidates as the judge does, and can stand in for it (as an objective, a constraint or for "
            "pruning) on this model.", ""]
    return out + _table(["signal", "ρ", "95% interval", "candidates"], rows) + [""]
