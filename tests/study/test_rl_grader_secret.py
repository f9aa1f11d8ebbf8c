"""The RL path keeps its grader's key secret too: a GRPO study rewarded by a grader model (a
loopback OpenAI-compatible stand-in that demands the key) sends the planted key with every grading
request, and the key appears nowhere in the study folder (MLflow store and artifacts, Optuna,
Ray results, caches), MLflow params or tags, or the printed output."""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "search_spaces" / "rl_dryrun.yaml"
GRADER_KEY = "sk-planted-grader-" + uuid.uuid4().hex


def test_a_planted_grader_key_reaches_the_grader_and_nothing_else(tmp_path, chat_server, monkeypatch) -> None:
    import ray

    server = chat_server(lambda index, body: chat_server.Reply(body=chat_server.completion({"90": 1.0})))
    raw = yaml.safe_load(RECIPE.read_text())
    raw.update(name="rlsecret", output_dir=str(tmp_path / "studies"), baselines={"enabled": False})
    raw["training"].update(max_steps=2)
    raw["training"]["grpo"]["warmup"].update(max_steps=2)
    raw["training"]["grpo"]["rewards"] = [{"name": "grader", "rubric": "helpful", "judge": {
        "kind": "openai", "base_url": server.url, "model": "grader-test", "api_key_env": "EMTUNE_TEST_GRADER_KEY",
        "max_retries": 0}}]
    raw["search"]["num_trials"] = 1
    spec_path = tmp_path / "rlsecret.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("EMTUNE_TEST_GRADER_KEY", GRADER_KEY)
    buffer = io.StringIO()
    ray.shutdown()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = main(["run", str(spec_path), "--num-cpus", "2"])
    finally:
        ray.shutdown()
    output = buffer.getvalue()
    assert code == 0, output[-3000:]
    # the grader was asked, always with the key
    assert server.headers and all(h.get("authorization") == f"Bearer {GRADER_KEY}" for h in server.headers)
    study_dir = tmp_path / "studies" / "rlsecret"
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("emtune/rlsecret").experiment_id])
    [trial] = [r for r in runs if r.data.tags.get("emtune.role") == "trial"]
    assert trial.info.status == "FINISHED" and "train_reward" in trial.data.metrics
    assert GRADER_KEY not in output
    needle = GRADER_KEY.encode()
    leaked = [p for p in study_dir.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
    assert not leaked, leaked
    for run in runs:
        assert GRADER_KEY not in repr(run.data.params) + repr(run.data.tags)
