"""Generation through an OpenAI-compatible server that loads LoRA adapters at run time.

``evaluation.backend: server``. The Train worker writes the trial's *generation plan* (every
enabled set's prompts as chat-template token ids, its settings, the stop tokens;
:func:`emtune.evaluation.runner.generation_plan`) beside the adapter and releases its GPU. The
trial driver then, through the server named by ``evaluation.server``:

1. loads the adapter: ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` (vLLM with
   ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; the path is on storage the server reads, rewritten
   by ``adapter_path_map``; an adapter of that name left by an earlier attempt is replaced);
2. asks ``POST /v1/completions`` once per sample, ``model`` = the adapter's name, the prompt as
   token ids, the sample's own seed (:func:`emtune.evaluation.samples.sample_seed`) and the
   protocol's sampling (temperature, top_p, and explicitly no top-k, min-p or repetition penalty,
   which a server would otherwise take from the model's ``generation_config``), at most
   ``max_concurrency`` requests in flight; each finished sample goes to ``on_sample`` at once;
3. writes each set's samples when the set is complete, and unloads the adapter.

Sets whose samples are already saved are skipped, so a finished set is never generated twice.
Requests are retried on connection errors, timeouts, 408/409/429 and 5xx with exponential
backoff and jitter; a 404 for the adapter (a restarted server lost it) reloads it once. When one
request has exhausted its retries the server counts as down: the rest fail at once and
:class:`GenerationUnavailable` says how many samples are missing. The trial then fails with that
reason and a pending evaluation that ``emtune resume`` finishes, as for a judge outage.

The API key is read from the variable ``api_key_env`` names, sent only as the bearer token, and
scrubbed from every message built from a response.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from emtune.evaluation.samples import Prompt, Sample, sample_seed
from emtune.trial_files import TrialFiles

log = logging.getLogger(__name__)
_RETRY_STATUS = {408, 409, 429}


class GenerationError(RuntimeError):
    """The server refused a request (bad adapter, bad key, misconfiguration): not retried."""


class GenerationUnavailable(RuntimeError):
    """The server stayed unreachable or failing past the retries; ``n_missing`` of ``n_total``
    samples have no answer."""

    def __init__(self, message: str, n_missing: int, n_total: int):
        super().__init__(message)
        self.n_missing, self.n_total = n_missing, n_total


class _Retryable(Exception):
    def __init__(self, summary: str, status: int | None = None):
        super().__init__(summary)
        self.status = status


class GenerationServer:
    """A client of one server (``GenerationServerSpec``): JSON POSTs with retries."""

    def __init__(self, spec: Any):
        self.spec = spec
        key = None
        if spec.api_key_env is not None:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise GenerationError(f"the generation server's API key is read from {spec.api_key_env}, which is "
                                      f"not set (export {spec.api_key_env}=..., or api_key_env: null)")
        # a closure keeps the key out of vars(self) and reprs
        self._headers = lambda: {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self._redact = lambda text: text.replace(key, "***") if key else text
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"GenerationServer(base_url={self.spec.base_url!r}, api_key_env={self.spec.api_key_env!r})"

    def post(self, path: str, body: dict[str, Any], retries: int | None = None) -> tuple[int, str]:
        """POST ``body`` to ``base_url + path``; (status, text) of a 2xx or 4xx answer. Retries
        retryable failures; raises :class:`_Retryable` once they are spent."""
        retries = self.spec.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self._post_once(path, body)
            except _Retryable as exc:
                if attempt == retries:
                    raise
                delay = min(self.spec.backoff_max_s, self.spec.backoff_base_s * 2 ** attempt) * self._rng.uniform(0.5, 1.5)
                log.warning("generation server: %s; retry %d/%d in %.2fs", exc, attempt + 1, retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post_once(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        request = urllib.request.Request(self.spec.base_url + path, data=json.dumps(body).encode(),
                                         headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            text = self._redact(exc.read().decode("utf-8", "replace"))[:500]
            if exc.code in _RETRY_STATUS or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code} from {path}: {text}", exc.code) from None
            return exc.code, text
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(self._redact(f"{path}: {type(reason).__name__}: {reason}")) from None

    def load_adapter(self, name: str, path: str) -> None:
        """Load (or replace) the adapter ``name`` from ``path`` on the server."""
        status, text = self.post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 400 and "already" in text:  # an earlier attempt's copy: replace it
            self.unload_adapter(name)
            status, text = self.post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status != 200:
            raise GenerationError(f"the generation server did not load adapter {path} (HTTP {status}): {text}. "
                                  "Is runtime LoRA loading on (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --enable-lora, "
                                  "--max-lora-rank >= lora.r) and is the path readable by the server?")

    def unload_adapter(self, name: str) -> None:
        """Unload ``name`` (best effort: a server that is gone has unloaded it anyway)."""
        try:
            self.post("/unload_lora_adapter", {"lora_name": name}, retries=1)
        except _Retryable as exc:
            log.warning("could not unload adapter %s: %s", name, exc)

    def complete(self, body: dict[str, Any], reload: Callable[[], None]) -> dict[str, Any]:
        """One completion; a 404 for the model reloads the adapter once and asks again."""
        status, text = self.post("/completions", body)
        if status == 404:
            reload()
            status, text = self.post("/completions", body)
        if status != 200:
            raise GenerationError(f"completion request refused (HTTP {status}): {text}")
        return json.loads(text)


def adapter_name(spec: Any, checkpoint: Path) -> str:
    """The adapter's name on the server: the study's name and a hash of the checkpoint path, so
    concurrent trials never share one and a resumed evaluation finds its own."""
    digest = hashlib.sha256(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
    return f"emtune-{re.sub(r'[^A-Za-z0-9_.-]', '-', spec.name)[:40]}-{digest}"


def server_path(spec: Any, path: Path) -> str:
    """``path`` as the server sees it (``adapter_path_map`` prefixes rewritten)."""
    text = str(Path(path).resolve())
    for local, remote in spec.evaluation.server.adapter_path_map.items():
        if text == local or text.startswith(local.rstrip("/") + "/"):
            return remote.rstrip("/") + text[len(local.rstrip("/")):]
    return text


def completion_body(model: str, ids: list[int], settings: dict[str, Any], seed: int | None,
                    stops: list[int]) -> dict[str, Any]:
    """The /v1/completions request of one sample (the protocol's sampling and nothing else)."""
    body = {"model": model, "prompt": ids, "max_tokens": settings["max_new_tokens"], "n": 1,
            "temperature": settings["temperature"], "top_p": settings["top_p"], "top_k": -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "stop_token_ids": stops, "skip_special_tokens": True}
    if seed is not None:
        body["seed"] = seed
    return body


def generate_missing_sets(spec: Any, checkpoint: Path, on_sample: Callable[[str, Sample], None] | None = None,
                          server: GenerationServer | None = None) -> dict[str, float]:
    """Generate every planned set whose samples the checkpoint lacks (see module docs); returns
    timings and counts (``time/server_load_s``, ``time/server_generate_s``, ``server/samples``,
    ``server/new_tokens``), empty when nothing was missing."""
    files = TrialFiles(Path(checkpoint))
    plan = files.read_json(files.plan)
    if not plan:
        return {}
    missing = {name: s for name, s in plan["sets"].items() if not files.samples(name).is_file()}
    if not missing:
        return {}
    server = server or GenerationServer(spec.evaluation.server)
    name = adapter_name(spec, files.root)
    path = server_path(spec, files.adapter)
    started = time.perf_counter()
    total = sum(len(s["prompts"]) * s["settings"]["samples_per_prompt"] for s in missing.values())
    try:
        server.load_adapter(name, path)
    except _Retryable as exc:
        raise GenerationUnavailable(f"generation server {spec.evaluation.server.base_url} unavailable: could not "
                                    f"load the adapter after {spec.evaluation.server.max_retries} retries ({exc})",
                                    n_missing=total, n_total=total) from None
    loaded = time.perf_counter()
    try:
        tokens = _generate(spec, server, name, path, missing, plan["stop_token_ids"], files, on_sample)
    finally:
        server.unload_adapter(name)
    done = time.perf_counter()
    return {"time/server_load_s": loaded - started, "time/server_generate_s": done - loaded,
            "server/samples": float(total),
            "server/new_tokens": float(tokens)}


def _generate(spec: Any, server: GenerationServer, name: str, path: str, sets: dict[str, Any], stops: list[int],
              files: TrialFiles, on_sample: Callable[[str, Sample], None] | None) -> int:
    jobs = []
    for set_name, planned in sets.items():
        settings = planned["settings"]
        greedy = settings["temperature"] == 0
        for row in planned["prompts"]:
            prompt = Prompt(row["question_id"], row["text"], row["system"], row.get("reference"), row.get("judge_prompts"))
            for k in range(settings["samples_per_prompt"]):
                seed = None if greedy else sample_seed(settings["seed"], prompt.question_id, k)
                jobs.append((set_name, prompt, k, seed, completion_body(name, row["ids"], settings, seed, stops)))
    results: dict[int, Sample] = {}
    down = threading.Event()
    errors: list[str] = []
    refused: list[GenerationError] = []
    tokens = [0]
    lock = threading.Lock()

    def run(index: int) -> None:
        set_name, prompt, k, seed, body = jobs[index]
        if down.is_set():
            return
        try:
            answer = server.complete(body, reload=lambda: server.load_adapter(name, path))
        except (_Retryable, GenerationError) as exc:
            down.set()  # the rest fail at once instead of each waiting through its own retries
            errors.append(str(exc))
            if isinstance(exc, GenerationError):
                refused.append(exc)
            return
        sample = Sample.answering(prompt, k, answer["choices"][0]["text"].strip(), seed)
        with lock:
            results[index] = sample
            tokens[0] += int(answer.get("usage", {}).get("completion_tokens", 0))
        if on_sample is not None:
            on_sample(set_name, sample)

    with ThreadPoolExecutor(max_workers=min(spec.evaluation.server.max_concurrency, len(jobs))) as pool:
        list(pool.map(run, range(len(jobs))))
    for set_name in sets:
        indices = [i for i, job in enumerate(jobs) if job[0] == set_name]
        if all(i in results for i in indices):
            files.write_samples(set_name, (results[i].to_dict() for i in indices))
    missing = len(jobs) - len(results)
    if refused:
        raise refused[0]
    if missing:
        raise GenerationUnavailable(
            f"generation server {spec.evaluation.server.base_url} unavailable: {missing} of {len(jobs)} samples "
            f"got no answer after {spec.evaluation.server.max_retries} retries (last error: {errors[-1]})",
            n_missing=missing, n_total=len(jobs))
    return tokens[0]


def generate_with_judge_stream(spec: Any, checkpoint: Path) -> dict[str, float]:
    """:func:`generate_missing_sets` for the trial driver, each finished sample going to the
    judge stream (:mod:`emtune.evaluation.judge_stream`) so judging overlaps generation."""
    from emtune.evaluation.judge_stream import judge_stream_for

    if not TrialFiles(Path(checkpoint)).plan.is_file():
        return {}
    stream = judge_stream_for(spec)
    try:
        return generate_missing_sets(spec, checkpoint, on_sample=stream.add if stream else None)
    finally:
        if stream is not None:
            stream.close()
