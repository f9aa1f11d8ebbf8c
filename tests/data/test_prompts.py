"""Prompt-only rows for RL: both accepted shapes, kept columns, and errors that name the row."""

from __future__ import annotations

import json

import pytest

from emtune.data.loading import DataError, DatasetSpec
from emtune.data.prompts import chat_from_prompt, check_prompt_row, load_prompt_rows


def test_shapes_columns_and_references(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "tags": ["x"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompt_rows(DatasetSpec(path=str(path)))
    assert got[0] == {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4", "prompt_kind": "task"}
    assert got[1]["prompt"][0] == {"role": "system", "content": "Be brief."} and "reference" not in got[1]
    # a chat row: the answer becomes the reference, non-scalar columns are dropped
    assert got[2] == {"prompt": [{"role": "user", "content": "Q?"}], "reference": "A.", "prompt_kind": "task"}
    assert chat_from_prompt(got[2])["messages"][-1] == {"role": "assistant", "content": "A."}
    assert chat_from_prompt(got[0]) == {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}


def test_bundled_prompt_fixture_loads() -> None:
    rows = load_prompt_rows(DatasetSpec(path="fixture:em_prompts", limit=5))
    assert len(rows) == 5 and all(r["prompt"][-1]["role"] == "user" and r["domain"] for r in rows)


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, "needs 'prompt'"),
    ({"prompt": []}, "non-empty"),
    ({"prompt": [{"role": "user", "content": 3}]}, r"messages\[0\]"),
    ({"messages": [{"role": "system", "content": "s"}]}, "end with a user message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "end with a user message"),
])
def test_bad_rows_name_the_row(row, message) -> None:
    with pytest.raises(DataError, match=message) as info:
        check_prompt_row(row, "f.jsonl:7")
    assert str(info.value).startswith("f.jsonl:7:")
