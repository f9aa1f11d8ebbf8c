"""Front plots (PNG via matplotlib's Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

from emtune.tracking.front import FrontTable


def plot_front(table: FrontTable, path: Path, title: str = "", stopped_early: bool = True) -> Path:
    """Scatter of the first two objectives: every candidate grey, the front in colour and joined.

    Infeasible candidates are drawn as crosses. With one objective, values are plotted by trial.
    With ``stopped_early`` (callers turn it off for objectives relative to a baseline), the
    stopped-early baseline's points are drawn as black triangles for comparison.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    done = [r for r in table.rows if r.values]
    if len(table.objectives) >= 2:
        xi, yi, xlabel, ylabel = 0, 1, table.objectives[0], table.objectives[1]
        xs = lambda rows: [r.values[xi] for r in rows]  # noqa: E731
        ys = lambda rows: [r.values[yi] for r in rows]  # noqa: E731
    else:
        xlabel, ylabel = "trial", table.objectives[0]
        xs = lambda rows: [r.number for r in rows]  # noqa: E731
        ys = lambda rows: [r.values[0] for r in rows]  # noqa: E731
    others = [r for r in done if r.rank != 0 and r.feasible]
    infeasible = [r for r in done if not r.feasible]
    front = sorted((r for r in done if r.rank == 0), key=lambda r: xs([r])[0])
    ax.scatter(xs(others), ys(others), c="0.6", s=22, label="dominated")
    if infeasible:
        ax.scatter(xs(infeasible), ys(infeasible), c="0.4", marker="x", s=26, label="infeasible")
    ax.plot(xs(front), ys(front), "-o", c="tab:red", ms=6, label="Pareto front")
    early = table.stopped_early() if stopped_early and len(table.objectives) >= 2 else []
    if early:
        ax.plot([v[0] for _, v in early], [v[1] for _, v in early], "^--", c="black", ms=6, lw=0.8,
                label="undefended, stopped early")
    for r in front:  # "7" for trial 7's own point, "7@300" for its checkpoint at step 300
        text = f"{r.trial}@{r.step}" if r.checkpoint else str(r.trial)
        ax.annotate(text, (xs([r])[0], ys([r])[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    arrows = {"minimize": "↓", "maximize": "↑"}
    ax.set_xlabel(xlabel + (f" ({arrows[table.directions[0]]})" if len(table.objectives) >= 2 else ""))
    ax.set_ylabel(ylabel + f" ({arrows[table.directions[min(1, len(table.directions) - 1)]]})")
    ax.set_title(title or "Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
