"""The supervised path (``training.method: sft``): TrainingArguments from the spec and the
defended trainer over tokenised chat rows (loss on assistant tokens + defense terms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emtune.data.chat import ChatCollator, tokenize_chat
from emtune.train.defended_fit import attach_all, defended_fit, tail_mean
from emtune.train.memory import memory_arguments

StudySpec = Any  # emtune.config.StudySpec, validated by the trial driver


def training_arguments(spec: StudySpec, output_dir: Path) -> Any:
    """transformers TrainingArguments from the spec (no checkpoints, no reporters: emtune tracks)."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(use_cpu=not torch.cuda.is_available(), **shared_arguments(spec, output_dir))


def shared_arguments(spec: StudySpec, output_dir: Path) -> dict[str, Any]:
    """The TrainingArguments fields both methods take from ``spec.training`` (GRPOConfig extends them)."""
    t = spec.training
    return dict(
        output_dir=str(Path(output_dir) / "hf"),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        optim=t.optimizer,
        bf16=t.bf16,
        max_grad_norm=t.max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if t.checkpoint_every_steps else "no",
        save_steps=t.checkpoint_every_steps or 500,
        save_total_limit=1,
        report_to=[],
        seed=spec.seed,
        data_seed=spec.seed,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        activation_checkpointing=False,  # GRPOConfig defaults it on; memory_arguments turns it on when asked
        **_parallelism(spec),
    ) | memory_arguments(t)


def _parallelism(spec: StudySpec) -> dict[str, Any]:
    """FSDP arguments when the spec asks for sharding across several workers (DDP otherwise)."""
    if spec.resources.strategy != "fsdp" or spec.resources.num_workers < 2:
        return {}
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"use_orig_params": True}}


def train_sft(spec: StudySpec, model: Any, tokenizer: Any, defenses: list[Any], train_rows: list[dict],
              output_dir: Path, resume_from: Path | None, on_checkpoint: Any, metrics: dict[str, Any],
              evaluator: Any = None) -> list[dict]:
    """Attach the defenses, train with the defended trainer, finalize and detach; fills ``metrics``
    (steps, timing, tail-mean task loss, finalize logs) and returns the per-step loss history.
    ``evaluator`` (a :class:`~emtune.train.checkpoints.CheckpointEvaluator`) evaluates
    checkpoints during training, if given (:func:`evaluation_callbacks`)."""
    from emtune.train.trainer import DefendedTrainer, LossHistory  # torch, transformers

    attach_all(model, defenses)
    features = [tokenize_chat(tokenizer, r["messages"], spec.data.max_length) for r in train_rows]
    history = LossHistory()
    trainer = DefendedTrainer(
        model=model,
        args=training_arguments(spec, output_dir),
        train_dataset=features,
        data_collator=ChatCollator(tokenizer.pad_token_id),
        defenses=defenses,
        group_by_length=spec.training.group_by_length,
        callbacks=evaluation_callbacks(history, on_checkpoint, evaluator, resume_from),
    )
    defended_fit(trainer, model, defenses, output_dir, resume_from, metrics, history)
    metrics["train_loss"] = tail_mean(history.rows, "task_loss")
    return history.rows


def evaluation_callbacks(history: Any, on_checkpoint: Any, evaluator: Any = None,
                         resume_from: Path | None = None) -> list[Any]:
    """The Trainer callbacks: the loss history, the checkpoint evaluator (given the history, and
    the points an earlier attempt evaluated before the checkpoint it resumes from), and the
    periodic-checkpoint hook, which copies the points evaluated so far into every checkpoint
    (:meth:`~emtune.trial_files.TrialFiles.carry_evaluations`) so a resumed trial keeps them."""
    from emtune.train.trainer import CheckpointHook  # transformers

    callbacks: list[Any] = [history]
    report = on_checkpoint
    if evaluator is not None:
        evaluator.history = history
        evaluator.resume(resume_from)
        callbacks.append(evaluator)
        report = on_checkpoint and evaluator.carried_into_checkpoints(on_checkpoint)
    return callbacks + ([CheckpointHook(report)] if report else [])
