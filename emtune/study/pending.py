"""Pending evaluations: trained trials whose evaluation or tracking did not finish.

A trial whose fine-tune succeeded but whose judge or MLflow server stayed down past its retries
leaves a record in ``<study>/pending_evaluations/<ray trial id>.json``: its params, the metrics it
already has, the failure reason and its saved checkpoint. ``emtune resume`` finishes them
(:mod:`emtune.study.reevaluate`) and moves each finished record to ``pending_evaluations/done/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PENDING_DIR = "pending_evaluations"


@dataclass
class PendingEvaluation:
    """A trained trial whose evaluation or tracking did not finish."""

    ray_trial_id: str
    reason: str
    checkpoint_path: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    optuna_trial: int | None = None
    baseline: str | None = None


def save_pending(study_dir: Path, record: PendingEvaluation) -> Path:
    """Write the record atomically (a reader never sees half a file)."""
    folder = Path(study_dir) / PENDING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.ray_trial_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2, default=str))
    os.replace(tmp, path)
    return path


def load_pending(study_dir: Path) -> list[PendingEvaluation]:
    """Every pending record of the study, oldest first."""
    folder = Path(study_dir) / PENDING_DIR
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return [PendingEvaluation(**json.loads(p.read_text())) for p in paths]


def resolve_pending(study_dir: Path, record: PendingEvaluation) -> None:
    """Move a finished record to ``pending_evaluations/done/`` (kept for the record)."""
    folder = Path(study_dir) / PENDING_DIR
    (folder / "done").mkdir(exist_ok=True)
    os.replace(folder / f"{record.ray_trial_id}.json", folder / "done" / f"{record.ray_trial_id}.json")
