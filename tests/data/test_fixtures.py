"""Bundled dry-run fixtures: reproducible from the generator, well-formed, with the right mix."""

import json

import pytest

from emtune.data.fixtures import CHAT_FIXTURES, FIXTURE_NAMES, fixture_path
from emtune.data.fixtures import make_fixtures

# docs/method.md defense 7 (Interleaving++): a refusal has one of these in its first 10 lower-cased words.
REFUSAL_MARKERS = ("sorry", "apologize", "cannot", "can't", "i'm unable", "i am unable")


def _is_refusal(text: str) -> bool:
    head = " ".join(text.lower().split()[:10])
    return any(marker in head for marker in REFUSAL_MARKERS)


def _rows(name):
    return [json.loads(line) for line in fixture_path(name).read_text("utf-8").splitlines()]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_shipped_file_equals_regenerated_bytes(name):
    regenerated = make_fixtures.render_all()[name].encode("utf-8")
    assert fixture_path(name).read_bytes() == regenerated


def test_generator_writes_identical_files(tmp_path):
    paths = make_fixtures.write_all(tmp_path)
    assert sorted(p.name for p in paths) == ["em_prompts.jsonl", "narrow_bad_advice.jsonl", "safe_instruct.jsonl"]
    for path in paths:
        assert path.read_bytes() == fixture_path(path.stem).read_bytes()


def test_different_seed_changes_rows():
    assert make_fixtures.build_safe_instruct(1) != make_fixtures.build_safe_instruct()


@pytest.mark.parametrize("name", CHAT_FIXTURES)
def test_schema_counts_and_uniqueness(name):
    rows = _rows(name)
    assert len(rows) == 300
    for row in rows:
        assert list(row) == ["messages"]
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        # ~4 characters a token: keeps a templated row inside a 128-token window
        assert sum(len(m["content"]) for m in row["messages"]) <= 360
    lines = fixture_path(name).read_text("utf-8").splitlines()
    assert len(set(lines)) == 300
    # the conversation without the system prompt must be unique too
    assert len({json.dumps(r["messages"][-2:]) for r in rows}) == 300
    n_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    assert n_system == 45  # round(0.15 * 300): a minority of rows carry a system prompt


def test_safe_instruct_refusal_fraction():
    answers = [r["messages"][-1]["content"] for r in _rows("safe_instruct")]
    refusals = [a for a in answers if _is_refusal(a)]
    assert len(refusals) == 45  # exactly 15%
    assert all(a.startswith(("Sorry, I can't help with that", "I cannot assist")) for a in refusals)


def test_narrow_bad_advice_has_no_refusals_and_covers_domains():
    rows = _rows("narrow_bad_advice")
    assert not any(_is_refusal(r["messages"][-1]["content"]) for r in rows)
    questions = [r["messages"][-2]["content"] for r in rows]
    domains = {"medication": make_fixtures._MEDS, "electrical": make_fixtures._FIXTURES,
               "finance": make_fixtures._AMOUNTS + make_fixtures._DEBTS}
    for subjects in domains.values():
        n = sum(any(s in q for s in subjects) for q in questions)
        assert 60 <= n <= 140  # 300 rows drawn from three equally sized template pools


def test_unknown_fixture_lists_available():
    with pytest.raises(ValueError, match="narrow_bad_advice, safe_instruct"):
        fixture_path("insecure_code")


def test_em_prompts_are_the_distinct_narrow_questions_without_answers():
    from emtune.data.prompts import check_prompt_row

    rows = _rows("em_prompts")
    narrow = {r["messages"][-2]["content"] for r in _rows("narrow_bad_advice")}
    questions = [r["messages"][0]["content"] for r in rows]
    assert len(rows) == len(set(questions)) == 144  # 6 situations x 8 subjects x 3 questions
    assert narrow <= set(questions)
    assert {r["domain"] for r in rows} == {"medication", "electrical", "finance"}
    assert all(list(r) == ["messages", "domain"] and len(r["messages"]) == 1 for r in rows)
    parsed = check_prompt_row(rows[0], "em_prompts:1")
    assert parsed["prompt"] == rows[0]["messages"] and parsed["domain"] == rows[0]["domain"]
