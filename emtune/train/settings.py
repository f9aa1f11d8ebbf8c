"""The ``training`` section of a study spec: optimisation settings of one fine-tune."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from emtune.spec_errors import StrictModel


class TrainingSpec(StrictModel):
    """Optimisation settings; defaults are the paper's (lr 1e-4, 1 epoch, 4 x accum 4, wd 0.01)."""

    learning_rate: float = Field(1e-4, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after N optimizer steps")
    per_device_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(5, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    optimizer: str = "adamw_torch"
    bf16: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="report a resumable checkpoint (adapter + optimizer) every N steps"
    )
    group_by_length: bool = Field(
        True, description="batches of rows of similar length (less padding; batch order stays random); "
        "false = plain random batches")
    fused_kernels: bool = Field(
        True, description="Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels on GPU when liger-kernel is "
        "installed (pip install 'emtune[gpu]'); the plain PyTorch path otherwise")
    activation_checkpointing: int = Field(
        0, ge=0, description="recompute the activations of every N-th decoder block in the backward pass "
        "(1 = all blocks, 2 = half, 0 = none): less memory for about one forward pass per checkpointed block")
