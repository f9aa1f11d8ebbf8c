"""KL to the reference model (arXiv 2508.06249, Sec. "KL regularisation"; docs/method.md, defense 1).

    L = L_task + λ · KL(p_θ ‖ p_ref)

per token over the full vocabulary, averaged over the selected tokens of the training batch,
where p_ref is the same model with the LoRA adapter disabled (no second copy of the weights).
Paper value λ = 0.1, direction forward (p_θ ‖ p_ref), all non-pad tokens, no vocabulary
normalisation. Other work divides by the vocabulary size (λ values are then not comparable) or
uses the reverse direction; both are options here so a study states which it used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from emtune.defenses.base import Defense
from emtune.spec_errors import StrictModel
from emtune.tensor_ops import kl_per_token, token_mask

__all__ = ["KLToReference", "KLToReferenceConfig", "kl_per_token", "kl_to_reference_loss", "token_mask"]

if TYPE_CHECKING:  # torch is imported where the math runs, so loading specs stays light
    import torch


class KLToReferenceConfig(StrictModel):
    """Settings of the KL-to-reference defense; ``weight`` is λ, the search dial."""

    name: Literal["kl_to_reference"] = "kl_to_reference"
    weight: float = Field(0.1, ge=0, description="λ; the paper uses 0.1")
    direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward = KL(p_θ ‖ p_ref) as in the paper; reverse = KL(p_ref ‖ p_θ)"
    )
    tokens: Literal["all", "response"] = Field(
        "all", description="all non-pad positions (paper) or only positions predicting response tokens"
    )
    normalization: Literal["token_mean", "token_vocab_mean"] = Field(
        "token_mean", description="token_mean (paper); token_vocab_mean also divides by vocabulary size"
    )


def kl_to_reference_loss(
    logits: "torch.Tensor",
    reference_logits: "torch.Tensor",
    mask: "torch.Tensor",
    direction: str = "forward",
    normalization: str = "token_mean",
) -> "torch.Tensor":
    """Mean of the per-token KL over positions where ``mask`` is true (0 when none is)."""
    per_token = kl_per_token(logits, reference_logits, direction)
    mask = mask.to(per_token.dtype)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if normalization == "token_vocab_mean":
        loss = loss / logits.shape[-1]
    return loss


class KLToReference(Defense):
    """Adds λ·KL(p_θ ‖ p_ref) on the training batch; p_ref = adapter-disabled model."""

    config_class = KLToReferenceConfig
    strength = ("weight",)
    off = {"weight": 0.0}

    @property
    def active(self) -> bool:
        return self.config.weight > 0

    def loss_terms(self, batch: dict[str, Any], outputs: Any, reference: Callable[[], Any]) -> dict[str, Any]:
        if not self.active:
            return {}
        ref = reference()
        loss = kl_to_reference_loss(
            outputs.logits,
            ref.logits,
            token_mask(batch, self.config.tokens),
            self.config.direction,
            self.config.normalization,
        )
        return {"kl_to_reference": self.config.weight * loss}
