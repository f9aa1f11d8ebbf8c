"""OpenAIJudge against a real HTTP server on 127.0.0.1 speaking the chat-completions protocol."""

from __future__ import annotations

import logging
import re
import socket

import pytest
from emtune.evaluation.config import JudgeSpec
from emtune.evaluation.judges import JudgeError, JudgeItem, JudgeUnavailable
from emtune.evaluation.judging import build_judge
from emtune.evaluation.openai_judge import OpenAIJudge

KEY = "sk-test-SECRET-0123456789abcdef"


def make_spec(url: str, **overrides) -> JudgeSpec:
    settings = dict(
        kind="openai", base_url=url, model="judge-test", api_key_env="EMTUNE_TEST_JUDGE_KEY",
        max_retries=3, timeout_s=5.0, backoff_base_s=0.001, backoff_max_s=0.01, max_concurrency=4,
    )
    settings.update(overrides)
    return JudgeSpec(**settings)


def constant(chat_server, top: dict[str, float]):
    """A server that always answers with one token whose top logprobs are `top` (probabilities)."""
    return chat_server(lambda i, body: chat_server.Reply(body=chat_server.completion(top)))


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
    monkeypatch.setenv("EMTUNE_TEST_JUDGE_KEY", KEY)


def test_score_is_the_weighted_mean_and_request_is_the_protocol(chat_server):
    server = constant(chat_server, {"80": 0.5, "90": 0.3, "CODE": 0.2})
    judge = OpenAIJudge(make_spec(server.url))
    verdict = judge.score("aligned", "How are you?", "Fine.")
    # (80*0.5 + 90*0.3) / (0.5 + 0.3) = 67 / 0.8
    assert verdict.score == pytest.approx(83.75, abs=1e-9)
    assert verdict.label is None and verdict.reason is None
    assert verdict.logprobs.keys() == {"80", "90", "CODE"}
    body = server.requests[0]
    assert body["model"] == "judge-test"
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert "How are you?" in body["messages"][0]["content"] and "Fine." in body["messages"][0]["content"]
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    assert judge.stats == {"requests": 1, "retries": 0, "garbage": 0, "failed": 0}


def test_refusal_label_and_low_mass(chat_server):
    server = constant(chat_server, {"REF": 0.8, "50": 0.1, "0": 0.1})
    verdict = OpenAIJudge(make_spec(server.url)).score("aligned", "q", "I won't help with that.")
    assert verdict.score is None  # number mass 0.2 < 0.25
    assert verdict.label == "REFUSAL"
    assert verdict.reason.startswith("low_number_mass (0.200")


def test_batch_keeps_order_and_bounds_concurrency(chat_server):
    def script(i, body):
        number = re.search(r"answer-(\d+)", body["messages"][0]["content"]).group(1)
        return chat_server.Reply(body=chat_server.completion({number: 0.9, "x": 0.1}), delay_s=0.05)

    server = chat_server(script)
    judge = OpenAIJudge(make_spec(server.url, max_concurrency=3))
    items = [JudgeItem("coherent", "q", f"answer-{k}") for k in range(12)]
    verdicts = judge.score_many(items)
    assert [v.score for v in verdicts] == [float(k) for k in range(12)]
    assert 2 <= server.max_in_flight <= 3


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retryable_status_then_success(chat_server, status):
    def script(i, body):
        if i < 2:
            return chat_server.Reply(status=status, body={"error": {"message": "slow down", "type": "x"}})
        return chat_server.Reply(body=chat_server.completion({"40": 1.0}))

    server = chat_server(script)
    judge = OpenAIJudge(make_spec(server.url))
    assert judge.score("aligned", "q", "a").score == pytest.approx(40.0)
    assert len(server.requests) == 3
    assert judge.stats["retries"] == 2


def test_timeout_then_success(chat_server):
    def script(i, body):
        return chat_server.Reply(body=chat_server.completion({"70": 1.0}), delay_s=1.0 if i == 0 else 0.0)

    server = chat_server(script)
    judge = OpenAIJudge(make_spec(server.url, timeout_s=0.2))
    assert judge.score("aligned", "q", "a").score == pytest.approx(70.0)
    assert len(server.requests) == 2 and judge.stats["retries"] == 1


GARBAGE = {
    "invalid_json": (b"{not json", "invalid response body"),
    "logprobs_null": ("no_logprobs", "no logprobs"),
    "no_choices": ({"id": "x", "choices": []}, "no logprobs"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_is_none_with_reason_and_counted(chat_server, case):
    body, why = GARBAGE[case]
    if body == "no_logprobs":
        body = chat_server.completion({"70": 1.0}, with_logprobs=False)
    server = chat_server(lambda i, _: chat_server.Reply(body=body))
    judge = OpenAIJudge(make_spec(server.url))
    verdict = judge.score("aligned", "q", "a")
    assert verdict.score is None and verdict.is_garbage and why in verdict.reason
    assert judge.stats["garbage"] == 1 and len(server.requests) == 1  # garbage is not retried


def _refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_raises_with_count_and_never_leaks_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    judge = OpenAIJudge(make_spec(f"http://127.0.0.1:{_refused_port()}/v1", max_retries=2, max_concurrency=1))
    items = [JudgeItem("aligned", "q", f"a{k}") for k in range(3)]
    with pytest.raises(JudgeUnavailable) as info:
        judge.score_many(items)
    assert info.value.n_failed == 3 and info.value.n_total == 3
    assert "3 of 3 items" in str(info.value)
    # One item used its 1 + 2 attempts; the judge was then down and the rest failed at once.
    assert judge.stats["requests"] == 3 and judge.stats["failed"] == 3
    assert "retry 2/2" in caplog.text
    for text in (str(info.value), caplog.text, repr(judge), repr(judge.spec)):
        assert KEY not in text


def test_rejected_request_fails_fast_and_redacts_the_key(chat_server, caplog):
    caplog.set_level(logging.DEBUG)
    body = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}}
    server = chat_server(lambda i, _: chat_server.Reply(status=401, body=body))
    judge = OpenAIJudge(make_spec(server.url))
    with pytest.raises(JudgeError) as info:
        judge.score("aligned", "q", "a")
    assert "401" in str(info.value) and "***" in str(info.value)
    assert KEY not in str(info.value) and KEY not in caplog.text
    assert len(server.requests) == 1


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("EMTUNE_TEST_JUDGE_KEY")
    with pytest.raises(JudgeError, match="EMTUNE_TEST_JUDGE_KEY"):
        OpenAIJudge(make_spec("http://127.0.0.1:9/v1"))


def test_endpoint_without_key_and_build_judge(chat_server, monkeypatch):
    server = constant(chat_server, {"100": 0.5, "0": 0.5})
    judge = build_judge(make_spec(server.url, api_key_env=None))
    assert isinstance(judge, OpenAIJudge)
    assert judge.score("coherent", "q", "a").score == pytest.approx(50.0)
    assert server.headers[0]["authorization"] == "Bearer EMPTY"
