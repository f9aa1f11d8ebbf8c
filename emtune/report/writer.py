"""`emtune report`: one or more finished studies as a page people can read.

``write_report(study_dirs, out_dir)`` writes ``out_dir/README.md`` (Markdown), PNG figures (a
front per study, every study's front overlaid, hypervolume by completed trial) and
``front.html`` (a self-contained interactive page), and the paper-format table as
``paper_table.csv`` and ``paper_table.tex`` (:mod:`emtune.report.paper_table`).

Everything is written into a temporary folder beside ``out_dir`` and moved into place at the end:
a failing report leaves the previous one (or nothing), never half a page. An existing ``out_dir``
is replaced only when it is empty or an earlier emtune report (its README carries ``MARKER``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from emtune.report.data import MARKER, ReportError, StudyData, load_study_data
from emtune.report.figures import front_html, plot_hypervolume, plot_overlay
from emtune.report.markdown import render
from emtune.report.paper_table import paper_rows, to_csv, to_latex
from emtune.tracking.plots import plot_front


def write_report(study_dirs: list[Path], out_dir: Path) -> Path:
    """Write the report of ``study_dirs`` into ``out_dir``; returns the path of its README.md."""
    if not study_dirs:
        raise ReportError("give at least one study")
    studies = [load_study_data(Path(d)) for d in study_dirs]
    out_dir = Path(out_dir).resolve()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        slugs = _slugs(studies)
        figures = {"overlay": "fronts_overlay.png", "hypervolume": "hypervolume.png"}
        for study, slug in zip(studies, slugs):
            plot_front(study.table, tmp / f"front_{slug}.png", title=f"{study.name}: Pareto front",
                       stopped_early=not any(o.relative for o in study.spec.objectives))
        skipped = plot_overlay(studies, tmp / figures["overlay"])
        plot_hypervolume(studies, tmp / figures["hypervolume"])
        (tmp / "front.html").write_text(front_html(studies), encoding="utf-8")
        columns, rows = paper_rows(studies)
        (tmp / "paper_table.csv").write_text(to_csv(columns, rows), encoding="utf-8")
        (tmp / "paper_table.tex").write_text(to_latex(columns, rows), encoding="utf-8")
        text = render(studies, slugs, figures, skipped)
        (tmp / "README.md").write_text(text, encoding="utf-8")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "README.md"


def _slugs(studies: list[StudyData]) -> list[str]:
    names = [s.name for s in studies]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ReportError(f"{out_dir} exists and is not a folder")
    readme = out_dir / "README.md"
    ours = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(MARKER)
    if any(out_dir.iterdir()) and not ours:
        raise ReportError(f"{out_dir} holds files that are not an emtune report; pass another --out "
                          f"or empty that folder")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder in with renames (same file system: atomic per rename)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
