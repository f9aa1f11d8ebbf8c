"""The `emtune` command: one small module per verb.

Each verb imports the work it does inside its ``main`` (Ray, MLflow, torch and the study code),
so that `emtune --help`, `emtune validate` and the read-only verbs start in about a second.
"""

from __future__ import annotations

import argparse
import sys

from emtune.cli import (confirm, data, jobs, pareto, persona, recommend, report, resume, run, submit, ui,
                        validate)

VERBS = (run, resume, validate, pareto, confirm, recommend, report, ui, submit, jobs, data, persona)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    parser = argparse.ArgumentParser(
        prog="emtune",
        description="Hyperparameter studies of in-training defenses against emergent misalignment.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
