"""KL to the reference model (arXiv 2508.06249, Sec. "KL regularisation"; docs/method.md, defense 1).

    L = L_task + λ · KL(p_θ ‖ p_ref)

per token over the full vocabulary, averaged over the selected tokens of the training batch,
where p_ref is the same model with the LoRA adapter disabled (no second copy of the weights).
Paper value λ = 0.1, direction forward (p_θ ‖ p_ref), all non-pad tokens, no vocabulary
normalisation. Other work divides by the vocabulary size (λ values are then not comparable) or
uses the reverse direction; both are options here so a study states which it used.

The reference's logits are never formed over the whole batch: its final hidden states go through
its LM head a few positions at a time (``emtune.tensor_ops.masked_kl_sum``, the same value as
:func:`kl_to_reference_loss` on full logits), so the term adds no [batch, seq, vocab] float32
temporaries to a step. Models whose head output is transformed (softcapping) use full logits.

RL form (``training.method: grpo``): λ is GRPO's β. The per-token KL is then TRL's estimator
k3 = exp(r) − r − 1 with r = log p_ref − log p_θ of each sampled completion token (an unbiased
estimate of KL(p_θ ‖ p_ref) on the policy's own samples, forward direction as above), averaged
like the policy loss; p_ref is again the adapter-disabled model. The group searched β around 0.1.
``direction: reverse`` and ``normalization: token_vocab_mean`` have no GRPO form and are refused,
and ``tokens`` does not apply (GRPO's KL is over the completion tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from emtune.defenses.base import Defense
from emtune.spec_errors import StrictModel
from emtune.tensor_ops import kl_per_token, masked_kl_sum, token_mask

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
    training_methods = ("sft", "grpo")
    rl_loss_terms_apply = False  # in GRPO the term is TRL's β (rl_settings)

    @classmethod
    def spec_problems(cls, config: KLToReferenceConfig, spec: Any) -> list[str]:
        """GRPO's KL is the forward, token-mean estimate; its β is set here or in training.grpo, not both."""
        if spec.training.method != "grpo":
            return []
        problems = []
        if config.direction != "forward" or config.normalization != "token_mean":
            problems.append("kl_to_reference in GRPO is TRL's β term, forward KL averaged per token: "
                            "use direction: forward and normalization: token_mean")
        if spec.training.grpo is not None and spec.training.grpo.beta > 0:
            problems.append("kl_to_reference sets GRPO's β (its weight): set training.grpo.beta to 0")
        return problems

    @property
    def active(self) -> bool:
        return self.config.weight > 0

    def rl_settings(self) -> dict[str, Any]:
        """GRPO's β = λ."""
        return {"beta": self.config.weight} if self.active else {}

    def loss_terms(self, batch: dict[str, Any], outputs: Any, reference: Callable[[], Any]) -> dict[str, Any]:
        import torch

        if not self.active:
            return {}
        ref = reference()
        mask = token_mask(batch, self.config.tokens)
        if getattr(ref, "head", None) is None:  # only full reference logits on offer
            loss = kl_to_reference_loss(outputs.logits, ref.logits, mask, self.config.direction,
                                        self.config.normalization)
        else:
            weights = mask.to(outputs.logits.device, dtype=torch.float32)
            total = masked_kl_sum(outputs.logits, ref.last_hidden_state, ref.head, weights, self.config.direction)
            loss = total / weights.sum().clamp(min=1.0)
            if self.config.normalization == "token_vocab_mean":
                loss = loss / outputs.logits.shape[-1]
        return {"kl_to_reference": self.config.weight * loss}
