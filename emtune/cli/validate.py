"""`emtune validate SPEC|STUDY ...`: check specs and their inputs without running anything.

Each argument is a spec file or a study folder (its stored ``spec.yaml``). Every problem of every
spec is printed as ``file:line: path: message`` (stderr); a spec that validates gets one line
saying what a run would do (stdout), with the trial count including the baseline trials. No
network is used unless ``--online`` (then the Hugging Face Hub is asked whether each hub model
and dataset id exists; nothing is downloaded). Exit 0 when every spec is valid, 2 when any has a
problem, 4 when only the hub could not be reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emtune.cli.common import OK, UNAVAILABLE, USAGE_ERROR, Checked, add_set_option, check_spec_file, print_problems
from emtune.cli.output import add_format_argument, description, print_csv, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the verb."""
    p = sub.add_parser("validate", help="check study specs and their inputs (exit 2 with every problem listed)",
                       description=description(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", metavar="SPEC|STUDY", help="study spec YAML files and/or study folders")
    add_set_option(p)
    p.add_argument("--online", action="store_true",
                   help="also ask the Hugging Face Hub whether hub model and dataset ids exist (no downloads)")
    add_format_argument(p, "problem (or valid spec)")
    p.set_defaults(func=main)


def spec_file(target: str) -> Path:
    """The spec file of an argument: the file itself, or a study folder's stored spec.yaml."""
    path = Path(target).expanduser()
    return path / "spec.yaml" if path.is_dir() else path


def summary(checked: Checked) -> dict[str, Any]:
    """What a run of a valid spec would do, as data."""
    spec = checked.spec
    kinds = list(spec.baselines.kinds) if spec.baselines.enabled else []
    return {"study": spec.name, "trials": spec.search.num_trials, "baselines": kinds, "runs": spec.trial_count,
            "parameters": list(spec.search.parameters), "defenses": [d.name for d in spec.defenses],
            "objectives": [f"{o.name} ({o.direction})" for o in spec.objectives], "inputs": checked.counts,
            "not_checked_offline": checked.unchecked}


def line(checked: Checked) -> str:
    """The one-line summary of a valid spec."""
    s = summary(checked)
    trials = f"{s['trials']} trials"
    if s["baselines"]:
        from emtune.study.outcomes import baseline_trials  # optuna: only for a spec with baselines

        runs = baseline_trials(s["baselines"])  # one undefended fine-tune measures stopped_early too
        trials += (f" + {len(runs)} baseline{'s' if len(runs) > 1 else ''} "
                   f"({', '.join(' + '.join(kinds) for kinds in runs)}) = {s['runs']} runs")
    inputs = ", ".join(f"{v} {k}" for k, v in s["inputs"].items())
    text = (f"{checked.file}: ok: study {s['study']!r}, {trials} over [{', '.join(s['parameters'])}], "
            f"defenses [{', '.join(s['defenses']) or 'none'}]; {inputs}")
    if s["not_checked_offline"]:
        text += f"; not checked offline: {', '.join(s['not_checked_offline'])} (--online asks the hub)"
    if checked.unreachable:
        text += f"; {len(checked.unreachable)} hub id(s) not checked: the hub did not answer (see above)"
    return text


def main(args: argparse.Namespace) -> int:
    """Validate every spec; print what each would run, or every problem."""
    results = [check_spec_file(spec_file(t), inputs=True, hub="exists" if args.online else "skip",
                               overrides=args.overrides) for t in args.specs]
    for checked in results:
        if checked.problems:
            print_problems(checked)
        for note in checked.unreachable:
            print(f"emtune: {checked.file}: not checked: {note}", file=sys.stderr)
    if args.format == "json":
        print_json([_record(c) for c in results])
    elif args.format == "csv":
        rows = []
        for c in results:
            rows += [{"file": str(c.file), "line": ln, "path": path, "message": msg, "status": "problem"}
                     for path, msg, ln in c.problems]
            if not c.problems:
                rows.append({"file": str(c.file), "line": "", "path": "", "message": line(c), "status": "ok"})
        print_csv(rows, ["file", "line", "path", "message", "status"])
    else:
        for c in results:
            if not c.problems:
                print(line(c))
    if any(c.problems for c in results):
        return USAGE_ERROR
    return UNAVAILABLE if any(c.unreachable for c in results) else OK


def _record(checked: Checked) -> dict[str, Any]:
    record: dict[str, Any] = {"file": str(checked.file), "ok": not checked.problems,
                              "problems": [{"line": ln, "path": p, "message": m} for p, m, ln in checked.problems],
                              "not_reachable": checked.unreachable}
    if not checked.problems:
        record.update(summary(checked))
    return record
