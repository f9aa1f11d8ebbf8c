"""`emtune pareto STUDY`: print the study's Pareto front (table or JSON)."""

from __future__ import annotations

import argparse
import json

from emtune.cli.common import load_optuna_study, load_study_spec, resolve_study_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("pareto", help="print a study's Pareto front")
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--all", action="store_true", help="list every trial, not only the front")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Read the Optuna study (no Ray, no MLflow) and print its front."""
    from emtune.tracking.front import format_table, front_table

    study_dir = resolve_study_dir(args.study)
    spec = load_study_spec(study_dir)
    study = load_optuna_study(study_dir, spec)
    refs = [o.reference for o in spec.objectives]
    table = front_table(study, [o.name for o in spec.objectives], [o.direction for o in spec.objectives],
                        None if None in refs else refs)
    if args.format == "json":
        print(json.dumps(table.to_dict(), indent=2))
    else:
        print(format_table(table, all_trials=args.all))
    return 0
