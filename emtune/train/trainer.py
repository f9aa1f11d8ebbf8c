"""The defended trainer: a transformers Trainer whose loss is the task loss plus defense terms.

Only ``compute_loss`` (and ``log``, to add the terms to the logs) is overridden; optimiser,
schedule, gradient accumulation, mixed precision and DDP stay the Trainer's. The task loss is a
per-micro-batch mean over assistant tokens, and so is every defense term, so
``loss_is_scaled_for_ga = False`` lets the Trainer divide by the accumulation steps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from emtune.data.batching import LengthGroupedSampler, feature_lengths
from emtune.train.reference import ReferenceOutputs

__all__ = ["CheckpointHook", "DefendedTrainer", "DefenseLossMixin", "LossHistory", "WarmupLines", "ReferenceOutputs",
           "defended_loss", "defended_trainer_class"]


def defended_loss(model: Any, inputs: dict[str, Any], defenses: list[Any], unwrapped: Any = None) -> tuple[Any, dict[str, Any], Any]:
    """Task loss + every defense's terms for one batch: ``(total, {name: term}, outputs)``.

    ``unwrapped`` is the PEFT model behind any DDP wrapper (used for the reference pass).
    """
    active = [d for d in defenses if d.active]
    hidden = any(d.needs_hidden_states for d in active)
    # no KV cache: a training forward never reads it, and it would hold every layer's keys and values
    outputs = model(**inputs, output_hidden_states=hidden, use_cache=False)
    reference = ReferenceOutputs(unwrapped if unwrapped is not None else model, inputs,
                                 any(d.needs_reference_hidden_states for d in active))
    terms: dict[str, Any] = {"task_loss": outputs.loss}
    for defense in active:
        terms.update(defense.loss_terms(inputs, outputs, reference))
    total = sum(terms.values())
    return total, terms, outputs


class DefenseLossMixin:
    """Mix into any transformers ``Trainer`` subclass (TRL's ``SFTTrainer`` too): the loss becomes
    the task loss plus the defenses' terms, each term logged under its own name."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, defenses: list[Any] | None = None, group_by_length: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.defenses = defenses or []
        self.group_by_length = group_by_length
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_count = 0

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels")}
        loss, terms, outputs = defended_loss(model, inputs, self.defenses, unwrapped)
        if model.training:
            for name, value in terms.items():
                self._term_sums[name] += float(value.detach())
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Length-grouped batches (``emtune.data.batching``) when asked for, else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = feature_lengths(dataset) if self.group_by_length and dataset is not None else None
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(lengths, self.args.per_device_train_batch_size, seed)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._term_count and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[name] = total / self._term_count
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, start_time)


def defended_trainer_class(base: type) -> type:
    """``base`` (a Trainer subclass such as TRL's SFTTrainer) with the defended loss."""
    return type(f"Defended{base.__name__}", (DefenseLossMixin, base), {})


class DefendedTrainer(DefenseLossMixin, Trainer):
    """The transformers Trainer with the defended loss (what emtune's workers use)."""


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The training lines of a Trainer ``log_history`` (those with a loss, or GRPO's warm-up loss):
    step and every number."""
    return [{"step": entry["step"], **{k: float(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}}
            for entry in log_history if "loss" in entry or "warmup_loss" in entry]


class LossHistory(TrainerCallback):
    """Keeps every training log line (step, loss, defense terms, lr) for tracking, including
    those before the checkpoint a run resumed from."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A run resumed from a checkpoint gets the earlier lines back with the Trainer's state
        # (trainer_state.json): without them its history and final loss would cover only the
        # steps after the checkpoint.
        self.rows = history_rows(state.log_history)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs:
            self.rows.extend(history_rows([{**logs, "step": state.global_step}]))


class WarmupLines(TrainerCallback):
    """Puts GRPO's warm-up loss lines at the head of a fresh run's log history, so its checkpoints
    carry them and a run resumed from one reports the whole history (list it before LossHistory)."""

    def __init__(self, rows: list[dict[str, float]]):
        self.rows = rows

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rows and state.global_step == 0:
            state.log_history[:0] = [dict(row) for row in self.rows]


class CheckpointHook(TrainerCallback):
    """Calls ``report(step, folder)`` after the Trainer writes a periodic checkpoint."""

    def __init__(self, report: Any):
        self.report = report

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from pathlib import Path

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.report(state.global_step, folder)
