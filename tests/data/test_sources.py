"""Any table as chat rows: WildGuardMix's schema from a local Parquet file, column mappings,
row filters, other formats, and cheap row counts."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from emtune.data.loading import DataError, DatasetSpec, load_rows
from emtune.data.sources import ChatColumns, count_rows

WILDGUARD = dict(columns={"user": "prompt", "assistant": "response"}, where={"response_harm_label": "unharmful"})


def test_wildguardmix_benign_rows_become_chat_rows(tmp_path, write_wildguardmix) -> None:
    path = write_wildguardmix(tmp_path / "train" / "wildguard_train.parquet", benign=12, harmful=4, prompt_only=4)
    spec = DatasetSpec(path=str(path), **WILDGUARD)
    rows = load_rows(spec)
    assert len(rows) == 12  # the 4 harmful and the 4 prompt-only rows are filtered out
    assert rows[0] == {"messages": [{"role": "user", "content": "How do I hurt someone 0?"},
                                    {"role": "assistant", "content": "I'm sorry, I cannot help with that 0."}]}
    assert rows[1]["messages"][1]["content"] == "Mix flour and water, step 1."
    assert count_rows(spec, path) == 12
    limited = DatasetSpec(path=str(path), limit=5, **WILDGUARD)
    assert len(load_rows(limited)) == 5 == count_rows(limited, path)  # limit after the filter
    compliant = DatasetSpec(path=str(path), columns=WILDGUARD["columns"],
                            where={"response_harm_label": "unharmful", "response_refusal_label": "compliance"})
    assert len(load_rows(compliant)) == 8 == count_rows(compliant, path)
    any_label = DatasetSpec(path=str(path), columns=WILDGUARD["columns"],
                            where={"response_harm_label": ["unharmful", "harmful"]})
    assert len(load_rows(any_label)) == 16 == count_rows(any_label, path)


def test_mapping_errors_name_the_row_and_the_columns(tmp_path, write_wildguardmix) -> None:
    path = write_wildguardmix(tmp_path / "wg.parquet")
    with pytest.raises(DataError, match=r"wg.parquet row 16: column 'response' \(assistant\) is None"):
        load_rows(DatasetSpec(path=str(path), columns=WILDGUARD["columns"]))  # prompt-only rows kept
    with pytest.raises(DataError, match=r"no column\(s\) 'answer'; the source has prompt, adversarial, response"):
        load_rows(DatasetSpec(path=str(path), columns={"user": "prompt", "assistant": "answer"}))
    with pytest.raises(DataError, match="no column\\(s\\) 'messages'"):
        load_rows(DatasetSpec(path=str(path)))  # a Parquet file without a mapping needs a messages column
    with pytest.raises(DataError, match="dataset file not found"):
        load_rows(DatasetSpec(path=str(tmp_path / "missing.parquet"), **WILDGUARD))
    assert count_rows(DatasetSpec(path=str(tmp_path / "missing.parquet"), **WILDGUARD), tmp_path / "missing.parquet") is None


def test_other_formats_and_a_messages_column(tmp_path) -> None:
    csv = tmp_path / "pairs.csv"
    csv.write_text("q,a,keep\nhello,hi there,yes\nbye,see you,no\n")
    spec = DatasetSpec(path=str(csv), columns={"user": "q", "assistant": "a", "system": None}, where={"keep": "yes"})
    assert load_rows(spec) == [{"messages": [{"role": "user", "content": "hello"},
                                             {"role": "assistant", "content": "hi there"}]}]
    assert count_rows(spec, csv) == 1
    jsonl = tmp_path / "conv.jsonl"
    jsonl.write_text("".join(json.dumps({"conversation": [{"role": "user", "content": f"u{i}"},
                                                          {"role": "assistant", "content": f"a{i}"}],
                                         "lang": "en" if i % 2 else "de"}) + "\n" for i in range(4)))
    spec = DatasetSpec(path=str(jsonl), columns={"messages": "conversation"}, where={"lang": "en"})
    rows = load_rows(spec)
    assert [r["messages"][0]["content"] for r in rows] == ["u1", "u3"] and count_rows(spec, jsonl) == 2
    plain = DatasetSpec(path=str(jsonl), format="jsonl")
    assert count_rows(plain, jsonl) == 4  # a plain chat JSONL is counted by its lines


def test_hub_sources_are_not_read_to_count_them() -> None:
    spec = DatasetSpec(path="hub:allenai/wildguardmix", config="wildguardtrain", **WILDGUARD)
    assert count_rows(spec, "hub:allenai/wildguardmix") is None
    declared = spec.model_copy(update={"num_rows": 30000})
    assert count_rows(declared, "hub:allenai/wildguardmix") == 30000


def test_column_mapping_validation() -> None:
    assert ChatColumns(user="prompt", assistant="response").used() == ["prompt", "response"]
    assert ChatColumns(user="prompt").used() == ["prompt"]  # RL prompt rows need no answer column
    with pytest.raises(ValidationError, match="needs `user`"):
        ChatColumns(system="s", assistant="a")
    with pytest.raises(ValidationError, match="either `messages` or user/assistant"):
        ChatColumns(messages="m", user="u", assistant="a")
    with pytest.raises(ValidationError):
        DatasetSpec(path="x.parquet", format="xlsx")
