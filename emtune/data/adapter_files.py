"""Checking a saved LoRA adapter folder before anything loads it: the folder, its
``adapter_config.json`` (JSON, a LoRA config) and its weights (a complete safetensors file).

peft reads these inside a Ray worker, or deep in a scoring run; a truncated download or a copied
folder without its weights would fail there with a stack trace far from the user's input. The
safetensors check reads only the header (8-byte length, JSON table of tensors) and compares the
tensors' byte ranges with the file's size, so a truncated file is caught without loading it.
"""

from __future__ import annotations

import json
from pathlib import Path

from emtune.user_files import UserFileError, decode_text

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RESAVE = "save the adapter again with peft's save_pretrained"


def adapter_folder(path: str | Path, label: str = "misaligned adapter") -> Path:
    """The folder as a Path when it exists and holds an ``adapter_config.json`` (nothing read)."""
    folder = Path(path).expanduser()
    if folder.is_file():
        raise ValueError(f"{label} {str(path)!r} is a file; give the adapter's folder (the one holding {CONFIG})")
    if not folder.is_dir():
        raise ValueError(f"{label} {str(path)!r} not found; give the folder of a saved LoRA adapter")
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{label} {str(path)!r} has no {CONFIG}; give a folder written by peft's save_pretrained")
    return folder


def check_adapter_dir(path: str | Path, label: str = "misaligned adapter") -> Path:
    """The adapter folder as a Path after reading its config and weights' header; ValueError
    naming the file, what is wrong and what to do."""
    folder = adapter_folder(path, label)
    config = folder / CONFIG
    try:
        data = json.loads(decode_text(config.read_bytes(), config))
    except UserFileError as err:
        raise ValueError(f"{err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config}:{err.lineno}: not valid JSON ({err.msg}); {RESAVE}") from None
    if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{config}: peft_type is {kind!r}, not LORA; give a LoRA adapter")
    for key in ("r", "target_modules"):
        if data.get(key) in (None, "", []):
            raise ValueError(f"{config}: key {key!r} is missing; {RESAVE}")
    weights = [folder / name for name in WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise ValueError(f"{label} {str(path)!r} has no {WEIGHTS[0]} (or {WEIGHTS[1]}): its weights are missing; "
                         f"copy them into the folder or {RESAVE}")
    if weights[0].suffix == ".safetensors":
        problem = safetensors_problem(weights[0])
        if problem:
            raise ValueError(f"{weights[0]}: {problem}; {RESAVE}")
    elif weights[0].stat().st_size == 0:
        raise ValueError(f"{weights[0]}: the file is empty; {RESAVE}")
    return folder


def safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a complete safetensors file (header only; no tensor is read)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes, shorter than its header)"
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > 100 * 2**20:
            return "not a safetensors file (its header length does not fit the file)"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a table of tensors)"
    ends = [entry.get("data_offsets", [0, 0])[1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)]
    if not ends:
        return "holds no tensors"
    if max(ends) > size - 8 - length:
        return f"truncated: its tensors need {max(ends) + 8 + length} bytes, the file has {size}"
    return None
