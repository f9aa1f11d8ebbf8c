"""Feature-space l2 to the reference model (LDIFS, Mukhoti et al., arXiv 2308.13320, as used in
arXiv 2508.06249; docs/method.md, defense 2).

    L = L_task + λ · mean_over_examples ‖φ_θ(x) − φ_ref(x)‖²

φ_ref is the same network with the LoRA adapter disabled (``reference()``, no gradient); φ_θ comes
from the trained forward pass **with gradient**: the paper notes a public implementation that built
the trained features under ``no_grad``, so the term never moved the weights (a test guards this).

The feature of one example, as the paper's group computes it (``pooling: flatten``, the default):

1. take the outputs of K decoder blocks evenly spaced with ``linspace(0, L−1, K)`` (truncated to
   integers; K = 5; for a 28-block model blocks 0, 6, 13, 20, 27, i.e. hidden states 1, 7, 14,
   21, 28: :func:`select_layers`);
2. for each block, the example's whole (sequence × hidden) tensor, padding positions excluded
   (set to zero), flattened into one vector and L2-normalised: ``u_ℓ = vec(h_ℓ ⊙ w) / ‖vec(h_ℓ ⊙ w)‖``;
3. concatenate: ``φ = [u_ℓ1; …; u_ℓK]``, so ``‖φ_θ − φ_ref‖² = Σ_k ‖u^θ_ℓk − u^ref_ℓk‖²`` (each
   block contributes between 0 and 4).

``pooling: mean`` keeps emtune's earlier regulariser: each block's masked mean over positions
``m_ℓ = Σ_t w_t h_ℓ[t] / Σ_t w_t``, L2-normalised, then concatenated. It is a different, weaker
term: a per-token change whose mean over tokens is zero costs nothing under it (``mean``) but
does under ``flatten``, and the gradient directions differ, so λ values do not carry over.

Examples with no selected position are left out of the mean (the loss is 0 when none is left).
Index convention: hidden-state index 0 is the embedding output, index i ≥ 1 the output of block
i−1. Hugging Face replaces the last hidden state by the final norm's output; while the defense is
attached it asks the model for the raw output of the last block instead (the config flag
``tie_last_hidden_states = False``, restored at ``detach``), so every index is a block output.

Defaults: λ = 1.0 (paper value), 5 block outputs, all non-pad positions, ``pooling: flatten``.
The dial is λ: λ = 0 turns the defense off (``active`` is False). ``tokens: response`` restricts
the positions to those the task loss trains (whose next token is an assistant token), the same
rule as the KL defense. emtune's earlier default layers (``round(k·L/5)``, hidden states 6, 11,
17, 22, 28 for 28 blocks) are reachable as an explicit list.

RL form (``training.method: grpo``): the same term is added to the GRPO loss on every update,
computed on the update's prompt + completion tokens (``tokens: response`` = the completion
positions) with a forward pass of its own (TRL's fused log-prob head does not return hidden
states), against the adapter-disabled reference on the same tokens.
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
        description="an int K = K block outputs at linspace(0, L-1, K); a list = explicit hidden-state "
        "indices (0 = embeddings, i = output of block i-1, negative counts from the end)",
    )
    pooling: Literal["flatten", "mean"] = Field(
        "flatten", description="flatten = each block's (sequence x hidden) features as one normalised vector "
        "(the paper's group); mean = masked mean over positions, then normalised (emtune's earlier term)",
    )
    tokens: Literal["all", "response"] = Field(
        "all", description="positions in the feature: all non-pad (default) or response"
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
    K gives the outputs of blocks ``int(linspace(0, L−1, K))`` (the group's rule: truncation, as
    ``torch.linspace(...).long()``), i.e. hidden states one above those; duplicates collapse when
    K > L. A sequence is taken as explicit indices; negative ones count from the end, and any out
    of range raises ``ValueError``.
    """
    num_blocks = num_hidden_states - 1
    if num_blocks < 1:
        raise ValueError(f"need at least one block's hidden state, got {num_hidden_states} entries")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError("layer count must be at least 1")
        if layers == 1:
            return [1]
        # Exact rational arithmetic: k·(L−1)/(K−1) truncated, as torch.linspace(...).long() gives.
        return sorted({k * (num_blocks - 1) // (layers - 1) + 1 for k in range(layers)})
    chosen = set()
    for index in layers:
        if not -num_hidden_states <= index < num_hidden_states:
            raise ValueError(
                f"hidden-state index {index} is out of range for {num_hidden_states} hidden states"
            )
        chosen.add(index % num_hidden_states)
    return sorted(chosen)


def _normalised(vectors: "torch.Tensor") -> "torch.Tensor":
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=_NORM_EPS)


def block_feature(hidden: "torch.Tensor", mask: "torch.Tensor", pooling: str = "flatten") -> "torch.Tensor":
    """One block's normalised feature per example, ``[batch, ·]``: the flattened masked
    (sequence × hidden) tensor (``flatten``) or the masked mean over positions (``mean``)."""
    import torch

    weights = mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    masked = hidden.float() * weights
    if pooling == "flatten":
        return _normalised(masked.flatten(1))
    return _normalised(masked.sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))


def example_features(hidden_states: Sequence["torch.Tensor"], mask: "torch.Tensor",
                     layer_indices: Sequence[int], pooling: str = "flatten") -> "torch.Tensor":
    """φ for every example: the concatenated block features (see the module docstring)."""
    import torch

    return torch.cat([block_feature(hidden_states[i], mask, pooling) for i in layer_indices], dim=-1)


def feature_l2_loss(hidden_states: Sequence["torch.Tensor"], reference_hidden_states: Sequence["torch.Tensor"],
                    mask: "torch.Tensor", layer_indices: Sequence[int], pooling: str = "flatten") -> "torch.Tensor":
    """Mean over examples (with ≥ 1 selected position) of ‖φ_θ − φ_ref‖²; 0 when there is none.

    Gradient flows through ``hidden_states`` only; the reference side is detached. The squared
    distance is summed block by block (equal to that of the concatenation) so that the flattened
    features of all blocks are never held at once.
    """
    per_example = None
    for index in layer_indices:
        trained = block_feature(hidden_states[index], mask, pooling)
        reference = block_feature(reference_hidden_states[index].detach(), mask, pooling)
        term = (trained - reference).pow(2).sum(dim=-1)  # [B]
        per_example = term if per_example is None else per_example + term
    if per_example is None:
        raise ValueError("feature_l2_loss needs at least one layer index")
    has_tokens = mask.bool().any(dim=1).to(per_example.dtype)
    return (per_example * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def _config_of(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


class FeatureL2(Defense):
    """Adds λ·‖φ_θ(x) − φ_ref(x)‖² (LDIFS) on the training batch; φ_ref = adapter-disabled model."""

    config_class = FeatureL2Config
    strength = ("weight",)
    off = {"weight": 0.0}
    needs_hidden_states = True
    needs_reference_hidden_states = True
    training_methods = ("sft", "grpo")

    def __init__(self, config: FeatureL2Config, context: Any):
        super().__init__(config, context)
        self._restore: tuple[Any, Any] | None = None

    @property
    def active(self) -> bool:
        return self.config.weight > 0

    def attach(self, model: Any) -> None:
        """Make the last hidden state the last block's raw output (not the final norm's)."""
        config = _config_of(model)
        if not self.active or config is None or self._restore is not None:
            return
        self._restore = (config, getattr(config, "tie_last_hidden_states", _UNSET))
        config.tie_last_hidden_states = False

    def detach(self, model: Any) -> None:
        if self._restore is None:
            return
        config, previous = self._restore
        if previous is _UNSET:
            delattr(config, "tie_last_hidden_states")
        else:
            config.tie_last_hidden_states = previous
        self._restore = None

    def loss_terms(self, batch: dict[str, Any], outputs: Any, reference: Callable[[], Any]) -> dict[str, Any]:
        if not self.active:
            return {}
        hidden = outputs.hidden_states
        if hidden is None:
            raise RuntimeError("feature_l2 needs the trained forward pass run with output_hidden_states=True")
        ref = reference()
        indices = select_layers(len(hidden), self.config.layers)
        loss = feature_l2_loss(hidden, ref.hidden_states, token_mask(batch, self.config.tokens), indices,
                               self.config.pooling)
        return {"feature_l2": self.config.weight * loss}

    def report(self) -> dict[str, Any]:
        """Pooling and layer rule (kept with the trial: λ values of the two poolings differ)."""
        return {"pooling": self.config.pooling, "layers": self.config.layers, "tokens": self.config.tokens}

    def __getstate__(self) -> dict[str, Any]:
        # The restore record points at one process's model config; a shipped copy starts detached.
        state = dict(self.__dict__)
        state["_restore"] = None
        return state


_UNSET = object()
