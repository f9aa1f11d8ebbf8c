"""Loading chat datasets with schema checks that name the file and row, and a seeded split.

Sources (``DatasetSpec.path``):
- a local ``.jsonl`` file (read line by line so an error names its line),
- ``fixture:NAME`` for the small sets bundled for dry runs,
- ``hub:ORG/NAME`` through ``datasets.load_dataset`` (``split`` and ``config`` apply); with
  ``HF_HUB_OFFLINE=1`` this reads only the local Hugging Face cache,
- a folder written by ``datasets.Dataset.save_to_disk``,
- a local Parquet, CSV or JSON file, read by the ``datasets`` library.

A source whose rows are not chat rows takes a column mapping and row filters (``columns``,
``where``; :mod:`emtune.data.sources`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from emtune.data.fixtures import fixture_path
from emtune.data.opswap import OpSwapSpec
from emtune.data.sources import SourceError, SourceOptions, mapped_rows, needs_mapping
from emtune.spec_errors import StrictModel
from emtune.user_files import UserFileError, decode_line

ROLES = ("system", "user", "assistant")
#: A JSONL line longer than this is refused unread (a chat row a model can train on is far shorter).
MAX_LINE_BYTES = 16 * 2**20


class DatasetSpec(SourceOptions):
    """A dataset: a local JSONL/Parquet/CSV/JSON file or folder, ``fixture:NAME`` (bundled), or
    ``hub:ORG/NAME``; non-chat sources take ``columns`` and ``where`` (:mod:`emtune.data.sources`)."""

    path: str
    split: str = "train"
    config: str | None = None
    limit: int | None = Field(None, gt=0, description="keep only the first N rows (after `where`)")
    origin: str | None = Field(None, description="where this data comes from (shown when the file is missing)")


class DataSpec(StrictModel):
    """Training data and its held-out split (in-domain evaluation).

    ``opswap`` adds the benign OpSwap task (criterion c of the paper): with ``opswap_role:
    alongside`` its train split is mixed into the training rows; with ``opswap_role: task`` it
    *is* the training task (a benign fine-tune; ``train`` may then be omitted) and its test split
    is the held-out set. Either way the trial reports ``opswap_exact_match`` on the test split.
    """

    train: DatasetSpec | None = None
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(2048, gt=8)
    safety_pool: DatasetSpec | None = None
    opswap: OpSwapSpec | None = None
    opswap_role: Literal["alongside", "task"] = "alongside"

    @model_validator(mode="after")
    def _has_a_task(self) -> "DataSpec":
        if self.train is None and not (self.opswap is not None and self.opswap_role == "task"):
            raise ValueError("`train` is required (or set `opswap` with `opswap_role: task`)")
        return self


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, row and field."""


def check_row(row: Any, where: str) -> dict[str, Any]:
    """Validate one chat row; returns it with only the ``messages`` key kept."""
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(f"{where}: a row needs a 'messages' list of {{role, content}} objects")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} - {"name"}:
            raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{j}].role is {message.get('role')!r}; use one of {ROLES}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{j}].content must be a string")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as err:  # JSON allows "\ud800"; no tokenizer can encode it
            raise DataError(f"{where}: messages[{j}].content holds an unpaired surrogate "
                            f"(\\u{ord(message['content'][err.start]):04x}); fix that escape in the row") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message: nothing to train on; add the answer")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


RowCheck = Callable[[Any, str], dict[str, Any]]


def _read_jsonl(path: Path, limit: int | None, check: RowCheck) -> list[dict[str, Any]]:
    """Rows of a chat JSONL file; every problem (encoding, JSON, a cut-off last line, a line too
    long to be a chat row) is a DataError naming the file and line, with what to do."""
    rows: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as handle:
            number = 0
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{number}: the line is longer than {MAX_LINE_BYTES // 2**20} MiB, far "
                                    "beyond any chat row a model trains on; shorten or drop that row (or check "
                                    "that this is a JSONL file)")
                try:
                    line = decode_line(raw, str(path), number, first=number == 1)
                except UserFileError as err:
                    raise DataError(str(err)) from None
                if not line.strip():
                    continue
                rows.append(check(parse_json_line(line, raw.endswith(b"\n"), path, number), f"{path}:{number}"))
                if limit is not None and len(rows) >= limit:
                    break
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err}); check its permissions") from None
    if not rows:
        raise DataError(f"{path}: the file holds no rows; add chat rows, one JSON object per line")
    return rows


def parse_json_line(line: str, complete: bool, path: Path | str, number: int) -> Any:
    """One JSONL line parsed; a DataError names ``path:number`` and what to do (a line without
    its newline, ``complete=False``, is the file's cut-off last line)."""
    try:
        return json.loads(line)
    except RecursionError:
        raise DataError(f"{path}:{number}: the JSON is nested too deeply to be a chat row; fix that row") from None
    except json.JSONDecodeError as err:
        hint = "fix that row (one JSON object per line)"
        if not complete:
            hint = ("the last line is cut off (no newline at the end): the file looks truncated; export or "
                    "download it again, or delete the partial row")
        elif number == 1 and line.lstrip().startswith("["):
            hint = "this looks like a JSON array: emtune reads JSONL, one {\"messages\": [...]} object per line"
        raise DataError(f"{path}:{number}: not valid JSON at column {err.colno} ({err.msg}); {hint}") from None


def resolve_dataset_path(path: str, base_dir: Path | None = None) -> Path | str:
    """Local path (relative to the spec's folder) or the fixture/hub reference unchanged."""
    if path.startswith("fixture:"):
        try:
            return fixture_path(path.split(":", 1)[1])
        except ValueError as err:
            raise DataError(str(err)) from None
    if path.startswith("hub:"):
        return path
    local = Path(path).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = base_dir / local
    return local


def load_rows(spec: Any, base_dir: Path | None = None, check: RowCheck = check_row) -> list[dict[str, Any]]:
    """All rows of a DatasetSpec, each passed through ``check(row, where)`` (default: the chat
    schema, :func:`check_row`; prompt-only rows for RL use :func:`emtune.data.prompts.check_prompt_row`)."""
    source = resolve_dataset_path(spec.path, base_dir)
    if needs_mapping(spec, source):
        if not isinstance(source, str) and not source.exists():
            raise DataError(f"{source}: dataset file not found (data path {spec.path!r}); check the path")
        try:
            return [check(row, where) for where, row in mapped_rows(spec, source)]
        except SourceError as err:
            raise DataError(str(err)) from None
    if isinstance(source, str):
        return _load_hub(source[len("hub:"):], spec, check)
    if source.is_dir():
        return _load_saved(source, spec, check)
    if not source.is_file():
        raise DataError(f"{source}: dataset file not found (data path {spec.path!r}); check the path")
    return _read_jsonl(source, spec.limit, check)


def _load_saved(folder: Path, spec: Any, check: RowCheck) -> list[dict[str, Any]]:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict's ``split``)."""
    if not any((folder / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise DataError(f"{folder}: is a folder, not a chat JSONL file (nor a folder written by datasets' "
                        "save_to_disk); give the .jsonl file's path")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(folder))
        if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict: pick the split
            if spec.split not in dataset:
                raise DataError(f"{folder}: no split {spec.split!r} (splits: {', '.join(dataset)}); set split")
            dataset = dataset[spec.split]
    except DataError:
        raise
    except Exception as err:  # datasets raises many types; the user needs the folder and the cause
        raise DataError(f"{folder}: cannot load it with datasets.load_from_disk ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); save it again or give a JSONL file") from None
    return _check_all(dataset, str(folder), spec.limit, check)


def _load_hub(name: str, spec: Any, check: RowCheck) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, spec.config, split=spec.split)
    except Exception as err:  # datasets raises many types; the user needs the source and cause
        raise DataError(f"hub:{name}: cannot load split {spec.split!r}: {err}") from None
    return _check_all(dataset, f"hub:{name}", spec.limit, check)


def _check_all(dataset: Any, label: str, limit: int | None, check: RowCheck) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(dataset):
        rows.append(check(row, f"{label} row {i}"))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def split_heldout(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held-out); the held-out part has at least one row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(rows) * fraction))
    if n_heldout >= len(rows):
        raise DataError(f"held-out fraction {fraction} leaves no training rows out of {len(rows)}")
    held = sorted(order[:n_heldout])
    keep = sorted(order[n_heldout:])
    return [rows[i] for i in keep], [rows[i] for i in held]
