"""`emtune run SPEC`: run a study on a local Ray (or join the cluster at RAY_ADDRESS)."""

from __future__ import annotations

import argparse
import os

from emtune.cli.common import (FAILED, OK, add_set_option, check_tracking_login_or_exit, exit_on_study_error, fail,
                               load_spec_or_exit)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("run", help="run a study (local Ray unless RAY_ADDRESS names a cluster)",
                       description="Validate the spec and read its inputs (exit 2 with every problem), then "
                                   "run the baselines and search.num_trials trials and print the front.")
    p.add_argument("spec", help="study spec YAML")
    add_set_option(p)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--extend", type=int, default=None, metavar="N",
                   help="add N trials to the existing study of this spec (same Optuna study, same parent run)")
    p.set_defaults(func=main)


def check_cluster_address() -> None:
    """``RAY_ADDRESS`` set to a dashboard URL is how Ray's job clients reach a cluster; a driver
    cannot join through it. Say what to do instead of failing inside ``ray.init``."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        fail(f"RAY_ADDRESS is {address}, a Ray dashboard URL: that is where `emtune submit` sends a study "
             "(`emtune submit SPEC --wait`); `emtune run` joins a cluster only from one of its nodes "
             "(RAY_ADDRESS=auto or HOST:6379). Unset RAY_ADDRESS to run locally.")


def main(args: argparse.Namespace) -> int:
    """Validate everything first, then run; print where to look afterwards."""
    check_cluster_address()
    spec = load_spec_or_exit(args.spec, inputs=True, hub="load", overrides=args.overrides)
    check_tracking_login_or_exit(spec)
    if args.extend is not None and (args.extend < 1 or not (spec.study_dir / "optuna.db").is_file()):
        fail(f"--extend needs N >= 1 and an existing study at {spec.study_dir}; run it first without --extend")
    from emtune.study.runner import run_study
    from emtune.tracking.front import format_table

    with exit_on_study_error(spec):
        table = run_study(spec, num_cpus=args.num_cpus, extend=args.extend)
    print()
    print(format_table(table))
    print(f"\nstudy folder: {spec.study_dir}")
    print(f"  front:      emtune pareto {spec.study_dir}")
    print(f"  MLflow UI:  emtune ui {spec.study_dir}   (then open http://127.0.0.1:5000)")
    print(f"  Optuna:     optuna-dashboard --host 127.0.0.1 sqlite:///{spec.study_dir / 'optuna.db'}")
    return OK if table.front else FAILED
