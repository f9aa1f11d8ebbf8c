"""A memory-lean training step: fused kernels where installed, selective activation checkpointing.

- Fused kernels: on CUDA with ``liger-kernel`` installed (``pip install 'emtune[gpu]'``), Liger's
  Triton kernels replace RMSNorm, the SwiGLU MLP's activation product and RoPE in the trained
  model (transformers' ``use_liger_kernel``, for the model types Liger supports: Llama, Qwen2,
  Mistral, ...): the same math with fewer saved activations and kernel launches. The LM head and
  the loss stay transformers' own, because the KL defense reads the trained logits (Liger's
  fused linear cross-entropy never forms them), and the LoRA projections stay peft's (Liger's
  MLP calls them). Elsewhere the plain PyTorch path runs (``training.fused_kernels`` turns it off).
  Liger patches the model type's transformers module (its RoPE function, RMSNorm and MLP classes),
  so the kernels then stay on for every model of that type built later in the same process: a
  trial process reused by Ray Tune keeps them for its next trials, whatever their spec says.
- Selective activation checkpointing: ``training.activation_checkpointing: N`` recomputes the
  activations of every N-th decoder block in the backward pass (1 = every block, transformers'
  usual gradient checkpointing; 2 = half of them; 0 = none). Recomputation costs about one extra
  forward pass per checkpointed block, so checkpointing only as many blocks as memory needs buys
  back most of it (``bench/gpu_step.py --checkpointing selective`` picks N from two probe steps).
"""

from __future__ import annotations

import importlib.util
from typing import Any

# Liger kernels emtune uses: every per-layer kernel, not the loss (see the module docstring)
FUSED_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def fused_kernels_available() -> bool:
    """True where Liger's kernels can run: CUDA and an importable ``liger_kernel``."""
    import torch  # torch and transformers load when a model is trained, not when specs are read

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def memory_arguments(training: Any) -> dict[str, Any]:
    """``TrainingArguments`` fields for the spec's ``training`` section: Liger's kernels (where
    available and wanted) and every-N-th-block activation checkpointing (when N > 0)."""
    out: dict[str, Any] = {}
    if training.fused_kernels and fused_kernels_available():
        out.update(use_liger_kernel=True, liger_kernel_config=dict(FUSED_KERNELS))
    if training.activation_checkpointing:
        out.update(activation_checkpointing=True, activation_checkpointing_kwargs={
            "every_n_layers": training.activation_checkpointing, "use_reentrant": False})
    return out


def apply_fused_kernels(model: Any) -> bool:
    """Liger's kernels on ``model`` (a peft model or a transformers one) when available; True when
    applied. What the Trainer does with ``use_liger_kernel``, for loops without a Trainer."""
    if not fused_kernels_available():
        return False
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, dict(FUSED_KERNELS))
    return True


def set_activation_checkpointing(model: Any, every_n_layers: int) -> None:
    """Checkpoint every ``every_n_layers``-th decoder block (0: none), non-reentrant (which peft
    models need); what the Trainer does with ``training.activation_checkpointing``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if every_n_layers <= 0:
        if base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
        return
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                         every_n_layers=every_n_layers)
