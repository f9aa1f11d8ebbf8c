"""Concept ablation fine-tuning, CAFT (Casademunt et al., arXiv 2507.16795; docs/method.md,
"Beyond the paper").

During training only, chosen directions are projected out of the residual stream at chosen layers:

    h_ℓ ← h_ℓ − s · U_ℓᵀ U_ℓ h_ℓ        at every position,

where the rows of U_ℓ are an orthonormal basis of layer ℓ's directions and s ∈ [0, 1] is the
strength: the fraction of the component along the directions that is removed (s = 1 is CAFT's full
ablation, s = 0 is off). Because the fine-tune cannot use the ablated concept, it learns the task
without moving toward it; the hooks are removed before evaluation, so the evaluated model is the
adapter alone. The published result: about 10x fewer misaligned responses after insecure-code
fine-tuning, with in-distribution performance kept.

h_ℓ = ``hidden_states[ℓ]`` is the output of decoder block ℓ−1 (0 = embeddings), the convention of
persona vectors and persona steering; a forward hook on block ℓ−1 does the projection (registered
first among the block's hooks, so Hugging Face's ``hidden_states[ℓ]`` shows the ablated value).

Directions, one source:

- the misalignment (evil persona) vector e_ℓ at each chosen layer: ``vector_path`` (a file of
  ``emtune persona extract``), or ``extract_prompts`` (e.g. ``evil_v1``) for a study stage that
  extracts it once from the base model (cached, shared with persona steering and the monitor);
- ``directions_path``: a file of directions per layer, ``torch.save({"directions": {ℓ: Tensor[k,
  hidden]}})`` (e.g. the paper's PCA or SAE directions), orthonormalised here.

Note: like persona steering's, the hooks are on the modules, so a reference pass taken while they
are attached (KL or LDIFS stacked with CAFT) is ablated too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from emtune.defenses.base import Defense, LocalFile, StageServices
from emtune.defenses.block_hooks import block_output_hook, decoder_blocks, register_block_hook
from emtune.defenses.persona_steering import (
    checked_persona_vectors, extraction, judge_filter_problem, stage_vectors, tiny_layer_problems,
)
from emtune.spec_errors import StrictModel


class CAFTConfig(StrictModel):
    """Settings of concept ablation; ``fraction`` is the strength dial, ``layers`` the places."""

    name: Literal["caft"] = "caft"
    fraction: float = Field(1.0, ge=0, le=1, description="s: fraction of the component removed; "
                            "1 = full ablation (the paper), 0 = off")
    layers: tuple[int, ...] = Field(
        (20,), min_length=1, description="hidden states ℓ ablated (output of decoder block ℓ−1); 20 is "
        "the persona-vector authors' layer for Qwen2.5-7B")
    vector_path: str | None = Field(None, description="persona vector file (`emtune persona extract`)")
    extract_prompts: str | None = Field(
        None, description="contrastive prompt set (e.g. evil_v1): the study stage extracts the persona vector")
    extract_max_new_tokens: int = Field(64, gt=0, description="answer length during stage extraction")
    extract_filter: Literal["judge", "none"] = Field(
        "judge", description="judge = keep the contrastive pairs the study's judge confirms (the persona-vector "
        "recipe, with persona steering's default rule); none = every pair")
    directions_path: str | None = Field(
        None, description="file of directions per layer: torch.save({'directions': {layer: Tensor[k, hidden]}})")

    @model_validator(mode="after")
    def _one_source(self) -> "CAFTConfig":
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 1:
            raise ValueError(f"layers {list(self.layers)} must be distinct hidden-state indices >= 1")
        persona = bool(self.vector_path or self.extract_prompts)
        if persona and self.directions_path:
            raise ValueError("give the persona vector (vector_path / extract_prompts) or directions_path, not both")
        if self.fraction > 0 and not (persona or self.directions_path):
            raise ValueError("CAFT needs directions when fraction > 0: set extract_prompts (e.g. evil_v1), "
                             "vector_path (`emtune persona extract`) or directions_path")
        return self


def orthonormal_basis(directions: Any) -> Any:
    """Rows spanning the same space as ``directions [k, hidden]``, orthonormal (QR)."""
    import torch

    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.dim() == 1:
        directions = directions.unsqueeze(0)
    if directions.dim() != 2 or not bool(directions.norm(dim=1).gt(0).all()):
        raise ValueError(f"CAFT directions must be non-zero rows [k, hidden], got shape {tuple(directions.shape)}")
    q, r = torch.linalg.qr(directions.T)
    if bool(r.diagonal().abs().lt(1e-6 * directions.norm(dim=1).max()).any()):
        raise ValueError("CAFT directions are linearly dependent: give independent directions per layer")
    return q.T.contiguous()


def make_ablation_hook(basis: Any, fraction: float) -> Any:
    """A forward hook that removes ``fraction`` of a block's output component in span(basis)."""
    return block_output_hook(basis, lambda hidden, u, _: hidden - fraction * (hidden @ u.T) @ u)


class CAFT(Defense):
    """Projects ``fraction`` of the chosen directions out of the residual stream while training."""

    config_class = CAFTConfig
    strength = ("fraction",)
    off = {"fraction": 0.0}

    @classmethod
    def local_files(cls, config: CAFTConfig) -> list[LocalFile]:
        """The persona vector or directions file, when one is given."""
        found = []
        if config.vector_path:
            found.append(LocalFile("vector_path", config.vector_path, hint="create it with `emtune persona extract`"))
        if config.directions_path:
            found.append(LocalFile("directions_path", config.directions_path))
        return found

    @classmethod
    def spec_problems(cls, config: CAFTConfig, spec: Any) -> list[str]:
        """A stage extraction with the judge filter needs the study's judge; on the tiny model
        every layer must be one of its blocks."""
        return judge_filter_problem("caft", config, spec) + tiny_layer_problems("caft", config.layers, spec)

    @classmethod
    def prepare(cls, config: CAFTConfig, stage: StageServices) -> CAFTConfig:
        """With ``extract_prompts`` and no file: extract the persona vector once (study stage,
        shared with persona steering's when the settings agree)."""
        if not config.extract_prompts or config.vector_path:
            return config
        return config.model_copy(update={"vector_path": stage_vectors(stage, extraction(config))})

    def __init__(self, config: CAFTConfig, context: Any):
        super().__init__(config, context)
        self._handles: list[Any] = []

    @property
    def active(self) -> bool:
        return self.config.fraction > 0

    def bases(self, model: Any) -> dict[int, Any]:
        """Layer -> orthonormal basis of the directions ablated there."""
        import torch

        if self.config.directions_path:
            data = torch.load(Path(self.config.directions_path).expanduser(), map_location="cpu", weights_only=True)
            table = data.get("directions") if isinstance(data, dict) else None
            if not isinstance(table, dict):
                raise ValueError(f"caft.directions_path {self.config.directions_path!r}: expected "
                                 "{'directions': {layer: Tensor[k, hidden]}}")
            missing = [layer for layer in self.config.layers if layer not in table]
            if missing:
                raise ValueError(f"caft.directions_path has no directions for layers {missing} "
                                 f"(it has {sorted(table)})")
            return {layer: orthonormal_basis(table[layer]) for layer in self.config.layers}
        vectors = checked_persona_vectors(self.config.vector_path, getattr(self.context, "spec", None), model,
                                          "caft.vector_path")
        out = {}
        for layer in self.config.layers:
            if layer >= vectors.shape[0]:
                raise ValueError(f"caft.layers {layer} is out of range: the vector file has hidden states "
                                 f"0..{vectors.shape[0] - 1}")
            out[layer] = orthonormal_basis(vectors[layer])
        return out

    def attach(self, model: Any) -> None:
        if not self.active or self._handles:
            return
        decoder_blocks(model)  # an unsupported architecture fails before the directions are read
        for layer, basis in self.bases(model).items():
            hidden = getattr(getattr(model, "config", None), "hidden_size", basis.shape[1])
            if basis.shape[1] != hidden:
                raise ValueError(f"caft: directions of width {basis.shape[1]} for a model of hidden size {hidden}")
            hook = make_ablation_hook(basis, self.config.fraction)
            self._handles.append(register_block_hook(model, layer, hook, "caft.layers"))

    def detach(self, model: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __getstate__(self) -> dict[str, Any]:
        # hook handles are tied to one process's modules; a shipped copy starts detached
        state = dict(self.__dict__)
        state["_handles"] = []
        return state
