"""`emtune resume STUDY`: continue a study whose driver stopped (no trial lost or duplicated)."""

from __future__ import annotations

import argparse

from emtune.cli.common import (FAILED, OK, check_tracking_login_or_exit, exit_on_study_error, load_study_spec,
                               resolve_study_dir)
from emtune.cli.run import check_cluster_address


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("resume", help="continue an interrupted study from its folder")
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Restore the Tuner, finish unfinished trials, close orphans, print the front."""
    from emtune.study.runner import resume_study
    from emtune.tracking.front import format_table

    check_cluster_address()
    spec = load_study_spec(resolve_study_dir(args.study), check_files=True)
    check_tracking_login_or_exit(spec)
    with exit_on_study_error(spec):
        table = resume_study(spec, num_cpus=args.num_cpus)
    print()
    print(format_table(table))
    return OK if table.front else FAILED
