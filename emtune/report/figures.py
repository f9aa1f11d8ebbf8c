"""Figures of ``emtune report``: every study's front overlaid, hypervolume by completed trial
(PNG, matplotlib Agg), and ``front.html``: the overlay as inline SVG with a tooltip per trial,
a legend that shows and hides studies, and the front tables with links to the MLflow UI.

The HTML loads nothing: no CDN, no fonts, no scripts from elsewhere, so it opens offline and in
sandboxed viewers. The only addresses in it are MLflow UI links (127.0.0.1 for local stores).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from emtune.report.data import ARROWS, StudyData, fmt_value, setting_of, shown_path

#: matplotlib's tab10, so PNG and HTML colour a study the same way.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def labels(studies: list[StudyData]) -> list[str]:
    """Legend labels: the study's defenses, with the study name where two share defenses."""
    names = [s.defenses for s in studies]
    return [n if names.count(n) == 1 else f"{n} ({s.name})" for n, s in zip(names, studies)]


def _axes(studies: list[StudyData]) -> tuple[list[int], list[str], list[str]]:
    """Studies sharing the first study's plotted objectives; their axis names and directions."""
    first = studies[0].table
    k = min(2, len(first.objectives))
    key = (first.objectives[:k], first.directions[:k])
    keep = [i for i, s in enumerate(studies) if (s.table.objectives[:k], s.table.directions[:k]) == key]
    return keep, first.objectives[:k], first.directions[:k]


def _xy(study: StudyData, row: Any, dims: int) -> tuple[float, float]:
    return (row.values[0], row.values[1]) if dims == 2 else (float(row.number), row.values[0])


def _groups(study: StudyData) -> tuple[list[Any], list[Any], list[Any]]:
    """(front sorted along x, dominated feasible, infeasible) completed rows."""
    done = [r for r in study.table.rows if r.values]
    front = sorted((r for r in done if r.rank == 0), key=lambda r: r.values[0])
    return front, [r for r in done if r.rank not in (0, None)], [r for r in done if r.rank is None]


def plot_overlay(studies: list[StudyData], path: Path) -> list[str]:
    """All fronts on one plot, one colour per study; returns the studies left out (other axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep, names, directions = _axes(studies)
    dims = len(names)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for i, label in zip(keep, [labels(studies)[i] for i in keep]):
        study, colour = studies[i], PALETTE[i % len(PALETTE)]
        front, dominated, infeasible = _groups(study)

        def pts(rows: list[Any], study: StudyData = study) -> tuple[list[float], list[float]]:
            xy = [_xy(study, r, dims) for r in rows]
            return [x for x, _ in xy], [y for _, y in xy]

        ax.scatter(*pts(dominated), facecolors="none", edgecolors=colour, s=24, alpha=0.6)
        if infeasible:
            ax.scatter(*pts(infeasible), c=colour, marker="x", s=24, alpha=0.6)
        ax.plot(*pts(front), "-o", c=colour, ms=6, label=label)
    if dims == 2:
        ax.set_xlabel(f"{names[0]} ({ARROWS[directions[0]]})")
        ax.set_ylabel(f"{names[1]} ({ARROWS[directions[1]]})")
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{names[0]} ({ARROWS[directions[0]]})")
    ax.set_title("Pareto fronts by defense")
    ax.ticklabel_format(useOffset=False)  # an offset (+5.397) hides the values people read off
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="defenses", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [studies[i].name for i in range(len(studies)) if i not in keep]


def plot_hypervolume(studies: list[StudyData], path: Path) -> Path:
    """Hypervolume after each finished trial (with all its checkpoint candidates), one line per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for i, (study, label) in enumerate(zip(studies, labels(studies))):
        hv = study.table.hypervolume_trials
        if hv:
            ax.step(range(1, len(hv) + 1), hv, where="post", marker="o", ms=4, c=PALETTE[i % len(PALETTE)],
                    label=f"{label}, reference {study.table.reference_source}")
    if not any(s.table.hypervolume for s in studies):
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume")
    ax.set_title("Hypervolume by completed trial")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- front.html -------------------------------------------------------------------------------

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 460, 70, 20, 20, 50

SCRIPT = """
for (const box of document.querySelectorAll('input[data-study]')) {
  box.addEventListener('change', () => {
    for (const g of document.querySelectorAll('g.' + box.dataset.study)) {
      g.style.display = box.checked ? '' : 'none';
    }
  });
}
"""

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
svg circle:hover { stroke-width: 3; }
.legend label { margin-right: 1.2em; }
"""


def _scale(values: list[float], lo_px: float, hi_px: float):
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.06 or max(abs(high) * 0.06, 0.5)
    low, high = low - pad, high + pad
    return (lambda v: lo_px + (v - low) / (high - low) * (hi_px - lo_px)), low, high


def _tick(value: float, low: float, high: float) -> str:
    """A tick label with just enough decimals to tell five ticks over [low, high] apart."""
    step = (high - low) / 5
    decimals = max(0, min(10, 1 - math.floor(math.log10(step)))) if step > 0 else 3
    return f"{value:.{decimals}f}"


def _tooltip(study: StudyData, row: Any) -> str:
    lines = [f"{study.name}: trial {row.label} (rank {'infeasible' if row.rank is None else row.rank})"]
    lines += [f"{n} = {fmt_value(v)}" for n, v in zip(study.table.objectives, row.values)]
    lines += [f"{k} = {fmt_value(v)}" for k, v in sorted(row.params.items())]
    lines.append(f"MLflow run: {row.mlflow_run_id or '-'}")
    return html.escape("\n".join(lines))


def _label(x: float, y: float, text: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{html.escape(text)}</text>")


def _svg(studies: list[StudyData]) -> str:
    keep, names, directions = _axes(studies)
    dims = len(names)
    rows = [(i, r) for i in keep for r in studies[i].table.rows if r.values]
    sx, x0, x1 = _scale([_xy(studies[i], r, dims)[0] for i, r in rows], LEFT, W - RIGHT)
    sy, y0, y1 = _scale([_xy(studies[i], r, dims)[1] for i, r in rows], H - BOTTOM, TOP)
    mid_x, mid_y = (LEFT + W - RIGHT) / 2, (TOP + H - BOTTOM) / 2
    parts = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="Pareto fronts">',
             f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
             'fill="none" stroke="#999"/>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * (k + 0.5) / 5, y0 + (y1 - y0) * (k + 0.5) / 5
        parts.append(_label(sx(xv), H - BOTTOM + 16, _tick(xv, x0, x1)))
        parts.append(_label(LEFT - 6, sy(yv) + 4, _tick(yv, y0, y1), anchor="end"))
    xlabel = f"{names[0]} {ARROWS[directions[0]]}" if dims == 2 else "trial"
    parts.append(_label(mid_x, H - 12, xlabel, size=13))
    parts.append(_label(16, mid_y, f"{names[-1]} {ARROWS[directions[-1]]}", size=13,
                        extra=f' transform="rotate(-90 16 {mid_y:.1f})"'))
    for i in keep:
        study, colour = studies[i], PALETTE[i % len(PALETTE)]
        front, dominated, infeasible = _groups(study)
        parts.append(f'<g class="study{i}">')
        if len(front) > 1:
            points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in (_xy(study, r, dims) for r in front))
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        styles = ((dominated, 4.5, f'fill="white" stroke="{colour}"'),
                  (infeasible, 4.5, f'fill="#ddd" stroke="{colour}" stroke-dasharray="2"'),
                  (front, 6, f'fill="{colour}" stroke="{colour}"'))
        for group, radius, style in styles:
            for r in group:
                x, y = _xy(study, r, dims)
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" {style} stroke-width="1.5">'
                             f"<title>{_tooltip(study, r)}</title></circle>")
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def _front_table(study: StudyData) -> str:
    objectives = study.table.objectives
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", *objectives, "defense (setting)", "MLflow run"])
    body = []
    by_number = {r.row.number: r for r in study.trials}
    for row in study.table.front:
        url = study.run_url(row.mlflow_run_id) if row.mlflow_run_id else None
        run = html.escape(row.mlflow_run_id or "-")
        link = f'<a href="{html.escape(url)}">{run}</a>' if url else run
        cells = [row.label, *(fmt_value(v) for v in row.values), setting_of(study, by_number[row.number])]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + f"<td>{link}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>" if body else "<p>No completed feasible trial yet.</p>"


def front_html(studies: list[StudyData]) -> str:
    """The self-contained interactive page (inline SVG, inline CSS and a few lines of inline JS)."""
    keep, _, _ = _axes(studies)
    legend = " ".join(
        f'<label><input type="checkbox" checked data-study="study{i}"> '
        f'<span style="color:{PALETTE[i % len(PALETTE)]}">&#9679;</span> {html.escape(label)}</label>'
        for i, label in enumerate(labels(studies)) if i in keep)
    sections = []
    for study in studies:
        note = "" if study.local_tracking else f" (tracking: {html.escape(study.tracking_uri)})"
        command = html.escape(f"emtune ui {shown_path(study.study_dir)}")
        ui = (f"<p>Run links open the MLflow UI served by <code>{command}</code> on 127.0.0.1:5000{note}.</p>"
              if study.experiment_id else "")
        sections.append(f"<h2>{html.escape(study.name)}: Pareto front</h2>{ui}{_front_table(study)}")
    title = "emtune fronts: " + ", ".join(s.name for s in studies)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            "<p>Hover a point for its trial, objectives, parameters and MLflow run. Filled points joined "
            "by a line: the Pareto front; hollow: dominated; dashed grey: infeasible.</p>\n"
            f"<div class=\"legend\">{legend}</div>\n{_svg(studies)}\n{''.join(sections)}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")
