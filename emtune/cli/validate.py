"""`emtune validate SPEC`: check a spec and its inputs without running anything."""

from __future__ import annotations

import argparse

from emtune.cli.common import add_set_option, check_inputs_or_exit, load_spec_or_exit


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("validate", help="check a study spec (exit 2 with every problem listed)")
    p.add_argument("spec", help="study spec YAML")
    add_set_option(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Validate the spec and read its datasets and question set."""
    spec = load_spec_or_exit(args.spec, args.overrides)
    counts = check_inputs_or_exit(spec)
    details = ", ".join(f"{v} {k}" for k, v in counts.items())
    params = ", ".join(spec.search.parameters)
    print(f"{args.spec}: ok: study {spec.name!r}, {spec.search.num_trials} trials over [{params}], "
          f"defenses [{', '.join(d.name for d in spec.defenses) or 'none'}]; {details}")
    return 0
