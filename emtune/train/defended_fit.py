"""One defended fit, whatever the method: attach the defenses, train, finalize, detach.

The SFT path (:mod:`emtune.train.sft`) and the RL path (:mod:`emtune.train.grpo`) each build
their trainer (a transformers ``Trainer`` subclass) and hand it here, so both keep the defense
hooks in the same order (:mod:`emtune.defenses.base`) and report the same bookkeeping.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any


def defended_fit(trainer: Any, model: Any, defenses: list[Any], output_dir: Path, resume_from: Path | None,
                 metrics: dict[str, Any], history: Any) -> int:
    """Train with ``trainer`` (defenses already attached), then finalize and detach every defense.

    Fills ``metrics`` with ``time/train_s``, ``train_steps`` and each defense's ``finalize/...``
    values, and ``history`` (the trainer's :class:`~emtune.train.trainer.LossHistory`) with every
    logged step; returns the global step reached. A checkpoint saved at the run's last step is not
    trained on (transformers would still take one more step from it): its adapter weights and
    log history are restored instead.
    """
    from emtune.train.trainer import history_rows  # torch

    started = time.perf_counter()
    finished = _finished_state(resume_from)
    if finished is None:
        global_step = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).global_step
        # With bf16/fp16 accelerate leaves model.forward wrapped in autocast; evaluating under it would
        # give other numbers than a fresh model with the saved adapter (`emtune confirm`, resume).
        trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    else:
        _load_adapter_weights(model, resume_from)  # type: ignore[arg-type]
        history.rows = history_rows(finished["log_history"])
        global_step = finished["global_step"]
    metrics["time/train_s"] = time.perf_counter() - started
    shutil.rmtree(Path(output_dir) / "hf", ignore_errors=True)  # periodic checkpoints: reported already
    for defense in defenses:
        if defense.active:
            metrics.update({f"finalize/{k}": v for k, v in defense.finalize(model).items()})
    for defense in defenses:
        defense.detach(model)
    metrics["train_steps"] = int(global_step)
    return int(global_step)


def _finished_state(checkpoint: Path | None) -> dict[str, Any] | None:
    """The Trainer state saved in ``checkpoint`` when it was saved at the run's last step, else None."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state if state.get("max_steps") and state["global_step"] >= state["max_steps"] else None


def _load_adapter_weights(model: Any, checkpoint: Path) -> None:
    """Load a Trainer checkpoint's LoRA weights into ``model``'s adapter (what resuming restores)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))


def attach_all(model: Any, defenses: list[Any]) -> None:
    """Install every active defense's training-time hooks."""
    for defense in defenses:
        if defense.active:
            defense.attach(model)


def tail_mean(rows: list[dict[str, float]], key: str) -> float:
    """Mean of ``key`` over the last quarter of the logged rows that have it (NaN when none does;
    a non-finite value in the tail makes it non-finite, which fails the trial)."""
    values = [row[key] for row in rows if key in row]
    tail = values[-max(1, len(values) // 4):] if values else [float("nan")]
    return sum(tail) / len(tail)
