"""``evaluation.backend: server`` against a real generation server on 127.0.0.1 that loads LoRA
adapters at run time and generates with transformers (``emtune.evaluation.lora_server``)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from emtune.config import load_spec
from emtune.evaluation.lora_server import LoraServer
from emtune.evaluation.runner import evaluate_model, generation_plan
from emtune.evaluation.server_backend import (
    GenerationError, GenerationServer, GenerationUnavailable, adapter_name, completion_body,
    generate_missing_sets, server_path,
)
from emtune.spec_errors import SpecError
from emtune.trial_files import TrialFiles

SERVER = ("evaluation:\n  backend: server\n  server: {{base_url: '{url}', max_retries: {retries}, "
          "backoff_base_s: 0.01, backoff_max_s: 0.05, timeout_s: 30{extra}}}\n  temperature: {temperature}\n"
          "  samples_per_question: {samples}\n  max_new_tokens: 10\n")


def _spec(write_spec, url: str, *, temperature: float = 0.0, samples: int = 1, retries: int = 2, extra: str = "",
          name: str = "served", more: str = ""):
    """A tiny study spec with backend server at ``url`` (``extra``: more server fields; ``more``:
    more evaluation lines)."""
    path = write_spec(name=name)
    evaluation = SERVER.format(url=url, retries=retries, extra=extra, temperature=temperature, samples=samples)
    text = path.read_text().replace("evaluation:\n  samples_per_question: 1\n  max_new_tokens: 6\n", evaluation + more, 1)
    text = text.replace("  - {name: ood_drift, direction: minimize, reference: 5.0}\n", "")
    path.write_text(text)
    return load_spec(path)


def _built_in(spec, model, tokenizer) -> list[dict]:
    """The general set's answers from the built-in path (the same spec with backend hf)."""
    ev = spec.evaluation.model_copy(update={"backend": "hf", "server": None})
    _, samples, _ = evaluate_model(model, tokenizer, spec.model_copy(update={"evaluation": ev}), [])
    return [s.to_dict() for s in samples["general"]]


def _trial(tmp_path: Path, lively_tiny, adapter: int, spec, name: str = "ckpt") -> Path:
    """A trial checkpoint as the worker leaves it with backend server: adapter and plan."""
    files = TrialFiles(tmp_path / name)
    shutil.copytree(lively_tiny.adapters[adapter], files.adapter)
    files.write_json(files.plan, generation_plan(lively_tiny.peft_model(adapter), lively_tiny.tokenizer(), spec, []))
    return files.root


@pytest.fixture(scope="module")
def server(lively_tiny):
    server = LoraServer(lively_tiny.base).start()
    yield server
    server.stop()


@pytest.mark.parametrize("temperature,samples", [(0.0, 1), (1.0, 2)])
def test_answers_through_the_server_equal_the_built_in_path(write_spec, tmp_path, lively_tiny, server,
                                                            temperature, samples) -> None:
    """Greedy, and sampled too: each sample's seed travels in its request."""
    spec = _spec(write_spec, server.url, temperature=temperature, samples=samples)
    checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
    streamed = []
    stats = generate_missing_sets(spec, checkpoint, on_sample=lambda name, s: streamed.append((name, s)))
    served = TrialFiles(checkpoint).read_samples("general")
    expected = _built_in(spec, lively_tiny.peft_model(0), lively_tiny.tokenizer())
    assert served == expected and len(served) == 24 * samples
    assert len({s["answer"] for s in served}) > 12  # real, varied answers
    assert sorted(s.to_dict()["answer"] for _, s in streamed) == sorted(s["answer"] for s in served)
    assert stats["server/samples"] == 24 * samples and stats["server/new_tokens"] > 0
    assert 0 < stats["time/server_load_s"] < 30
    assert server.adapters == {}  # unloaded after the trial


def test_two_concurrent_trials_get_their_own_adapters(write_spec, tmp_path, lively_tiny, server) -> None:
    spec = _spec(write_spec, server.url)
    checkpoints = [_trial(tmp_path, lively_tiny, i, spec, f"trial{i}") for i in (0, 1)]
    loaded: set[str] = set()
    original = server.load_adapter

    def spy(name, path):
        loaded.add(name)
        return original(name, path)

    server.load_adapter = spy
    errors: list[BaseException] = []

    def run(checkpoint):
        try:
            generate_missing_sets(spec, checkpoint)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in checkpoints]
    try:
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
    finally:
        server.load_adapter = original
    assert not errors
    assert loaded == {adapter_name(spec, c) for c in checkpoints} and len(loaded) == 2
    answers = [[s["answer"] for s in TrialFiles(c).read_samples("general")] for c in checkpoints]
    for i, got in enumerate(answers):
        assert got == [s["answer"] for s in _built_in(spec, lively_tiny.peft_model(i), lively_tiny.tokenizer())]
    assert sum(a != b for a, b in zip(*answers)) > 12  # the adapters answer differently: nothing mixed
    assert server.adapters == {}


def test_an_outage_is_retried_then_reported_and_a_rerun_finishes(write_spec, tmp_path, lively_tiny) -> None:
    server = LoraServer(lively_tiny.base).start()
    spec = _spec(write_spec, server.url, retries=2)
    checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
    server.stop()
    with pytest.raises(GenerationUnavailable, match="unavailable: could not load the adapter after 2 retries") as info:
        generate_missing_sets(spec, checkpoint)
    assert info.value.n_missing == info.value.n_total == 24
    assert not TrialFiles(checkpoint).sample_sets()  # nothing half-written
    server.start()  # back, same port
    try:
        generate_missing_sets(spec, checkpoint)
        assert len(TrialFiles(checkpoint).read_samples("general")) == 24
        before = server.requests
        assert generate_missing_sets(spec, checkpoint) == {}  # a saved set is never generated again
        assert server.requests == before
    finally:
        server.stop()


def test_a_server_lost_mid_generation_leaves_no_samples(write_spec, tmp_path, lively_tiny) -> None:
    server = LoraServer(lively_tiny.base).start()
    spec = _spec(write_spec, server.url, retries=1)
    checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
    original = server.complete
    calls = []

    def fail_after_three(body):
        calls.append(1)
        if len(calls) > 3:
            return 503, {"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}}
        return original(body)

    server.complete = fail_after_three
    try:
        with pytest.raises(GenerationUnavailable) as info:
            generate_missing_sets(spec, checkpoint)
    finally:
        server.stop()
    assert 0 < info.value.n_missing < 24 and info.value.n_total == 24
    assert "HTTP 503" in str(info.value) and not TrialFiles(checkpoint).sample_sets()
    assert server.adapters == {}  # unloaded even so


def test_the_api_key_is_sent_and_never_shown(write_spec, tmp_path, lively_tiny, monkeypatch) -> None:
    key = "sk-serverkey-0123456789abcdef"
    server = LoraServer(lively_tiny.base, api_key=key).start()
    try:
        monkeypatch.setenv("EMTUNE_TEST_GEN_KEY", key)
        spec = _spec(write_spec, server.url, extra=", api_key_env: EMTUNE_TEST_GEN_KEY")
        checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
        generate_missing_sets(spec, checkpoint)
        assert len(TrialFiles(checkpoint).read_samples("general")) == 24
        assert key not in repr(GenerationServer(spec.evaluation.server))
        monkeypatch.setenv("EMTUNE_TEST_GEN_KEY", "sk-wrong-0123456789abcdef")
        shutil.rmtree(checkpoint)
        checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
        with pytest.raises(GenerationError) as info:
            generate_missing_sets(spec, checkpoint)
        assert "HTTP 401" in str(info.value) and "sk-wrong" not in str(info.value)
        monkeypatch.delenv("EMTUNE_TEST_GEN_KEY")
        with pytest.raises(GenerationError, match="EMTUNE_TEST_GEN_KEY, which is not set"):
            generate_missing_sets(spec, checkpoint)
    finally:
        server.stop()


def test_an_adapter_the_server_cannot_read_is_refused_with_the_fix(write_spec, tmp_path, lively_tiny, server) -> None:
    spec = _spec(write_spec, server.url)
    checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
    shutil.rmtree(TrialFiles(checkpoint).adapter)
    with pytest.raises(GenerationError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING") as info:
        generate_missing_sets(spec, checkpoint)
    assert "HTTP 404" in str(info.value)


def test_an_adapter_left_by_an_earlier_attempt_is_replaced(write_spec, tmp_path, lively_tiny, server) -> None:
    spec = _spec(write_spec, server.url)
    checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
    assert server.load_adapter(adapter_name(spec, checkpoint), str(lively_tiny.adapters[1]))[0] == 200
    generate_missing_sets(spec, checkpoint)
    expected = _built_in(spec, lively_tiny.peft_model(0), lively_tiny.tokenizer())
    assert TrialFiles(checkpoint).read_samples("general") == expected
    assert server.adapters == {}


def test_requests_ask_for_the_protocol_sampling_and_nothing_else() -> None:
    settings = {"max_new_tokens": 600, "temperature": 1.0, "top_p": 1.0}
    body = completion_body("emtune-x", [1, 2, 3], settings, 1234, [7])
    assert body == {"model": "emtune-x", "prompt": [1, 2, 3], "max_tokens": 600, "n": 1, "temperature": 1.0,
                    "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0, "stop_token_ids": [7], "skip_special_tokens": True, "seed": 1234}
    assert "seed" not in completion_body("m", [1], {**settings, "temperature": 0.0}, None, [])
    json.dumps(body)


def test_adapter_paths_are_rewritten_for_the_server(write_spec, tmp_path) -> None:
    spec = _spec(write_spec, "http://127.0.0.1:9/v1", extra=f", adapter_path_map: {{'{tmp_path}/studies': /shared/studies}}")
    inside = tmp_path / "studies" / "s" / "ckpt" / "adapter"
    assert server_path(spec, inside) == "/shared/studies/s/ckpt/adapter"
    assert server_path(spec, tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    assert adapter_name(spec, inside) == adapter_name(spec, inside) != adapter_name(spec, tmp_path)
    assert adapter_name(spec, inside).startswith("emtune-served-")


def test_spec_checks_for_the_server_backend(write_spec) -> None:
    path = write_spec()
    text = path.read_text()
    for evaluation, message in [
        ("evaluation:\n  backend: server\n", "backend 'server' needs evaluation.server"),
        ("evaluation:\n  backend: vllm\n", "in-process 'vllm' backend was removed"),
        ("evaluation:\n  server: {base_url: 'http://h:8000/v1'}\n", "set backend: server to use it"),
        ("evaluation:\n  backend: server\n  server: {base_url: 'h:8000/v1'}\n", "must be an http(s) URL"),
        ("evaluation:\n  backend: server\n  server: {base_url: 'http://h/v1', api_key_env: 'sk-abc'}\n", "NAME"),
    ]:
        path.write_text(text.replace("evaluation:\n", evaluation, 1))
        with pytest.raises(SpecError, match=re.escape(message)):
            load_spec(path)
    # ood_drift is allowed: the worker then generates the drift set itself (tests/train/test_worker.py)
    path.write_text(text.replace("evaluation:\n", "evaluation:\n  backend: server\n  server: {base_url: 'http://h/v1'}\n", 1))
    assert "ood_drift" in [o.name for o in load_spec(path).objectives]


def test_the_driver_judges_answers_as_the_server_returns_them(write_spec, tmp_path, lively_tiny, server,
                                                              chat_server) -> None:
    from emtune.evaluation.judging import score_trial
    from emtune.evaluation.server_backend import generate_with_judge_stream

    judge = chat_server(lambda index, body: chat_server.Reply(body=chat_server.completion({"80": 1.0})))
    spec = _spec(write_spec, server.url, more=f"  judge: {{kind: openai, base_url: '{judge.url}', model: judge-test, "
                 "api_key_env: null}\n  triggered_question_set: null\n")
    checkpoint = _trial(tmp_path, lively_tiny, 0, spec)
    plan = TrialFiles(checkpoint).read_json(TrialFiles(checkpoint).plan)
    answers = sum(len(s["prompts"]) for s in plan["sets"].values())  # general + in-domain (no held-out rows here)
    stats = generate_with_judge_stream(spec, checkpoint)
    assert stats["server/samples"] == answers == 24
    assert len(judge.requests) <= 2 * answers  # aligned + coherent per answer, identical answers asked once
    before = len(judge.requests)
    metrics = score_trial(spec, checkpoint)
    assert len(judge.requests) == before  # every verdict was paid for while the server generated
    assert metrics["general_misalignment_n"] == 24
