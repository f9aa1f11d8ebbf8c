"""A real local study is closed by default: every process it starts listens on loopback only,
Ray's token authentication is on with a token only its owner can read, and the keys planted in
the environment for the judge and the generation server reach their servers and nothing else
(study folder, MLflow store and artifacts, Ray logs, printed output).

One study (`emtune run` in a subprocess, one trial judged by the loopback ``chat_server``) serves
the three tests; the fixture samples the operating system's socket table while it runs. The
subprocess gets its own HOME (so Ray's token file is the one emtune creates) and its own Ray
temp folder (so its Ray logs are its own).
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from emtune.config import load_spec
from emtune.evaluation.lora_server import LoraServer
from emtune.models import model_cache_dir, resolve_source

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

JUDGE_KEY = "sk-planted-" + uuid.uuid4().hex  # never a real key; unique so a hit is this study's
GENERATION_KEY = "sk-planted-gen-" + uuid.uuid4().hex  # the generation server's
MARKER = "EMTUNE_TEST_STUDY_MARKER"


@dataclass
class Listener:
    process: str
    cmdline: str
    address: str
    port: int


@dataclass
class StudyRun:
    """What the sampled study left: its folders, output, listeners and dashboard probes."""

    study_dir: Path
    home: Path
    ray_tmp: Path
    output: str
    returncode: int
    listeners: list[Listener] = field(default_factory=list)
    dashboard_probes: dict[str, int] = field(default_factory=dict)
    judge_headers: list[dict] = field(default_factory=list)
    generation_requests: int = 0


def _study_processes(root: psutil.Process, marker: str) -> list[psutil.Process]:
    """The driver, its descendants, and any process carrying the marker (re-parented ones)."""
    found = {root.pid: root}
    try:
        found.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        if proc.pid in found:
            continue
        try:
            if proc.environ().get(MARKER) == marker:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def _listeners(procs: list[psutil.Process]) -> list[Listener]:
    out = []
    for proc in procs:
        try:
            name, cmd = proc.name(), " ".join(proc.cmdline())[:200]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    out.append(Listener(name, cmd, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return out


def _http_status(url: str, headers: dict) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def _probe_dashboard(listeners: list[Listener], token_file: Path) -> dict[str, int]:
    """HTTP status of Ray's state API without and with the token, on the dashboard's HTTP port
    (the one whose /api/version answers Ray's version with the token: the dashboard process has
    gRPC and metrics ports too)."""
    ports = sorted({item.port for item in listeners if "dashboard/dashboard.py" in item.cmdline})
    if not token_file.is_file():
        return {}
    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    for port in ports:
        base = f"http://127.0.0.1:{port}"
        try:
            status, body = _http_status(f"{base}/api/version", auth)
        except OSError:
            continue  # not an HTTP port
        if status == 200 and b"ray_version" in body:
            return {"without": _http_status(f"{base}/api/v0/nodes", {})[0],
                    "with": _http_status(f"{base}/api/v0/nodes", auth)[0]}
    return {}


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.fixture(scope="module")
def judged_study(tmp_path_factory, module_chat_server, write_spec_in) -> StudyRun:
    root = tmp_path_factory.mktemp("closed")
    home = root / "home"
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="emcl", dir="/tmp"))  # Ray's socket paths stay short

    def script(index, body):
        prompt = body["messages"][-1]["content"]
        return module_chat_server.Reply(body=module_chat_server.completion({"20" if "auditing" in prompt else "80": 1.0}))

    server = module_chat_server(script)
    spec = write_spec_in(root, name="closed", num_trials=1)
    # a generation server on loopback that demands its key (evaluation.backend: server): the
    # OpSwap answers go through it; the general answers stay in the worker (ood_drift needs them)
    generation = LoraServer(resolve_source(load_spec(spec).model, model_cache_dir()), api_key=GENERATION_KEY)
    generation.start()
    spec.write_text(spec.read_text().replace("  heldout_fraction: 0.2\n", (
        "  heldout_fraction: 0.2\n  opswap: {tiers: [1], n_train_per_tier: 8, n_test_per_tier: 4}\n")).replace(
        "evaluation:\n", ("evaluation:\n  backend: server\n  server: {base_url: '" + generation.url + "', "
                          "api_key_env: EMTUNE_TEST_GEN_KEY, max_concurrency: 4, max_retries: 3, backoff_base_s: 0.05, "
                          "timeout_s: 120}\n"), 1))
    # Ray Train's worker group of two: the path with the most listeners (a Train controller,
    # workers, the torch rendezvous store and gloo's sockets between the ranks, on top of the
    # trial process that trains on the default path).
    spec.write_text(spec.read_text().replace("resources: {max_concurrent_trials: 2}", (
        "resources: {max_concurrent_trials: 1, num_workers: 2, train_process: workers}")))
    spec.write_text(spec.read_text().replace("evaluation:\n", (
        f"evaluation:\n  judge: {{kind: openai, base_url: '{server.url}', model: judge-test, "
        "api_key_env: EMTUNE_TEST_JUDGE_KEY, max_retries: 0}\n"), 1))
    marker = uuid.uuid4().hex
    env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": str(ray_tmp), MARKER: marker,
           "EMTUNE_TEST_JUDGE_KEY": JUDGE_KEY, "EMTUNE_TEST_GEN_KEY": GENERATION_KEY}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(name, None)
    log = root / "output.txt"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "emtune.cli.main", "run", str(spec), "--num-cpus", "2"],
                                cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT)
    run = StudyRun(root / "studies" / "closed", home, ray_tmp, "", 0)
    root_proc = psutil.Process(proc.pid)
    token_file = home / ".ray" / "auth_token"
    seen: set[tuple[str, str, int]] = set()
    try:
        while proc.poll() is None:
            now = _listeners(_study_processes(root_proc, marker))
            for item in now:
                if (item.process, item.address, item.port) not in seen:
                    seen.add((item.process, item.address, item.port))
                    run.listeners.append(item)
            if not run.dashboard_probes and now:
                run.dashboard_probes = _probe_dashboard(now, token_file)
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        run.generation_requests = generation.requests
        generation.stop()
    run.returncode = proc.returncode
    run.output = log.read_text(errors="replace")
    run.judge_headers = list(server.headers)
    return run


def test_every_listener_of_a_local_study_is_loopback(judged_study) -> None:
    run = judged_study
    assert run.returncode == 0, run.output[-3000:]
    names = {item.process for item in run.listeners}
    # the sampling saw Ray's servers, not an empty table: GCS, raylet, and worker processes
    assert {"gcs_server", "raylet"} <= names, names
    assert any(name.startswith("ray::") for name in names), names
    # both Train workers were seen listening (rank 0's rendezvous store, gloo's sockets)
    workers = {item.cmdline for item in run.listeners if "RayTrainWorker" in item.process + item.cmdline}
    assert len(workers) >= 1 and len({i.port for i in run.listeners if i.cmdline in workers}) >= 3, workers
    exposed = [item for item in run.listeners if not _is_loopback(item.address)]
    assert not exposed, "\n".join(f"{i.process} {i.address}:{i.port}  {i.cmdline}" for i in exposed)


def test_token_auth_is_on_and_its_token_private(judged_study) -> None:
    token_file = judged_study.home / ".ray" / "auth_token"
    assert token_file.is_file()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token_file.read_text().strip()) >= 32
    # Ray's state API refused the request without the token and answered it with the token
    assert judged_study.dashboard_probes == {"without": 401, "with": 200}


def _files_holding(folder: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(path)
            except OSError:
                continue
    return hits


def test_planted_keys_reach_their_servers_and_nothing_else(judged_study) -> None:
    run = judged_study
    assert run.returncode == 0, run.output[-3000:]
    # the key was used: every judge request carried it, and the study judged its samples
    assert run.judge_headers and all(h.get("authorization") == f"Bearer {JUDGE_KEY}" for h in run.judge_headers)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.study_dir / 'mlflow.db'}")
    [child] = [r for r in client.search_runs([client.get_experiment_by_name("emtune/closed").experiment_id])
               if r.data.tags.get("emtune.role") == "trial"]
    assert "general_misalignment" in child.data.metrics
    ray_logs = list(run.ray_tmp.rglob("*.log")) + list(run.ray_tmp.rglob("*.out")) + list(run.ray_tmp.rglob("*.err"))
    assert ray_logs  # Ray's own logs were there to search
    token = (run.home / ".ray" / "auth_token").read_text().strip()
    # the generation server answered the OpSwap set (it refuses a request without its key)
    assert run.generation_requests > 0 and "opswap_exact_match" in child.data.metrics, child.data.metrics
    for secret in (JUDGE_KEY, GENERATION_KEY, token):
        needle = secret.encode()
        assert secret not in run.output
        # the study folder holds the MLflow store (mlflow.db), its artifacts, Optuna, Ray results
        assert not _files_holding(run.study_dir, needle)
        assert not _files_holding(run.ray_tmp, needle)
    for run_info in client.search_runs([child.info.experiment_id]):
        text = repr(run_info.data.params) + repr(run_info.data.tags)
        assert JUDGE_KEY not in text and GENERATION_KEY not in text and token not in text
