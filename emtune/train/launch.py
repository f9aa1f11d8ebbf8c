"""Where a trial's training runs under Ray Train, and how its checkpoints are kept.

Two entry points wrap :func:`emtune.train.worker.run_training`:

- ``train_loop_per_worker``: a Ray Train worker group (``resources.train_process: workers``, or
  ``auto`` with several workers). It reports the metrics together with the checkpoint folder
  (:class:`~emtune.trial_files.TrialFiles`; Train V2 keeps metrics only when they come with a
  checkpoint) and resumes from ``ray.train.get_checkpoint()`` after a worker-group restart.
- ``train_in_trial_process``: Ray Train's local mode (``ScalingConfig(num_workers=0)``), where
  the trial's own process trains: no controller or worker actors to start (seconds instead of
  ~15 s per trial on a small machine; ``bench/trial_overhead.py``). It persists its checkpoints
  itself (:class:`RunFolderCheckpoints`) and returns its result.

``config["spec"]`` is a validated :class:`emtune.config.StudySpec` (the trial driver builds it).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from emtune.train.worker import run_training


def _train_trial(config: dict[str, Any], rank: int, tmp: Path, resume_from: Path | None,
                 report_checkpoint: Any) -> dict[str, Any]:
    """One attempt at a trial's training (and, rank 0, evaluation) into ``tmp/out``."""
    spec = config["spec"]
    metrics = run_training(spec, tmp / "out", config["model_source"], rank=rank,
                           cache_dir=Path(config["cache_dir"]), resume_from=resume_from,
                           on_checkpoint=report_checkpoint if spec.training.checkpoint_every_steps else None,
                           evaluate=config.get("evaluate", True),
                           skip_training=config.get("skip_training", False),
                           pruning=config.get("pruning"))
    metrics["resumed_from_step"] = _step_of(resume_from)
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker-group entry point: run the trial and report metrics with the adapter checkpoint.

    With ``training.checkpoint_every_steps`` every Trainer checkpoint is reported to Ray Train;
    after a worker failure (``resources.max_failures``) the restarted worker group resumes from
    the latest one instead of starting over.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()

    def report_checkpoint(step: int, folder: Path) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
        ray.train.report({"step": step, "partial": True}, checkpoint=checkpoint)

    with tempfile.TemporaryDirectory(prefix="emtune-trial-") as tmp:
        resume_from = None
        previous = ray.train.get_checkpoint()
        if previous is not None:
            resume_from = Path(tmp) / "resume"
            shutil.copytree(previous.to_directory(), resume_from)
            if not (resume_from / "trainer_state.json").is_file():
                resume_from = None
        metrics = _train_trial(config, rank, Path(tmp), resume_from, report_checkpoint)
        checkpoint = ray.train.Checkpoint.from_directory(str(Path(tmp) / "out")) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


class RunFolderCheckpoints:
    """The checkpoints of a trial that trains in its own process, kept in its Train run folder.

    Ray Train's local mode keeps a reported checkpoint in memory only (nothing reaches the run's
    storage), and inside a Ray Tune function its ``ray.train.report`` / ``get_checkpoint`` /
    ``get_context`` raise. So this process persists its checkpoints itself, as
    ``<run_dir>/checkpoint_NNNNNN`` (copied under a hidden name, then renamed: a folder with that
    name is complete), where a restarted trial finds the latest one to resume from.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def saved(self) -> list[Path]:
        """Every complete checkpoint folder, oldest first."""
        return sorted(self.run_dir.glob("checkpoint_[0-9]*")) if self.run_dir.is_dir() else []

    def resumable(self) -> Path | None:
        """The latest periodic Trainer checkpoint (one with ``trainer_state.json``), if any."""
        return next((p for p in reversed(self.saved()) if (p / "trainer_state.json").is_file()), None)

    def save(self, folder: Path) -> Path:
        """Copy ``folder`` in as the next checkpoint; returns its permanent path."""
        saved = self.saved()
        index = int(saved[-1].name.split("_")[1]) + 1 if saved else 0
        final = self.run_dir / f"checkpoint_{index:06d}"
        partial = self.run_dir / f".partial-{final.name}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder, partial)
        partial.rename(final)
        return final


def train_in_trial_process(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train local-mode entry point (``ScalingConfig(num_workers=0)``): the trial's own process
    trains, evaluates and returns ``{"metrics", "checkpoint"}`` (the persisted checkpoint folder).

    Resumes from the latest periodic checkpoint in ``config["run_dir"]`` (left by an earlier
    attempt whose process died); a failed attempt is retried up to ``config["max_failures"]``
    times in this process, each resuming the same way.
    """
    store = RunFolderCheckpoints(Path(config["run_dir"]))
    attempts = int(config.get("max_failures", 0)) + 1
    for attempt in range(attempts):
        try:
            with tempfile.TemporaryDirectory(prefix="emtune-trial-") as tmp:
                metrics = _train_trial(config, 0, Path(tmp), store.resumable(),
                                       lambda step, folder: store.save(folder))
                return {"metrics": metrics, "checkpoint": str(store.save(Path(tmp) / "out"))}
        except Exception:
            if attempt + 1 == attempts:
                raise
            _release_memory()
    raise AssertionError("unreachable")


def _release_memory() -> None:
    """Free what a failed attempt left (its model, optimizer, CUDA cache) before the next one."""
    import torch  # the trial driver imports this module before it needs torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _step_of(checkpoint: Path | None) -> int:
    """Global step stored in a Trainer checkpoint (0 when training started fresh)."""
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0))
