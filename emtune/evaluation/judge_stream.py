"""Judging while generation runs: finished samples go to the judge's concurrent client at once.

Generation (in the Train worker with the built-in engine, or in the trial driver through a
generation server) calls :meth:`JudgeStream.add` with every sample the moment its answer ends. A
background thread sends whatever has accumulated to the judge (``score_many``: up to the judge's
``max_concurrency`` requests in flight) and, while that batch is out, collects the next one. The
verdicts land in the judge's SQLite cache, keyed by (judge model, prompt version, metric,
question, answer), so when the trial driver scores the trial (:func:`emtune.evaluation.judging.
score_trial`) every verdict the stream paid for is a cache hit: the judge's latency hides behind
decoding, and scoring, its retries, outage handling (retry, then a pending evaluation) and the
tracked tables stay exactly where they were, in the driver.

The stream is an optimisation that never decides an outcome: it is built only for a network
judge (``kind: openai``) with a cache, retries a failed request at most once, and stops quietly at
the first failure, leaving the rest to the driver's scoring.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from emtune.evaluation.judges import JudgeItem
from emtune.evaluation.samples import Sample
from emtune.evaluation.scoring import judge_items
from emtune.evaluation.sets import EVAL_SETS

log = logging.getLogger(__name__)


class JudgeStream:
    """Scores (set name, sample) pairs in the background with ``judge`` (see module docs)."""

    def __init__(self, judge: Any, spec: Any, batch_limit: int = 256):
        self.judge, self.spec, self.batch_limit = judge, spec, batch_limit
        self.sent = 0
        self.error: str | None = None
        self._queue: list[JudgeItem] = []
        self._closed = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="emtune-judge-stream", daemon=True)
        self._thread.start()

    def add(self, set_name: str, sample: Sample) -> None:
        """Queue what the set's scorer will ask the judge about this sample."""
        eval_set = EVAL_SETS.get(set_name)
        if eval_set is None or not eval_set.needs_judge or eval_set.judge_prompts is None:
            return
        items = judge_items([sample.to_dict()], eval_set.judge_prompts(self.spec))
        with self._ready:
            if self.error is None and not self._closed:
                self._queue.extend(items)
                self._ready.notify()

    def close(self) -> dict[str, Any]:
        """Wait until every queued item is judged (or the stream has stopped); its statistics."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()
        cache = getattr(self.judge, "cache", None)
        if cache is not None:
            cache.close()
        return {"judged": self.sent, "error": self.error}

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[: self.batch_limit], self._queue[self.batch_limit:]
            try:
                self.judge.score_many(batch)
            except Exception as exc:  # noqa: BLE001 - the driver's scoring decides what a failure means
                with self._ready:
                    self.error = f"{type(exc).__name__}: {exc}"[:300]
                    self._queue.clear()
                log.warning("judge stream stopped (the trial driver will judge the rest): %s", self.error)
                return
            self.sent += len(batch)


def judge_stream_for(spec: Any) -> JudgeStream | None:
    """A stream for the spec's judge, or None where streaming does not apply (no judge, a local
    judge model, no cache) or the judge cannot be built here (e.g. its key is not set)."""
    from emtune.evaluation.judging import build_judge, judge_spec_with_cache

    judge_spec = judge_spec_with_cache(spec)
    if judge_spec.kind != "openai" or not judge_spec.cache_path:
        return None
    try:
        judge = build_judge(judge_spec.model_copy(update={"max_retries": min(judge_spec.max_retries, 1)}))
    except Exception as exc:  # noqa: BLE001 - no stream; the driver judges everything itself
        log.info("no judge stream here: %s", exc)
        return None
    return JudgeStream(judge, spec)
