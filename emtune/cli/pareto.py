"""`emtune pareto STUDY`: print the study's Pareto front (or every trial) and its baselines.

Reads the Optuna study only (no Ray, no MLflow) and writes nothing. Rows: the front first, by the
first objective, then (``--all``) dominated, infeasible and unfinished trials. The baselines
(``base``: the model before fine-tuning; ``undefended``: fine-tuned with no defense) are shown
below the table (JSON: ``baselines``; CSV: rows of kind ``baseline``). Exit 3 when the study has
no front yet (no completed feasible trial).
"""

from __future__ import annotations

import argparse

from emtune.cli.common import NOTHING_QUALIFIES, OK, load_optuna_study, load_study_spec, resolve_study_dir
from emtune.cli.output import add_format_argument, description, print_csv, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("pareto", help="print a study's Pareto front and baselines (reads only)",
                       description=description(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    add_format_argument(p, "trial or baseline")
    p.add_argument("--all", action="store_true", help="list every trial, not only the front")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Read the Optuna study and print its front."""
    from emtune.tracking.front import format_table, front_table

    study_dir = resolve_study_dir(args.study)
    spec = load_study_spec(study_dir)
    study = load_optuna_study(study_dir, spec)
    refs = [o.reference for o in spec.objectives]
    table = front_table(study, [o.name for o in spec.objectives], [o.direction for o in spec.objectives],
                        None if None in refs else refs)
    if args.format == "json":
        document = table.to_dict()
        if not args.all:
            document.pop("trials")
        print_json(document)
    elif args.format == "csv":
        print_csv(table.records(all_trials=args.all))
    else:
        print(format_table(table, all_trials=args.all))
    return OK if table.front else NOTHING_QUALIFIES
