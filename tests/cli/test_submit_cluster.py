"""`emtune submit` against a real two-node Ray cluster on this machine (token auth, loopback only).

The cluster is two `ray start --block` processes (head + worker) in their own sessions, started
as cluster/README.md says for one machine: token authentication on, the dashboard on 127.0.0.1.
The emtune client gets only ``RAY_AUTH_TOKEN`` (no ``RAY_AUTH_MODE``, no token file): it sends
the token itself. A client without the token, and one with a wrong token, are refused. Teardown
stops only those processes, their children, and any process carrying this cluster's token (the
job driver runs in a session of its own), never other Ray instances on the machine (`ray stop`
would).
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
import urllib.error
import urllib.request
from dataclasses import dataclass
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


@dataclass
class Cluster:
    dashboard: str
    token: str
    client_env: dict[str, str]  # RAY_AUTH_TOKEN only: the emtune client sends it itself
    home: Path  # the clients' HOME: no ~/.ray/auth_token to fall back on


@pytest.fixture
def ray_cluster(tmp_path):
    """A head (2 CPUs) and a worker node (1 CPU) on 127.0.0.1 with token authentication."""
    token = secrets.token_hex(32)
    # Short folder: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="emrt", dir="/tmp")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # An earlier in-process local study leaves Ray's single-machine switch set; a worker node
    # refuses to start under it (cluster/README.md, section 7).
    dropped = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k not in dropped}
    # Token authentication guards every port. A multi-node cluster cannot stay on loopback: Ray maps
    # a worker's 127.0.0.1 to the machine's address (cluster/README.md, section 7); the dashboard
    # and Jobs API bind 127.0.0.1.
    env = {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    home = tmp_path / "client-home"
    home.mkdir()
    client_env = {**clean, "RAY_AUTH_TOKEN": token, "HOME": str(home), "PATH": path}
    ray = str(Path(sys.executable).parent / "ray")
    gcs, dash = _free_port(), _free_port()
    common = ["--block", "--disable-usage-stats", "--object-store-memory", str(200 * 2**20)]
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
        yield Cluster(dashboard, token, client_env, home)
    finally:
        _stop(procs, token)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_runs_study_on_two_node_cluster(ray_cluster, write_spec, tmp_path) -> None:
    dashboard, env = ray_cluster.dashboard, ray_cluster.client_env
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

    # Without the token, and with a wrong one, the cluster refuses the client: exit 2, what to set.
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = _cli(["status", job_id, "--address", dashboard], anonymous, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{dashboard} refused the request" in refused.stderr and "set RAY_AUTH_TOKEN" in refused.stderr
    assert job_id not in refused.stdout
    wrong = _cli(["logs", job_id, "--address", dashboard], {**env, "RAY_AUTH_TOKEN": "0" * 64}, timeout=60)
    assert wrong.returncode == 2 and "rejected the token" in wrong.stderr, wrong.stdout + wrong.stderr
    with pytest.raises(urllib.error.HTTPError) as denied:  # the HTTP API itself, without a token
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=5)
    assert denied.value.code == 401
    assert not list(ray_cluster.home.rglob("*"))  # the clients wrote no token file anywhere

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
