"""The record of mutation runs (reports/mutants.json) and the report written from it
(reports/mutants.md). A run of some modules updates their entries and keeps the others."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any


def commit() -> str:
    """The short commit of the working tree, ``+`` when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_results(path: Path, modules: list[str]) -> dict[str, Any]:
    """The saved record, keeping only modules still in the config."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    kept = {m: v for m, v in (record.get("modules") or {}).items() if m in modules}
    return {"modules": kept, "planted": record.get("planted") or []}


def _verdict(row: dict[str, Any], notes: dict[str, dict[str, str]]) -> tuple[str, str]:
    """(kind, reason) of one mutant: killed / equivalent / left / unexplained."""
    note = notes.get(row["key"]) or {}
    if row["status"] in ("killed", "timeout"):
        return "killed", ""
    if "equivalent" in note:
        return "equivalent", note["equivalent"]
    if "left" in note:
        return "left", note["left"]
    return "unexplained", f"{row['status']}; no note in tests/mutation/mutants.yaml"


def write_report(path: Path, record: dict[str, Any], notes: dict[str, dict[str, str]],
                 configured: list[str] | None = None) -> None:
    """The Markdown report: a score per module, every survivor with its reason, the planted bugs."""
    lines = [
        "# Mutation testing",
        "",
        f"Written by `make mutants` (`tests/mutation/mutants.py`) on {time.strftime('%Y-%m-%d')}. Each mutant is one "
        "small change to a module (a comparison, an arithmetic or boolean operator, a number, a sign, "
        "`min`/`max`, the branches of a conditional expression), run against those of the module's fast tests "
        "(listed in `tests/mutation/mutants.yaml`) that execute the changed line; the first failing test kills it. "
        "Score = killed / (mutants - equivalent). Every survivor is explained in `tests/mutation/mutants.yaml` "
        "(`notes:`): *equivalent* (no input can tell it from the original) or *left* (a real gap, with the "
        "reason it stays). The commit column is the code each module was mutated at.",
        "",
        "| module | commit | tests (s) | mutants | killed | equivalent | left | unexplained | score |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = {"mutants": 0, "killed": 0, "equivalent": 0, "left": 0, "unexplained": 0}
    survivors: list[str] = []
    stale: list[str] = []
    for module, entry in record["modules"].items():
        counts = {"killed": 0, "equivalent": 0, "left": 0, "unexplained": 0}
        module_survivors = []
        for row in entry["mutants"]:
            kind, reason = _verdict(row, notes)
            counts[kind] += 1
            if kind != "killed":
                module_survivors.append(f"- line {row['line']}, **{kind}**: `{row['before']}` → `{row['after']}` "
                                        f"in `{row['qualname']}` — {reason}")
            elif row["key"] in notes:
                stale.append(f"- `{row['key']}` is killed now: its note can go")
        total = len(entry["mutants"])
        live = total - counts["equivalent"]
        score = f"{100 * counts['killed'] / live:.1f}%" if live else "n/a"
        lines.append(f"| `{module}` | `{entry['commit']}` | {entry['seconds']:.0f} | {total} | {counts['killed']} | "
                     f"{counts['equivalent']} | {counts['left']} | {counts['unexplained']} | {score} |")
        totals["mutants"] += total
        for key in counts:
            totals[key] += counts[key]
        if module_survivors:
            survivors += ["", f"### `{module}`", "", *module_survivors]
    live = totals["mutants"] - totals["equivalent"]
    score = f"{100 * totals['killed'] / live:.1f}%" if live else "n/a"
    lines.append(f"| **all** | | | {totals['mutants']} | {totals['killed']} | {totals['equivalent']} | "
                 f"{totals['left']} | {totals['unexplained']} | **{score}** |")
    missing = [m for m in configured or [] if m not in record["modules"]]
    if missing:
        lines += ["", "Configured in `tests/mutation/mutants.yaml` but not in this record yet (no run finished them; "
                  "`make mutants` or `tests/mutation/mutants.py --module PATH` adds them): "
                  + ", ".join(f"`{m}`" for m in missing) + "."]
    lines += ["", "## Survivors", *(survivors or ["", "None."])]
    if stale:
        lines += ["", "## Notes that no longer apply", "", *stale]
    if record.get("planted"):
        lines += ["", "## Planted bugs (issue 19)", "",
                  "Each bug is planted by hand (`planted:` in `tests/mutation/mutants.yaml` gives the exact text replaced) "
                  "and run against every fast test listed with it (no `-x`); the failing ones are named.", "",
                  "| planted bug | commit | caught | failing tests |", "|---|---|---|---|"]
        for bug in record["planted"]:
            caught = "yes" if bug["status"] in ("killed", "timeout") else "**no**"
            tests = "<br>".join(f"`{t}`" for t in bug["failed"]) or bug["status"]
            lines.append(f"| {bug['name']} | `{bug['commit']}` | {caught} | {tests} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
