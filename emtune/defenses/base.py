"""The defense protocol: fixed hook points every in-training defense may use.

A trial may stack several defenses. The trainer calls, in order:

1. ``transform_data(rows)`` on the chat rows before tokenisation (inoculation, interleaving);
2. ``attach(model)`` once the LoRA model exists (forward hooks such as persona steering);
3. ``loss_terms(batch, outputs, reference)`` every step; the terms are added to the task loss;
4. ``finalize(model)`` after training (SafeLoRA projection), returning values to log;
5. ``detach(model)`` before evaluation, removing every training-only effect.

``reference()`` returns the adapter-disabled model's outputs on the same batch (computed at most
once per step and shared by all defenses), so no second copy of the weights is ever loaded.
Every hook defaults to a no-op; a defense at strength 0 must leave training unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Rows = list[dict[str, Any]]


@dataclass
class DefenseContext:
    """What a defense may use while it is built: the trial spec, tokenizer, seed, caches."""

    spec: Any
    tokenizer: Any = None
    seed: int = 0
    cache_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Defense:
    """Base of all defenses: every hook is a no-op until a defense overrides it."""

    #: True when ``loss_terms`` reads the trained model's hidden states from ``outputs``.
    needs_hidden_states: bool = False
    #: True when ``loss_terms`` reads ``reference()`` with hidden states.
    needs_reference_hidden_states: bool = False

    def __init__(self, config: Any, context: DefenseContext):
        self.config = config
        self.context = context

    @property
    def name(self) -> str:
        """The registry name, as written in specs."""
        return self.config.name

    @property
    def active(self) -> bool:
        """False when the defense is at strength 0 and must change nothing."""
        return True

    def transform_data(self, rows: Rows) -> Rows:
        """Return the training rows this defense trains on (default: unchanged)."""
        return rows

    def attach(self, model: Any) -> None:
        """Install training-time hooks on the model."""

    def loss_terms(self, batch: dict[str, Any], outputs: Any, reference: Callable[[], Any]) -> dict[str, Any]:
        """Extra loss terms (already weighted) to add to the task loss, keyed by a log name."""
        return {}

    def finalize(self, model: Any) -> dict[str, float]:
        """Change the trained adapter after training; returns values worth logging."""
        return {}

    def detach(self, model: Any) -> None:
        """Remove every training-only effect before evaluation."""

    def report(self) -> dict[str, Any]:
        """Details worth keeping with the trial (e.g. per-layer scores); saved as an artifact."""
        return {}
