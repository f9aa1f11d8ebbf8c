"""`emtune submit` against a real two-node Ray cluster on this machine (token auth, loopback only).

The cluster is two `ray start --block` processes (head + worker) in their own sessions; teardown
stops only those, their children, and any process carrying this cluster's token (the job driver
runs in a session of its own), never other Ray instances on the machine (`ray stop` would).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

# The verbs through their own add_parser: independent of their registration in emtune.cli.main.
CLI = """
import argparse, sys
from emtune.cli import jobs, submit
parser = argparse.ArgumentParser(prog="emtune")
sub = parser.add_subparsers(dest="verb", required=True)
submit.add_parser(sub)
jobs.add_parser(sub)
args = parser.parse_args(sys.argv[1:])
sys.exit(int(args.func(args) or 0))
"""


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where Ray's own random ports land."""
    while True:
        port = random.randrange(20000, 32000)
        if port in _TAKEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port


def _alive_nodes(dashboard: str, token: str) -> int:
    request = urllib.request.Request(f"{dashboard}/api/v0/nodes",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.loads(response.read())
    return sum(1 for node in body["data"]["result"]["result"] if node["state"] == "ALIVE")


def _stop(procs: list[subprocess.Popen], token: str) -> None:
    """SIGTERM our process groups, SIGKILL what is left, then any process holding our token."""
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 8
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    marker = f"RAY_AUTH_TOKEN={token}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture
def ray_cluster():
    """A head (2 CPUs) and a worker node (1 CPU) on 127.0.0.1: (dashboard URL, client env)."""
    token = secrets.token_hex(32)
    # Short folder: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="emrt", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    gcs, dash = _free_port(), _free_port()
    # Ray binds its GCS and raylets on every interface whatever the flags (token auth guards
    # them); the dashboard and Jobs API bind loopback.
    common = ["--block", "--disable-usage-stats",
              "--object-store-memory", str(200 * 2**20)]
    head_cmd = [ray, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dash), "--include-dashboard=true", "--num-cpus", "2",
                "--temp-dir", temp_dir, "--ray-client-server-port", str(_free_port())]
    # The worker's own temp dir: two nodes sharing one session folder share `runtime_resources`,
    # and one node's runtime-env cleanup then deletes the job's working_dir under the other.
    worker_cmd = [ray, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                  "--temp-dir", os.path.join(temp_dir, "w")]
    procs: list[subprocess.Popen] = []
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        for cmd, name in ((head_cmd, "head"), (worker_cmd, "worker")):
            cmd = cmd + common + ["--dashboard-agent-listen-port", str(_free_port()),
                                  "--metrics-export-port", str(_free_port())]
            log = open(Path(temp_dir) / f"{name}.log", "wb")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            if name == "head":
                time.sleep(5)  # the worker must find a running GCS
        deadline = time.monotonic() + 120
        while True:
            try:
                if _alive_nodes(dashboard, token) == 2:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "".join((Path(temp_dir) / f"{n}.log").read_text()[-2000:] for n in ("head", "worker"))
                pytest.fail(f"the local Ray cluster did not come up:\n{logs}")
            time.sleep(1)
        yield dashboard, env
    finally:
        _stop(procs, token)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_runs_study_on_two_node_cluster(ray_cluster, write_spec, tmp_path) -> None:
    dashboard, env = ray_cluster
    spec_path = write_spec(name="clustered", num_trials=1, max_steps=2)
    job_cache = tmp_path / "job-cache"
    started = time.monotonic()
    proc = _cli(["submit", str(spec_path), "--address", dashboard, "--wait",
                 "--env", f"EMTUNE_CACHE_DIR={job_cache}"], env, timeout=380)
    elapsed = time.monotonic() - started
    print(f"submit --wait took {elapsed:.0f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"as job (\S+)", proc.stdout).group(1)
    assert job_id.startswith("emtune-clustered-")
    assert f"job {job_id}: SUCCEEDED" in proc.stdout
    # The job's env_vars reached the driver: it materialised the tiny model in that cache.
    assert any(job_cache.iterdir())

    status = _cli(["status", job_id, "--address", dashboard], env, timeout=60)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    logs = _cli(["logs", job_id, "--address", dashboard], env, timeout=60)
    assert logs.returncode == 0 and re.search(r"\[emtune \d+:\d\d\] trial", logs.stdout)
    unknown = _cli(["status", "no-such-job", "--address", dashboard], env, timeout=60)
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr

    study_dir = spec_path.parent / "studies" / "clustered"
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emtune/clustered")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("emtune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("emtune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 1
    assert parents[0].info.status == "FINISHED" and children[0].info.status == "FINISHED"
    assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert {"ood_drift", "indomain_nll"} <= set(children[0].data.metrics)
