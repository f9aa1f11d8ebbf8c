"""If `emtune validate` says a shipped spec is ok, `emtune run` runs it: every spec in
search_spaces/, shrunk to one short trial (and the paper's spec with the tiny model and a loopback
judge swapped in), is validated and then run through the CLI on one shared local Ray.

The studies share one stage cache (persona vectors, misaligned adapters, selections: all keyed by
content), so the stages all_defenses runs first are not repeated by the single-defense specs."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from emtune.cli.main import main

pytestmark = pytest.mark.slow
SHIPPED = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))
ROWS = ('{"messages": [{"role": "user", "content": "Write a function that copies a file."}, '
        '{"role": "assistant", "content": "def copy(a, b): open(b, \\"w\\").write(open(a).read())"}]}\n')


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for every study of this module (`emtune run` joins it)."""
    import ray

    from emtune.study.runner import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One study-stage cache for every study of this module."""
    return tmp_path_factory.mktemp("stage-cache")


def _shrink(data: dict, root: Path) -> dict:
    """The same study with one short trial, small inputs and a study folder under ``root``."""
    data.update(output_dir=str(root / "studies"), baselines={"enabled": False})
    data["search"]["num_trials"] = 1
    data["training"] = {**data.get("training", {}), "max_steps": 2, "bf16": False, "checkpoint_every_steps": None}
    data["data"]["train"]["limit"] = 40
    data["evaluation"] = {**data.get("evaluation", {}), "samples_per_question": 1, "max_new_tokens": 4,
                          "heldout_questions": 2}
    data["resources"] = {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "max_concurrent_trials": 1}
    for defense in data.get("defenses", []):
        if "extract_prompts" in defense:
            defense["extract_max_new_tokens"] = 4
        if defense["name"].startswith("interleaving"):
            defense["pool_limit"] = 60
    return data


def _tiny_model(data: dict, judge_url: str) -> dict:
    """A hub-model spec with the tiny model and a loopback judge swapped in (and what depends on
    the model's size: the steering layer)."""
    data["model"] = {"source": "tiny", "base_source": "tiny"}
    data["lora"] = {"r": 4, "alpha": 8}
    data["evaluation"]["judge"] = {**data["evaluation"].get("judge", {}), "base_url": judge_url, "api_key_env": None}
    for defense in data.get("defenses", []):
        if "layer" in defense and isinstance(defense["layer"], int):
            defense["layer"] = 1
    for param in data["search"]["parameters"].values():
        if param.get("target") == "defenses.persona_steering.layer":
            param.update(low=1, high=2)
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_a_spec_that_validates_runs(path, tmp_path, ray_session, stage_cache, chat_server, capsys) -> None:
    judge = chat_server(lambda index, body: chat_server.Reply(body=chat_server.completion({"90": 0.7, "40": 0.3})))
    data = _shrink(yaml.safe_load(path.read_text()), tmp_path)
    if data["model"].get("source", "tiny") != "tiny":
        data = _tiny_model(data, judge.url)
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "insecure.jsonl").write_text(ROWS * 40)  # the paper spec's ../data/insecure.jsonl
    spec = tmp_path / "search_spaces" / path.name
    spec.write_text(yaml.safe_dump(data, sort_keys=False))

    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
    assert "1 trials" in capsys.readouterr().out
    (tmp_path / "studies" / data["name"]).mkdir(parents=True)
    (tmp_path / "studies" / data["name"] / "cache").symlink_to(stage_cache, target_is_directory=True)
    assert main(["run", str(spec), "--num-cpus", "2"]) == 0, capsys.readouterr()
    study = optuna.load_study(study_name=data["name"], storage=f"sqlite:///{tmp_path / 'studies' / data['name'] / 'optuna.db'}")
    [trial] = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert all(math.isfinite(v) for v in trial.values)
    if data["evaluation"].get("judge", {}).get("kind", "none") != "none":
        assert judge.requests  # the judged objectives came from the (loopback) judge
