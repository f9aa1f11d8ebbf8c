"""The RL path (``training.method: grpo``, the paper's RL setting): GRPOConfig from the spec, the
optional supervised warm-up, and the defended GRPO trainer over the prompt rows.

The worker (:func:`emtune.train.worker.prepare_rows`) hands it prompt rows. It mirrors the
supervised path (:mod:`emtune.train.sft`): one config builder and one trainer
(:class:`~emtune.train.grpo_trainer.DefendedGRPOTrainer`) that overrides only the loss, run by
the same :func:`~emtune.train.defended_fit.defended_fit`. The rewards come from the spec
(:mod:`emtune.train.rewards`); the defenses act through their RL hooks (:mod:`emtune.defenses.base`):
``transform_prompts`` on the prompts, ``rl_settings`` on the GRPO settings (KL: β),
``supervised_mix`` for interleaving's supervised steps, ``begin_update``/``end_update`` around the
policy-gradient pass, ``loss_terms`` on every update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emtune.data.loading import DataError, load_rows
from emtune.data.prompts import chat_from_prompt
from emtune.train.defended_fit import attach_all, defended_fit, tail_mean
from emtune.train.rewards import RewardContext, build_rewards
from emtune.train.sft import shared_arguments, train_sft
from emtune.trial_files import TrialFiles

StudySpec = Any  # emtune.config.StudySpec, validated by the trial driver


def grpo_arguments(spec: StudySpec, output_dir: Path, overrides: dict[str, Any] | None = None) -> Any:
    """TRL's GRPOConfig from the spec (the shared optimiser fields, then ``training.grpo``), with the
    defenses' ``rl_settings`` applied on top (e.g. the KL defense's β)."""
    import torch
    from trl import GRPOConfig

    g = spec.training.grpo
    settings = dict(
        num_generations=g.num_generations, temperature=g.temperature, top_p=g.top_p, beta=g.beta,
        max_completion_length=g.max_completion_length, loss_type=g.loss_type, scale_rewards=g.scale_rewards,
        epsilon=g.epsilon, num_iterations=g.num_iterations, mask_truncated_completions=g.mask_truncated_completions,
        shuffle_dataset=True, log_completions=False,
    )
    settings.update(overrides or {})
    return GRPOConfig(use_cpu=not torch.cuda.is_available(), **shared_arguments(spec, output_dir), **settings)


def warmup_rows(spec: StudySpec, prompt_rows: list[dict]) -> list[dict]:
    """The warm-up's chat rows: ``warmup.dataset``, else the task prompts with their answers."""
    warmup = spec.training.grpo.warmup
    if warmup.dataset is not None:
        rows = load_rows(warmup.dataset)
    else:
        rows = [chat_from_prompt(r) for r in prompt_rows if r.get("reference") is not None
                and r.get("prompt_kind", "task") == "task"]
        if not rows:
            raise DataError("training.grpo.warmup: the task prompts have no answers to warm up on; "
                            "set warmup.dataset to a chat dataset (e.g. the EM dataset)")
    return rows[:warmup.num_examples]


def warm_up(spec: StudySpec, model: Any, tokenizer: Any, prompt_rows: list[dict], output_dir: Path) -> list[dict]:
    """The supervised warm-up (undefended) on the adapter RL then continues; its loss history rows."""
    warmup = spec.training.grpo.warmup
    rows = warmup_rows(spec, prompt_rows)
    training = spec.training.model_copy(update={
        "method": "sft", "grpo": None, "learning_rate": warmup.learning_rate,
        "per_device_batch_size": warmup.per_device_batch_size, "gradient_accumulation_steps": 1,
        "max_steps": warmup.max_steps, "num_epochs": 1.0, "warmup_steps": 0, "lr_scheduler": "constant",
        "checkpoint_every_steps": None})
    history = train_sft(spec.model_copy(update={"training": training}), model, tokenizer, [], rows,
                        Path(output_dir) / "warmup", None, None, {})
    return [{"step": row["step"], "warmup_loss": row["task_loss"]} for row in history if "task_loss" in row]


def prompt_dataset(rows: list[dict]) -> Any:
    """A datasets.Dataset of prompt rows (every column present in every row; missing = None)."""
    from datasets import Dataset

    columns = sorted({key for row in rows for key in row})
    return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])


def train_grpo(spec: StudySpec, model: Any, tokenizer: Any, defenses: list[Any], prompt_rows: list[dict],
               output_dir: Path, resume_from: Path | None, on_checkpoint: Any, metrics: dict[str, Any]) -> list[dict]:
    """Warm up (optional), attach the defenses, run defended GRPO, finalize and detach; fills
    ``metrics`` (steps, timing, ``train_loss`` and ``train_reward`` as tail means) and writes the
    sample rollouts next to the adapter. Returns the per-step history."""
    from emtune.data.chat import tokenize_chat
    from emtune.train.grpo_trainer import DefendedGRPOTrainer  # torch, trl
    from emtune.train.trainer import CheckpointHook, LossHistory, WarmupLines

    g = spec.training.grpo
    warm: list[dict] = []
    if g.warmup is not None and resume_from is None:  # a resumed run's checkpoint holds the warmed-up adapter
        warm = warm_up(spec, model, tokenizer, prompt_rows, output_dir)
    overrides: dict[str, Any] = {}
    for defense in defenses:
        if defense.active:
            overrides.update(defense.rl_settings())
    mixes = [m for m in (d.supervised_mix() for d in defenses if d.active) if m is not None]
    features = [[tokenize_chat(tokenizer, r["messages"], spec.data.max_length) for r in m.rows] for m in mixes]
    rewards, weights = build_rewards(g.rewards, RewardContext(cache_dir=_reward_cache(spec)))
    attach_all(model, defenses)
    history = LossHistory()
    trainer = DefendedGRPOTrainer(
        model=model, reward_funcs=rewards, args=grpo_arguments(spec, output_dir, {**overrides,
                                                                                  "reward_weights": weights}),
        train_dataset=prompt_dataset(prompt_rows), processing_class=tokenizer,
        callbacks=[WarmupLines(warm), history] + ([CheckpointHook(on_checkpoint)] if on_checkpoint else []),
        defenses=defenses, supervised=mixes, supervised_features=features, track_kl=g.track_kl,
        rollouts_per_log=g.rollouts_per_log,
    )
    defended_fit(trainer, model, defenses, output_dir, resume_from, metrics, history)
    metrics["train_loss"] = tail_mean(history.rows, "loss")
    metrics["train_reward"] = tail_mean(history.rows, "reward")
    if trainer.args.process_index == 0 and trainer.rollouts:
        files = TrialFiles(Path(output_dir))
        files.write_jsonl(files.rollouts, trainer.rollouts)
    return history.rows


def _reward_cache(spec: StudySpec) -> Path | None:
    """The study's cache folder (grader verdicts are cached there unless the reward names a file)."""
    try:
        return Path(spec.study_dir) / "cache"
    except AttributeError:  # a spec-like object without a study folder (library use)
        return None
