"""If `emtune validate` says a shipped spec is ok, `emtune run` runs it: every spec in
search_spaces/, shrunk to one short trial, is validated and then run through the CLI on one shared
local Ray (the session's shared `ray_session`). (The paper's specs need data emtune does not ship:
tests/study/test_paper_spec.py and test_paper_rl_spec.py validate them on small files of their
schema and run every arm on the tiny model.)

The studies share one stage cache (persona vectors, misaligned adapters, selections: all keyed by
content), so the stages all_defenses runs first are not repeated by the single-defense specs."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from emtune.cli.main import main
from emtune.evaluation.points import resolve_points

pytestmark = pytest.mark.slow
SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml")
                 if p.name not in ("paper_qwen7b_code.yaml", "paper_rl.yaml"))


@pytest.fixture(scope="module")
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One study-stage cache for every study of this module."""
    return tmp_path_factory.mktemp("stage-cache")


def _shrink(data: dict, root: Path) -> dict:
    """The same study with one short trial, small inputs and a study folder under ``root``."""
    data.update(output_dir=str(root / "studies"), baselines={"enabled": False})
    data["search"]["num_trials"] = 1
    data["training"] = {**data.get("training", {}), "max_steps": 2, "bf16": False, "checkpoint_every_steps": None}
    if data["data"].get("train"):
        data["data"]["train"]["limit"] = 40
    warmup = data["training"].get("grpo", {}).get("warmup")
    if warmup:  # GRPO's supervised warm-up
        warmup["max_steps"] = 2
    data["evaluation"] = {**data.get("evaluation", {}), "samples_per_question": 1, "max_new_tokens": 4,
                          "heldout_questions": 2}
    data["resources"] = {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1}
    monitor = data["evaluation"].get("monitor") or {}
    if "extract_prompts" in monitor:
        data["evaluation"]["monitor"] = {**monitor, "extract_max_new_tokens": 4}
    for defense in data.get("defenses", []):
        if "extract_prompts" in defense:
            defense["extract_max_new_tokens"] = 4
        if defense["name"].startswith("interleaving"):
            defense["pool_limit"] = 60
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_a_spec_that_validates_runs(path, tmp_path, ray_session, stage_cache, capsys) -> None:
    data = _shrink(yaml.safe_load(path.read_text()), tmp_path)
    (tmp_path / "search_spaces").mkdir()
    spec = tmp_path / "search_spaces" / path.name
    spec.write_text(yaml.safe_dump(data, sort_keys=False))

    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
    assert "1 trials" in capsys.readouterr().out
    (tmp_path / "studies" / data["name"]).mkdir(parents=True)
    (tmp_path / "studies" / data["name"] / "cache").symlink_to(stage_cache, target_is_directory=True)
    assert main(["run", str(spec), "--num-cpus", "2"]) == 0, capsys.readouterr()
    study = optuna.load_study(study_name=data["name"], storage=f"sqlite:///{tmp_path / 'studies' / data['name'] / 'optuna.db'}")
    # with evaluation.at, the trial's checkpoints are candidates (Optuna trials) beside it
    [trial] = [t for t in study.get_trials() if "candidate_of" not in t.user_attrs]
    checkpoints = [t for t in study.get_trials() if t.user_attrs.get("candidate_of") == trial.number]
    assert len(checkpoints) == len(resolve_points(data["evaluation"].get("at", ()), 2)) - 1
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert all(math.isfinite(v) for v in trial.values)
