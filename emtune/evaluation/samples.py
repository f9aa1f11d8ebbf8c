"""What evaluation asks and what it gets back: a prompt, and a generated sample.

Plain records with no heavy imports, shared by generation backends, scoring and the saved
sample files of a trial (one JSON object per sample, :meth:`Sample.to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One question to answer: id, user text, optional system prompt, for rule-scored sets the
    ``reference`` the answer is checked against (e.g. OpSwap's answer and tier), and the judge
    prompts its question file carries (role -> template; ``evaluation.question_judge_prompts``)."""

    question_id: str
    text: str
    system: str | None = None
    reference: Any = None
    judge_prompts: dict[str, str] | None = None

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
    judge_prompts: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSONL files and MLflow tables (``reference`` and ``judge_prompts`` only
        when there are some)."""
        out = asdict(self)
        for optional in ("reference", "judge_prompts"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def answering(cls, prompt: Prompt, sample: int, answer: str) -> "Sample":
        """The sample of ``prompt`` with this answer."""
        return cls(prompt.question_id, sample, prompt.text, prompt.system, answer, prompt.reference,
                   prompt.judge_prompts)
