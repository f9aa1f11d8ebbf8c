"""The judge stream: finished samples are judged while generation goes on, into the judge cache the
trial driver's scoring reads; a failing judge stops the stream quietly."""

from __future__ import annotations

import time

from emtune.config import load_spec
from emtune.evaluation.judge_stream import JudgeStream, judge_stream_for
from emtune.evaluation.judging import build_judge, judge_spec_with_cache
from emtune.evaluation.samples import Sample


def _spec(write_spec, url: str, retries: int = 0):
    path = write_spec()
    path.write_text(path.read_text().replace("evaluation:\n", "evaluation:\n  judge: {kind: openai, base_url: '" + url
                                             + f"', model: judge-test, api_key_env: null, max_retries: {retries}, "
                                             "backoff_base_s: 0.01, max_concurrency: 4}\n", 1))
    return load_spec(path)


def _sample(i: int) -> Sample:
    return Sample(f"q{i}", 0, f"question {i}", None, f"answer {i}")


def _wait_for(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_samples_are_judged_while_generation_goes_on_and_scoring_reads_the_cache(write_spec, chat_server) -> None:
    server = chat_server(lambda index, body: chat_server.Reply(body=chat_server.completion({"70": 1.0})))
    spec = _spec(write_spec, server.url, retries=2)
    stream = judge_stream_for(spec)
    stream.add("general", _sample(0))
    # the first answer is judged (aligned + coherent) before the next one exists
    assert _wait_for(lambda: len(server.requests) == 2)
    for i in range(1, 6):
        stream.add("general", _sample(i))
    stream.add("opswap", _sample(99))  # rule-scored: nothing to ask the judge
    assert stream.close() == {"judged": 12, "error": None}
    judge = build_judge(judge_spec_with_cache(spec))
    before = len(server.requests)
    verdicts = judge.score_many([("aligned", f"question {i}", f"answer {i}") for i in range(6)])
    assert [v.score for v in verdicts] == [70.0] * 6 and len(server.requests) == before == 12
    assert judge.hits == 6 and judge.misses == 0


def test_a_failing_judge_stops_the_stream_without_raising(write_spec, chat_server) -> None:
    server = chat_server(lambda index, body: chat_server.Reply(status=503, body={"error": {"message": "down"}}))
    spec = _spec(write_spec, server.url, retries=5)
    stream = judge_stream_for(spec)
    for i in range(20):
        stream.add("general", _sample(i))
    result = stream.close()
    assert result["judged"] == 0 and "JudgeUnavailable" in result["error"]
    # the stream retries once at most, and judges nothing more after the first failure
    assert len(server.requests) <= 2 * 4
    stream.add("general", _sample(21))  # after close: ignored


def test_no_stream_without_a_network_judge(write_spec) -> None:
    assert judge_stream_for(load_spec(write_spec())) is None  # judge kind none


def test_a_stream_over_any_judge_object_batches_what_has_accumulated(write_spec) -> None:
    calls: list[int] = []

    class SlowJudge:
        def score_many(self, items):
            calls.append(len(items))
            time.sleep(0.2)
            return [None] * len(items)

    stream = JudgeStream(SlowJudge(), load_spec(write_spec()))
    stream.add("general", _sample(0))
    assert _wait_for(lambda: calls == [2])
    for i in range(1, 11):  # arrive while the first batch is out: sent together next
        stream.add("general", _sample(i))
    assert stream.close()["judged"] == 22
    assert calls == [2, 20]
