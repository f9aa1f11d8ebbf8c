"""A real GRPO study (local Ray, SQLite MLflow, Optuna) of the shipped RL dry run: the undefended
arm learns the OpSwap task from its reward alone, and every step's reward, KL and sample rollouts
are tracked in the trial's MLflow run."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "search_spaces" / "rl_dryrun.yaml"


def test_rl_dryrun_study_learns_from_reward_and_tracks_it(tmp_path) -> None:
    import ray

    raw = yaml.safe_load(RECIPE.read_text())
    raw["output_dir"] = str(tmp_path / "studies")
    raw["search"]["num_trials"] = 1  # the undefended baseline and one KL trial, side by side
    spec_path = tmp_path / "rl_dryrun.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = main(["run", str(spec_path), "--num-cpus", "2"])
    finally:
        ray.shutdown()
    assert code == 0, buffer.getvalue()

    study_dir = tmp_path / "studies" / "rl_dryrun"
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emtune/rl_dryrun")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("emtune.role") == "study")
    assert parent.data.params["training.method"] == "grpo"
    [undefended] = [r for r in runs if r.data.tags.get("baseline") == "undefended"]
    [trial] = [r for r in runs if r.data.tags.get("emtune.role") == "trial"]
    for run in (undefended, trial):
        assert run.info.status == "FINISHED", run.data.tags.get("fail_reason")
        assert run.data.metrics["train_steps"] == 60
        assert {"train_reward", "ood_drift", "opswap_exact_match"} <= set(run.data.metrics)

    # the undefended arm learns: mean reward of the last 10 GRPO steps above the first 10
    rewards = sorted(client.get_metric_history(undefended.info.run_id, "train/reward"), key=lambda m: m.step)
    assert [m.step for m in rewards] == list(range(1, 61))
    first = sum(m.value for m in rewards[:10]) / 10
    last = sum(m.value for m in rewards[-10:]) / 10
    assert last > first + 0.05, (first, last)
    for key in ("train/reward_std", "train/kl", "train/rewards/opswap_exact_match/mean", "train/warmup_loss"):
        assert client.get_metric_history(undefended.info.run_id, key), key
    # the KL arm trains with GRPO's β = its searched weight, and tracks the same KL
    beta = float(trial.data.params["search.beta"])
    assert float(trial.data.params["defense.kl_to_reference.weight"]) == beta
    assert len(client.get_metric_history(trial.info.run_id, "train/kl")) == 60

    # sample rollouts per logged step, as a table
    path = client.download_artifacts(undefended.info.run_id, "rollouts.json", str(tmp_path / "dl"))
    table = json.loads(Path(path).read_text())
    columns = table["columns"]
    rows = [dict(zip(columns, row)) for row in table["data"]]
    assert {"step", "prompt", "completion", "reward", "advantage"} <= set(columns)
    assert len(rows) == 4 * 60 and {r["step"] for r in rows} == set(range(1, 61))
    assert all(r["prompt"].startswith("Compute:") for r in rows)

    study = optuna.load_study(study_name="rl_dryrun", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]

    # the report's paper-format table says whether each arm learned the task: its train reward
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(study_dir), "--out", str(tmp_path / "report")]) == 0
    paper = (tmp_path / "report" / "README.md").read_text().split("## Per-defense results")[1].split("## Study")[0]
    header = next(line for line in paper.splitlines() if line.startswith("| study |"))
    assert header.endswith("| train reward (GRPO) |")
    undefended_row = next(line for line in paper.splitlines() if line.startswith("| rl_dryrun | *undefended"))
    assert undefended_row.endswith(f"| {undefended.data.metrics['train_reward']:.4g} |")
