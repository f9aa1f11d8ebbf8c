"""Faults on a real local Ray: a NaN trial, a killed Train worker, a killed study driver.

Each test counts trials finished, failed and tracked, and checks nothing is lost, duplicated or
left RUNNING (in Optuna or MLflow), and no placement group outlives the study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow
COMPLETE, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                           optuna.trial.TrialState.RUNNING)


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def _study(study_dir: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")


def _children(study_dir: Path, name: str):
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"emtune/{name}")
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("emtune.role") == "trial"]


def test_nan_trial_fails_with_reason_and_the_study_goes_on(write_spec, fresh_ray) -> None:
    import ray

    path = write_spec(name="nan", num_trials=2)
    text = path.read_text().replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  max_grad_norm: 1.0e+30\n")
    text = text.replace("    kl_weight: {type: float, target: defenses.kl_to_reference.weight, low: 1.0e-3, high: 10.0, log: true}",
                        "    lr: {type: categorical, target: training.learning_rate, choices: [1.0e-2, 1.0e+30]}")
    path.write_text(text.replace("  sampler: {name: tpe}", "  sampler: {name: random, seed: 0}"))
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    placement_groups = ray.util.placement_group_table()
    assert all(pg["state"] == "REMOVED" for pg in placement_groups.values())

    study_dir = path.parent / "studies" / "nan"
    trials = {t.params["lr"]: t for t in _study(study_dir, "nan").get_trials()}
    assert trials[1e30].state == FAIL and trials[1e30].user_attrs["fail_reason"] == "training loss is not finite"
    assert trials[1e-2].state == COMPLETE
    runs = {r.data.params["search.lr"]: r for r in _children(study_dir, "nan")}
    assert runs["1e+30"].info.status == "FAILED" and "not finite" in runs["1e+30"].data.tags["fail_reason"]
    assert runs["0.01"].info.status == "FINISHED" and runs["0.01"].data.tags["pareto_rank"] == "0"


def _train_worker_pids() -> list[int]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            out.append(proc.pid)
    return out


def test_killed_train_worker_resumes_from_its_checkpoint(write_spec, fresh_ray) -> None:
    path = write_spec(name="workerkill", num_trials=1, max_steps=120)
    text = path.read_text().replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  checkpoint_every_steps: 5\n")
    path.write_text(text.replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1, max_failures: 1}"))
    study_dir = path.parent / "studies" / "workerkill"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 400
        first_seen = None
        while time.time() < deadline and not killed:
            if first_seen is None and list((study_dir / "ray_results" / "train").glob("train-*/checkpoint_*")):
                first_seen = time.time()
            # Train's controller registers a reported checkpoint at its next poll of the workers:
            # give it a moment, then kill the worker mid-training
            if first_seen is not None and time.time() - first_seen > 2.0:
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    killer.join(timeout=5)
    assert killed, "no Train worker was found to kill"
    [trial] = _study(study_dir, "workerkill").get_trials()
    assert trial.state == COMPLETE
    [run] = _children(study_dir, "workerkill")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_steps"] == 120
    assert run.data.metrics["resumed_from_step"] >= 5  # the restarted worker did not start over


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries ``EMTUNE_TEST_DRIVER=marker``."""
    needle = f"EMTUNE_TEST_DRIVER={marker}".encode()
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    proc.kill()
        except (OSError, psutil.Error):
            continue


def test_killed_driver_then_resume_keeps_every_trial_once(write_spec, tmp_path) -> None:
    path = write_spec(name="driverkill", num_trials=3, max_steps=3)
    path.write_text(path.read_text().replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1}"))
    study_dir = path.parent / "studies" / "driverkill"
    marker = uuid.uuid4().hex
    env = dict(os.environ, EMTUNE_TEST_DRIVER=marker)  # inherited by the Ray it starts
    driver = subprocess.Popen([sys.executable, "-m", "emtune.cli.main", "run", str(path), "--num-cpus", "2"],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        before: dict[int, tuple] = {}
        while time.time() < deadline:
            if (study_dir / "optuna.db").is_file():
                try:
                    done = [t for t in _study(study_dir, "driverkill").get_trials() if t.state == COMPLETE]
                except KeyError:
                    done = []
                if done:
                    before = {t.number: tuple(t.values) for t in done}
                    break
            time.sleep(0.5)
        assert before, "no trial completed before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        _kill_marked(marker)  # the killed driver's Ray (not `ray stop --force`: other Rays may run)

    assert main(["resume", str(study_dir), "--num-cpus", "2"]) == 0
    import ray

    ray.shutdown()
    trials = _study(study_dir, "driverkill").get_trials()
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == 3
    assert not [t for t in trials if t.state == RUNNING]
    assert all(t.user_attrs.get("fail_reason", "").startswith("lost") for t in trials if t.state == FAIL)
    for number, values in before.items():
        assert tuple(trials[number].values) == values  # finished before the kill: kept as it was
    children = _children(study_dir, "driverkill")
    ids = [c.data.tags["ray_trial_id"] for c in children]
    assert len(ids) == len(set(ids))  # no trial tracked twice
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 3 and not [c for c in children if c.info.status == "RUNNING"]
    assert {c.info.run_id for c in finished} == {t.user_attrs["mlflow_run_id"] for t in complete}


def test_extend_adds_trials_to_the_same_study_and_parent_run(write_spec, fresh_ray) -> None:
    import ray

    path = write_spec(name="extended", num_trials=1)
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    ray.shutdown()
    assert main(["run", str(path), "--num-cpus", "2", "--extend", "1"]) == 0
    study_dir = path.parent / "studies" / "extended"
    trials = _study(study_dir, "extended").get_trials()
    assert [t.state for t in trials] == [COMPLETE, COMPLETE]
    children = _children(study_dir, "extended")
    assert len(children) == 2 and len({c.data.tags["mlflow.parentRunId"] for c in children}) == 1
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
