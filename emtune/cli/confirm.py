"""`emtune confirm STUDY`: re-evaluate the front from saved adapters, several seeds, more samples."""

from __future__ import annotations

import argparse
import math

from emtune.cli.common import NOTHING_QUALIFIES, OK, fail, load_optuna_study, load_study_spec, resolve_study_dir
from emtune.cli.output import add_format_argument, print_csv, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("confirm", help="re-evaluate front members with more seeds and samples")
    p.add_argument("study", help="study folder, spec file, or name under ./studies")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds per trial (default 3)")
    p.add_argument("--samples", type=int, default=None, help="samples per question (default: the spec's)")
    p.add_argument("--trial", type=int, action="append", default=None,
                   help="Optuna trial number to confirm instead of the front (repeatable)")
    add_format_argument(p, "confirmed trial and objective")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print each confirmed trial's objectives as mean ± 95% half-width over seeds."""
    from mlflow.tracking import MlflowClient

    from emtune.study.confirm import confirm_front
    from emtune.tracking.mlflow_runs import tracking_uri

    if args.seeds < 1 or (args.samples is not None and args.samples < 1):
        fail("--seeds and --samples must be at least 1")
    study_dir = resolve_study_dir(args.study)
    spec = load_study_spec(study_dir)
    study = load_optuna_study(study_dir, spec)
    known = {t.number for t in study.get_trials()}
    missing = sorted(set(args.trial or []) - known)
    if missing:
        fail(f"no trial {missing} in study {spec.name!r} (trials: 0..{max(known, default=-1)})")
    confirmed = confirm_front(spec, study, MlflowClient(tracking_uri(spec)), args.seeds, args.samples, args.trial)
    if not confirmed:
        fail("nothing to confirm: no completed trial with a tracked adapter", NOTHING_QUALIFIES)
    names = [o.name for o in spec.objectives]
    fmt = getattr(args, "format", "table")
    if fmt != "table":
        records = []
        for c in confirmed:
            for n in names:
                mean, std, half = (None if math.isnan(v) else v for v in c.summary(n))
                records.append({"trial": c.number, "objective": n, "mean": mean, "std": std,
                                "half_width_95": half, "seeds": args.seeds, "params": c.params})
        if fmt == "json":
            print_json(records)
        else:
            print_csv(records)
        return OK
    print("trial  " + "  ".join(f"{n:>24}" for n in names) + "  params")
    for c in confirmed:
        cells = []
        for n in names:
            mean, _, half = c.summary(n)
            cells.append(f"{mean:>13.4g} ± {half:<8.3g}")
        print(f"{c.number:<6} " + "  ".join(cells) + f"  {c.params}")
    print(f"\n{args.seeds} evaluation seed(s) per trial; logged as confirm/<metric>_mean|_std|_n on each trial's run")
    return OK
