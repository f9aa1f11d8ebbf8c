"""One trial's whole job on one process, as a plain function.

``run_training`` does the whole job of one trial on one process: load the model and tokenizer,
apply LoRA, build the data through the defenses' data transforms, attach defense hooks, train
with the defended trainer of the spec's ``training.method`` (supervised: :mod:`emtune.train.sft`;
GRPO: :mod:`emtune.train.grpo`), finalize (e.g. SafeLoRA), detach, save the adapter, and (rank 0)
generate the evaluation answers (or, with a generation server, write the plan the trial driver
works through on it). :mod:`emtune.train.launch` runs it under Ray Train (a worker group, or the
trial's own process in Ray Train's local mode).

``spec`` is a validated :class:`emtune.config.StudySpec` (the trial driver builds it; this
module only reads it, so it does not import the config layer above it).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from emtune.data.loading import load_rows, split_heldout
from emtune.data.opswap import generate as generate_opswap
from emtune.data.prompts import chat_from_prompt, load_prompt_rows, prompt_from_chat
from emtune.defenses.base import DefenseContext
from emtune.defenses.registry import build_defenses
from emtune.evaluation.config import without_judge
from emtune.evaluation.points import FINAL
from emtune.models import apply_lora, load_adapter, load_model, load_tokenizer
from emtune.numbers import finite_numbers
from emtune.train.sft import train_sft
from emtune.trial_files import TrialFiles

StudySpec = Any  # emtune.config.StudySpec, validated by the trial driver


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_rows(spec: StudySpec, defenses: list[Any]) -> tuple[list[dict], list[dict]]:
    """Training rows after every defense's data transform, and the untouched held-out chat rows.

    SFT trains on chat rows (``transform_data``); GRPO on prompt rows (``{"prompt": messages,
    ...}``, :mod:`emtune.data.prompts`; ``transform_prompts``), whose held-out rows keep their
    reference answers for in-domain evaluation. With ``data.opswap`` the benign task's train split
    is mixed in (``alongside``) or is the whole task (``task``, its test split then being the
    held-out set); as prompt rows its rows keep their ``answer`` for the exact-match reward.
    """
    rl = spec.training.method == "grpo"
    train_rows: list[dict] = []
    heldout_rows: list[dict] = []
    if spec.data.train is not None:
        rows = load_prompt_rows(spec.data.train) if rl else load_rows(spec.data.train)
        train_rows, heldout_rows = split_heldout(rows, spec.data.heldout_fraction, spec.seed)
        if rl:
            heldout_rows = [chat_from_prompt(r) for r in heldout_rows]
    if spec.data.opswap is not None:
        splits = generate_opswap(spec.data.opswap)
        benign = [prompt_from_chat(r) if rl else {"messages": r["messages"]} for r in splits["train"]]
        if spec.data.opswap_role == "task":
            train_rows = benign
            heldout_rows = [{"messages": r["messages"]} for r in splits["test"]]
        else:
            train_rows = train_rows + benign
            random.Random(spec.seed).shuffle(train_rows)
    for defense in defenses:
        if defense.active:
            train_rows = defense.transform_prompts(train_rows) if rl else defense.transform_data(train_rows)
    return train_rows, heldout_rows


def _trainer_of(method: str) -> Any:
    """The training function of a method: ``(spec, model, tokenizer, defenses, rows, output_dir,
    resume_from, on_checkpoint, metrics) -> history rows`` (supervised, or GRPO)."""
    if method == "grpo":
        from emtune.train.grpo import train_grpo  # trl

        return train_grpo
    return train_sft


def run_training(spec: StudySpec, output_dir: Path, model_source: str, rank: int = 0,
                 cache_dir: Path | None = None, resume_from: Path | None = None,
                 on_checkpoint: Any = None, evaluate: bool = True, skip_training: bool = False,
                 adapter_dir: Path | None = None, pruning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and (rank 0) evaluate one trial; writes its :class:`TrialFiles` to ``output_dir``.

    ``resume_from`` is an earlier Trainer checkpoint (adapter, optimizer, scheduler, RNG and
    step); ``on_checkpoint(step, folder)`` is called after every periodic checkpoint save.
    ``skip_training`` evaluates without training: the fresh adapter (B = 0) is the base model
    itself (the ``base`` baseline), or ``adapter_dir`` is a saved adapter to re-evaluate.
    With ``evaluation.at`` the checkpoints at those points are evaluated during training
    (:mod:`emtune.train.checkpoints`); ``pruning`` is the searcher's pruning rule (a dict), and a
    pruned trial reports ``pruned`` (the reason) and is not evaluated at the end.
    """
    from emtune.evaluation.runner import evaluate_model  # torch
    from emtune.train.checkpoints import CheckpointEvaluator, PruningRule

    started = time.perf_counter()
    _seed_everything(spec.seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = TrialFiles(output_dir)
    tokenizer = load_tokenizer(model_source, spec.model)
    # Training moves the model to the GPU (the Trainer); an evaluation-only run (the `base`
    # baseline, confirm, a resumed evaluation) must put it there itself, or it evaluates on CPU.
    evaluate_only = skip_training or adapter_dir is not None
    base = load_model(model_source, spec.model, device=_gpu_device() if evaluate_only else None)
    model = load_adapter(base, adapter_dir) if adapter_dir else apply_lora(base, spec.lora)
    context = DefenseContext(spec=spec, tokenizer=tokenizer, seed=spec.seed, cache_dir=cache_dir,
                             extras={"model_source": model_source})
    defenses = [] if skip_training or adapter_dir else build_defenses(spec.defenses, context)
    train_rows, heldout_rows = prepare_rows(spec, defenses)
    metrics: dict[str, Any] = {"train_steps": 0, "time/setup_s": time.perf_counter() - started}
    direction = monitor_direction(spec, model) if evaluate else None

    def evaluate_at(current: Any, only: Any = None, folder: TrialFiles = files) -> Any:
        if only is not None:  # the monitor's own answers: generated here, neither judged nor planned
            return evaluate_model(current, tokenizer, spec, heldout_rows, only=set(only), direction=direction)
        judged = folder == files or spec.evaluation.judge_points == "all"  # else no judge calls for a checkpoint
        return _evaluate(spec if judged else without_judge(spec), current, tokenizer, heldout_rows, folder, direction)

    checkpoints = None
    if evaluate and (spec.evaluation.at or spec.evaluation.monitor.every_steps):
        checkpoints = CheckpointEvaluator(spec, files, tokenizer, defenses, evaluate_at, direction,
                                          PruningRule.from_config(pruning), rank)
    history: list[dict[str, float]] = []
    if not (skip_training or adapter_dir):
        # evaluation during training (evaluation.at, the monitor) is a supervised-fine-tuning feature
        extra = {"evaluator": checkpoints} if spec.training.method == "sft" else {}
        history = _trainer_of(spec.training.method)(spec, model, tokenizer, defenses, train_rows, output_dir,
                                                    resume_from, on_checkpoint, metrics, **extra)
    if rank != 0:
        return metrics
    files.write_json(files.history, history)
    if checkpoints is not None and checkpoints.pruned:
        metrics.update(pruned=checkpoints.pruned, pruned_at_step=metrics["train_steps"])
        return metrics  # training stopped at its last checkpoint, which holds its adapter and answers
    model.save_pretrained(files.adapter)
    details = {d.name: d.report() for d in defenses if d.active and d.report()}
    if details:
        files.write_json(files.defenses, details)
    if not math.isfinite(metrics.get("train_loss", 0.0)):
        metrics["error"] = "training loss is not finite"
        return metrics
    if not evaluate:  # study stages (e.g. the misaligned ensemble) only need the adapter
        return metrics
    eval_started = time.perf_counter()
    eval_metrics, samples, versions = evaluate_at(model)
    metrics["time/eval_s"] = time.perf_counter() - eval_started
    metrics.update(eval_metrics)
    for name, items in samples.items():
        files.write_samples(name, (sample.to_dict() for sample in items))
    files.write_json(files.meta, {"question_set_versions": versions, "num_train_rows": len(train_rows),
                                  "num_heldout_rows": len(heldout_rows)})
    files.write_json(files.point, {"label": FINAL, "step": metrics["train_steps"],
                                   "metrics": finite_numbers({**eval_metrics, "train_loss": metrics.get("train_loss")})})
    return metrics


def monitor_direction(spec: StudySpec, model: Any) -> tuple[Any, int] | None:
    """The EM monitor's persona direction ``(e_ℓ, ℓ)`` from ``evaluation.monitor`` (None when the
    monitor has no persona); the vector file must belong to this model."""
    monitor = spec.evaluation.monitor
    if not monitor.persona:
        return None
    if not monitor.persona_vector:
        raise ValueError("evaluation.monitor: no persona_vector yet (the study stage extracts it from "
                         "extract_prompts before the trials; or set persona_vector to a file)")
    from emtune.defenses.persona_steering import checked_persona_vectors
    from emtune.evaluation.monitor import monitored_layer

    vectors = checked_persona_vectors(monitor.persona_vector, spec, model, "evaluation.monitor.persona_vector")
    layer = monitored_layer(monitor.layer, vectors.shape[0])
    return vectors[layer], layer


def _gpu_device() -> Any:
    """This process's GPU (Ray Train sets CUDA_VISIBLE_DEVICES per worker), or None on CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _evaluate(spec: StudySpec, model: Any, tokenizer: Any, heldout_rows: list[dict], files: TrialFiles,
              direction: Any = None) -> tuple[dict[str, Any], dict[str, list], dict[str, str]]:
    """Metrics, samples per set and question-set versions, by the spec's generation backend.

    ``hf``: the built-in engine generates here, every finished sample going to the judge stream
    (the judge scores while the rest decodes; the driver's scoring then finds the verdicts
    cached). ``server``: the generation plan is written for the trial driver, which generates
    through the server once this worker has let its GPU go; only the drift set is generated here,
    when the study uses ``ood_drift`` or the EM monitor (they need the model on those answers).
    """
    from emtune.evaluation.judge_stream import judge_stream_for
    from emtune.evaluation.runner import evaluate_model, generation_plan, sets_in_worker  # torch

    only, planned = None, {}
    if spec.evaluation.backend == "server":
        only = sets_in_worker(spec)
        plan = generation_plan(model, tokenizer, spec, heldout_rows, exclude=only)
        files.write_json(files.plan, plan)
        planned = {name: entry["version"] for name, entry in plan["sets"].items()}
    stream = judge_stream_for(spec) if only is None or only else None
    try:
        metrics, samples, versions = evaluate_model(model, tokenizer, spec, heldout_rows,
                                                    on_sample=stream.add if stream else None, only=only,
                                                    direction=direction)
    finally:
        streamed = stream.close() if stream else None
    if streamed is not None:
        metrics["judge_stream/judged"] = float(streamed["judged"])
    return metrics, samples, {**planned, **versions}

