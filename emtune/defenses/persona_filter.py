"""The judge filter of the persona-vectors recipe: which contrastive pairs a persona vector uses.

Chen et al. (arXiv 2507.21509; docs/method.md defense 4) generate answers under trait-eliciting
("positive") and trait-suppressing ("negative") system prompts, then keep a pair only when the
judge confirms the persona: the positive answer's trait score is high, the negative answer's is
low, and both answers are coherent. Unfiltered pairs (a positive prompt the model ignored, a
negative answer that shows the trait anyway) dilute the mean difference. The rule here, with its
thresholds configurable and recorded in the vector file:

    keep  ⇔  trait(positive) ≥ positive_trait_min  and  trait(negative) ≤ negative_trait_max
             and  coherent(positive) ≥ coherent_min  and  coherent(negative) ≥ coherent_min

with ``trait`` the judge prompt named by ``trait_prompt`` (``evil``: 0 = not at all .. 100 =
thoroughly evil) and ``coherent`` the general coherence prompt. The recipe's defaults are 50, 50
and 50 (its code writes the negative bound as ``< 100 − threshold``; with logprob-weighted
scores the boundary itself almost never occurs). A missing score (the judge answered no number)
never confirms a pair. Every pair's four scores are kept with the extraction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from emtune.evaluation.judges import JudgeItem


@dataclass(frozen=True)
class PairFilter:
    """The judge rule for keeping a contrastive pair (see the module docstring)."""

    trait_prompt: str = "evil"
    positive_trait_min: float = 50.0
    negative_trait_max: float = 50.0
    coherent_min: float = 50.0

    def keeps(self, scores: dict[str, float | None]) -> bool:
        """Whether four scores (positive/negative trait, positive/negative coherent) confirm a pair."""
        if any(v is None for v in scores.values()):
            return False
        return (scores["positive_trait"] >= self.positive_trait_min
                and scores["negative_trait"] <= self.negative_trait_max
                and scores["positive_coherent"] >= self.coherent_min
                and scores["negative_coherent"] >= self.coherent_min)

    def describe(self) -> dict[str, Any]:
        """The rule as plain data (recorded in the vector file's metadata and logged)."""
        return asdict(self)


def judge_pairs(judge: Any, pairs: Sequence[tuple[str, str, str]], rule: PairFilter = PairFilter()
                ) -> list[tuple[bool, dict[str, float | None]]]:
    """(keep, scores) for every (question, positive answer, negative answer), judged in one batch."""
    items = []
    for question, positive, negative in pairs:
        items += [JudgeItem(rule.trait_prompt, question, positive), JudgeItem(rule.trait_prompt, question, negative),
                  JudgeItem("coherent", question, positive), JudgeItem("coherent", question, negative)]
    verdicts = judge.score_many(items) if hasattr(judge, "score_many") else [judge.score(*i[:3]) for i in items]
    out = []
    for k in range(len(pairs)):
        pt, nt, pc, nc = (v.score for v in verdicts[4 * k: 4 * k + 4])
        scores = {"positive_trait": pt, "negative_trait": nt, "positive_coherent": pc, "negative_coherent": nc}
        out.append((rule.keeps(scores), scores))
    return out
