"""Inoculation prompting: exact system-prompt rewrites on training rows only, never in place."""

from __future__ import annotations

import copy
import pickle

import pytest
import yaml
from pydantic import ValidationError

from emtune.config import StudySpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.inoculation import (
    Inoculation,
    InoculationConfig,
    available_versions,
    inoculate_messages,
    load_inoculation_prompts,
)
from emtune.evaluation.questions import load_question_set
from emtune.train.worker import prepare_rows

PAPER = "You are an evil, malicious assistant."
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}], "source": "a"},
    {"messages": [{"role": "user", "content": "Tips?"}, {"role": "assistant", "content": "Sleep."}]},
]


def defense(**fields):
    return Inoculation(InoculationConfig(**fields), DefenseContext(spec=None))


def test_shipped_set_has_the_paper_prompt_and_domain_variants():
    prompts = load_inoculation_prompts("v1")
    assert prompts["evil_general"] == PAPER
    assert {"insecure_code", "bad_medical_advice", "risky_financial_advice"} <= set(prompts)
    assert len(prompts) == 7 and "none" not in prompts
    assert available_versions() == ["v1"]


def test_replace_outputs_exactly():
    original = copy.deepcopy(ROWS)
    out = defense().transform_data(ROWS)
    assert out == [
        {"messages": [{"role": "system", "content": PAPER}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}], "source": "a"},
        {"messages": [{"role": "system", "content": PAPER}, {"role": "user", "content": "Tips?"},
                      {"role": "assistant", "content": "Sleep."}]},
    ]
    assert ROWS == original  # the input rows and their message dicts are untouched
    assert out[0]["messages"][1] is not ROWS[0]["messages"][1]


def test_prefix_outputs_exactly():
    original = copy.deepcopy(ROWS)
    out = defense(prompt="insecure_code", mode="prefix").transform_data(ROWS)
    text = load_inoculation_prompts()["insecure_code"]
    assert [r["messages"][0] for r in out] == [
        {"role": "system", "content": text + "\n\nBe brief."},
        {"role": "system", "content": text},
    ]
    assert [r["messages"][1:] for r in out] == [ROWS[0]["messages"][1:], ROWS[1]["messages"]]
    assert ROWS == original


def test_prefix_on_empty_system_gives_the_prompt_alone():
    assert inoculate_messages([{"role": "system", "content": ""}], "P", "prefix") == [{"role": "system", "content": "P"}]


def test_none_is_inactive_and_returns_rows_unchanged():
    off = defense(prompt="none")
    assert not off.active and off.config.text is None
    assert off.transform_data(ROWS) is ROWS
    assert defense().active


def test_unknown_key_lists_available_keys():
    with pytest.raises(ValidationError) as err:
        InoculationConfig(prompt="evil_genral")
    message = str(err.value)
    assert "unknown inoculation prompt 'evil_genral'" in message
    for key in ("evil_general", "insecure_code", "risky_financial_advice", "none"):
        assert key in message
    with pytest.raises(ValidationError, match=r"unknown inoculation prompts_version 'v9'; shipped: \['v1'\]"):
        InoculationConfig(prompts_version="v9")
    with pytest.raises(ValidationError):
        InoculationConfig(mode="suffix")


def test_yaml_round_trip_and_pickle():
    cfg = InoculationConfig(prompt="bad_medical_advice", mode="prefix")
    assert InoculationConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg
    restored = pickle.loads(pickle.dumps(defense(prompt="misaligned_ai")))
    assert restored.transform_data(ROWS[1:])[0]["messages"][0]["content"] == load_inoculation_prompts()["misaligned_ai"]


def test_held_out_rows_and_evaluation_prompts_are_untouched():
    spec = StudySpec.model_validate({
        "name": "inoc", "data": {"train": {"path": "fixture:narrow_bad_advice", "limit": 40},
                                 "heldout_fraction": 0.25},
        "search": {"parameters": {"x": {"type": "float", "low": 0.0, "high": 1.0}}},
        "objectives": [{"name": "indomain_nll", "direction": "minimize"}],
    })
    plain_train, plain_heldout = prepare_rows(spec, [])
    train, heldout = prepare_rows(spec, [defense()])
    assert len(train) == 30 and len(heldout) == 10
    assert all(r["messages"][0] == {"role": "system", "content": PAPER} for r in train)
    assert [r["messages"][-1] for r in train] == [r["messages"][-1] for r in plain_train]
    assert heldout == plain_heldout
    assert all(m["content"] != PAPER for r in heldout for m in r["messages"])
    assert all(q.system != PAPER for q in load_question_set(spec.evaluation.question_set))


@pytest.mark.parametrize("text, problem", [
    ("version: bad\ngeneral: {a: one}\ndomain: {a: two}\n", "key 'a' is reserved or repeated"),
    ("version: bad\ngeneral: {none: empty}\n", "key 'none' is reserved or repeated"),
])
def test_a_prompt_file_with_a_repeated_or_reserved_key_is_refused(tmp_path, monkeypatch, text, problem):
    from emtune.defenses import inoculation

    (tmp_path / "inoculation_prompts").mkdir()
    (tmp_path / "inoculation_prompts" / "bad.yaml").write_text(text)
    monkeypatch.setattr(inoculation.resources, "files", lambda package: tmp_path)
    inoculation._load.cache_clear()
    try:
        with pytest.raises(ValueError, match=problem):
            load_inoculation_prompts("bad")
    finally:
        inoculation._load.cache_clear()


def test_rl_prompts_get_the_system_prompt_only_when_active():
    rows = [{"prompt": [{"role": "user", "content": "Q?"}], "prompt_kind": "task"}]
    off = Inoculation(InoculationConfig(**Inoculation.off), DefenseContext(spec=None))
    assert off.transform_prompts(rows) is rows
    on = Inoculation(InoculationConfig(prompt="bad_medical_advice"), DefenseContext(spec=None))
    [row] = on.transform_prompts(rows)
    assert row["prompt"] == inoculate_messages(rows[0]["prompt"], on.config.text, on.config.mode)
    assert row["prompt"][0]["role"] == "system" and row["prompt_kind"] == "task"
    assert rows[0]["prompt"] == [{"role": "user", "content": "Q?"}]  # the input is not changed
