"""The SQLite judge cache: a re-evaluation makes zero judge calls."""

from __future__ import annotations

import math
import re
import sqlite3
import threading

import pytest
from emtune.evaluation.config import JudgeSpec
from emtune.evaluation.judge_cache import CachedJudge, JudgeCache, cache_key
from emtune.evaluation.judges import JudgeItem, JudgeVerdict
from emtune.evaluation.judging import build_judge


def numbered_server(chat_server):
    """Scores 'answer-N' as N (or a CODE answer for 'code'); garbage for 'junk'."""

    def script(i, body):
        content = body["messages"][0]["content"]
        if "junk" in content:
            return chat_server.Reply(body=chat_server.completion({"5": 1.0}, with_logprobs=False))
        if "code-answer" in content:
            return chat_server.Reply(body=chat_server.completion({"CODE": 0.9, "50": 0.1}))
        return chat_server.Reply(body=chat_server.completion({re.search(r"answer-(\d+)", content).group(1): 1.0}))

    return chat_server(script)


def test_re_evaluation_costs_zero_calls(chat_server, tmp_path):
    server = numbered_server(chat_server)
    spec = JudgeSpec(kind="openai", base_url=server.url, model="judge-a", api_key_env=None,
                     cache_path=str(tmp_path / "judge.sqlite"), backoff_base_s=0.0)
    items = [JudgeItem("aligned", "q", f"answer-{k}") for k in (10, 20, 30)]
    items.append(JudgeItem("aligned", "q", "code-answer"))
    first = build_judge(spec)
    assert isinstance(first, CachedJudge)
    verdicts = first.score_many(items)
    assert len(server.requests) == 4 and first.misses == 4 and first.hits == 0
    # A fresh process-like start: new judge, new connection, same file.
    second = build_judge(spec)
    again = second.score_many(items)
    assert len(server.requests) == 4 and second.hits == 4 and second.misses == 0
    assert again == verdicts
    assert [v.score for v in again[:3]] == [10.0, 20.0, 30.0]
    assert again[3].score is None and again[3].label == "CODE"
    assert math.exp(again[3].logprobs["CODE"]) == pytest.approx(0.9)
    # One new item costs exactly one call; the rest still come from the cache.
    second.score_many(items + [JudgeItem("aligned", "q", "answer-40")])
    assert len(server.requests) == 5


def test_key_separates_judge_prompt_version_and_metric(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    item = JudgeItem("aligned", "q", "a")
    cache.put_many("judge-a", "v1", [item], [JudgeVerdict(score=12.5, logprobs={"12": -0.1})])
    assert cache.get_many("judge-a", "v1", [item])[0].score == 12.5
    assert cache.get_many("judge-b", "v1", [item]) == [None]
    assert cache.get_many("judge-a", "v2", [item]) == [None]
    assert cache.get_many("judge-a", "v1", [JudgeItem("coherent", "q", "a")]) == [None]
    # Length-prefixed hashing: moving text between fields changes the key.
    assert cache_key("j", "v1", "aligned", "ab", "c") != cache_key("j", "v1", "aligned", "a", "bc")


def test_garbage_is_not_cached(chat_server, tmp_path):
    server = numbered_server(chat_server)
    spec = JudgeSpec(kind="openai", base_url=server.url, model="judge-a", api_key_env=None,
                     cache_path=str(tmp_path / "judge.sqlite"))
    judge = build_judge(spec)
    assert judge.score("aligned", "q", "junk").is_garbage
    assert judge.score("aligned", "q", "junk").is_garbage
    assert len(server.requests) == 2 and len(judge.cache) == 0


def test_rows_hold_texts_and_raw_logprobs(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    cache.put_many("judge-a", "v1", [JudgeItem("coherent", "Q?", "A!")],
                   [JudgeVerdict(score=None, label="REFUSAL", logprobs={"REF": -0.05}, reason="low_number_mass")])
    row = sqlite3.connect(tmp_path / "c.sqlite").execute(
        "SELECT judge_id, prompt_version, metric, question, answer, score, label, logprobs_json FROM verdicts"
    ).fetchone()
    assert row == ("judge-a", "v1", "coherent", "Q?", "A!", None, "REFUSAL", '{"REF": -0.05}')


def test_duplicates_in_a_batch_are_judged_once_and_threads_share_the_cache(tmp_path):
    calls: list[JudgeItem] = []
    lock = threading.Lock()

    class CountingJudge:
        judge_id, prompt_version = "count", "v1"

        def score_many(self, items):
            with lock:
                calls.extend(items)
            return [JudgeVerdict(score=float(len(it.answer))) for it in items]

    judge = CachedJudge(CountingJudge(), JudgeCache(tmp_path / "c.sqlite"))
    verdicts = judge.score_many([("aligned", "q", "aaa"), ("aligned", "q", "aaa"), ("aligned", "q", "b")])
    assert [v.score for v in verdicts] == [3.0, 3.0, 1.0] and len(calls) == 2

    def work(offset):
        judge.score_many([("aligned", "q", "x" * (offset + k)) for k in range(20)])

    threads = [threading.Thread(target=work, args=(t * 20,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(judge.cache) == 82
    calls.clear()
    judge.score_many([("aligned", "q", "x" * n) for n in range(80)])
    assert calls == []
