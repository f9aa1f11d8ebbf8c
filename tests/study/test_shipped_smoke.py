"""Every shipped tiny-model defense study runs: its stages, then a short trial at the top of its
search range (every defense active), with all metrics finite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from emtune.config import load_spec
from emtune.models import resolve_source
from emtune.models import model_cache_dir
from emtune.study.stages import prepare_stages
from emtune.train.worker import run_training

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2] / "search_spaces"
TINY_STUDIES = ["kl_to_reference", "feature_l2", "safelora", "persona_steering", "inoculation",
                "interleaving", "interleaving_selected", "kl_plus_interleaving_pp"]


def _short(spec, tmp_path):
    """The same study, shrunk: 2 steps, 40 rows, 4-token answers, study folder in tmp."""
    data = spec.data.model_copy(update={"train": spec.data.train.model_copy(update={"limit": 40})})
    return spec.model_copy(update={
        "output_dir": str(tmp_path),
        "data": data,
        "training": spec.training.model_copy(update={"max_steps": 2}),
        "evaluation": spec.evaluation.model_copy(update={"max_new_tokens": 4}),
    })


@pytest.mark.parametrize("name", TINY_STUDIES)
def test_shipped_study_trial_runs(name, tmp_path, ray_session) -> None:
    spec = _short(load_spec(ROOT / f"{name}.yaml"), tmp_path)
    source = resolve_source(spec.model, model_cache_dir())
    staged = prepare_stages(spec, tmp_path / "cache", source)
    top = {}
    for pname, param in staged.search.parameters.items():
        if param.target is None:
            continue
        top[pname] = param.choices[-1] if param.type == "categorical" else (
            int(param.high) if param.type == "int" else param.high)
    trial = staged.with_overrides(top)
    assert all(d.name for d in trial.defenses)
    metrics = run_training(trial, tmp_path / "trial", source, cache_dir=tmp_path / "cache")
    assert metrics["train_steps"] == 2
    for key in ("train_loss", "ood_drift", "indomain_nll"):
        assert math.isfinite(metrics[key]), (name, key, metrics)
    if name == "safelora":
        assert metrics["finalize/safelora/projected_layers"] >= 0
        assert (tmp_path / "trial" / "defenses.json").is_file()
