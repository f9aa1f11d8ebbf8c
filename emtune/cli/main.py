"""The `emtune` command: one small module per verb.

Each verb imports the work it does inside its ``main`` (Ray, MLflow, torch and the study code),
so that `emtune --help`, `emtune validate` and the read-only verbs start in about a second.

Conventions shared by every verb (docs/cli.md): results on stdout in ``--format table|json|csv``,
messages on stderr, distinct exit codes (:mod:`emtune.cli.common`), ``--version``, and a closed
pipe (``emtune pareto STUDY | head -3``) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys

from emtune.cli import (confirm, data, env, jobs, pareto, persona, recommend, report, resume, run, submit, ui,
                        validate)
from emtune.cli.common import CLOSED_PIPE, EXIT_CODES, INTERRUPTED

VERBS = (run, resume, validate, pareto, confirm, recommend, report, ui, submit, jobs, data, persona, env)


def version() -> str:
    """The installed emtune's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("emtune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    codes = "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="emtune",
        description="Hyperparameter studies of in-training defenses against emergent misalignment.",
        epilog=f"exit codes:\n{codes}\n\nenvironment: RAY_ADDRESS (a Ray cluster: its dashboard URL for "
               "submit/status/logs), MLFLOW_TRACKING_URI, HF_HUB_OFFLINE, EMTUNE_CACHE_DIR; see docs/cli.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"emtune {version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader (head, less) is gone: say nothing more, and keep Python's exit-time flush
        # of stdout from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return CLOSED_PIPE
    except KeyboardInterrupt:
        print("emtune: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
