"""`emtune report STUDY [STUDY ...] --out reports/NAME/`: the studies' fronts as a readable page."""

from __future__ import annotations

import argparse
from pathlib import Path

from emtune.cli.common import NOTHING_QUALIFIES, fail, load_study_spec, resolve_study_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser(
        "report", help="write a Markdown + HTML report of one or more studies",
        description="Write README.md (front tables, plots, the paper-format table, versions, spec, "
                    "MLflow links), PNG plots and a self-contained front.html into one folder.")
    p.add_argument("studies", nargs="+", metavar="STUDY", help="study folder, spec file, or name under ./studies")
    p.add_argument("--out", default=None,
                   help="output folder (default: reports/<first study's name>/); replaced as a whole")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Validate every study first (exit 2 on the first bad one), then write the report."""
    from emtune.report import NotStarted, ReportError, write_report

    dirs = [resolve_study_dir(s) for s in args.studies]
    specs = [load_study_spec(d) for d in dirs]  # prints every spec problem, exit 2
    out = Path(args.out) if args.out else Path("reports") / specs[0].name
    try:
        readme = write_report(dirs, out)
    except NotStarted as err:
        fail(str(err), NOTHING_QUALIFIES)
    except ReportError as err:
        fail(str(err))
    files = sorted(p.name for p in readme.parent.iterdir())
    print(f"report of {', '.join(s.name for s in specs)} written to {readme.parent}: {', '.join(files)}")
    return 0
