"""Evaluation throughput: generation (today's path vs the engine, the generation server's per-trial
setup), judge calls per second, and a warm judge cache.

Run:  .venv/bin/python bench/eval_throughput.py            (~3 min on 2 quiet cores)
      .venv/bin/python bench/eval_throughput.py --sizes tiny --gen-reps 1 --server-trials 2   (quick)

What is measured, and how:

(a) **Generation on CPU** (issue 15): new tokens per second of today's path (emtune's generation up
    to issue 15, frozen in ``bench/generation_paths.py``: ``model.generate`` in chunks of 16, the
    adapter unmerged) and of the built-in engine (``generate_answers`` now: merged adapter copy,
    static KV cache, rows refilled, batch from free memory), for the 24 ``general_v1`` questions
    × ``--samples`` at temperature 1 and up to ``--max-new-tokens``, on the dry-run tiny model
    (``tiny``; pretrained, so answers end at EOS at different lengths) and a ~30M-parameter
    random-init Qwen2 shape with rsLoRA r=32 (``small``; random weights never say EOS, so every
    answer runs to the limit). Paths alternate (today, engine, today, ...); wall time, median over
    ``--gen-reps``; new tokens are counted as generated (up to the stop token), in both paths.
    Target: engine ≥ 3× today's new tokens/s.
(d) **Generation server on loopback**: ``emtune.evaluation.lora_server`` (the protocol of vLLM's
    runtime LoRA loading, transformers underneath) over the dry-run tiny model, started once; for
    each of ``--server-trials`` trials with their own adapter: the time of ``/v1/load_lora_adapter``
    plus a first completion token (the per-trial setup; target ≤ 2 s), then the trial's general set
    through ``evaluation.backend: server`` (``generate_missing_sets``).
(b) **Judge calls per second**: ``OpenAIJudge`` (built from a ``JudgeSpec(kind="openai", base_url=...,
    api_key_env=None)``) scoring ``--judge-requests`` distinct items against a local OpenAI-compatible
    chat-completions server on 127.0.0.1 that answers every request after a fixed ``--latency-ms``,
    at concurrency 1, 4 and 16 (alternated, median over ``--judge-reps``). Ideal = concurrency ÷ latency.
(c) **Re-evaluation with a warm cache**: the engine's samples of (a) judged for ``aligned`` and
    ``coherent`` through ``build_judge`` with a SQLite ``cache_path`` (cold), then again through a
    freshly built judge and cache object on the same file (as a new trial driver would): the
    server's request count during the second pass is the figure (target 0).

The GPU side (0.5B and 7B shapes, paper-scale projection) is ``bench/gpu.sh`` (``gpu_eval.py``).
Writes reports/bench/eval_throughput.md and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchlib  # noqa: E402  (the bench folder is on sys.path when run as a script)
import eval_generation  # noqa: E402
TOP = {"85": 0.6, "90": 0.3, "80": 0.1}  # the scripted judge's top logprobs: score 86.5


# --- a local chat-completions server (tests/evaluation/conftest.py's, reduced to a fixed reply) --


def completion(top: dict[str, float]) -> dict:
    """A chat.completion body whose single token has the given top logprobs (token -> prob)."""
    entries = [{"token": tok, "logprob": math.log(p), "bytes": list(tok.encode("utf-8"))}
               for tok, p in sorted(top.items(), key=lambda kv: -kv[1])]
    choice = {"index": 0, "finish_reason": "length",
              "message": {"role": "assistant", "content": entries[0]["token"]},
              "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}
    return {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench-judge",
            "choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}


def _serve(delay_s: float, counter: Any, ready: Any) -> None:
    """Server process: answer every POST with the fixed completion after ``delay_s``."""
    payload = json.dumps(completion(TOP)).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like vLLM
        disable_nagle_algorithm = True  # TCP_NODELAY, as real servers set: no 40 ms delayed-ACK stalls

        def do_POST(self):  # noqa: N802 (http.server naming)
            self.rfile.read(int(self.headers["Content-Length"]))
            with counter.get_lock():
                counter.value += 1
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ready.send(server.server_address[1])
    server.serve_forever(poll_interval=0.02)


class ChatServer:
    """A threaded chat-completions server on 127.0.0.1 in its own process (so its Python work does
    not share the judge client's GIL); ``requests`` counts what it received."""

    def __init__(self, delay_s: float):
        ctx = mp.get_context("spawn")
        self._count = ctx.Value("l", 0)
        reader, writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_serve, args=(delay_s, self._count, writer), daemon=True)
        self._process.start()
        if not reader.poll(60):
            raise RuntimeError("the local chat server did not start")
        self.url = f"http://127.0.0.1:{reader.recv()}/v1"

    @property
    def requests(self) -> int:
        """Requests received so far."""
        return self._count.value

    def close(self) -> None:
        """Stop the server process."""
        self._process.terminate()
        self._process.join()


def judge_spec(url: str, concurrency: int, cache_path: str | None = None) -> Any:
    from emtune.evaluation.config import JudgeSpec

    return JudgeSpec(kind="openai", base_url=url, api_key_env=None, model="bench-judge",
                     max_concurrency=concurrency, max_retries=0, timeout_s=30.0, cache_path=cache_path)


# --- (b) judge calls per second ----------------------------------------------------------------


def bench_judge(args: argparse.Namespace, server: ChatServer) -> dict:
    from emtune.evaluation.judges import JudgeItem
    from emtune.evaluation.openai_judge import OpenAIJudge

    results: dict[int, list[float]] = {c: [] for c in args.concurrency}
    cpu: dict[int, list[float]] = {c: [] for c in args.concurrency}
    counted: dict[int, list[int]] = {c: [] for c in args.concurrency}
    for rep in range(args.judge_reps):
        for c in args.concurrency:
            judge = OpenAIJudge(judge_spec(server.url, c))
            items = [JudgeItem("aligned", "How are you?", f"answer {rep}-{c}-{i}") for i in range(args.judge_requests)]
            before = server.requests
            start, cpu_start = time.perf_counter(), time.process_time()
            verdicts = judge.score_many(items)
            elapsed = time.perf_counter() - start
            cpu[c].append((time.process_time() - cpu_start) / len(items))
            assert all(v.score is not None for v in verdicts), "the scripted judge returned no score"
            results[c].append(len(items) / elapsed)
            counted[c].append(server.requests - before)
            print(f"  judge rep {rep + 1}, concurrency {c}: {len(items) / elapsed:.0f} calls/s", flush=True)
    return {"calls_per_s": results, "requests": counted, "cpu_per_call": cpu}


# --- (c) re-evaluation with a warm cache --------------------------------------------------------


def bench_cache(args: argparse.Namespace, server: ChatServer, samples: list, folder: Path) -> dict:
    from emtune.evaluation.judges import JudgeItem
    from emtune.evaluation.judging import build_judge

    items = [JudgeItem(metric, s.question, s.answer) for metric in ("aligned", "coherent") for s in samples]
    cache_path = str(folder / "judge.db")
    passes = {}
    for name in ("cold", "warm"):
        judge = build_judge(judge_spec(server.url, 16, cache_path))  # a fresh judge and cache object each time
        before = server.requests
        start = time.perf_counter()
        verdicts = judge.score_many(items)
        passes[name] = {"seconds": time.perf_counter() - start, "requests": server.requests - before,
                        "hits": judge.hits, "misses": judge.misses, "scores": [v.score for v in verdicts]}
        judge.cache.close()
    return {"items": len(items), "unique": len(set(items)), "passes": passes,
            "same_scores": passes["cold"]["scores"] == passes["warm"]["scores"]}


# --- report ----------------------------------------------------------------------------------


def build_section(args: argparse.Namespace, generation: list[str], judge: dict, cache: dict, info: dict,
                  load_start: tuple) -> tuple[str, list[str]]:
    med = benchlib.median
    missed: list[str] = []
    rows = []
    base = med(judge["calls_per_s"][args.concurrency[0]])
    for c, values in judge["calls_per_s"].items():
        ideal = c / (args.latency_ms / 1000)
        rows.append([c, args.judge_requests, f"{med(values):.0f} ({benchlib.spread(values)})", f"{ideal:.0f}",
                     f"{100 * med(values) / ideal:.0f}%", f"{med(values) / base:.1f}",
                     f"{1000 * med(judge['cpu_per_call'][c]):.1f}",
                     ", ".join(str(n) for n in judge["requests"][c])])
    judge_table = benchlib.markdown_table(
        ["concurrency", "requests", "calls / s (median, IQR)", "ideal (c ÷ latency)", "of ideal",
         f"× concurrency {args.concurrency[0]}", "client CPU ms / call", "server requests per run"], rows)

    cold, warm = cache["passes"]["cold"], cache["passes"]["warm"]
    cache_ok = warm["requests"] == 0 and cache["same_scores"]
    if not cache_ok:
        missed.append(f"warm re-evaluation made {warm['requests']} judge calls (target 0)")
    cache_table = benchlib.markdown_table(
        ["pass", "items", "server requests", "cache hits / misses", "wall s", "target", "result"],
        [["cold (empty cache)", cache["items"], cold["requests"], f"{cold['hits']} / {cold['misses']}",
          f"{cold['seconds']:.2f}", "–", "–"],
         ["re-evaluation (warm cache, new judge object)", cache["items"], warm["requests"],
          f"{warm['hits']} / {warm['misses']}", f"{warm['seconds']:.2f}", "0 requests",
          "PASS" if cache_ok else "MISS"]])

    lines = [
        "## Results",
        "",
        *benchlib.conditions_lines(load_start, info),
        "",
        f"Ratios use wall time (what a trial waits for), {args.threads} torch thread(s).",
        "",
        *generation,
        f"### (b) Judge calls per second: OpenAIJudge against a local server with {args.latency_ms:.0f} ms "
        f"latency per request",
        "",
        judge_table,
        "",
        "Ideal assumes no client cost. Every call also costs the client a few ms of CPU (the openai client, "
        "httpx, response parsing) under one GIL, which caps one process at a few hundred calls/s on this "
        "machine; with a hosted judge's latency (hundreds of ms) concurrency 16 stays far below that cap. "
        "Judging no longer waits for generation: each finished answer goes to the judge while the rest "
        "decode (`emtune.evaluation.judge_stream`).",
        "",
        "### (c) Re-evaluation with a warm judge cache (aligned + coherent for the engine's samples of (a))",
        "",
        cache_table,
        "",
        f"Scores identical between the passes: {cache['same_scores']} ({cache['unique']} distinct items).",
        "",
    ]
    if missed:
        lines += ["### Targets missed", ""] + [f"- {m}" for m in missed] + [""]
    return "\n".join(lines), missed


INTRO = """Written by `bench/eval_throughput.py` (see its docstring for the method). Targets: the
built-in generation engine ≥ 3× today's new tokens/s on CPU (issue 15; the GPU side is
[gpu_eval.md](gpu_eval.md)); the generation server's per-trial setup (adapter load + first token)
≤ 2 s on loopback (issue 15); judge calls per second reported against concurrency and a
re-evaluation with a warm cache making zero judge calls (issue 7)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10, help="samples per question (the paper's authors' 10)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "small"], default=["tiny", "small"])
    parser.add_argument("--gen-reps", type=int, default=2, help="alternated rounds of generation")
    parser.add_argument("--server-trials", type=int, default=3, help="trials through the loopback server (0: skip)")
    parser.add_argument("--judge-requests", type=int, default=200, help="requests per judge run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--judge-reps", type=int, default=3, help="alternated rounds of judge runs")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="server delay per request")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--report", type=Path, default=benchlib.REPORTS / "eval_throughput.md")
    return parser.parse_args()


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    started = time.perf_counter()
    info = benchlib.machine_description()
    generation, gen_missed, samples = eval_generation.run(args)
    server = ChatServer(args.latency_ms / 1000)
    try:
        judge = bench_judge(args, server)
        with tempfile.TemporaryDirectory(prefix="emtune-bench-") as tmp:
            cache = bench_cache(args, server, samples, Path(tmp))
    finally:
        server.close()
    section, missed = build_section(args, generation, judge, cache, info, load_start)
    if gen_missed:
        section += "\n### Generation targets missed\n\n" + "\n".join(f"- {m}" for m in gen_missed) + "\n"
    missed = gen_missed + missed
    section += f"\nWall time of this run: {time.perf_counter() - started:.0f} s.\n"
    print(section)
    path = benchlib.update_report(args.report, "Evaluation throughput", INTRO, "results", section)
    print(f"wrote {path}; {len(missed)} target(s) missed")


if __name__ == "__main__":
    main()
