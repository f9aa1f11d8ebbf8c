"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for judge tests.

Tests get everything through the `chat_server` fixture (`chat_server(script)`, `chat_server.Reply`,
`chat_server.completion`), never by importing this file, so any pytest import mode works.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest


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


@pytest.fixture
def chat_server():
    """The server factory (see _Factory); servers stop at teardown."""
    factory = _Factory()
    yield factory
    for server in factory.servers:
        server.shutdown()
        server.server_close()
