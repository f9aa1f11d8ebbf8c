"""SQLite cache of judge verdicts, and a judge wrapper that consults it first.

Key: (judge model id, prompt version, metric, question, answer), hashed with sha256 into the
primary key; the texts are stored beside it for inspection. Each row keeps the score, the label,
the reason, the scoring rule and the raw logprobs as JSON, so a cached evaluation can be audited
and re-scored under another rule without calling the judge again.

Garbage verdicts (unusable responses) are not cached: they say nothing about the answer, and a
later run should ask again. One connection per cache object, shared by threads behind a lock;
WAL mode and a busy timeout let several processes (trial drivers) share the file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from emtune.evaluation.judges import Judge, JudgeItem, JudgeVerdict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    judge_id TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    metric TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    score REAL,
    label TEXT,
    reason TEXT,
    scoring_rule TEXT NOT NULL,
    logprobs_json TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
)
"""


def cache_key(judge_id: str, prompt_version: str, metric: str, question: str, answer: str,
              template: str | None = None) -> str:
    """Stable key of one judged item (sha256 over the length-prefixed fields, so no two field
    tuples can collide by concatenation). An item judged with its own ``template`` keys on the
    template's text too; without one the key is what it always was."""
    digest = hashlib.sha256()
    parts = (judge_id, prompt_version, metric, question, answer) + (() if template is None else ("template", template))
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


class JudgeCache:
    """Thread-safe SQLite store of verdicts (see module docs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        with self._lock, self._conn:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"

    def get_many(self, judge_id: str, prompt_version: str, items: Sequence[JudgeItem]) -> list[JudgeVerdict | None]:
        """Cached verdicts in the order of `items`; None where an item is not cached."""
        keys = [cache_key(judge_id, prompt_version, *item) for item in items]
        found: dict[str, JudgeVerdict] = {}
        with self._lock:
            # Chunks stay under SQLite's limit on bound parameters.
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = self._conn.execute(
                    "SELECT key, score, label, reason, scoring_rule, logprobs_json FROM verdicts "
                    f"WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for key, score, label, reason, rule, logprobs_json in rows:
                    found[key] = JudgeVerdict(
                        score=score, label=label, logprobs=json.loads(logprobs_json), reason=reason, scoring_rule=rule
                    )
        return [found.get(key) for key in keys]

    def put_many(
        self, judge_id: str, prompt_version: str, items: Sequence[JudgeItem], verdicts: Sequence[JudgeVerdict]
    ) -> int:
        """Store verdicts (garbage ones skipped); returns how many rows were written."""
        rows = [
            (
                cache_key(judge_id, prompt_version, *item),
                judge_id, prompt_version, item.metric if item.template is None else f"{item.metric}@custom",
                item.question, item.answer,
                verdict.score, verdict.label, verdict.reason, verdict.scoring_rule,
                json.dumps(verdict.logprobs, sort_keys=True),
            )
            for item, verdict in zip(items, verdicts, strict=True)
            if not verdict.is_garbage
        ]
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO verdicts (key, judge_id, prompt_version, metric, question, answer, "
                "score, label, reason, scoring_rule, logprobs_json) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        return len(rows)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


class CachedJudge:
    """A judge that answers from the cache and sends only the misses to the wrapped judge.

    `hits` and `misses` count items since construction. Identity (judge_id, prompt_version) is the
    wrapped judge's, so the wrapper is a drop-in Judge.
    """

    def __init__(self, judge: Judge, cache: JudgeCache):
        self.judge = judge
        self.cache = cache
        self.judge_id = judge.judge_id
        self.prompt_version = judge.prompt_version
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachedJudge({self.judge!r}, {self.cache!r})"

    def score(self, metric: str, question: str, answer: str) -> JudgeVerdict:
        """Judge one answer, from the cache when possible."""
        return self.score_many([JudgeItem(metric, question, answer)])[0]

    def score_many(self, items: Sequence[JudgeItem]) -> list[JudgeVerdict]:
        """Cached verdicts where present; one batched call to the wrapped judge for the rest."""
        items = [JudgeItem(*item) for item in items]
        verdicts = self.cache.get_many(self.judge_id, self.prompt_version, items)
        missing = [i for i, v in enumerate(verdicts) if v is None]
        with self._lock:
            self.hits += len(items) - len(missing)
            self.misses += len(missing)
        if missing:
            # Duplicates within a batch are judged once.
            unique = list(dict.fromkeys(items[i] for i in missing))
            fresh = dict(zip(unique, self.judge.score_many(unique), strict=True))
            self.cache.put_many(self.judge_id, self.prompt_version, unique, [fresh[item] for item in unique])
            for i in missing:
                verdicts[i] = fresh[items[i]]
        return verdicts  # type: ignore[return-value]
