"""`emtune pareto STUDY`: print the study's Pareto front (table or JSON)."""

from __future__ import annotations

import argparse
import json

from emtune.cli.common import fail, load_study_spec, resolve_study_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("pareto", help="print a study's Pareto front")
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--all", action="store_true", help="list every trial, not only the front")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Read the Optuna study (no Ray, no MLflow) and print its front."""
    import optuna

    from emtune.study.runner import StudyPaths
    from emtune.tracking.front import format_table, front_table

    study_dir = resolve_study_dir(args.study)
    spec = load_study_spec(study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=spec.name, storage=StudyPaths(study_dir).optuna_url)
    except KeyError:
        fail(f"{study_dir}: no Optuna study named {spec.name!r} yet (the study has not started a trial)")
    refs = [o.reference for o in spec.objectives]
    table = front_table(study, [o.name for o in spec.objectives], [o.direction for o in spec.objectives],
                        None if None in refs else refs)
    if args.format == "json":
        print(json.dumps(table.to_dict(), indent=2))
    else:
        print(format_table(table, all_trials=args.all))
    return 0
