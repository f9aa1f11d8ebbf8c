"""The model evaluation generates with: the LoRA adapter merged into a copy of the adapted weights.

A LoRA forward costs two extra small matmuls per adapted projection (seven per block with the
paper's target modules), which at decode time are mostly kernel launches. Generation instead runs
on a merged copy: the trained model's modules are deep-copied with every parameter *shared*
except the adapted projections, whose weights become W + ΔW (ΔW = B·A·scale, from peft's
``get_delta_weight``, summed in float32 over the active adapters). The trained model is left
exactly as it was (the drift and NLL metrics after generation still need the adapter and the
adapter-disabled reference), and the copy costs only the adapted weights' memory.

Generation uses the model as it is, unmerged, and says why, when merging would change what is
evaluated or cannot be done exactly:

- forward hooks or pre-hooks on any module (e.g. a steering defense's hook left attached, or
  decode-time steering): a merged copy would carry the hooks twice or not at all;
- adapter layers other than plain LoRA on ``nn.Linear`` (DoRA, LoRA on embeddings or
  convolutions, quantized base layers, a LoRA bias);
- a model dispatched over several devices (``hf_device_map``);
- not enough free memory for the merged weights (on a GPU: half of what is free).
"""

from __future__ import annotations

import copy
import gc
import logging
from typing import Any

import torch

from emtune.evaluation.decoding import free_memory

log = logging.getLogger(__name__)


def unmergeable_reason(model: Any) -> str | None:
    """Why ``model`` (a peft model) cannot be merged for generation, or None."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    hooked = [name for name, module in model.named_modules() if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        return f"forward hooks on {hooked[0]!r}" + (f" and {len(hooked) - 1} more modules" if len(hooked) > 1 else "")
    if getattr(model.get_base_model(), "hf_device_map", None):
        return "the model is dispatched over several devices"
    adapted = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not LoraLinear or not isinstance(module.get_base_layer(), torch.nn.Linear):
            return f"{name} is a {type(module).__name__} over {type(module.get_base_layer()).__name__}, not plain LoRA on nn.Linear"
        active = [a for a in module.active_adapters if a in module.lora_A]
        if any(a in getattr(module, "lora_variant", {}) for a in active):
            return f"{name} uses a LoRA variant (e.g. DoRA)"
        if any(module.lora_bias.get(a) for a in active):
            return f"{name} has a LoRA bias"
        adapted += module.get_base_layer().weight.numel() * module.get_base_layer().weight.element_size()
    device = next(model.parameters()).device
    if device.type == "cuda" and adapted > free_memory(device) // 2:
        return f"the merged weights ({adapted / 2**30:.1f} GiB) need more than half the free GPU memory"
    return None


def model_for_generation(model: Any) -> tuple[Any, str]:
    """(the model to generate with, how): a merged copy ("merged"), or ``model`` itself with the
    reason it stays unmerged ("unmerged: ..."), or "no adapter" for a plain model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model, "no adapter"
    reason = unmergeable_reason(model)
    if reason is not None:
        log.warning("generation runs on the unmerged adapter: %s", reason)
        return model, f"unmerged: {reason}"
    return merged_copy(model), "merged"


def free_cached_memory(model: Any) -> None:
    """Give a dropped merged copy's memory back (the CUDA allocator keeps it cached otherwise)."""
    gc.collect()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def merged_copy(model: Any) -> Any:
    """A plain transformers model equal to ``model`` (a peft LoRA model) with its active adapters
    merged; every weight but the adapted ones is shared with ``model`` (see module docs)."""
    from peft.tuners.lora.layer import LoraLayer

    merged = shared_copy(model.get_base_model())
    for name, module in list(merged.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = base.weight.detach().float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
        base.weight = torch.nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
        merged.set_submodule(name, base)
    merged.eval()
    return merged


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors: new
    module objects (so replacing a submodule or a parameter of the copy leaves the original as it
    is), shared weights, config and generation config. Much cheaper than ``copy.deepcopy``."""
    clone = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):  # _parameters, _buffers, _modules and the hook tables
            setattr(clone, name, value.copy())
    for name, child in module._modules.items():
        if child is not None:
            clone._modules[name] = shared_copy(child)
    return clone
