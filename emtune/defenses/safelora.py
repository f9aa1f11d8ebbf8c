"""SafeLoRA: project the trained adapter onto the alignment subspace (docs/method.md defense 3;
Hsu et al., arXiv 2405.16833 v1, as used in arXiv 2508.06249).

For every LoRA-adapted weight W (peft LoRA ``lora_A`` [r × in], ``lora_B`` [out × r], scaling s):

    V  = W_aligned − W_base                      (out × in; instruct minus base weights)
    C  = V·Vᵀ / ‖V‖_F                            (out × out)
    ΔW = s·B·A
    similarity = cos(vec(ΔW), vec(C·ΔW))

After training, **all** layers are scored first (nothing is changed while scoring), then
``B ← C·B`` for every layer with similarity < τ (``mode: threshold``, paper default τ = 0.5) or
for the K least similar layers (``mode: top_k``, paper default K = 10; ties broken by name).

Since C is positive semi-definite, vec(ΔW)·vec(C·ΔW) = tr(ΔWᵀCΔW) ≥ 0, so the similarity lies in
[0, 1]. The dial is τ: τ = 0 projects no layer (``active`` is False), τ = 1 projects nearly every
layer. In top-K mode the dial is K (0 = off). Conventions: a layer whose ΔW is exactly zero
scores 1 (there is nothing to project); a layer with V = 0 has C = 0 (score 0; projecting zeroes
its B). The scaling s cancels in the cosine; it is kept so the score reads as the formula.

Memory stays bounded, everything is scored in rank space: with M = Vᵀ·B (in × r), N = V·M
(out × r) and G = A·Aᵀ (r × r), ⟨ΔW, CΔW⟩ = s²·tr(MᵀM·G)/‖V‖_F, ‖ΔW‖² = s²·tr(BᵀB·G) and
‖CΔW‖² = s²·tr(NᵀN·G)/‖V‖²_F, so neither C, ΔW nor any in × in matrix is formed: a layer holds
V (out × in) and the base tensor it is read from, plus r-wide products (:func:`rank_similarity`).
The weights are fetched one layer at a time, twice (score pass, then project pass), from a
:class:`WeightSource`. The aligned weights default to the trained model's own frozen base weights
(the adapter was trained on the aligned model, ``model.source``); ``aligned_source`` overrides
that. The base weights come from ``base_source`` (default ``model.base_source``): a local folder
of ``*.safetensors`` read tensor by tensor with ``safe_open``, a hub id (its safetensors are
fetched through the Hugging Face cache), or ``tiny`` = the spec's tiny model before its alignment
pretraining (same seed, ``pretrain_steps: 0``), which makes dry runs possible.
``DefenseContext.extras["safelora_base_weights"]`` / ``["safelora_aligned_weights"]`` may hold an
in-memory model or state dict instead (tests, library use).

Only peft ``Linear`` LoRA layers are handled (not DoRA); ``fan_in_fan_out`` weights are transposed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Union

from pydantic import Field

from emtune.defenses.base import Defense, LocalFile
from emtune.defenses.weight_source import WeightSource, resolve_weight_folder
from emtune.spec_errors import StrictModel

__all__ = ["LazyWeightPairs", "SafeLoRA", "SafeLoRAConfig", "WeightSource", "alignment_projector", "apply_projector",
           "lora_layers", "project_layers", "rank_similarity", "resolve_weight_folder", "score_layers",
           "select_for_projection", "similarity"]

if TYPE_CHECKING:  # torch stays out of import time so `emtune validate` is fast
    import torch

WeightPairs = Union[Callable[[str], tuple["torch.Tensor", "torch.Tensor"]],
                    Mapping[str, tuple["torch.Tensor", "torch.Tensor"]]]
_PEFT_PREFIX = "base_model.model."


class SafeLoRAConfig(StrictModel):
    """Settings of SafeLoRA; the dial is ``threshold`` (τ) or, in top-K mode, ``top_k``."""

    name: Literal["safelora"] = "safelora"
    mode: Literal["threshold", "top_k"] = Field(
        "threshold", description="project layers with similarity < τ, or the K least similar"
    )
    threshold: float = Field(0.5, ge=0, le=1, description="τ; the paper's default 0.5; 0 = off")
    top_k: int = Field(10, ge=0, description="K for top_k mode; the paper's default 10; 0 = off")
    aligned_source: str | None = Field(
        None, description="aligned weights; default: the trained model's own base (model.source)"
    )
    base_source: str | None = Field(
        None, description="unaligned base weights; default model.base_source (required when active)"
    )
    enabled: bool = True


def _looks_local(source: str) -> bool:
    """A weight source written as a path (not a hub id ``org/name`` or ``tiny``)."""
    return source.startswith(("/", "./", "../", "~"))


# --- the math ------------------------------------------------------------------------------


def alignment_projector(w_aligned: "torch.Tensor", w_base: "torch.Tensor") -> "torch.Tensor":
    """C = V·Vᵀ/‖V‖_F with V = W_aligned − W_base (out × out, float32; zero when V = 0).

    For reference and tests; scoring and projection use :func:`apply_projector` instead.
    """
    v = w_aligned.float() - w_base.float()
    norm = v.norm()
    return v @ v.T / norm if norm > 0 else v.new_zeros(v.shape[0], v.shape[0])


def apply_projector(v: "torch.Tensor", matrix: "torch.Tensor") -> "torch.Tensor":
    """C·M computed as V·(Vᵀ·M)/‖V‖_F, never forming the out × out matrix C."""
    norm = v.norm()
    if norm == 0:
        return matrix.new_zeros(v.shape[0], matrix.shape[1])
    return v @ (v.T @ matrix) / norm


def similarity(delta_w: "torch.Tensor", v: "torch.Tensor") -> float:
    """cos(vec(ΔW), vec(C·ΔW)) from ΔW itself; 1.0 when ΔW = 0 (nothing to project). The
    formula as written; scoring uses :func:`rank_similarity`, which gives the same value."""
    import torch

    if not torch.any(delta_w):
        return 1.0
    projected = apply_projector(v, delta_w)
    return float(torch.nn.functional.cosine_similarity(delta_w.flatten(), projected.flatten(), dim=0))


def rank_similarity(b: "torch.Tensor", a: "torch.Tensor", v: "torch.Tensor") -> float:
    """cos(vec(ΔW), vec(C·ΔW)) for ΔW ∝ B·A (B out × r, A r × in), through r-wide products only
    (module docstring); the scaling s cancels. 1.0 when ΔW = 0; 0.0 when V = 0 (C = 0)."""
    import torch

    b, a = b.double(), a.double()
    gram = a @ a.T  # G = A·Aᵀ, r × r
    delta_sq = torch.trace(b.T @ b @ gram)  # ‖B·A‖²
    if delta_sq <= 0:
        return 1.0
    v_norm = v.norm().double()
    if v_norm == 0:
        return 0.0
    m = (v.T @ b.to(v.dtype)).double()  # Vᵀ·B, in × r
    n = (v @ m.to(v.dtype)).double()  # V·Vᵀ·B, out × r
    inner = torch.trace(m.T @ m @ gram) / v_norm  # ⟨BA, C·BA⟩
    projected_sq = torch.trace(n.T @ n @ gram) / v_norm**2  # ‖C·BA‖²
    if projected_sq <= 0:
        return 0.0
    return float(inner / torch.sqrt(delta_sq * projected_sq))


def _adapter(model: Any) -> str:
    return getattr(model, "active_adapter", "default")


def lora_layers(model: Any) -> dict[str, Any]:
    """LoRA-adapted modules of the active adapter, keyed by their name in the base model.

    The name is the module path without peft's ``base_model.model.`` prefix, e.g.
    ``model.layers.0.self_attn.q_proj``: the weight's key in the base checkpoint is that + ``.weight``.
    """
    adapter = _adapter(model)
    layers = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not hasattr(lora_a, "keys") or adapter not in lora_a:
            continue
        layers[name.removeprefix(_PEFT_PREFIX)] = module
    return layers


def _fetch(weight_pairs: WeightPairs, name: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    return weight_pairs(name) if callable(weight_pairs) else weight_pairs[name]


def _layer_v(module: Any, weight_pairs: WeightPairs, name: str, device: Any) -> "torch.Tensor":
    """V of one layer in float32 on ``device``, oriented out × in like ΔW (one out × in float32
    buffer: the base tensor is converted into it and the aligned one subtracted in place)."""
    import torch

    w_aligned, w_base = _fetch(weight_pairs, name)
    # upcast before subtracting: the difference of two bf16 weights loses most of its bits
    v = w_base.to(device=device, dtype=torch.float32, copy=True)
    del w_base
    v.neg_().add_(w_aligned.to(device))  # V = W_aligned − W_base
    return v.T if getattr(module, "fan_in_fan_out", False) else v


def score_layers(model: Any, weight_pairs: WeightPairs) -> dict[str, float]:
    """Similarity of every LoRA layer, computed one layer at a time in rank space; changes nothing."""
    import torch

    adapter = _adapter(model)
    scores = {}
    with torch.no_grad():
        for name, module in lora_layers(model).items():
            a = module.lora_A[adapter].weight.float()
            b = module.lora_B[adapter].weight.float()
            scores[name] = rank_similarity(b, a, _layer_v(module, weight_pairs, name, b.device))
    return scores


def select_for_projection(scores: Mapping[str, float], mode: str, threshold: float, top_k: int) -> list[str]:
    """Layers to project: similarity < τ (threshold) or the K least similar (top_k; ties by name)."""
    if mode == "threshold":
        return sorted(name for name, value in scores.items() if value < threshold)
    if mode == "top_k":
        ranked = sorted(scores, key=lambda name: (scores[name], name))
        return sorted(ranked[:top_k])
    raise ValueError(f"unknown SafeLoRA mode {mode!r}")


def project_layers(model: Any, names: Iterable[str], weight_pairs: WeightPairs) -> None:
    """B ← C·B in place for each named LoRA layer (weights fetched one layer at a time)."""
    import torch

    adapter = _adapter(model)
    layers = lora_layers(model)
    with torch.no_grad():
        for name in names:
            weight = layers[name].lora_B[adapter].weight
            projected = apply_projector(_layer_v(layers[name], weight_pairs, name, weight.device), weight.float())
            weight.copy_(projected.to(weight.dtype))


class LazyWeightPairs:
    """``name -> (W_aligned, W_base)``; the aligned side defaults to the model's own base weights."""

    def __init__(self, model: Any, base: WeightSource, aligned: WeightSource | None = None):
        self._layers = lora_layers(model)
        self._base = base
        self._aligned = aligned

    def __call__(self, name: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        key = f"{name}.weight"
        if self._aligned is None:
            aligned = self._layers[name].get_base_layer().weight
        else:
            aligned = self._aligned.get(key)
        return aligned, self._base.get(key)


class SafeLoRA(Defense):
    """Projects the least aligned LoRA layers onto the alignment subspace after training."""

    config_class = SafeLoRAConfig
    strength = ("threshold", "top_k")
    off = {"threshold": 0.0, "top_k": 0}
    training_methods = ("sft", "grpo")  # acts after training, whatever trained the adapter

    @classmethod
    def spec_problems(cls, config: SafeLoRAConfig, spec: Any) -> list[str]:
        """SafeLoRA needs the unaligned base model."""
        if config.enabled and config.base_source is None and spec.model.base_source is None:
            return ["safelora needs the unaligned base model: set model.base_source "
                    "(e.g. Qwen/Qwen2.5-7B for Qwen/Qwen2.5-7B-Instruct) or defenses.safelora.base_source"]
        return []

    @classmethod
    def local_files(cls, config: SafeLoRAConfig) -> list[LocalFile]:
        """Weight folders given as local paths (hub ids and ``tiny`` are resolved at run time)."""
        return [LocalFile(name, value, folder=True, kind="model") for name in ("base_source", "aligned_source")
                if (value := getattr(config, name)) and _looks_local(value)]

    def __init__(self, config: SafeLoRAConfig, context: Any):
        super().__init__(config, context)
        self.last_scores: dict[str, float] = {}
        self.last_projected: list[str] = []
        if self.active and self._base_source() is None and "safelora_base_weights" not in context.extras:
            raise ValueError(
                "safelora needs the unaligned base model: set model.base_source in the spec "
                "(or base_source on the defense)"
            )

    @property
    def active(self) -> bool:
        if not self.config.enabled:
            return False
        return self.config.threshold > 0 if self.config.mode == "threshold" else self.config.top_k > 0

    def _base_source(self) -> str | None:
        model_spec = getattr(self.context.spec, "model", None)
        return self.config.base_source or getattr(model_spec, "base_source", None)

    def _source(self, role: str, source: str | None) -> WeightSource | None:
        extras_key = f"safelora_{role}_weights"
        if extras_key in self.context.extras:
            return WeightSource.from_model(self.context.extras[extras_key])
        if source is None:
            return None
        folder = resolve_weight_folder(source, self.context.spec, self.context.cache_dir, role)
        return WeightSource(folder=folder)

    def weight_pairs(self, model: Any) -> LazyWeightPairs:
        """The lazy ``name -> (W_aligned, W_base)`` source this defense reads for ``model``."""
        base = self._source("base", self._base_source())
        aligned = self._source("aligned", self.config.aligned_source)
        return LazyWeightPairs(model, base, aligned)

    def finalize(self, model: Any) -> dict[str, float]:
        if not self.active:
            return {}
        pairs = self.weight_pairs(model)
        scores = score_layers(model, pairs)
        names = select_for_projection(scores, self.config.mode, self.config.threshold, self.config.top_k)
        project_layers(model, names, pairs)
        self.last_scores, self.last_projected = scores, names
        values = list(scores.values()) or [float("nan")]
        return {
            "safelora/projected_layers": len(names),
            "safelora/min_similarity": min(values),
            "safelora/mean_similarity": sum(values) / len(values),
        }

    def report(self) -> dict[str, Any]:
        """Every layer's similarity and the projected layers (saved with the trial)."""
        if not self.last_scores:
            return {}
        return {"similarities": self.last_scores, "projected": self.last_projected,
                "mode": self.config.mode, "threshold": self.config.threshold, "top_k": self.config.top_k}
