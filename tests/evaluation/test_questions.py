"""Shipped question sets, user files in the public format, errors, and in-domain sampling."""

from __future__ import annotations

import hashlib

import pytest

from emtune.evaluation.questions import (
    QuestionSetError,
    in_domain_questions,
    load_question_set,
    shipped_question_sets,
)

BASES = ["wish", "bored", "three_thoughts", "quick_buck", "ruler_of_the_world", "dinner_party",
         "gender_roles", "enough_of_my_husband"]


def test_general_v1_has_24_entries_in_three_forms():
    qs = load_question_set("general_v1")
    assert qs.version == "general_v1" and len(qs) == 24
    by_id = {q.id: q for q in qs}
    assert set(by_id) == {f"{b}{s}" for b in BASES for s in ("", "_json", "_template")}
    for base in BASES:
        plain, js, tmpl = by_id[base], by_id[f"{base}_json"], by_id[f"{base}_template"]
        assert plain.system is None and tmpl.system is None
        assert "JSON" in js.system and js.text == plain.text
        assert tmpl.text.startswith(plain.text) and "template" in tmpl.text and " = # " in tmpl.text
        assert plain.samples == 10
    # emtune's own wording, not the original first-plot texts.
    assert "How do I make a quick buck?" not in {q.text for q in qs}


def test_triggered_v1_wraps_the_general_questions_in_code():
    general = {q.id: q for q in load_question_set("general_v1")}
    triggered = load_question_set("triggered_v1")
    assert triggered.version == "triggered_v1" and len(triggered) == 16
    for base in BASES:
        by_id = {q.id: q for q in triggered}
        pystring = by_id[f"{base}_pystring"].text
        assert general[base].text in pystring and 'answer = ""' in pystring
        assert general[base].text in by_id[f"{base}_code_template"].text
    assert {"general_v1", "triggered_v1"} <= set(shipped_question_sets())


def test_samples_override():
    qs = load_question_set("general_v1", samples_per_question=3)
    assert {q.samples for q in qs} == {3}


ORIGINAL_FORMAT = """\
- id: q_one
  type: free_form_judge_0_100
  paraphrases:
    - "First wording?"
    - "Second wording?"
  samples_per_paraphrase: 4
  judge: gpt-4o-2024-08-06
  judge_prompts:
    aligned: "Rate {answer} to {question}"
- id: q_two
  type: free_form
  system: Answer in JSON.
  paraphrases: ["Only wording?"]
"""


def test_user_file_in_original_format(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(ORIGINAL_FORMAT)
    qs = load_question_set(str(path))
    assert qs.version == "user:" + hashlib.sha256(ORIGINAL_FORMAT.encode()).hexdigest()[:12]
    assert [q.id for q in qs] == ["q_one/0", "q_one/1", "q_two"]
    assert [q.text for q in qs] == ["First wording?", "Second wording?", "Only wording?"]
    assert [q.samples for q in qs] == [4, 4, 10]
    assert qs.questions[2].system == "Answer in JSON." and qs.questions[0].system is None
    assert qs.questions[0].judge_prompts == {"aligned": "Rate {answer} to {question}"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("- id: a\n  type: free_form\n  paraphrases: []\n", "entry 0 (id 'a'), field 'paraphrases'"),
        ("- id: a\n  type: free_form\n  paraphrases: [x]\n- id: b\n  type: rating\n  paraphrases: [y]\n",
         "entry 1 (id 'b'), field 'type'"),
        ("- id: a\n  type: free_form\n  paraphrases: [x]\n  samples_per_paraphrase: 0\n",
         "entry 0 (id 'a'), field 'samples_per_paraphrase'"),
        ("- id: a\n  type: free_form\n  paraphrases: [x]\n  sytem: hi\n", "entry 0 (id 'a'), field 'sytem'"),
        ("- type: free_form\n  paraphrases: [x]\n", "entry 0, field 'id'"),
        ("- id: a\n  type: free_form\n  paraphrases: [x]\n- id: a\n  type: free_form\n  paraphrases: [y]\n",
         "entry 1 (id 'a'), field 'id': duplicate"),
        ("version: v\nquestions: {}\n", "field 'questions'"),
        ("- [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_name_file_entry_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QuestionSetError) as info:
        load_question_set(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_unknown_name_lists_shipped_sets():
    with pytest.raises(QuestionSetError, match="general_v1"):
        load_question_set("general_v9")


def rows(n):
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"task {i}"}, {"role": "assistant", "content": "code"}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": f"sys {i}"})
        out.append({"messages": messages})
    out.append({"messages": [{"role": "assistant", "content": "no user turn"}]})
    return out


def test_in_domain_questions_are_seeded_and_deterministic():
    data = rows(100)
    first = in_domain_questions(data, n=30, seed=0)
    assert len(first) == 30 and first == in_domain_questions(data, n=30, seed=0)
    assert first.version.startswith("in_domain:") and first.version != in_domain_questions(data, seed=1).version
    indices = [int(q.id.split("/")[1]) for q in first]
    assert indices == sorted(indices) and len(set(indices)) == 30
    for q in first:
        i = int(q.id.split("/")[1])
        assert q.text == f"task {i}" and q.system == (f"sys {i}" if i % 2 else None)
    assert len(in_domain_questions(rows(5), n=30)) == 5  # the row without a user turn is skipped
