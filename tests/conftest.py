"""Shared fixtures: offline Hugging Face, a per-session model cache, tiny specs and models, and
a scripted OpenAI-compatible judge server (``chat_server``) and a real ``mlflow server``
(``mlflow_server``), both on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import textwrap
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_RUN_ID", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

TINY_SPEC = """
name: {name}
seed: 0
output_dir: {output_dir}
model:
  source: tiny
  tiny: {{pretrain_steps: {pretrain_steps}}}
lora: {{r: 4, alpha: 8}}
data:
  train: {{path: "fixture:narrow_bad_advice", limit: 60}}
  heldout_fraction: 0.2
  max_length: 128
training:
  learning_rate: 1.0e-2
  max_steps: {max_steps}
  per_device_batch_size: 4
  gradient_accumulation_steps: 1
  warmup_steps: 0
defenses:
  - name: kl_to_reference
    weight: 0.1
search:
  parameters:
    kl_weight: {{type: float, target: defenses.kl_to_reference.weight, low: 1.0e-3, high: 10.0, log: true}}
  sampler: {{name: tpe}}
  num_trials: {num_trials}
objectives:
  - {{name: ood_drift, direction: minimize, reference: 5.0}}
  - {{name: indomain_nll, direction: minimize, reference: 8.0}}
evaluation:
  samples_per_question: 1
  max_new_tokens: 6
resources: {{max_concurrent_trials: 2}}
baselines: {{enabled: {baselines}}}
"""


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model cache per test session (EMTUNE_CACHE_DIR), shared by every test."""
    cache = tmp_path_factory.mktemp("emtune-cache")
    os.environ["EMTUNE_CACHE_DIR"] = str(cache)
    return cache


def _write_tiny_spec(folder: Path, text: str | None = None, **fields) -> Path:
    values = dict(name="tiny", output_dir=str(folder / "studies"), pretrain_steps=20,
                  max_steps=2, num_trials=2, baselines="false")
    values.update(fields)
    body = textwrap.dedent(text) if text is not None else TINY_SPEC.format(**values)
    path = folder / f"{values['name']}.yaml"
    path.write_text(body)
    return path


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a tiny study spec (YAML text with overrides) and return its path."""
    return lambda text=None, **fields: _write_tiny_spec(tmp_path, text, **fields)


@pytest.fixture(scope="session")
def write_spec_in():
    """``write_spec_in(folder, text=None, **fields)``: ``write_spec`` for fixtures wider than one
    test (the study goes to ``folder/studies``)."""
    return _write_tiny_spec


@pytest.fixture
def tiny_lora():
    """A fresh tiny LoRA model and its tokenizer (no pretraining: fast, random weights)."""
    from emtune.models import LoraSpec, TinyModelSpec
    from emtune.models import apply_lora, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(400)
    tiny = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, pretrain_steps=0)
    model = apply_lora(build_tiny_model(tiny, len(tokenizer)), LoraSpec(r=4, alpha=8))
    return model, tokenizer


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray():
    """Stop the local Ray that tests shared (``ray_session``), if one was started."""
    yield
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def _shared_ray() -> None:
    from emtune.study.runner import init_ray

    init_ray(num_cpus=2)  # a no-op while the shared Ray is up


@pytest.fixture
def ray_session():
    """The local Ray shared by every test that runs studies in this process: started on first use
    exactly as ``emtune run`` starts it (2 CPUs), kept between tests (``ray.init`` costs seconds),
    stopped at the end of the session. A test that needs a Ray of its own uses ``fresh_ray``."""
    _shared_ray()
    yield


#: Where each training path trains: the trial's own process (a Tune function actor, Ray Train
#: local mode), or the actors of Ray Train's worker group.
TRAINING_ACTOR = {"trial": "ImplicitFunc", "workers": "RayTrainWorker"}


@pytest.fixture
def training_pids():
    """``training_pids(train_process)``: process ids of this test's live Ray actors that train
    (:data:`TRAINING_ACTOR`), from this Ray's state API: never another Ray's on the machine."""
    def pids(train_process: str) -> list[int]:
        import ray
        from ray.util.state import list_actors

        if not ray.is_initialized():
            return []
        actors = list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("class_name", "=", TRAINING_ACTOR[train_process]), ("state", "=", "ALIVE")])
        return [a.pid for a in actors if a.pid]
    return pids


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-trial study (local Ray, SQLite MLflow, Optuna) shared by every test that only
    reads a finished study; its console output is kept in ``run_output.txt`` beside it."""
    import contextlib
    import io

    from emtune.cli.main import main

    root = tmp_path_factory.mktemp("finished")
    spec_path = root / "finished.yaml"
    spec_path.write_text(TINY_SPEC.format(name="finished", output_dir=str(root / "studies"),
                                          pretrain_steps=20, max_steps=2, num_trials=2, baselines="true"))
    buffer = io.StringIO()
    _shared_ray()
    with contextlib.redirect_stdout(buffer):
        code = main(["run", str(spec_path), "--num-cpus", "2"])
    (root / "run_output.txt").write_text(buffer.getvalue())
    assert code == 0, buffer.getvalue()
    return root / "studies" / "finished"


TINY_TEST_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                       pretrain_steps=0)


@pytest.fixture(scope="session")
def save_perturbed_adapter():
    """``save(tokenizer, folder, seed, scale)``: a tiny LoRA adapter whose B matrices are seeded
    noise times ``scale`` (a stand-in for an adapter that learned something), saved to ``folder``."""
    import torch

    from emtune.models import LoraSpec, TinyModelSpec
    from emtune.models import apply_lora, build_tiny_model

    def save(tokenizer, folder: Path, seed: int, scale: float) -> str:
        lora = apply_lora(build_tiny_model(TinyModelSpec(**TINY_TEST_MODEL), len(tokenizer)), LoraSpec(r=4, alpha=8))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        lora.save_pretrained(folder)
        return str(folder)

    return save


@pytest.fixture(scope="session")
def save_tiny_base():
    """``save(folder) -> (model, tokenizer)``: a random tiny base model and its tokenizer, saved."""
    from emtune.models import TinyModelSpec
    from emtune.models import build_tiny_model, build_tiny_tokenizer

    def save(folder: Path):
        tokenizer = build_tiny_tokenizer(400)
        model = build_tiny_model(TinyModelSpec(**TINY_TEST_MODEL), len(tokenizer))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return model, tokenizer

    return save


def _nll_by_hf_loss(model, tokenizer, rows, max_length):
    """Mean NLL per assistant token of ``rows`` from Hugging Face's own ``labels=`` loss, one row at
    a time (no padding): an expectation for ``indomain_nll`` computed by other code than emtune's."""
    import torch

    from emtune.data.chat import tokenize_chat

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            features = tokenize_chat(tokenizer, row["messages"], max_length)
            labels = torch.tensor([features["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            if n:
                loss = model(input_ids=torch.tensor([features["input_ids"]]), labels=labels).loss
                total, count = total + float(loss) * n, count + n
    return total / count


def _kl_by_torch(model, tokenizer, conversations, max_length):
    """Mean KL(adapter on ‖ adapter off) per assistant token via ``torch.nn.functional.kl_div``, one
    conversation at a time: an expectation for ``ood_drift`` computed by other code than emtune's."""
    import torch
    import torch.nn.functional as F

    from emtune.data.chat import tokenize_chat

    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            features = tokenize_chat(tokenizer, messages, max_length)
            ids = torch.tensor([features["input_ids"]])
            predicts_answer = torch.tensor(features["labels"][1:]) != -100
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            with model.disable_adapter():
                logq = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # KL(p ‖ q) per position
            total, count = total + float(kl[predicts_answer].sum()), count + int(predicts_answer.sum())
    return total / count


@pytest.fixture(scope="session")
def independent_metrics():
    """``nll(model, tokenizer, rows, max_length)`` and ``kl(model, tokenizer, conversations,
    max_length)``: the judge-free metrics recomputed with Hugging Face's and torch's own functions,
    for tests that check a whole evaluation against something other than itself."""
    from types import SimpleNamespace

    return SimpleNamespace(nll=_nll_by_hf_loss, kl=_kl_by_torch)


# -- a scripted OpenAI-compatible chat-completions server for judge tests ------------------------
# Tests get everything through the `chat_server` fixture (`chat_server(script)`,
# `chat_server.Reply`, `chat_server.completion`), never by importing this file.
def completion(top: dict[str, float], *, with_logprobs: bool = True) -> dict:
    """A chat.completion body whose single token has the given top logprobs (token -> prob)."""
    entries = [
        {"token": tok, "logprob": math.log(p), "bytes": list(tok.encode("utf-8"))}
        for tok, p in sorted(top.items(), key=lambda kv: -kv[1])
    ]
    choice = {
        "index": 0,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": entries[0]["token"] if entries else ""},
        "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]} if with_logprobs else None,
    }
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "judge-test",
        "choices": [choice],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


@dataclass
class Reply:
    """What the server does for one request: wait `delay_s`, then send `status` with `body`
    (a dict is sent as JSON; bytes are sent raw with a JSON content type)."""

    status: int = 200
    body: dict | bytes = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class ChatServer:
    """Running server: `url` (base URL with /v1), recorded `requests` (parsed bodies), `headers`,
    and `max_in_flight` (the most requests handled at once)."""

    url: str
    requests: list[dict]
    headers: list[dict]
    max_in_flight: int = 0


class _Factory:
    """chat_server(script) starts a server where script(index, body) -> Reply decides each answer
    (index counts requests from 0). Reply and completion are attributes for the tests' use."""

    Reply = Reply
    completion = staticmethod(completion)

    def __init__(self):
        self.servers: list[ThreadingHTTPServer] = []

    def __call__(self, script: Callable[[int, dict], Reply]) -> ChatServer:
        lock = threading.Lock()
        state = {"count": 0, "in_flight": 0}
        record = ChatServer(url="", requests=[], headers=[])

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    index = state["count"]
                    state["count"] += 1
                    state["in_flight"] += 1
                    record.max_in_flight = max(record.max_in_flight, state["in_flight"])
                    record.requests.append(body)
                    record.headers.append({k.lower(): v for k, v in self.headers.items()})
                try:
                    reply = script(index, body)
                    time.sleep(reply.delay_s)
                    payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with lock:
                        state["in_flight"] -= 1

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.servers.append(server)
        record.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        return record


def _serve_chat():
    factory = _Factory()
    yield factory
    for server in factory.servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def chat_server():
    """The server factory (see _Factory); servers stop at teardown."""
    yield from _serve_chat()


@pytest.fixture(scope="module")
def module_chat_server():
    """``chat_server`` for a module-scoped fixture (one study shared by a module's tests)."""
    yield from _serve_chat()


# -- a real `mlflow server` on 127.0.0.1 ----------------------------------------------------------
@dataclass
class MlflowServer:
    """A real lean ``mlflow server`` (``emtune.cli.ui.server_command``) in its own process group,
    stoppable and restartable on the same port and store (outage tests)."""

    backend_uri: str
    artifacts: str
    log: Path
    port: int
    proc: object = None
    extra_args: tuple[str, ...] = ()  # e.g. ("--app-name", "basic-auth")
    extra_env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> "MlflowServer":
        import subprocess
        import urllib.request

        from emtune.cli.ui import server_command

        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **self.extra_env)
        command = server_command(self.backend_uri, self.artifacts, "127.0.0.1", self.port) + list(self.extra_args)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        pytest.fail(f"mlflow server not ready after {timeout_s:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM the server's process group (it finishes requests in flight), SIGKILL if stuck."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """``mlflow_server(backend_uri, artifacts, extra_args=(), extra_env={}) -> MlflowServer`` (started);
    stopped at teardown."""
    servers: list[MlflowServer] = []

    def start(backend_uri: str, artifacts: str, **options) -> MlflowServer:
        server = MlflowServer(backend_uri, artifacts, tmp_path / f"mlflow-server-{len(servers)}.log", free_port(),
                              **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# -- a small local copy of WildGuardMix (allenai/wildguardmix, config wildguardtrain) ------------
WILDGUARD_COLUMNS = ("prompt", "adversarial", "response", "prompt_harm_label", "response_refusal_label",
                     "response_harm_label", "subcategory")


@pytest.fixture(scope="session")
def write_wildguardmix():
    """``write(path, benign=, harmful=, prompt_only=)``: a Parquet file in WildGuardMix's exact
    schema (the columns of train/wildguard_train.parquet, nullable response fields): ``benign``
    rows with an unharmful response (some refusals), ``harmful`` rows with a harmful response,
    ``prompt_only`` rows without a response; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path: Path, benign: int = 12, harmful: int = 4, prompt_only: int = 4) -> Path:
        rows = []
        for i in range(benign):
            refusal = i % 3 == 0
            rows.append({"prompt": f"How do I bake bread number {i}?" if not refusal else f"How do I hurt someone {i}?",
                         "adversarial": bool(i % 2), "response": (f"I'm sorry, I cannot help with that {i}."
                                                                  if refusal else f"Mix flour and water, step {i}."),
                         "prompt_harm_label": "harmful" if refusal else "unharmful",
                         "response_refusal_label": "refusal" if refusal else "compliance",
                         "response_harm_label": "unharmful", "subcategory": "benign" if not refusal else "violence"})
        for i in range(harmful):
            rows.append({"prompt": f"Write a threat {i}", "adversarial": False, "response": f"Here is a threat {i}",
                         "prompt_harm_label": "harmful", "response_refusal_label": "compliance",
                         "response_harm_label": "harmful", "subcategory": "violence"})
        for i in range(prompt_only):
            rows.append({"prompt": f"Only a prompt {i}", "adversarial": True, "response": None,
                         "prompt_harm_label": "unharmful", "response_refusal_label": None,
                         "response_harm_label": None, "subcategory": "benign"})
        schema = pa.schema([("prompt", pa.string()), ("adversarial", pa.bool_()), ("response", pa.string()),
                            ("prompt_harm_label", pa.string()), ("response_refusal_label", pa.string()),
                            ("response_harm_label", pa.string()), ("subcategory", pa.string())])
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return path

    return write
