"""A small OpenAI-compatible generation server with runtime LoRA loading, on transformers.

It speaks the part of vLLM's HTTP API that ``evaluation.backend: server`` uses, with vLLM's
status codes and bodies: ``GET /v1/models``, ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter`` (``{"lora_name", "lora_path"}``; 400 when the name is taken, 404 when
the path or name is unknown), and ``POST /v1/completions`` with ``model`` = the base model's
name or a loaded adapter's, ``prompt`` as token ids or text, ``max_tokens``, ``temperature``,
``top_p``, ``seed`` and ``stop_token_ids``. An API key, when given, is required as the bearer token.

Generation is real: the base model is loaded once; each adapter is loaded with peft and merged
into a copy of the adapted weights (:mod:`emtune.evaluation.merging`), and requests are decoded by
the built-in engine (:mod:`emtune.evaluation.decoding`) with the request's seed, so a sample's
answer is the one the built-in path gives for the same seed. Concurrent requests for the same
adapter and settings are batched: a scheduler thread takes everything waiting and decodes it
together, as a serving engine does. Each adapter has its own merged copy, so requests of
concurrent trials never see each other's weights.

For tests, benchmarks and machines without vLLM; it binds 127.0.0.1 by default. Run it with
``python -m emtune.evaluation.lora_server MODEL_DIR --port 8000``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from emtune.evaluation.decoding import DecodeLoop, Job
from emtune.evaluation.merging import merged_copy, shared_copy


class _ListeningServer(ThreadingHTTPServer):
    """The HTTP server with a connection backlog for a study's concurrent clients: the standard
    library's default of 5 resets connections when a trial's generation client opens 32 at once."""

    request_queue_size = 256
    daemon_threads = True


class LoraServer:
    """The server (see module docs): ``start()``, ``url`` (ending in /v1), ``stop()``; ``adapters``
    maps loaded names to their paths; ``requests`` counts completion requests."""

    def __init__(self, model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, served_name: str | None = None, max_rows: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = str(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.served_name = served_name or self.model_dir
        self.host, self.port, self.max_rows = host, port, max_rows
        self._key = api_key
        self.adapters: dict[str, str] = {}
        self._models: dict[str, Any] = {self.served_name: self.base}
        self._lock = threading.Lock()
        self._queue: list[tuple[str, dict[str, Any], Future]] = []
        self._wake = threading.Condition()
        self._http: ThreadingHTTPServer | None = None
        self.requests = 0
        self._ids = itertools.count()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "LoraServer":
        """Listen (again, on the same port after a ``stop``) and serve in background threads."""
        self._http = _ListeningServer((self.host, self.port), _handler(self))
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        threading.Thread(target=self._schedule, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening (loaded adapters are kept, as a paused server keeps them)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        with self._wake:
            self._wake.notify_all()

    # -- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> tuple[int, Any]:
        from peft import PeftModel

        if not name or not path:
            return 400, _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        with self._lock:
            if name in self._models:
                return 400, _error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
        if not (Path(path) / "adapter_config.json").is_file():
            return 404, _error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        merged = merged_copy(PeftModel.from_pretrained(shared_copy(self.base), path))
        with self._lock:
            self._models[name], self.adapters[name] = merged, path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, name: str) -> tuple[int, Any]:
        with self._lock:
            if name not in self.adapters:
                return 404, _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del self._models[name], self.adapters[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def models(self) -> dict[str, Any]:
        with self._lock:
            cards = [{"id": self.served_name, "object": "model", "root": self.model_dir, "parent": None}]
            cards += [{"id": n, "object": "model", "root": p, "parent": self.served_name} for n, p in self.adapters.items()]
        return {"object": "list", "data": cards}

    # -- completions ------------------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("model") or self.served_name
        with self._lock:
            known = name in self._models
            self.requests += 1
        if not known:
            return 404, _error(f"The model `{name}` does not exist.", "NotFoundError", 404)
        future: Future = Future()
        with self._wake:
            self._queue.append((name, body, future))
            self._wake.notify()
        return 200, future.result()

    def _schedule(self) -> None:
        """Decode waiting requests in groups of the same adapter and settings."""
        http = self._http
        while self._http is http:
            with self._wake:
                while not self._queue and self._http is http:
                    self._wake.wait(0.5)
            time.sleep(0.005)  # let requests sent together arrive together
            with self._wake:
                head = self._queue[0] if self._queue else None
                if head is None:
                    continue
                group = [r for r in self._queue if _group_key(r) == _group_key(head)]
                self._queue = [r for r in self._queue if _group_key(r) != _group_key(head)]
            try:
                self._decode(group)
            except Exception as exc:  # noqa: BLE001 - answer every waiting request
                for *_, future in group:
                    future.set_exception(exc)

    def _decode(self, group: list[tuple[str, dict[str, Any], Future]]) -> None:
        name, body, _ = group[0]
        with self._lock:
            model = self._models.get(name)
        prompts = [self._prompt_ids(b["prompt"]) for _, b, _ in group]
        stops = set(body.get("stop_token_ids") or []) | {self.tokenizer.eos_token_id}
        jobs = [Job(p, int(b.get("seed") or 0)) for p, (_, b, _) in zip(prompts, group)]
        made: dict[int, tuple[list[int], str]] = {}
        DecodeLoop(model, jobs, max_new_tokens=int(body.get("max_tokens") or 16),
                   temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                   stop_ids=stops, pad_id=self.tokenizer.pad_token_id, rows=self.max_rows,
                   on_finish=lambda i, tokens, reason: made.__setitem__(i, (list(tokens), reason))).run()
        for i, (_, b, future) in enumerate(group):
            tokens, reason = made[i]
            text = self.tokenizer.decode(tokens, skip_special_tokens=b.get("skip_special_tokens", True))
            future.set_result({
                "id": f"cmpl-{next(self._ids)}", "object": "text_completion", "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}],
                "usage": {"prompt_tokens": len(prompts[i]), "completion_tokens": len(tokens),
                          "total_tokens": len(prompts[i]) + len(tokens)},
            })

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(t) for t in prompt]


def _group_key(request: tuple[str, dict[str, Any], Future]) -> tuple:
    name, body, _ = request
    return (name, body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("max_tokens"),
            tuple(body.get("stop_token_ids") or ()))


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _handler(server: LoraServer) -> type[BaseHTTPRequestHandler]:
    routes = {"/v1/load_lora_adapter": lambda b: server.load_adapter(b.get("lora_name", ""), b.get("lora_path", "")),
              "/v1/unload_lora_adapter": lambda b: server.unload_adapter(b.get("lora_name", "")),
              "/v1/completions": lambda b: server.complete(b)}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server naming)
            if self._authorized():
                self._send(*((200, server.models()) if self.path == "/v1/models" else (404, _error("Not Found", "NotFoundError", 404))))

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized():
                return
            route = routes.get(self.path)
            try:
                self._send(*(route(body) if route else (404, _error("Not Found", "NotFoundError", 404))))
            except Exception as exc:  # noqa: BLE001 - a server error, as vLLM reports one
                self._send(500, _error(f"{type(exc).__name__}: {exc}", "InternalServerError", 500))

        def _authorized(self) -> bool:
            if server._key is None or self.headers.get("Authorization") == f"Bearer {server._key}":
                return True
            self._send(401, {"error": "Unauthorized"})
            return False

        def _send(self, status: int, payload: Any) -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    """Serve a local model folder until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None, help="name of the variable holding the required key")
    args = parser.parse_args(argv)
    import os

    server = LoraServer(args.model_dir, host=args.host, port=args.port,
                        api_key=os.environ.get(args.api_key_env) if args.api_key_env else None).start()
    print(f"serving {args.model_dir} at {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
