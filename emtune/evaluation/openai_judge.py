"""Judge on any OpenAI-compatible chat-completions endpoint (the hosted API or a vLLM server).

One request per item: the metric's prompt as the user message, max_tokens=1, temperature=0,
logprobs=True, top_logprobs=20; the score is `score_from_logprobs` over that token's top-20.
The client's own retries are off (max_retries=0): emtune retries 429, 5xx, 408/409, timeouts and
connection errors itself with exponential backoff and jitter, bounded concurrency, and a batch that
still has failures after `max_retries` raises `JudgeUnavailable` with the count. Responses without
logprobs are not retried: they become verdicts with score None and a "garbage: ..." reason, counted
in `stats`.

The API key is read from the environment variable the spec names and handed to the client only;
it is never stored on this object, and every message emtune builds from an error is scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from emtune.evaluation.config import JudgeSpec
from emtune.evaluation.judges import (
    JudgeError,
    JudgeItem,
    JudgeUnavailable,
    JudgeVerdict,
    load_judge_prompts,
    render_prompt,
    resolved_prompt_version,
    verdict_from_top_logprobs,
)

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429}
TOP_LOGPROBS = 20


class _Failed(Exception):
    """An item that exhausted its retries (or was skipped because the judge is down)."""


class OpenAIJudge:
    """Logprob-weighted 0-100 judge over an OpenAI-compatible endpoint (see module docs).

    `stats` counts requests, retries, garbage responses and failed items (thread-safe).
    `client` may be passed in (tests, custom HTTP clients); otherwise one is built from the spec.
    """

    def __init__(self, spec: JudgeSpec, *, prompts: dict[str, str] | None = None, client: Any = None):
        if spec.kind != "openai":
            raise JudgeError(f"OpenAIJudge needs a spec of kind 'openai', got {spec.kind!r}")
        self.spec = spec
        self.judge_id = spec.judge_id
        self.prompt_version = resolved_prompt_version(spec.prompt_version)
        self.prompts = prompts if prompts is not None else load_judge_prompts(spec.prompt_version)
        key = _read_key(spec.api_key_env)
        # Kept only to scrub error texts; a closure keeps it out of vars(self) and reprs.
        self._redact = _redactor(key)
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=spec.base_url, api_key=key or "EMPTY", max_retries=0, timeout=spec.timeout_s)
        self._client = client
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "garbage": 0, "failed": 0}

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.spec.model!r}, base_url={self.spec.base_url!r}, "
            f"api_key_env={self.spec.api_key_env!r}, prompt_version={self.prompt_version!r})"
        )

    def score(self, metric: str, question: str, answer: str) -> JudgeVerdict:
        """Judge one answer (raises JudgeUnavailable if the endpoint stays down)."""
        return self.score_many([JudgeItem(metric, question, answer)])[0]

    def score_many(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        """Judge items with at most `max_concurrency` requests in flight; order is kept.

        Once one item has exhausted its retries the judge counts as down: items not yet started
        fail at once instead of each waiting through its own backoff. Any failure raises
        JudgeUnavailable with the number of items left without a verdict.
        """
        items = [JudgeItem(*item) for item in items]
        prompts = [render_prompt(self.prompts, *it) for it in items]
        if not items:
            return []
        down = threading.Event()
        last_error: list[str] = []

        def run(prompt: str) -> JudgeVerdict | None:
            if down.is_set():
                return None
            try:
                return self._score_with_retries(prompt)
            except _Failed as exc:
                down.set()
                last_error.append(str(exc))
                return None

        with ThreadPoolExecutor(max_workers=min(self.spec.max_concurrency, len(items))) as pool:
            results = list(pool.map(run, prompts))
        n_failed = sum(v is None for v in results)
        if n_failed:
            with self._lock:
                self.stats["failed"] += n_failed
            where = self.spec.base_url or "api.openai.com"
            raise JudgeUnavailable(
                f"judge {self.spec.model!r} at {where} unavailable: {n_failed} of {len(items)} items "
                f"got no score after {self.spec.max_retries} retries (last error: {last_error[-1]})",
                n_failed=n_failed,
                n_total=len(items),
            )
        return results  # type: ignore[return-value]

    # -- one request, with retries -------------------------------------------------------------
    def _score_with_retries(self, prompt: str) -> JudgeVerdict:
        import openai

        for attempt in range(self.spec.max_retries + 1):
            with self._lock:
                self.stats["requests"] += 1
            try:
                response = self._client.chat.completions.create(
                    model=self.spec.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=TOP_LOGPROBS,
                    seed=0,
                )
            except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
                # A 200 whose body is not a chat completion: the server answered, so no retry.
                return self._garbage(f"invalid response body ({type(exc).__name__})")
            except (openai.APIConnectionError, openai.APIStatusError) as exc:
                status = getattr(exc, "status_code", None)
                retryable = status is None or status in _RETRY_STATUS or status >= 500
                summary = self._redact(f"{type(exc).__name__}" + (f" {status}" if status else "") + f": {exc}")
                if not retryable:
                    raise JudgeError(f"judge request rejected: {summary}") from None
                if attempt == self.spec.max_retries:
                    raise _Failed(summary) from None
                delay = self._backoff(attempt, exc)
                with self._lock:
                    self.stats["retries"] += 1
                log.warning(
                    "judge request failed (%s); retry %d/%d in %.2fs",
                    summary[:200], attempt + 1, self.spec.max_retries, delay,
                )
                time.sleep(delay)
                continue
            return self._parse(response)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, exc: Exception) -> float:
        delay = min(self.spec.backoff_max_s, self.spec.backoff_base_s * 2**attempt)
        # Jitter spreads the retries of concurrent requests so they do not hit the limit together.
        delay *= self._rng.uniform(0.5, 1.5)
        retry_after = _retry_after_s(exc)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.spec.backoff_max_s))
        return delay

    def _parse(self, response: Any) -> JudgeVerdict:
        try:
            content = response.choices[0].logprobs.content
            top = content[0].top_logprobs
            pairs = [(entry.token, float(entry.logprob)) for entry in top]
        except (AttributeError, IndexError, TypeError, ValueError):
            return self._garbage("no logprobs in response")
        if not pairs:
            return self._garbage("empty top_logprobs")
        return verdict_from_top_logprobs(_merge_duplicates(pairs))

    def _garbage(self, why: str) -> JudgeVerdict:
        with self._lock:
            self.stats["garbage"] += 1
        log.warning("judge returned an unusable response: %s", why)
        return JudgeVerdict(score=None, reason=f"garbage: {why}")


def _read_key(api_key_env: str | None) -> str | None:
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise JudgeError(
            f"the judge API key is read from the environment variable {api_key_env}, which is not set "
            f"(export {api_key_env}=..., or set api_key_env: null for an endpoint without a key)"
        )
    return key


def _redactor(secret: str | None):
    def redact(text: str) -> str:
        return text.replace(secret, "***") if secret else text

    return redact


def _retry_after_s(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _merge_duplicates(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """token -> logprob; a token string listed twice (distinct byte tokens that decode alike)
    keeps the log of the summed probability."""
    merged: dict[str, float] = {}
    for token, logprob in pairs:
        if token in merged:
            hi, lo = max(merged[token], logprob), min(merged[token], logprob)
            merged[token] = hi + math.log1p(math.exp(lo - hi))
        else:
            merged[token] = logprob
    return merged
