"""Any table as chat rows: a column mapping to chat messages, row filters, and row counts.

A :class:`~emtune.data.loading.DatasetSpec` may name a source that does not hold chat rows: a
Hugging Face hub dataset, a local Parquet, CSV, JSON or JSONL file, or a ``save_to_disk`` folder,
read by the ``datasets`` library. ``columns`` says how a row becomes a conversation and ``where``
which rows to keep, for example the benign part of WildGuardMix::

    path: hub:allenai/wildguardmix        # or a local copy of train/wildguard_train.parquet
    config: wildguardtrain
    columns: {user: prompt, assistant: response}
    where: {response_harm_label: unharmful}

``where`` maps a column to the value a kept row has in it, or to a list of accepted values; all
conditions must hold. Filters run before ``limit``. A mapped column that is empty (None) in a kept
row is an error naming the row: filter such rows out with ``where``.

:func:`count_rows` answers "how many rows would this source yield" cheaply and without writing
anything (validation calls it for every spec it checks): local files are counted with pyarrow or
line by line, cached per file version; a hub dataset is not read at all, its count is the
declared ``num_rows`` (or unknown).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import Field, model_validator

from emtune.spec_errors import StrictModel

#: Formats read through the datasets library's packaged builders, by file suffix.
SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
Format = Literal["auto", "jsonl", "json", "parquet", "csv", "hub", "disk"]
Scalar = str | int | float | bool | None


class SourceError(ValueError):
    """A source that cannot be read or mapped; the message names the source, row and column."""


class ChatColumns(StrictModel):
    """How one table row becomes chat messages: ``messages`` (a column already holding a list of
    {role, content}), or ``user`` + ``assistant`` (+ optional ``system``) text columns; RL's
    prompt-only rows (``training.method: grpo``) need no ``assistant``."""

    messages: str | None = None
    system: str | None = None
    user: str | None = None
    assistant: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> "ChatColumns":
        turns = (self.system, self.user, self.assistant)
        if self.messages and any(turns):
            raise ValueError("give either `messages` or user/assistant (/system) columns, not both")
        if not self.messages and not self.user:
            raise ValueError("a column mapping needs `user` (and `assistant`, except for the prompt-only rows "
                             "of RL), or a `messages` column")
        return self

    def used(self) -> list[str]:
        """The source columns this mapping reads."""
        return [c for c in (self.messages, self.system, self.user, self.assistant) if c]


class SourceOptions(StrictModel):
    """The fields of a DatasetSpec that describe a non-chat source (see the module docstring)."""

    format: Format = Field("auto", description="auto = from the path: hub:, a folder, or the file suffix")
    columns: ChatColumns | None = Field(None, description="column mapping to chat messages (default: `messages`)")
    where: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict, description="row filters: column -> value(s)")
    num_rows: int | None = Field(None, gt=0, description="rows this source yields after `where` and `limit`: "
                                 "declare it for a hub dataset, so validation can check sizes offline")


def source_format(spec: Any, source: Path | str) -> str:
    """The format a DatasetSpec's resolved source is read as."""
    if spec.format != "auto":
        return spec.format
    if isinstance(source, str):
        return "hub"
    if source.is_dir():
        return "disk"
    return "jsonl" if source.suffix == ".jsonl" else SUFFIX_FORMATS.get(source.suffix, "jsonl")


def needs_mapping(spec: Any, source: Path | str) -> bool:
    """True when rows must go through :func:`mapped_rows` (a mapping, filters, or a non-chat file)."""
    fmt = source_format(spec, source)
    return spec.columns is not None or bool(spec.where) or fmt not in ("jsonl", "hub", "disk")


def read_table(spec: Any, source: Path | str) -> Any:
    """The source as a ``datasets.Dataset`` (hub, disk folder, or a local file by its format)."""
    import datasets

    fmt = source_format(spec, source)
    label = str(source)
    try:
        if fmt == "hub":
            return datasets.load_dataset(str(source)[len("hub:"):], spec.config, split=spec.split)
        if fmt == "disk":
            return datasets.load_from_disk(str(source))
        builder = "json" if fmt == "jsonl" else fmt
        return datasets.load_dataset(builder, data_files=str(source), split="train")
    except Exception as err:  # datasets raises many types; the user needs the source and the cause
        said = str(err).strip().splitlines()[0][:300].rstrip(".") if str(err).strip() else ""
        fix = ("check the dataset name, config and split (and that it is in the local cache when offline)"
               if fmt == "hub" else f"check that it is a complete {fmt} file (export it again), or set `format`")
        raise SourceError(f"{label}: cannot read as {fmt}: {type(err).__name__}: {said}; {fix}") from None


def check_columns(spec: Any, columns: Iterable[str], label: str) -> None:
    """Every column the mapping and the filters name must exist in the source."""
    present = list(columns)
    wanted = (spec.columns.used() if spec.columns else ["messages"]) + list(spec.where)
    missing = [c for c in wanted if c not in present]
    if missing:
        raise SourceError(f"{label}: no column(s) {', '.join(repr(c) for c in missing)}; the source has "
                          f"{', '.join(present)} (fix `columns` / `where`)")


def keep(row: dict[str, Any], where: dict[str, Any]) -> bool:
    """True when ``row`` meets every filter (a value, or a list of accepted values)."""
    return all(row.get(col) in (want if isinstance(want, list) else [want]) for col, want in where.items())


def to_chat(row: dict[str, Any], columns: ChatColumns | None, where: str) -> dict[str, Any]:
    """One source row as ``{"messages": [...]}`` plus its other scalar columns (RL rewards read
    them, e.g. an ``answer``; the chat schema check keeps only the messages)."""
    used = set(columns.used()) if columns else {"messages"}
    extra = {k: v for k, v in row.items() if k not in used and k not in ("messages", "prompt")
             and isinstance(v, (str, int, float, bool, type(None)))}
    if columns is None or columns.messages:
        return {**extra, "messages": row.get(columns.messages if columns else "messages")}
    messages = []
    for role in ("system", "user", "assistant"):
        column = getattr(columns, role)
        if column is None:
            continue
        value = row.get(column)
        if value is None and role == "system":
            continue
        if not isinstance(value, str):
            raise SourceError(f"{where}: column {column!r} ({role}) is {value!r}, not text; keep only rows "
                              f"that have it with `where`")
        messages.append({"role": role, "content": value})
    return {**extra, "messages": messages}


def mapped_rows(spec: Any, source: Path | str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(row label, chat row) for every kept source row, up to ``limit`` (rows not yet checked)."""
    table = read_table(spec, source)
    label = str(source)
    check_columns(spec, table.column_names, label)
    kept = 0
    for index, row in enumerate(table):
        if not keep(row, spec.where):
            continue
        where = f"{label} row {index}"
        yield where, to_chat(row, spec.columns, where)
        kept += 1
        if spec.limit is not None and kept >= spec.limit:
            return


def count_rows(spec: Any, source: Path | str) -> int | None:
    """How many rows ``spec`` yields (after ``where`` and ``limit``) without reading it into
    memory or writing any cache; None when unknown (a hub dataset without ``num_rows``, a
    missing or unreadable file: its own check reports that)."""
    if spec.num_rows is not None:
        return spec.num_rows
    if isinstance(source, str) or not source.exists():
        return None
    fmt = source_format(spec, source)
    stat = source.stat()
    try:
        total = _count(str(source), fmt, stat.st_mtime_ns, stat.st_size, json.dumps(spec.where, sort_keys=True))
    except Exception:  # noqa: BLE001 - unreadable here: the loader reports it with row and field
        return None
    return total if spec.limit is None else min(total, spec.limit)


@lru_cache(maxsize=64)
def _count(path: str, fmt: str, mtime_ns: int, size: int, where_json: str) -> int:
    where = json.loads(where_json)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=list(where) or None) if where else None
        if table is None:
            return pq.ParquetFile(path).metadata.num_rows
        return sum(keep(row, where) for row in table.to_pylist())
    if fmt == "disk":
        import datasets

        table = datasets.load_from_disk(path)
        return len(table) if not where else sum(keep(row, where) for row in table.select_columns(list(where)))
    if fmt == "csv":
        import pyarrow.csv as pcsv

        rows = pcsv.read_csv(path).to_pylist()
        return sum(keep(row, where) for row in rows)
    if fmt == "json":
        with open(path, encoding="utf-8") as handle:
            if Path(path).suffix != ".jsonl":
                data = json.load(handle)
                return sum(keep(row, where) for row in (data if isinstance(data, list) else []))
            return sum(keep(json.loads(line), where) for line in handle if line.strip())
    with open(path, encoding="utf-8") as handle:  # chat JSONL
        if not where:
            return sum(1 for line in handle if line.strip())
        return sum(keep(json.loads(line), where) for line in handle if line.strip())
