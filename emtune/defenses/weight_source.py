"""Model weights read one tensor at a time, for defenses that compare weights (SafeLoRA).

A :class:`WeightSource` serves tensors by checkpoint key from an in-memory state dict or a folder
of ``*.safetensors`` files (read with ``safe_open``, one tensor per call, so a 7B checkpoint is
never loaded whole); :func:`resolve_weight_folder` turns a spec's weight source (local folder,
hub id, or ``tiny``) into such a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from emtune.models import materialize_tiny

if TYPE_CHECKING:  # torch stays out of import time so `emtune validate` is fast
    import torch


class WeightSource:
    """Tensors of one model by checkpoint key, read on demand (a state dict or safetensors folder)."""

    def __init__(self, tensors: Mapping[str, Any] | None = None, folder: str | None = None):
        self._tensors = tensors
        self._folder = folder
        self._files: dict[str, str] | None = None

    @classmethod
    def from_model(cls, model_or_state: Any) -> "WeightSource":
        """Wrap an in-memory model (its ``state_dict``) or a state dict."""
        state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
        return cls(tensors=state)

    def _index(self) -> dict[str, str]:
        if self._files is None:
            from safetensors import safe_open

            files = sorted(Path(self._folder).glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"SafeLoRA needs *.safetensors weights in {self._folder}")
            self._files = {}
            for path in files:
                with safe_open(str(path), framework="pt") as handle:
                    self._files.update({key: str(path) for key in handle.keys()})
        return self._files

    def get(self, key: str) -> "torch.Tensor":
        """The tensor at ``key``; falls back to the key without a leading ``model.``."""
        keys = [key, key.removeprefix("model.")]
        if self._tensors is not None:
            for candidate in keys:
                if candidate in self._tensors:
                    return self._tensors[candidate]
        else:
            from safetensors import safe_open

            index = self._index()
            for candidate in keys:
                if candidate in index:
                    with safe_open(index[candidate], framework="pt") as handle:
                        return handle.get_tensor(candidate)
        raise KeyError(f"weight {key!r} not found in the SafeLoRA weight source")


def resolve_weight_folder(source: str, spec: Any, cache_dir: Any, role: str = "base") -> str:
    """A local folder holding ``source``'s safetensors: local path, tiny model, or hub snapshot.

    ``tiny`` in the ``base`` role is the spec's tiny model before alignment pretraining
    (``pretrain_steps: 0``, same seed); in the ``aligned`` role it is the spec's tiny model itself.
    """
    if source == "tiny":
        tiny = spec.model.tiny
        if role == "base":
            tiny = tiny.model_copy(update={"pretrain_steps": 0})
        return str(materialize_tiny(tiny, Path(cache_dir or ".")))
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
