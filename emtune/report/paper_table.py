"""The per-defense table in the paper's format, as data, Markdown rows, CSV and LaTeX.

One block per study: its baselines first (``base``: the aligned model before fine-tuning;
``undefended``: the same fine-tune with no defense), then one row per Pareto-front setting. The
columns are the paper's (general and in-domain misalignment and incoherence, the benign score,
when some row reports them) plus the judge-free metrics. Every defended row also carries its
difference from the study's ``undefended`` baseline (Δ; rates in percentage points), so a reader
sees what the defense bought and what it cost. ``write_report`` writes the table beside the
Markdown page as ``paper_table.csv`` (full precision, one column per value, bound and Δ) and
``paper_table.tex`` (a LaTeX ``tabular`` using ``booktabs``, ready to ``\\input``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from emtune.evaluation.sets import MODEL_METRICS, MetricInfo, paper_columns
from emtune.report.data import JUDGE_FREE_COLUMNS, StudyData, fmt_rate, fmt_value, setting_of

BASELINE_LABELS = {"base": "base model (no fine-tuning)", "undefended": "undefended fine-tune"}


@dataclass
class PaperRow:
    """One row: where it comes from, its label, its metrics and its baseline (None for baselines)."""

    study: str
    kind: str  # "baseline" or "front"
    label: str
    metrics: dict[str, float]
    undefended: dict[str, float] | None = None
    trial: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def delta(self, name: str) -> float | None:
        """metric - undefended baseline (None without both)."""
        if self.undefended is None or self.metrics.get(name) is None or self.undefended.get(name) is None:
            return None
        return self.metrics[name] - self.undefended[name]


def paper_rows(studies: list[StudyData]) -> tuple[list[MetricInfo], list[PaperRow]]:
    """The columns any row reports (judged columns only when present, judge-free always) and
    the rows: per study its baselines, then its front members."""
    rows: list[PaperRow] = []
    for study in studies:
        baselines = {k: v for k, v in study.table.baselines.items() if "error" not in v}
        undefended = baselines.get("undefended")
        for kind in ("base", "undefended"):
            if kind in baselines:
                rows.append(PaperRow(study.name, "baseline", BASELINE_LABELS[kind], baselines[kind]))
        by_number = {r.row.number: r for r in study.trials}
        for member in study.table.front:
            record = by_number[member.number]
            rows.append(PaperRow(study.name, "front", setting_of(study, record), record.metrics, undefended,
                                 member.number))
    present = [m for m in paper_columns() if any(m.name in r.metrics for r in rows)]
    # RL studies: whether the task was learned is the reward (the paper's RL criterion)
    rl = [MODEL_METRICS["train_reward"]] if any("train_reward" in r.metrics for r in rows) else []
    return present + list(JUDGE_FREE_COLUMNS) + rl, rows


def markdown_cells(row: PaperRow, columns: list[MetricInfo]) -> list[str]:
    """The row's cells: rates as ``x.xx% [lo, hi]``, others as numbers, each with its Δ."""
    cells = []
    for m in columns:
        text = fmt_rate(row.metrics, m.name) if m.rate else fmt_value(row.metrics.get(m.name))
        delta = row.delta(m.name)
        if delta is not None:
            text += f" (Δ {100 * delta:+.2f} pp)" if m.rate else f" (Δ {delta:+.4g})"
        cells.append(text)
    return cells


def to_csv(columns: list[MetricInfo], rows: list[PaperRow]) -> str:
    """Full-precision CSV: per metric its value, Wilson bounds (rates) and Δ vs undefended."""
    header = ["study", "row", "trial", "defense_setting"]
    for m in columns:
        header += [m.name] + ([f"{m.name}_low", f"{m.name}_high"] if m.rate else []) + [f"{m.name}_delta_vs_undefended"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[Any] = [row.study, row.kind, "" if row.trial is None else row.trial, row.label]
        for m in columns:
            names = [m.name] + ([f"{m.name}_low", f"{m.name}_high"] if m.rate else [])
            cells += [_csv(row.metrics.get(n)) for n in names] + [_csv(row.delta(m.name))]
        writer.writerow(cells)
    return buffer.getvalue()


def to_latex(columns: list[MetricInfo], rows: list[PaperRow]) -> str:
    """A booktabs ``tabular``: rates in %, each defended row's Δ vs undefended in small type."""
    heads = [_tex(m.title) + (r" (\%)" if m.rate else "") for m in columns]
    out = ["% emtune paper-format table; needs \\usepackage{booktabs}",
           "\\begin{tabular}{ll" + "r" * len(columns) + "}", "\\toprule",
           "Study & Defense (setting) & " + " & ".join(heads) + " \\\\", "\\midrule"]
    study = None
    for row in rows:
        if study is not None and row.study != study:
            out.append("\\midrule")
        study = row.study
        cells = [_tex(row.study), _tex(row.label) if row.kind == "front" else f"\\emph{{{_tex(row.label)}}}"]
        for m in columns:
            value, delta = row.metrics.get(m.name), row.delta(m.name)
            if value is None:
                cells.append("--")
                continue
            text = f"{100 * value:.2f}" if m.rate else f"{value:.4g}"
            if delta is not None:
                text += f" {{\\scriptsize (${100 * delta:+.2f}$)}}" if m.rate else f" {{\\scriptsize (${delta:+.3g}$)}}"
            cells.append(text)
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def _csv(value: Any) -> Any:
    return "" if value is None else repr(value) if isinstance(value, float) else value


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(char, escaped)
    return text
