"""Evaluation during training: every evaluation point a candidate, the monitor, and pruning.

:class:`CheckpointEvaluator` is a ``TrainerCallback`` the worker adds when the spec asks for
evaluation points before the end (``evaluation.at``) or a monitor every M steps
(``evaluation.monitor.every_steps``). At each point before the final one it evaluates the
checkpoint exactly as the end of training would be evaluated, as if training had stopped there:

1. the defenses' training-only effects are removed (``detach``) and their post-training step
   applied (``finalize``, e.g. SafeLoRA's projection) to a copy of the adapter weights;
2. that adapter is saved, the evaluation sets' answers generated and the judge-free metrics
   (``indomain_nll``, ``ood_drift`` and the persona monitor) measured, into
   ``checkpoints/step-<N>/`` of the trial folder (:class:`~emtune.trial_files.TrialFiles`);
3. the training adapter, the hooks and every random number generator are put back, so a trial
   evaluated at several points trains exactly as one evaluated only at the end.

The judge scores the saved answers later, in the trial driver, like the final point's.

Pruning (``search.pruning``): after a point's judge-free metrics, :class:`PruningRule` compares
them with the same point's values of the trials that finished before this one started (handed
over by the searcher with the trial's config, so a restarted trial decides the same way). When at
least ``min_share`` of them (and at least ``min_trials``) dominate it, training stops there and
the trial is told PRUNED with the reason; the points it evaluated stay candidates.

Under DDP only rank 0 evaluates (the other ranks wait at the next gradient all-reduce).
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers import TrainerCallback

from emtune.evaluation.points import EvaluationPoint, resolve_points
from emtune.evaluation.runner import monitor_signals
from emtune.evaluation.sets import DRIFT_SET, EVAL_SETS
from emtune.numbers import finite_numbers
from emtune.tracking.pareto import dominating_count
from emtune.train.defended_fit import tail_mean
from emtune.trial_files import TrialFiles


@dataclass
class PruningRule:
    """Prune a trial whose point is dominated by ``min_share`` of the earlier trials' same point.

    ``board`` maps a point label to the earlier trials' values of ``metrics`` there (one list of
    numbers per trial, in ``metrics`` order); ``directions`` are the metrics' directions.
    """

    metrics: list[str]
    directions: list[str]
    min_share: float
    min_trials: int
    board: dict[str, list[list[float]]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> "PruningRule | None":
        """The rule handed over in a trial's config (None when pruning is off)."""
        if not config:
            return None
        return cls(list(config["metrics"]), list(config["directions"]), float(config["min_share"]),
                   int(config["min_trials"]), {k: [list(v) for v in vs] for k, vs in config["board"].items()})

    def decide(self, point: EvaluationPoint, metrics: dict[str, float]) -> str | None:
        """The reason to stop at ``point`` (None to go on). The final point is never pruned."""
        earlier = self.board.get(point.label, [])
        if point.final or len(earlier) < self.min_trials or any(m not in metrics for m in self.metrics):
            return None
        count = dominating_count([metrics[m] for m in self.metrics], earlier, self.directions)
        if count < self.min_share * len(earlier):
            return None
        return (f"pruned at step {point.step}: dominated by {count} of {len(earlier)} trials on "
                f"[{', '.join(self.metrics)}]")


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, numpy's and torch's (CPU and CUDA) random states on exit: generation
    seeds torch, and evaluating a checkpoint must not change what training draws next."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextlib.contextmanager
def evaluation_mode(model: Any, defenses: list[Any]) -> Iterator[None]:
    """The model as evaluation sees it, for the duration: eval mode, no training-only hooks, no
    mixed-precision autocast wrapper, random states untouched; everything restored on exit."""
    active = [d for d in defenses if d.active]
    # accelerate wraps forward in autocast for bf16/fp16 training and keeps the plain one as
    # `_original_forward`: evaluate through that one, as a fresh model with the adapter would run
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    was_training = model.training
    with preserved_rng():
        for defense in active:
            defense.detach(model)
        if wrapped is not None:
            model.forward = model.__dict__["_original_forward"]
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            if wrapped is not None:
                model.forward = wrapped
            for defense in active:
                defense.attach(model)


def _rank0_says(stop: bool, model: Any) -> bool:
    """Rank 0's pruning decision on every rank (a rank that stopped alone would leave the others
    waiting at the next all-reduce); the decision itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([int(stop)], device=next(model.parameters()).device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class CheckpointEvaluator(TrainerCallback):
    """Evaluates the checkpoints at the spec's evaluation points, logs the monitor every M
    steps, and stops a trial that pruning rejects (module docstring).

    ``evaluate(model, only=None, folder=None) -> (metrics, samples, versions)`` is the worker's
    evaluation of one model (generation of the sets named in ``only``, or of all, and the
    judge-free metrics; ``folder`` is the checkpoint's folder, where a generation server's plan
    goes with ``evaluation.backend: server``). The worker
    sets ``history``, the training's :class:`~emtune.train.trainer.LossHistory` (its rows: the
    training log so far, including the steps before a checkpoint a run resumed from).
    """

    def __init__(self, spec: Any, files: TrialFiles, tokenizer: Any, defenses: list[Any],
                 evaluate: Callable[[Any], tuple[dict, dict, dict]], direction: Any = None,
                 pruning: PruningRule | None = None, rank: int = 0):
        self.spec, self.files, self.tokenizer, self.defenses = spec, files, tokenizer, defenses
        self.evaluate, self.direction, self.pruning = evaluate, direction, pruning
        self.history: Any = None
        self.rank = rank
        self.points: dict[int, EvaluationPoint] = {}
        self.pruned: str | None = None
        self.monitor_rows: list[dict[str, float]] = []
        self._monitor_answers: list[Any] = []

    def resume(self, checkpoint: Path | None) -> None:
        """Take back the points and monitor rows an earlier attempt evaluated before ``checkpoint``
        (a periodic Trainer checkpoint it resumes from, which carries them): training resumes
        after them, so they would not be evaluated again."""
        if checkpoint is None:
            return
        TrialFiles(checkpoint).carry_evaluations(self.files)
        if self.files.monitor.is_file():
            self.monitor_rows = json.loads(self.files.monitor.read_text(encoding="utf-8"))

    def carried_into_checkpoints(self, report: Callable[[int, Path], Any]) -> Callable[[int, Path], Any]:
        """``report(step, folder)`` for periodic checkpoints that first copies the points evaluated
        so far into the checkpoint folder, so a trial resumed from it keeps them as candidates."""

        def carrying(step: int, folder: Path) -> Any:
            if self.rank == 0:
                self.files.carry_evaluations(TrialFiles(folder))
            return report(step, folder)

        return carrying

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.points = {p.step: p for p in resolve_points(self.spec.evaluation.at, state.max_steps) if not p.final}
        if self.rank == 0 and self.spec.evaluation.monitor.every_steps:
            general = EVAL_SETS[DRIFT_SET]
            with evaluation_mode(model, self.defenses):  # the base model's answers, once
                _, samples, _ = self.evaluate(model, only=[general.name])
            self._monitor_answers = samples.get(DRIFT_SET, [])

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        step = state.global_step
        every = self.spec.evaluation.monitor.every_steps
        if self.rank == 0 and every and step % every == 0 and self._monitor_answers:
            with evaluation_mode(model, self.defenses):
                row = monitor_signals(model, self.tokenizer, self.spec, self._monitor_answers, self.direction)
            self.monitor_rows.append({"step": step, **row})
            self.files.write_json(self.files.monitor, self.monitor_rows)
        point = self.points.get(step)
        if point is not None:
            reason = self._evaluate_point(model, point) if self.rank == 0 else None
            if _rank0_says(reason is not None, model):
                self.pruned = reason or "pruned by rank 0"
                control.should_training_stop = True
        return control

    def _evaluate_point(self, model: Any, point: EvaluationPoint) -> str | None:
        """Evaluate the checkpoint at ``point`` into its folder; the pruning reason, if any."""
        folder = self.files.checkpoint(point.step)
        with evaluation_mode(model, self.defenses):
            trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
            try:
                finalized = {}
                for defense in self.defenses:
                    if defense.active:
                        finalized.update({f"finalize/{k}": v for k, v in defense.finalize(model).items()})
                model.save_pretrained(folder.adapter)
                metrics, samples, _ = self.evaluate(model, folder=folder)
            finally:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if name in trained:
                            param.copy_(trained[name])
        for name, items in samples.items():
            folder.write_samples(name, (sample.to_dict() for sample in items))
        rows = self.history.rows if self.history is not None else []
        metrics = finite_numbers({**metrics, **finalized, "train_loss": tail_mean(rows, "task_loss")})
        reason = self.pruning.decide(point, metrics) if self.pruning else None
        record = {"label": point.label, "step": point.step, "metrics": metrics}
        if reason:
            record["pruned"] = reason
        folder.write_json(folder.point, record)
        return reason
