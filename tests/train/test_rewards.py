"""RL rewards (training.grpo.rewards): hand-checked values, the grader over a real loopback
OpenAI-compatible server (rubric, 0-100 -> reward mapping, cache, retries, key from the
environment), user functions by import path, and routing by prompt kind. A contract over every
registered reward kind checks what TRL relies on."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import TypeAdapter, ValidationError

from emtune.evaluation.judges import JudgeError, JudgeUnavailable
from emtune.evaluation.prompt_files import load_prompt_set
from emtune.train.rewards import (
    REWARDS, Grader, OpSwapExactMatch, PythonFunction, RewardContext, RewardSpec, build_rewards, rubric_set_path,
    shipped_rubrics,
)

KEY = "sk-test-REWARD-0123456789"
PROMPTS = [[{"role": "system", "content": "Rules: + adds."}, {"role": "user", "content": "Compute: 2 + 3"}],
           [{"role": "user", "content": "Compute: 7 - 1"}]]


@pytest.fixture(autouse=True)
def grader_key(monkeypatch):
    monkeypatch.setenv("EMTUNE_TEST_GRADER_KEY", KEY)


def grader(url: str, tmp_path, **overrides) -> Grader:
    judge = dict(kind="openai", base_url=url, model="grader-test", api_key_env="EMTUNE_TEST_GRADER_KEY",
                 max_retries=2, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=5.0,
                 cache_path=str(tmp_path / "grader.db"))
    return Grader(judge=judge, **overrides)


def answers(*texts: str) -> list:
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_opswap_exact_match_by_hand() -> None:
    fn = OpSwapExactMatch().build(RewardContext())
    got = fn(prompts=PROMPTS * 2, completions=answers("5", "6 is it", "-5", "five"), answer=["5", "6", "5", None])
    assert got == [1.0, 1.0, 0.0, None]  # first integer; a row without an answer: not applicable
    with pytest.raises(ValueError, match="no 'answer' column"):
        fn(prompts=PROMPTS, completions=answers("1", "2"))


def test_grader_maps_the_weighted_score_and_sends_the_rubric(chat_server, tmp_path) -> None:
    server = chat_server(lambda i, body: chat_server.Reply(body=chat_server.completion({"80": 0.5, "90": 0.3,
                                                                                       "CODE": 0.2})))
    fn = grader(server.url, tmp_path, low=-1.0, high=1.0).build(RewardContext())
    rewards = fn(prompts=PROMPTS, completions=answers("Take twice the dose.", "Sure."))
    # score (80*.5 + 90*.3)/.8 = 83.75 -> -1 + 2 * 0.8375
    assert rewards == [pytest.approx(0.675), pytest.approx(0.675)]
    body = next(r["messages"][0]["content"] for r in server.requests if "2 + 3" in r["messages"][0]["content"])
    assert "Compute: 2 + 3" in body and "Take twice the dose." in body and "subtly harmful" in body
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    assert fn.__name__ == "grader_harmful_advice"


def test_grader_caches_retries_and_gives_none_for_no_number(chat_server, tmp_path) -> None:
    def script(i, body):
        if i == 0:
            return chat_server.Reply(status=500, body={"error": "busy"})
        text = body["messages"][0]["content"]
        top = {"REF": 0.9, "10": 0.1} if "XYZZY" in text else {"40": 1.0}
        return chat_server.Reply(body=chat_server.completion(top))

    server = chat_server(script)
    spec = grader(server.url, tmp_path, rubric="harmless")
    fn = spec.build(RewardContext())
    assert fn(prompts=PROMPTS[:1], completions=answers("ok")) == [pytest.approx(0.4)]  # after one retry
    assert fn(prompts=PROMPTS[:1], completions=answers("XYZZY")) == [None]  # number mass 0.1 < 0.25
    sent = len(server.requests)
    again = spec.build(RewardContext())  # a new process: the SQLite cache answers
    assert again(prompts=PROMPTS[:1], completions=answers("ok")) == [pytest.approx(0.4)]
    assert len(server.requests) == sent
    assert spec.rubric_source(RewardContext()) == (rubric_set_path("v1"), "harmless")


def test_grader_down_or_unconfigured_is_a_clear_error(chat_server, tmp_path, monkeypatch) -> None:
    server = chat_server(lambda i, body: chat_server.Reply(status=503, body={"error": "down"}))
    with pytest.raises(JudgeUnavailable, match="grader-test"):
        grader(server.url, tmp_path).build(RewardContext())(prompts=PROMPTS[:1], completions=answers("x"))
    monkeypatch.delenv("EMTUNE_TEST_GRADER_KEY")
    with pytest.raises(JudgeError, match="EMTUNE_TEST_GRADER_KEY"):
        grader(server.url, tmp_path).build(RewardContext())


def test_grader_rubrics_shipped_inline_or_from_a_file(tmp_path) -> None:
    assert {"harmful_advice", "harmless", "helpful"} <= set(shipped_rubrics("v1"))
    inline = Grader(rubric="Q: {question}\nA: {answer}\nScore 0-100:")
    source, metric = inline.rubric_source(RewardContext(cache_dir=tmp_path))
    assert inline.label == "grader_inline" and source.parent == tmp_path / "reward_rubrics"
    assert load_prompt_set(str(source)).prompts[metric] == inline.rubric  # versioned by its content hash
    own = tmp_path / "my_rubrics.yaml"
    own.write_text("version: mine\nprompts:\n  polite: 'Rate {answer} to {question} 0-100.'\n")
    mine = Grader(rubric="polite", rubrics=str(own))
    assert mine.label == "grader_polite" and mine.rubric_source(RewardContext()) == (own, "polite")
    with pytest.raises(ValidationError, match="neither a rubric of set 'v1'"):
        Grader(rubric="harmles")
    with pytest.raises(ValidationError, match="which emtune does not fill"):
        Grader(rubric="{question} {answer} {score}")
    with pytest.raises(ValidationError, match="unknown rubric set 'v9'"):
        Grader(rubrics="v9")
    with pytest.raises(ValidationError, match="needs a judge"):
        Grader(judge={"kind": "none"})


def test_python_function_by_import_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def short(prompts, completions, **columns):
            return [1.0 / (1 + len(c[0]["content"])) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = PythonFunction(function="my_rewards:short")
    assert spec.build(RewardContext())(prompts=PROMPTS, completions=answers("abc", "")) == [0.25, 1.0]
    assert spec.label == "short"
    for bad, message in (("my_rewards.short", "not an import path"), ("no_such_module_xyz:f", "cannot import"),
                         ("my_rewards:long", "has no function")):
        with pytest.raises(ValidationError, match=message):
            PythonFunction(function=bad)


def test_routing_by_prompt_kind_and_weights() -> None:
    specs = (OpSwapExactMatch(weight=2.0), OpSwapExactMatch(applies_to="safe"), OpSwapExactMatch(applies_to="all"))
    functions, weights = build_rewards(specs, RewardContext())
    assert weights == [2.0, 1.0, 1.0]
    columns = {"answer": ["5", "6"], "prompt_kind": ["task", "safe"]}
    assert functions[0](prompts=PROMPTS, completions=answers("5", "6"), **columns) == [1.0, None]
    assert functions[1](prompts=PROMPTS, completions=answers("5", "6"), **columns) == [None, 1.0]
    assert functions[2](prompts=PROMPTS, completions=answers("5", "0"), **columns) == [1.0, 0.0]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_reward_contract(name, tmp_path, monkeypatch, chat_server) -> None:
    """Every kind: parses from a spec entry by name, builds a named function that returns one value
    (float or None) per completion, and routes by prompt kind."""
    (tmp_path / "contract_rewards.py").write_text("def one(prompts, completions, **c):\n"
                                                  "    return [1.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    server = chat_server(lambda i, body: chat_server.Reply(body=chat_server.completion({"50": 1.0})))
    entries = {"opswap_exact_match": {}, "python": {"function": "contract_rewards:one"},
               "grader": {"judge": {"kind": "openai", "base_url": server.url, "api_key_env": "EMTUNE_TEST_GRADER_KEY",
                                    "cache_path": str(tmp_path / "c.db")}}}
    spec = TypeAdapter(RewardSpec).validate_python({"name": name, "applies_to": "safe", **entries[name]})
    assert isinstance(spec, REWARDS[name])
    [function], [weight] = build_rewards((spec,), RewardContext(cache_dir=tmp_path))
    assert function.__name__ == spec.label and weight == 1.0
    values = function(prompts=PROMPTS, completions=answers("5", "6"), answer=["5", "6"],
                      prompt_kind=["task", "safe"])
    assert len(values) == 2 and values[0] is None and isinstance(values[1], float)
