"""Token-level tensor helpers shared by the loss-term defenses and the judge-free metrics.

Kept in a leaf module (no emtune imports) because both the KL and feature-space defenses and
``emtune.evaluation.judge_free`` need the same position mask and per-token KL; torch is
imported inside the functions so that importing emtune (e.g. for ``emtune validate``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


def kl_per_token(logits: "torch.Tensor", reference_logits: "torch.Tensor", direction: str = "forward") -> "torch.Tensor":
    """KL divergence at every position, summed over the vocabulary: shape ``logits.shape[:-1]``.

    ``forward`` is KL(p ‖ q) with p = softmax(logits), q = softmax(reference_logits);
    ``reverse`` swaps them.
    """
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(reference_logits.float(), dim=-1)
    if direction == "reverse":
        logp, logq = logq, logp
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def token_mask(batch: dict[str, Any], tokens: str) -> "torch.Tensor":
    """Positions whose next-token distribution (or feature) a defense regularises.

    ``all``: every non-pad position. ``response``: positions whose next token is a labelled
    (assistant) token, i.e. the positions the task loss trains.
    """
    import torch

    attention = batch["attention_mask"].bool()
    if tokens == "all":
        return attention
    labels = batch["labels"]
    predicts_label = torch.zeros_like(attention)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predicts_label & attention
