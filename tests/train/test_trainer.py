"""The Trainer glue of the defended loss: per-term logging averaged over the steps of a log line,
gradient accumulation, the length-grouped sampler's dataset and seed, the loss history and the
checkpoint hook."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emtune.data.batching import LengthGroupedSampler
from emtune.train.trainer import (
    CheckpointHook, DefendedTrainer, DefenseLossMixin, LossHistory, WarmupLines, history_rows,
)


def _features(n_rows: int, length: int = 6):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(5, 300, (length + i % 3,), generator=gen).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return rows


def _args(tmp_path, **fields):
    from transformers import TrainingArguments

    fields = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [],
              "remove_unused_columns": False, "save_strategy": "no", "learning_rate": 1e-3, **fields}
    return TrainingArguments(**fields)


@pytest.mark.parametrize("accumulation, logging_steps", [(2, 1), (1, 2)])
def test_logged_task_loss_is_the_mean_over_the_steps_of_the_line(tiny_lora, tmp_path, accumulation, logging_steps):
    """Without defenses the logged loss and the logged task_loss are the same number: the Trainer
    logs the mean of its micro-batch losses since the last line (each divided by the accumulation
    steps, since compute_loss does not scale), and the mixin the mean of the task terms it summed."""
    from emtune.data.chat import ChatCollator

    model, tokenizer = tiny_lora
    args = _args(tmp_path, gradient_accumulation_steps=accumulation, logging_steps=logging_steps, max_steps=4)
    trainer = DefendedTrainer(model=model, args=args, train_dataset=_features(16),
                              data_collator=ChatCollator(tokenizer.pad_token_id))
    trainer.train()
    rows = history_rows(trainer.state.log_history)
    assert [row["step"] for row in rows] == list(range(logging_steps, 5, logging_steps))
    for row in rows:
        assert row["task_loss"] == pytest.approx(row["loss"], rel=1e-5)
        assert row["task_loss"] > 1.0  # random weights over a 400-token vocabulary: about ln(400) = 6


class _Recorder:
    """The end of the method chain: records what the mixin hands on."""

    def __init__(self, *args, **kwargs):
        self.logged = []

    def log(self, logs, start_time=None):
        self.logged.append(dict(logs))


class _Mixed(DefenseLossMixin, _Recorder):
    pass


def test_log_adds_each_term_averaged_and_starts_over():
    trainer = _Mixed()
    trainer.log({"loss": 2.0})  # no training step yet: nothing to add
    trainer._term_sums.update({"task_loss": 3.0, "kl_to_reference": 0.5})
    trainer._term_count = 2
    trainer.log({"eval_loss": 1.0})  # an evaluation line keeps the sums for the next training line
    trainer.log({"loss": 1.75})
    assert trainer.logged == [{"loss": 2.0}, {"eval_loss": 1.0},
                              {"loss": 1.75, "task_loss": 1.5, "kl_to_reference": 0.25}]
    assert trainer._term_count == 0 and not trainer._term_sums


def test_sampler_uses_the_dataset_it_is_given_and_the_data_seed(tiny_lora, tmp_path):
    model, _ = tiny_lora
    features = _features(6)
    seeded = DefendedTrainer(model=model, args=_args(tmp_path, seed=6, data_seed=5), train_dataset=features,
                             group_by_length=True)
    sampler = seeded._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.seed == 5
    assert sampler.lengths == [6, 7, 8, 6, 7, 8]
    other = seeded._get_train_sampler(_features(4, length=10))
    assert other.lengths == [10, 11, 12, 10]
    unseeded = DefendedTrainer(model=model, args=_args(tmp_path, seed=6), train_dataset=features, group_by_length=True)
    assert unseeded._get_train_sampler().seed == 6


def test_history_rows_keep_training_lines_and_their_numbers():
    log_history = [
        {"loss": 2.5, "grad_norm": 3, "learning_rate": 1e-4, "epoch": 0.5, "task_loss": 2.0, "step": 2, "note": "x"},
        {"eval_loss": 1.0, "step": 2},
        {"train_runtime": 5.0, "train_loss": 2.4, "step": 4},
    ]
    assert history_rows(log_history) == [
        {"step": 2, "loss": 2.5, "grad_norm": 3.0, "learning_rate": 1e-4, "epoch": 0.5, "task_loss": 2.0}]


def test_loss_history_takes_the_resumed_lines_and_new_ones():
    history = LossHistory()
    state = SimpleNamespace(log_history=[{"loss": 3.0, "step": 1}, {"eval_loss": 2.0, "step": 1}], global_step=1)
    history.on_train_begin(None, state, None)
    state.global_step = 2
    history.on_log(None, state, None, logs={"loss": 2.0, "kl_to_reference": 0.1})
    history.on_log(None, state, None, logs=None)
    history.on_log(None, state, None, logs={"eval_loss": 1.0})
    assert history.rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "kl_to_reference": 0.1}]


def test_checkpoint_hook_reports_the_folder_the_trainer_wrote(tmp_path):
    calls = []
    CheckpointHook(lambda step, folder: calls.append((step, folder))).on_save(
        SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=7), None)
    assert calls == [(7, Path(tmp_path) / "checkpoint-7")]


def test_warmup_lines_head_a_fresh_run_only():
    rows = [{"step": 0, "warmup_loss": 2.5}, {"step": 0, "warmup_loss": 2.0}]
    fresh = SimpleNamespace(global_step=0, log_history=[{"step": 0, "note": 1.0}])
    WarmupLines(rows).on_train_begin(None, fresh, None)
    assert fresh.log_history == [*rows, {"step": 0, "note": 1.0}]
    assert fresh.log_history[0] is not rows[0]  # copies: the Trainer may change its lines
    assert history_rows(fresh.log_history) == rows  # warm-up lines count as training lines
    resumed = SimpleNamespace(global_step=4, log_history=[{"step": 4, "loss": 1.0}])
    WarmupLines(rows).on_train_begin(None, resumed, None)  # a checkpoint's history already has them
    assert resumed.log_history == [{"step": 4, "loss": 1.0}]
    nothing = SimpleNamespace(global_step=0, log_history=[])
    WarmupLines([]).on_train_begin(None, nothing, None)
    assert nothing.log_history == []
