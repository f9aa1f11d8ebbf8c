"""What evaluation asks and what it gets back: a prompt, and a generated sample.

Plain records with no heavy imports, shared by generation backends, scoring and the saved
sample files of a trial (one JSON object per sample, :meth:`Sample.to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One question to answer: id, user text, optional system prompt, and for rule-scored sets
    the ``reference`` the answer is checked against (e.g. OpSwap's answer and tier)."""

    question_id: str
    text: str
    system: str | None = None
    reference: Any = None

    def messages(self) -> list[dict[str, str]]:
        """The chat messages of this prompt (system first when present)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.text}]


@dataclass(frozen=True)
class Sample:
    """A generated answer to one prompt (``sample`` counts the answers to the same prompt)."""

    question_id: str
    sample: int
    question: str
    system: str | None
    answer: str
    reference: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSONL files and MLflow tables (``reference`` only when there is one)."""
        out = asdict(self)
        if out["reference"] is None:
            del out["reference"]
        return out

    @classmethod
    def answering(cls, prompt: Prompt, sample: int, answer: str) -> "Sample":
        """The sample of ``prompt`` with this answer."""
        return cls(prompt.question_id, sample, prompt.text, prompt.system, answer, prompt.reference)
