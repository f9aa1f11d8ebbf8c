"""Feature-space l2 to the reference model (LDIFS, Mukhoti et al., arXiv 2308.13320, as used in
arXiv 2508.06249; docs/method.md, defense 2).

    L = L_task + λ · mean_over_examples ‖φ_θ(x) − φ_ref(x)‖²

φ_ref is the same network with the LoRA adapter disabled (``reference()``, no gradient); φ_θ comes
from the trained forward pass **with gradient**: the paper notes a public implementation that built
the trained features under ``no_grad``, so the term never moved the weights (a test guards this).

The feature of one example, precisely:

1. pick hidden-state indices ``ℓ_1 < … < ℓ_K`` (:func:`select_layers`);
2. for each, take the masked mean over the selected positions: ``m_ℓ = Σ_t w_t h_ℓ[t] / Σ_t w_t``;
3. L2-normalise it: ``u_ℓ = m_ℓ / max(‖m_ℓ‖, 1e-6)``;
4. concatenate: ``φ = [u_ℓ1; …; u_ℓK]``, so ``‖φ_θ − φ_ref‖² = Σ_k ‖u^θ_ℓk − u^ref_ℓk‖²`` (each
   layer contributes between 0 and 4).

Examples with no selected position are left out of the mean (the loss is 0 when none is left).
Index convention (transformers' ``hidden_states``): index 0 is the embedding output, index i ≥ 1
the output of block i−1; the last index also has the model's final norm applied. The embeddings
are not LoRA-adapted, so evenly spaced selections start at the blocks.

Defaults: λ = 1.0 (paper value), 5 evenly spaced layers (the LDIFS recipe: "5 layers, or every
5th"), all non-pad positions. The dial is λ: λ = 0 turns the defense off (``active`` is False).
``tokens: response`` restricts the positions to those the task loss trains (whose next token is
an assistant token), the same rule as the KL defense.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from pydantic import Field, field_validator

from emtune.defenses.base import Defense
from emtune.spec_errors import StrictModel
from emtune.tensor_ops import token_mask

if TYPE_CHECKING:  # torch stays out of import time so `emtune validate` is fast
    import torch

_NORM_EPS = 1e-6


class FeatureL2Config(StrictModel):
    """Settings of the feature-space l2 (LDIFS) defense; ``weight`` is λ, the search dial."""

    name: Literal["feature_l2"] = "feature_l2"
    weight: float = Field(1.0, ge=0, description="λ; the paper uses 1.0")
    layers: int | tuple[int, ...] = Field(
        5,
        description="an int = that many evenly spaced block outputs; a list = explicit hidden-state "
        "indices (0 = embeddings, i = output of block i-1, negative counts from the end)",
    )
    tokens: Literal["all", "response"] = Field(
        "all", description="positions averaged into the feature: all non-pad (default) or response"
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: int | tuple[int, ...]) -> int | tuple[int, ...]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("`layers` as a count must be at least 1")
        elif not value:
            raise ValueError("`layers` as a list must name at least one hidden-state index")
        return value


def select_layers(num_hidden_states: int, layers: int | Sequence[int]) -> list[int]:
    """Hidden-state indices to compare, sorted and unique.

    ``num_hidden_states`` is ``len(outputs.hidden_states)`` (number of blocks L plus one). An int
    n gives ``round(k·L/n)`` for k = 1..n: evenly spaced block outputs ending at the last one
    (all blocks when n ≥ L). A sequence is taken as explicit indices; negative ones count from
    the end, and any out of range raises ``ValueError``.
    """
    num_blocks = num_hidden_states - 1
    if num_blocks < 1:
        raise ValueError(f"need at least one block's hidden state, got {num_hidden_states} entries")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError("layer count must be at least 1")
        count = min(layers, num_blocks)
        # floor(x + 0.5) rather than round(): Python rounds halves to even, which is less regular
        return sorted({int(k * num_blocks / count + 0.5) for k in range(1, count + 1)})
    chosen = set()
    for index in layers:
        if not -num_hidden_states <= index < num_hidden_states:
            raise ValueError(
                f"hidden-state index {index} is out of range for {num_hidden_states} hidden states"
            )
        chosen.add(index % num_hidden_states)
    return sorted(chosen)


def example_features(hidden_states: Sequence["torch.Tensor"], mask: "torch.Tensor",
                     layer_indices: Sequence[int]) -> "torch.Tensor":
    """φ for every example: ``[batch, len(layer_indices) · hidden]`` (see the module docstring)."""
    import torch

    weights = mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    count = weights.sum(dim=1).clamp(min=1.0)  # [B, 1]
    parts = []
    for index in layer_indices:
        mean = (hidden_states[index].float() * weights).sum(dim=1) / count  # [B, H]
        parts.append(mean / mean.norm(dim=-1, keepdim=True).clamp(min=_NORM_EPS))
    return torch.cat(parts, dim=-1)


def feature_l2_loss(hidden_states: Sequence["torch.Tensor"], reference_hidden_states: Sequence["torch.Tensor"],
                    mask: "torch.Tensor", layer_indices: Sequence[int]) -> "torch.Tensor":
    """Mean over examples (with ≥ 1 selected position) of ‖φ_θ − φ_ref‖²; 0 when there is none.

    Gradient flows through ``hidden_states`` only; the reference side is detached.
    """
    phi = example_features(hidden_states, mask, layer_indices)
    phi_ref = example_features([h.detach() for h in reference_hidden_states], mask, layer_indices)
    per_example = (phi - phi_ref).pow(2).sum(dim=-1)  # [B]
    has_tokens = mask.bool().any(dim=1).to(per_example.dtype)
    return (per_example * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


class FeatureL2(Defense):
    """Adds λ·‖φ_θ(x) − φ_ref(x)‖² (LDIFS) on the training batch; φ_ref = adapter-disabled model."""

    config_class = FeatureL2Config
    strength = ("weight",)
    off = {"weight": 0.0}
    needs_hidden_states = True
    needs_reference_hidden_states = True

    @property
    def active(self) -> bool:
        return self.config.weight > 0

    def loss_terms(self, batch: dict[str, Any], outputs: Any, reference: Callable[[], Any]) -> dict[str, Any]:
        if not self.active:
            return {}
        hidden = outputs.hidden_states
        if hidden is None:
            raise RuntimeError("feature_l2 needs the trained forward pass run with output_hidden_states=True")
        ref = reference()
        indices = select_layers(len(hidden), self.config.layers)
        loss = feature_l2_loss(hidden, ref.hidden_states, token_mask(batch, self.config.tokens), indices)
        return {"feature_l2": self.config.weight * loss}
