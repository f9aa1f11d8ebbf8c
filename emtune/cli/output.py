"""How verbs print results: one ``--format {table,json,csv}`` option, the same on every verb.

``table`` is for people (aligned columns, enough digits to tell values apart); ``json`` is one
document with named fields and full precision; ``csv`` is one header line and one row per record
(spreadsheets, pandas). Results go to stdout, messages and problems to stderr, so a pipe gets
only the result.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Iterable

FORMATS = ("table", "json", "csv")


def add_format_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--format`` option; ``what`` says what a record is (for the help text)."""
    parser.add_argument(
        "--format", choices=FORMATS, default="table",
        help=f"table: aligned text for reading (default); json: one document with named fields and full "
             f"precision; csv: a header and one row per {what}")


def print_json(document: Any) -> None:
    """``document`` as indented JSON on stdout."""
    print(json.dumps(document, indent=2, default=str))


def print_csv(records: Iterable[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Records as CSV on stdout; columns in first-seen order unless given."""
    records = list(records)
    if columns is None:
        columns = []
        for record in records:
            columns += [k for k in record if k not in columns]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(v) for k, v in record.items()})


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else value


def description(doc: str | None) -> str:
    """A verb module's docstring, minus its first line, as argparse help text."""
    return (doc or "").split("\n\n", 1)[-1].replace("``", "`")
