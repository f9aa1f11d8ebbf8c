"""The layout of one trial's checkpoint folder, in one place.

A trial's worker writes this folder and reports it to Ray Train as the trial's checkpoint; the
trial driver logs it to MLflow and judges its samples; study stages copy the adapter out of it;
a pending evaluation is finished from it later. Every one of them reads the names from here::

    <root>/adapter/                 the LoRA adapter (peft ``save_pretrained``)
    <root>/loss_history.json        per-step training logs (task loss, defense terms, lr)
    <root>/samples_<set>.jsonl      generated answers, one file per evaluation set
    <root>/generation_plan.json     what to generate when a server does it (prompts, settings, seeds)
    <root>/trial_meta.json          question-set versions and row counts
    <root>/defenses.json            what each active defense reported (e.g. SafeLoRA's scores)
    <root>/rollouts.jsonl           RL only: sample rollouts per logged step (prompt, completion, reward)
    <root>/point.json               the evaluation point: label, step, judge-free metrics (and why
                                    training stopped there, for a pruned trial)
    <root>/monitor.json             the monitor every M training steps (evaluation.monitor.every_steps)
    <root>/checkpoints/step-<N>/    a checkpoint evaluated during training (``evaluation.at``), laid
                                    out as above: adapter/, samples_<set>.jsonl, point.json

The root itself holds the final point (the end of training), except for a pruned trial, whose
training stopped at its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

_SAMPLES_PREFIX, _SAMPLES_SUFFIX = "samples_", ".jsonl"
_CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class TrialFiles:
    """Paths inside one trial checkpoint folder, and small readers and writers for them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def adapter(self) -> Path:
        """The saved LoRA adapter folder."""
        return self.root / "adapter"

    @property
    def history(self) -> Path:
        """Per-step training log rows (JSON list)."""
        return self.root / "loss_history.json"

    @property
    def meta(self) -> Path:
        """Question-set versions and row counts of the trial's evaluation (JSON)."""
        return self.root / "trial_meta.json"

    @property
    def plan(self) -> Path:
        """The generation plan a generation server works through (JSON), when the spec uses one."""
        return self.root / "generation_plan.json"

    @property
    def defenses(self) -> Path:
        """Each active defense's report (JSON), when any defense reported something."""
        return self.root / "defenses.json"

    @property
    def rollouts(self) -> Path:
        """RL trials: sample rollouts (step, prompt, completion, reward, advantage), JSONL."""
        return self.root / "rollouts.jsonl"

    @property
    def point(self) -> Path:
        """The evaluation point of this folder: label, step and judge-free metrics (JSON)."""
        return self.root / "point.json"

    @property
    def monitor(self) -> Path:
        """Monitor rows logged every M training steps (JSON list)."""
        return self.root / "monitor.json"

    def checkpoint(self, step: int) -> "TrialFiles":
        """The folder of the checkpoint evaluated at optimizer step ``step``."""
        return TrialFiles(self.root / "checkpoints" / f"{_CHECKPOINT_PREFIX}{int(step)}")

    def checkpoints(self) -> list["TrialFiles"]:
        """Every checkpoint evaluated during training that wrote its point, by step."""
        folder = self.root / "checkpoints"
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.name.startswith(_CHECKPOINT_PREFIX)
                 and p.name[len(_CHECKPOINT_PREFIX):].isdigit() and (p / "point.json").is_file()]
        return [TrialFiles(p) for p in sorted(found, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX):]))]

    def carry_evaluations(self, into: "TrialFiles") -> None:
        """Copy the checkpoints evaluated during training and the monitor rows into ``into``
        (merged with what it holds): a periodic Trainer checkpoint carries them, and a trial
        resumed from it takes them back."""
        if (self.root / "checkpoints").is_dir():
            shutil.copytree(self.root / "checkpoints", into.root / "checkpoints", dirs_exist_ok=True)
        if self.monitor.is_file():
            into.root.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.monitor, into.monitor)

    def read_point(self) -> dict[str, Any]:
        """The evaluation point record (empty when absent)."""
        return json.loads(self.point.read_text(encoding="utf-8")) if self.point.is_file() else {}

    def samples(self, set_name: str) -> Path:
        """Generated answers of one evaluation set (JSONL, one sample per line)."""
        return self.root / f"{_SAMPLES_PREFIX}{set_name}{_SAMPLES_SUFFIX}"

    def sample_sets(self) -> list[str]:
        """Names of the evaluation sets whose samples this folder holds, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[len(_SAMPLES_PREFIX):-len(_SAMPLES_SUFFIX)] for p in self.root.iterdir()
                      if p.name.startswith(_SAMPLES_PREFIX) and p.name.endswith(_SAMPLES_SUFFIX))

    def extra_artifacts(self) -> list[Path]:
        """The small JSON files worth keeping with the trial's tracked run (those present)."""
        return [p for p in (self.defenses, self.meta) if p.is_file()]

    def write_json(self, path: Path, value: Any) -> None:
        """Write ``value`` as JSON atomically (a reader never sees half a file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)

    def write_samples(self, set_name: str, rows: Iterable[dict[str, Any]]) -> Path:
        """Write one evaluation set's samples as JSONL, atomically (a set is there whole or not at all)."""
        return self.write_jsonl(self.samples(set_name), rows)

    def write_jsonl(self, path: Path, rows: Iterable[dict[str, Any]]) -> Path:
        """Write rows as JSONL (one object per line) at one of this folder's paths, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
        return path

    def read_samples(self, set_name: str) -> list[dict[str, Any]]:
        """One evaluation set's samples (empty when the file is absent)."""
        path = self.samples(set_name)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def read_json(self, path: Path) -> Any:
        """A JSON file of this folder (None when absent)."""
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def read_history(self) -> list[dict[str, float]]:
        """The training log rows (empty when absent)."""
        return json.loads(self.history.read_text(encoding="utf-8")) if self.history.is_file() else []
