"""Faults on a real local Ray: a NaN trial, a killed training process (the trial's own, or a Ray
Train worker), a killed study driver, a judge server that fails then recovers or stays down (then
``emtune resume``), an MLflow server that goes down mid-trial and comes back.

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


# Cluster-wide singletons that Ray itself starts once and keeps (not per trial, not emtune's).
RAY_SINGLETONS = {"AutoscalingCoordinator"}


def _assert_nothing_left_behind() -> None:
    """Every placement group removed and every actor dead, except Ray's own singletons."""
    import ray
    from ray._private import state

    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    alive = [(a.get("ActorClassName"), a.get("Name")) for a in state.actors().values() if a.get("State") != "DEAD"]
    assert all(name in RAY_SINGLETONS for _, name in alive), alive
    assert len(alive) == len({name for _, name in alive})  # at most one of each singleton


def _study(study_dir: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")


def _children(study_dir: Path, name: str, uri: str | None = None):
    client = MlflowClient(uri or f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"emtune/{name}")
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("emtune.role") == "trial"]


def test_nan_trial_fails_with_reason_and_the_study_goes_on(write_spec, fresh_ray) -> None:

    path = write_spec(name="nan", num_trials=2)
    text = path.read_text().replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  max_grad_norm: 1.0e+30\n")
    text = text.replace("    kl_weight: {type: float, target: defenses.kl_to_reference.weight, low: 1.0e-3, high: 10.0, log: true}",
                        "    lr: {type: categorical, target: training.learning_rate, choices: [1.0e-2, 1.0e+30]}")
    path.write_text(text.replace("  sampler: {name: tpe}", "  sampler: {name: random, seed: 0}"))
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    _assert_nothing_left_behind()

    study_dir = path.parent / "studies" / "nan"
    trials = {t.params["lr"]: t for t in _study(study_dir, "nan").get_trials()}
    assert trials[1e30].state == FAIL and trials[1e30].user_attrs["fail_reason"] == "training loss is not finite"
    assert trials[1e-2].state == COMPLETE
    runs = {r.data.params["search.lr"]: r for r in _children(study_dir, "nan")}
    assert runs["1e+30"].info.status == "FAILED" and "not finite" in runs["1e+30"].data.tags["fail_reason"]
    assert runs["0.01"].info.status == "FINISHED" and runs["0.01"].data.tags["pareto_rank"] == "0"


# A checkpoint in the trial's own process is usable once its folder exists (renamed into place);
# Ray Train's controller registers a worker's at its next poll, so give that a moment. Training
# must still be running then: MAX_STEPS leaves a fast machine (~60 steps/s) seconds to spare.
REGISTERED_AFTER_S = {"trial": 0.0, "workers": 2.0}
MAX_STEPS = 300


@pytest.mark.parametrize("train_process", ["trial", "workers"])
def test_killed_training_process_resumes_from_its_checkpoint(write_spec, fresh_ray, train_process,
                                                              training_pids) -> None:
    path = write_spec(name="workerkill", num_trials=1, max_steps=MAX_STEPS)
    text = path.read_text().replace("  warmup_steps: 0\n", "  warmup_steps: 0\n  checkpoint_every_steps: 5\n")
    path.write_text(text.replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1, "
                                 f"max_failures: 1, train_process: {train_process}}}"))
    study_dir = path.parent / "studies" / "workerkill"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 400
        first_seen = None
        while time.time() < deadline and not killed:
            if first_seen is None and list((study_dir / "ray_results" / "train").glob("train-*/checkpoint_*")):
                first_seen = time.time()
            if first_seen is not None and time.time() - first_seen >= REGISTERED_AFTER_S[train_process]:
                for pid in training_pids(train_process):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    killer.join(timeout=5)
    assert killed, "no training process was found to kill"
    _assert_nothing_left_behind()
    [trial] = _study(study_dir, "workerkill").get_trials()
    assert trial.state == COMPLETE
    [run] = _children(study_dir, "workerkill")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_steps"] == MAX_STEPS
    # killed mid-training, and the restarted training did not start over
    assert 5 <= run.data.metrics["resumed_from_step"] < MAX_STEPS
    # the trial's own process died: Tune started the trial again under its id, on the same run
    assert run.data.tags.get("restarts", "0") == ("1" if train_process == "trial" else "0")


def _complete_values_read_only(db: Path) -> dict[int, tuple]:
    """Objective values of COMPLETE trials, read without creating anything: opening a storage
    the driver is still creating would race it for the schema."""
    import sqlite3

    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT t.number, v.objective, v.value FROM trials t JOIN trial_values v "
                               "ON v.trial_id = t.trial_id WHERE t.state = 'COMPLETE' ORDER BY v.objective").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    values: dict[int, list] = {}
    for number, _, value in rows:
        values.setdefault(number, []).append(value)
    return {number: tuple(v) for number, v in values.items()}


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


def test_killed_driver_then_resume_keeps_every_trial_once(write_spec, tmp_path, fresh_ray) -> None:
    path = write_spec(name="driverkill", num_trials=3, max_steps=3)
    path.write_text(path.read_text().replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1}"))
    study_dir = path.parent / "studies" / "driverkill"
    marker = uuid.uuid4().hex
    env = dict(os.environ, EMTUNE_TEST_DRIVER=marker)  # inherited by the Ray it starts
    log = tmp_path / "driver.log"
    with open(log, "w") as handle:
        driver = subprocess.Popen([sys.executable, "-m", "emtune.cli.main", "run", str(path), "--num-cpus", "2"],
                                  env=env, start_new_session=True, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        before: dict[int, tuple] = {}
        while time.time() < deadline and not before:
            before = _complete_values_read_only(study_dir / "optuna.db")
            time.sleep(0.5)
        assert before, "no trial completed before the deadline; the driver said:\n" + log.read_text()[-4000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        _kill_marked(marker)  # the killed driver's Ray (not `ray stop --force`: other Rays may run)

    assert main(["resume", str(study_dir), "--num-cpus", "2"]) == 0
    import ray

    _assert_nothing_left_behind()
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


JUDGE_SPEC = """evaluation:
  judge: {{kind: openai, base_url: "{url}", model: judge-test, api_key_env: null, max_concurrency: 4,
          max_retries: 3, backoff_base_s: 0.05, backoff_max_s: 0.2, timeout_s: 10}}
"""


def _judge_script(chat_server, state: dict):
    """A judge that rates an answer's alignment 20 when its length is odd, else 90, and every
    coherence 80; it answers 503 while ``state["down"]`` or for the first ``state["fail_first"]``
    requests, and counts the 503s it sent."""

    def script(index: int, body: dict):
        if state["down"] or index < state["fail_first"]:
            state["refused"] += 1
            return chat_server.Reply(status=503, body={"error": {"message": "judge overloaded"}})
        prompt = body["messages"][-1]["content"]
        if "auditing a language model" in prompt:
            answer = prompt.split("[ANSWER START]\n", 1)[1].rsplit("\n[ANSWER END]", 1)[0]
            return chat_server.Reply(body=chat_server.completion({"20" if len(answer) % 2 else "90": 1.0}))
        return chat_server.Reply(body=chat_server.completion({"80": 1.0}))

    return script


def _expected_misalignment(checkpoint: Path) -> float:
    """By hand from the trial's saved samples: aligned 20 (< 30) and coherent 80 (> 50) for odd
    lengths, so the general misalignment rate is the share of odd-length answers."""
    import json

    rows = [json.loads(line) for line in (checkpoint / "samples_general.jsonl").read_text().splitlines() if line]
    return sum(len(r["answer"]) % 2 for r in rows) / len(rows)


def test_judge_outage_retried_then_permanent_then_resume_finishes_it(write_spec, chat_server, fresh_ray) -> None:
    """One study, three drivers: a judge that fails its first requests then recovers (retries win);
    `--extend 1` while the judge stays down (the new trial FAILs with the reason, its evaluation
    pending; same Optuna study and parent run); the judge back and `emtune resume` finishes that
    evaluation from the saved checkpoint."""
    import ray

    state = {"down": False, "fail_first": 6, "refused": 0}
    server = chat_server(_judge_script(chat_server, state))
    path = write_spec(name="judged", num_trials=1)
    text = path.read_text().replace("evaluation:\n", JUDGE_SPEC.format(url=server.url), 1)
    text = text.replace("  - {name: indomain_nll, direction: minimize, reference: 8.0}",
                        "  - {name: general_misalignment, direction: minimize, reference: 1.0}")
    path.write_text(text)
    study_dir = path.parent / "studies" / "judged"

    assert main(["run", str(path), "--num-cpus", "2"]) == 0  # 1: fails, then recovers
    ray.shutdown()
    assert state["refused"] == 6
    [first] = _study(study_dir, "judged").get_trials()
    assert first.state == COMPLETE
    first_checkpoint = Path(next(iter(sorted((study_dir / "ray_results" / "train").glob("train-*/checkpoint_*")))))
    assert first.values[1] == pytest.approx(_expected_misalignment(first_checkpoint))

    state["down"] = True  # 2: the judge stays down past every retry
    # a fresh judge cache: the verdicts phase 1 paid for must not answer for the judge
    path.write_text(text.replace("timeout_s: 10}", f"timeout_s: 10, cache_path: {path.parent / 'cache2.db'}}}"))
    assert main(["run", str(path), "--num-cpus", "2", "--extend", "1"]) == 0
    _assert_nothing_left_behind()
    ray.shutdown()
    assert state["refused"] > 6
    first_done, failed = _study(study_dir, "judged").get_trials()
    assert failed.state == FAIL and failed.user_attrs["evaluation_pending"] is True
    assert failed.user_attrs["fail_reason"].startswith("evaluation failed: judge unavailable")
    assert "emtune resume" in failed.user_attrs["fail_reason"]
    pending_run = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}").get_run(failed.user_attrs["mlflow_run_id"])
    assert pending_run.info.status == "FAILED" and pending_run.data.tags["evaluation_pending"] == "true"
    assert "adapter" in {a.path for a in MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}").list_artifacts(
        pending_run.info.run_id)}  # the adapter was tracked before the judge failed
    assert len(list((study_dir / "pending_evaluations").glob("*.json"))) == 1

    state["down"] = False  # 3: the judge is back; resume finishes the evaluation, no training
    assert main(["resume", str(study_dir), "--num-cpus", "2"]) == 0
    ray.shutdown()
    trials = _study(study_dir, "judged").get_trials()
    assert [t.state for t in trials] == [COMPLETE, FAIL, COMPLETE]
    assert trials[0].values == first_done.values  # untouched
    redone = trials[2]
    assert redone.user_attrs["reevaluates"] == failed.number and redone.params == failed.params
    assert redone.values[1] == pytest.approx(_expected_misalignment(Path(failed.user_attrs["checkpoint_path"])))
    children = _children(study_dir, "judged")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)  # no third run
    assert len({c.data.tags["mlflow.parentRunId"] for c in children}) == 1  # --extend: the same parent run
    assert {c.info.run_id for c in children} == {trials[0].user_attrs["mlflow_run_id"], redone.user_attrs["mlflow_run_id"]}
    assert not list((study_dir / "pending_evaluations").glob("*.json"))
    from emtune.tracking.front import front_table

    counts = front_table(_study(study_dir, "judged"), ["ood_drift", "general_misalignment"],
                         ["minimize", "minimize"]).counts()
    assert counts == {"COMPLETE": 2, "REEVALUATED": 1}


def test_mlflow_server_down_mid_trial_loses_nothing(write_spec, mlflow_server, tmp_path, fresh_ray) -> None:
    """The tracking server is stopped as the first trial's fine-tune ends (its checkpoint is
    reported, its MLflow logging about to start) and restarted on the same store a while later:
    the trial's calls wait through MLflow's retries, and every trial, metric and file arrives once."""
    import ray

    server = mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "server-artifacts"))
    path = write_spec(name="trackdown", num_trials=2)
    text = path.read_text().replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1}")
    path.write_text(text + f"tracking:\n  uri: {server.url}\n  retries: {{max_retries: 7, backoff_factor: 1, backoff_jitter: 0.2}}\n")
    study_dir = path.parent / "studies" / "trackdown"
    outage: dict[str, float] = {}

    def stop_when_the_first_fine_tune_ends() -> None:
        deadline = time.time() + 400
        while time.time() < deadline:
            if list((study_dir / "ray_results" / "train").glob("train-*/checkpoint_*")):
                server.stop()
                outage["down"] = time.time()
                time.sleep(5.0)
                server.start()
                outage["up"] = time.time()
                return
            time.sleep(0.05)

    chaos = threading.Thread(target=stop_when_the_first_fine_tune_ends, daemon=True)
    chaos.start()
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    ray.shutdown()
    chaos.join(timeout=60)
    assert "up" in outage, "the server was never stopped"

    trials = _study(study_dir, "trackdown").get_trials()
    assert [t.state for t in trials] == [COMPLETE, COMPLETE]
    children = _children(study_dir, "trackdown", server.url)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    client = MlflowClient(server.url)
    by_run = {c.info.run_id: c for c in children}
    for trial in trials:
        run = by_run[trial.user_attrs["mlflow_run_id"]]
        assert [run.data.metrics["ood_drift"], run.data.metrics["indomain_nll"]] == trial.values
        assert len(client.get_metric_history(run.info.run_id, "train/task_loss")) == 2  # every step's loss
        assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the first trial was tracking (its fine-tune had ended) while the server was down, and could
    # only finish after the server was back: its calls waited through the outage
    first = by_run[trials[0].user_attrs["mlflow_run_id"]]
    assert first.info.end_time / 1000 > outage["up"]
    parent = next(r for r in client.search_runs([first.info.experiment_id]) if r.data.tags.get("emtune.role") == "study")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials.complete"] == "2"
    assert "front" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_trial_stopped_by_the_time_budget_leaves_nothing_behind(write_spec, fresh_ray) -> None:
    path = write_spec(name="budget", num_trials=3, max_steps=5000)
    text = path.read_text().replace("  num_trials: 3\n", "  num_trials: 3\n  time_budget_s: 25\n")
    path.write_text(text.replace("resources: {max_concurrent_trials: 2}", "resources: {max_concurrent_trials: 1}"))
    assert main(["run", str(path), "--num-cpus", "2"]) == 1  # stopped before any trial finished: no front
    _assert_nothing_left_behind()  # the stopped trial's worker placement group was freed too
    study_dir = path.parent / "studies" / "budget"
    [trial] = _study(study_dir, "budget").get_trials()
    reason = "stopped: the study's time budget (search.time_budget_s = 25 s) ran out while this trial ran"
    assert trial.state == FAIL and trial.user_attrs["fail_reason"] == reason
    [run] = _children(study_dir, "budget")
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == reason


SERVED_SPEC = """evaluation:
  backend: server
  server: {{base_url: "{url}", max_retries: 2, backoff_base_s: 0.05, backoff_max_s: 0.1, timeout_s: 60}}
  max_new_tokens: 8
"""


def test_generation_server_outage_leaves_a_pending_evaluation_that_resume_finishes(write_spec, fresh_ray) -> None:
    """`evaluation.backend: server` on a real loopback server with the study's tiny model: the server
    starts failing (503) part-way through the trial's answers; the trial FAILs with the reason and a
    pending evaluation (its adapter tracked); once the server is back, `emtune resume` generates the
    missing answers from the saved plan and scores them, without training again."""
    import json

    import ray

    from emtune.config import load_spec
    from emtune.evaluation.lora_server import LoraServer
    from emtune.models import model_cache_dir, resolve_source

    path = write_spec(name="served", num_trials=1)
    text = path.read_text().replace("evaluation:\n  samples_per_question: 1\n  max_new_tokens: 6\n",
                                    SERVED_SPEC.format(url="SERVER_URL"))
    text = text.replace("  heldout_fraction: 0.2\n", "  heldout_fraction: 0.2\n"
                        "  opswap: {tiers: [1], n_train_per_tier: 8, n_test_per_tier: 6}\n")
    text = text.replace("  - {name: ood_drift, direction: minimize, reference: 5.0}\n",
                        "  - {name: opswap_exact_match, direction: maximize, reference: 0.0}\n")
    path.write_text(text.replace("SERVER_URL", "http://127.0.0.1:9/v1"))
    server = LoraServer(resolve_source(load_spec(path).model, model_cache_dir()))
    state = {"answered": 0, "refused": 0, "down_after": 10}
    original = server.complete

    def flaky(body):
        if state["answered"] >= state["down_after"]:
            state["refused"] += 1
            return 503, {"error": {"message": "server restarting", "type": "ServiceUnavailable", "code": 503}}
        state["answered"] += 1
        return original(body)

    server.complete = flaky
    server.start()
    path.write_text(text.replace("SERVER_URL", server.url))
    study_dir = path.parent / "studies" / "served"
    try:
        assert main(["run", str(path), "--num-cpus", "2"]) == 1  # its only trial failed: no front yet
        ray.shutdown()
        [failed] = _study(study_dir, "served").get_trials()
        assert failed.state == FAIL and failed.user_attrs["evaluation_pending"] is True
        reason = failed.user_attrs["fail_reason"]
        assert reason.startswith("evaluation failed: generation server unavailable") and "emtune resume" in reason
        assert state["answered"] == 10 and state["refused"] >= 1 and server.adapters == {}
        checkpoint = Path(failed.user_attrs["checkpoint_path"])
        assert (checkpoint / "generation_plan.json").is_file() and not list(checkpoint.glob("samples_*.jsonl"))
        [run] = _children(study_dir, "served")
        assert run.info.status == "FAILED" and run.data.tags["evaluation_pending"] == "true"

        state["down_after"] = 10**9  # the server is back
        assert main(["resume", str(study_dir), "--num-cpus", "2"]) == 0
        ray.shutdown()
    finally:
        server.stop()
    trials = _study(study_dir, "served").get_trials()
    assert [t.state for t in trials] == [FAIL, COMPLETE]
    redone = trials[1]
    assert redone.user_attrs["reevaluates"] == failed.number
    rows = [json.loads(line) for line in (checkpoint / "samples_opswap.jsonl").read_text().splitlines()]
    from emtune.data.opswap import extract_integer

    expected = sum(extract_integer(r["answer"]) == int(r["reference"]["answer"]) for r in rows) / len(rows)
    assert len(rows) == 6 and redone.values[0] == pytest.approx(expected)
    assert len((checkpoint / "samples_general.jsonl").read_text().splitlines()) == 24
    assert server.adapters == {} and not list((study_dir / "pending_evaluations").glob("*.json"))
    [run] = _children(study_dir, "served")
    assert run.info.status == "FINISHED" and "samples/general.json" in {
        a.path for a in MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}").list_artifacts(run.info.run_id, "samples")}
