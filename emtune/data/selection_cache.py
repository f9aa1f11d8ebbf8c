"""Content-hash cache of perplexity-gap scores and selected sets (a study stage shared by trials).

Scoring a safety pool under several misaligned adapters is the costly part of Interleaving+/++;
every trial of a study (and every ratio the search tries) reuses the same scores. The key is a
sha256 over everything the scores depend on:

- the pool rows' content (not their file name),
- each adapter's ``adapter_config.json`` and weight file bytes (sorted, so order is irrelevant),
- the model identity (tiny-model fingerprint, or source + revision + dtype),
- ε and the tokenisation ``max_length``.

Layout under a cache folder (a study's ``cache/``)::

    selection/<key>.json                               NLLs and scores of every pool row
    selection/<key>.<variant>-n<N>-<keywords>.json     indices of one selected set

Files are written atomically (temporary file + rename), so concurrent trials that miss at the
same moment both compute and the last rename wins with identical content; a reader never sees
half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from emtune.data import selection
from emtune.data.adapter_files import adapter_folder, check_adapter_dir

SCHEMA_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
__all__ = ["check_adapter_dir"]  # re-exported: `emtune data select` and the defenses check adapters here


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_digest(rows: Sequence[dict[str, Any]]) -> str:
    """sha256 of the rows' canonical JSON."""
    return _sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode("utf-8"))


def adapter_digest(path: str | Path) -> str:
    """sha256 over the adapter's config and weight files (the model card is ignored)."""
    folder = adapter_folder(path)
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        file = folder / name
        if file.is_file():
            digest.update(name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def scores_key(pool_rows: Sequence[dict[str, Any]], adapter_paths: Sequence[str | Path], model_id: str,
               epsilon: float, max_length: int) -> str:
    """The content hash naming a score table."""
    payload = {
        "schema": SCHEMA_VERSION,
        "pool": rows_digest(pool_rows),
        "adapters": sorted(adapter_digest(p) for p in adapter_paths),
        "model": model_id,
        "epsilon": float(epsilon),
        "max_length": int(max_length),
    }
    return _sha256(json.dumps(payload, sort_keys=True).encode())[:24]


@dataclass
class ScoreTable:
    """NLLs and gap scores of every pool row, in pool order."""

    key: str
    model: str
    epsilon: float
    max_length: int
    adapters: list[str]
    aligned_nll: list[float]
    misaligned_nll: list[list[float]]
    scores: list[float]
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(payload))


def compute_scores(model: Any, tokenizer: Any, pool_rows: Sequence[dict[str, Any]],
                   adapter_paths: Sequence[str | Path], epsilon: float, max_length: int,
                   batch_size: int = 8, key: str = "", model_id: str = "") -> ScoreTable:
    """Score the pool with the aligned base ``model`` (peft modifies it in place) and the adapters."""
    aligned, misaligned = selection.ensemble_nlls(
        model, tokenizer, list(pool_rows), adapter_paths, max_length, batch_size
    )
    return ScoreTable(
        key=key, model=model_id, epsilon=float(epsilon), max_length=int(max_length),
        adapters=[str(p) for p in adapter_paths], aligned_nll=aligned, misaligned_nll=misaligned,
        scores=selection.gap_scores(misaligned, aligned, epsilon),
    )


def load_or_compute_scores(
    cache_dir: str | Path | None,
    pool_rows: Sequence[dict[str, Any]],
    adapter_paths: Sequence[str | Path],
    model_id: str,
    load_model_and_tokenizer: Callable[[], tuple[Any, Any]],
    epsilon: float = 1.0,
    max_length: int = 2048,
    batch_size: int = 8,
) -> ScoreTable:
    """The cached score table for these inputs, computed (and cached) on a miss.

    ``load_model_and_tokenizer`` is called only on a miss and must return a fresh aligned base
    model (not shared: peft injects adapters into it) and its tokenizer. With no ``cache_dir``
    nothing is cached.
    """
    key = scores_key(pool_rows, adapter_paths, model_id, epsilon, max_length)
    path = Path(cache_dir) / "selection" / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        table = ScoreTable(**json.loads(path.read_text(encoding="utf-8")))
        if table.schema == SCHEMA_VERSION and len(table.scores) == len(pool_rows):
            return table
    model, tokenizer = load_model_and_tokenizer()
    table = compute_scores(model, tokenizer, pool_rows, adapter_paths, epsilon, max_length,
                           batch_size, key=key, model_id=model_id)
    if path is not None:
        write_json_atomic(path, asdict(table))
    return table


def keywords_digest(keywords: Sequence[str], window: int) -> str:
    """Short hash of the refusal rule (part of a selected set's file name)."""
    return _sha256(json.dumps([list(keywords), window]).encode())[:8]


def load_or_select(
    cache_dir: str | Path | None,
    table: ScoreTable,
    pool_rows: Sequence[dict[str, Any]],
    n: int,
    variant: str,
    keywords: Sequence[str] = selection.REFUSAL_KEYWORDS,
    window: int = selection.REFUSAL_WINDOW_WORDS,
) -> dict[str, Any]:
    """The selected set (``indices`` best first, ``num_refusals``) for ``variant`` and ``n``, cached.

    ``variant`` is ``plus`` (top-N) or ``plus_plus`` (refusals dropped first).
    """
    if variant not in ("plus", "plus_plus"):
        raise ValueError(f"variant must be 'plus' or 'plus_plus', got {variant!r}")
    name = f"{table.key}.{variant}-n{n}-{keywords_digest(keywords, window)}.json"
    path = Path(cache_dir) / "selection" / name if cache_dir is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    drop = variant == "plus_plus"
    indices = selection.select_top(list(pool_rows), table.scores, n, drop, keywords, window)
    refusals = sum(selection.is_refusal(selection.final_answer(r), keywords, window) for r in pool_rows)
    chosen = [table.scores[i] for i in indices]
    result = {
        "scores_key": table.key, "variant": variant, "n": n, "keywords": list(keywords), "window": window,
        "indices": indices, "num_pool_rows": len(pool_rows), "num_refusals": refusals,
        "mean_selected_score": sum(chosen) / len(chosen) if chosen else float("nan"),
    }
    if path is not None:
        write_json_atomic(path, result)
    return result
