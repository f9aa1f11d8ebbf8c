"""The ``training`` section of a study spec: optimisation settings of one fine-tune.

``method`` picks the training method: ``sft`` (supervised fine-tuning on chat rows, the default)
or ``grpo`` (reinforcement learning with TRL's GRPO on prompt-only rows, the paper's RL setting;
its settings are the ``grpo`` subsection). The optimiser fields are shared; where the RL setting
has other defaults (the group's: lr 5e-6, cosine schedule, weight decay 0.1), those apply to a
``grpo`` spec unless the spec sets the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from emtune.data.loading import DatasetSpec
from emtune.spec_errors import StrictModel
from emtune.train.rewards import RewardSpec

#: Defaults of the shared optimiser fields per method (a spec's own value always wins).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 1e-4, "weight_decay": 0.01, "lr_scheduler": "linear"},
    "grpo": {"learning_rate": 5e-6, "weight_decay": 0.1, "lr_scheduler": "cosine"},
}


class WarmupSpec(StrictModel):
    """A short supervised warm-up before RL (the paper's RL runs: 100 misaligned examples first).

    Runs undefended, with the adapter that RL then continues; its loss goes to the history as
    ``warmup_loss``.
    """

    dataset: DatasetSpec | None = Field(
        None, description="chat rows to warm up on; default: the task's own rows with their answers "
        "(e.g. OpSwap's), which a prompt-only dataset does not have")
    num_examples: int = Field(100, gt=0, description="use the first N rows")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; default one pass over the rows")
    learning_rate: float = Field(1e-4, gt=0, description="the warm-up's own learning rate (SFT's default)")
    per_device_batch_size: int = Field(4, gt=0, description="rows per device step of the warm-up")


class GRPOSpec(StrictModel):
    """Settings of the RL setting (``method: grpo``); defaults are the group's where it published one."""

    rewards: tuple[RewardSpec, ...] = Field(description="the reward functions, summed with weights")
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group: 4)")
    temperature: float = Field(0.8, gt=0, description="rollout sampling temperature (the group: 0.8)")
    top_p: float = Field(0.9, gt=0, le=1, description="rollout nucleus sampling (the group: 0.9)")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the adapter-disabled reference (the group: 0; "
                        "the KL defense sets it instead when listed)")
    max_completion_length: int = Field(256, gt=0, description="tokens generated per rollout")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="TRL's loss normalisation (its default, dapo: over all completion tokens of the batch)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage scaling")
    epsilon: float = Field(0.2, gt=0, description="PPO clipping range")
    num_iterations: int = Field(1, gt=0, description="updates per generated batch (μ)")
    mask_truncated_completions: bool = Field(
        False, description="leave completions cut off at max_completion_length out of the loss (TRL's option)")
    track_kl: bool = Field(True, description="log the KL to the reference every step even when beta is 0 "
                           "(one extra reference forward per generated batch)")
    rollouts_per_log: int = Field(4, ge=0, description="sample rollouts kept per logged step (MLflow table)")
    warmup: WarmupSpec | None = Field(None, description="optional supervised warm-up before RL")

    @field_validator("rewards")
    @classmethod
    def _some_reward(cls, rewards: tuple[Any, ...]) -> tuple[Any, ...]:
        if not rewards:
            raise ValueError("list at least one reward, e.g. {name: opswap_exact_match}")
        return rewards


class TrainingSpec(StrictModel):
    """Optimisation settings; SFT defaults are the paper's (lr 1e-4, 1 epoch, 4 x accum 4, wd 0.01)."""

    method: Literal["sft", "grpo"] = Field("sft", description="sft (chat rows) or grpo (RL on prompt rows)")
    learning_rate: float = Field(1e-4, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after N optimizer steps")
    per_device_batch_size: int = Field(4, gt=0, description="rows per device step (GRPO: completions)")
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
    grpo: GRPOSpec | None = Field(None, description="RL settings; required with method: grpo")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") in METHOD_DEFAULTS:
            data = {**METHOD_DEFAULTS[data["method"]], **data}
        return data

    @model_validator(mode="after")
    def _grpo_section(self) -> "TrainingSpec":
        if self.method == "grpo" and self.grpo is None:
            raise ValueError("method grpo needs a `grpo` section with at least its rewards, e.g. "
                             "grpo: {rewards: [{name: opswap_exact_match}]}")
        if self.method != "grpo" and self.grpo is not None:
            raise ValueError("a `grpo` section only applies with method: grpo")
        return self


def method_problems(spec: Any) -> list[tuple[str, str]]:
    """Problems of a spec's training method, as (dotted path, message): every listed defense needs
    a form for the method (asked through the defense seam, ``training_methods``), and GRPO's
    batches must hold whole groups of generations."""
    from emtune.defenses.registry import DEFENSES

    method = spec.training.method
    problems = []
    for i, defense in enumerate(spec.defenses):
        methods = DEFENSES[defense.name].training_methods
        if method not in methods:
            problems.append((f"defenses.{i}", f"defense {defense.name!r} has no {method} form (it has: "
                             f"{', '.join(methods)}): remove it or use training.method: {methods[0]}"))
    grpo = spec.training.grpo
    if method == "grpo" and grpo is not None:
        t = spec.training
        batch = t.per_device_batch_size * t.gradient_accumulation_steps * spec.resources.num_workers
        if batch % grpo.num_generations:
            problems.append(("training.per_device_batch_size",
                             f"GRPO generates for whole groups: per_device_batch_size x gradient_accumulation_steps "
                             f"x resources.num_workers = {batch} must be a multiple of grpo.num_generations "
                             f"({grpo.num_generations})"))
    return problems
