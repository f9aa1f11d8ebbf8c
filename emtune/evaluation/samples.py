"""What evaluation asks and what it gets back: a prompt, and a generated sample.

Plain records with no heavy imports, shared by generation backends, scoring and the saved
sample files of a trial (one JSON object per sample, :meth:`Sample.to_dict`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

#: Sample seeds are 31-bit: every generation server takes them (some reject larger ones).
SEED_BITS = 31


def sample_seed(seed: int, question_id: str, sample: int) -> int:
    """The seed of one sample: the ``sample``-th answer to ``question_id`` under the study's
    generation ``seed``. Every backend draws that answer from this seed alone, so it does not
    depend on batch sizes or on which other answers were generated beside it."""
    digest = hashlib.blake2b(f"{seed}\x00{question_id}\x00{sample}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


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
    seed: int | None = None  # the sample's own seed (:func:`sample_seed`); None for greedy answers

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSONL files and MLflow tables (``reference``, ``judge_prompts`` and
        ``seed`` only when set)."""
        out = asdict(self)
        for optional in ("reference", "judge_prompts", "seed"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def answering(cls, prompt: Prompt, sample: int, answer: str, seed: int | None = None) -> "Sample":
        """The sample of ``prompt`` with this answer (drawn with ``seed``)."""
        return cls(prompt.question_id, sample, prompt.text, prompt.system, answer, prompt.reference,
                   prompt.judge_prompts, seed)
