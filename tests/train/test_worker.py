"""The worker loop as a plain function: trains, saves the adapter, evaluates."""

from __future__ import annotations

import json
import math

from emtune.config import load_spec
from emtune.models import resolve_source
from emtune.study.runner import model_cache_dir
from emtune.train.worker import HISTORY_FILE, run_training


def test_run_training_writes_adapter_history_and_metrics(write_spec, tmp_path) -> None:
    spec = load_spec(write_spec(max_steps=3)).with_overrides({"kl_weight": 0.5})
    source = resolve_source(spec.model, model_cache_dir())
    metrics = run_training(spec, tmp_path / "out", source)
    assert metrics["train_steps"] == 3
    for key in ("ood_drift", "indomain_nll", "train_loss"):
        assert math.isfinite(metrics[key])
    assert metrics["ood_drift"] >= 0 and metrics["indomain_nll"] > 0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(row["kl_to_reference"] >= 0 and "task_loss" in row for row in history)
    samples = (tmp_path / "out" / "samples_general.jsonl").read_text().splitlines()
    assert len(samples) == 24  # 24 general questions x 1 sample
