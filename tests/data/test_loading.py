"""Dataset loading: schema errors name the file and row; the held-out split is seeded."""

from __future__ import annotations

import json

import pytest

from emtune.data.loading import DatasetSpec
from emtune.data.loading import DataError, load_rows, split_heldout


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_rows_load_and_limit(tmp_path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD] * 5)
    assert len(load_rows(DatasetSpec(path=str(path)))) == 5
    assert len(load_rows(DatasetSpec(path=str(path), limit=2))) == 2
    assert len(load_rows(DatasetSpec(path="fixture:safe_instruct"))) == 300


@pytest.mark.parametrize("bad,fragment", [
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role is 'robot'"),
    ({"text": "plain"}, "needs a 'messages' list"),
    ("{not json", "not valid JSON"),
])
def test_schema_errors_name_file_and_line(tmp_path, bad, fragment) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as info:
        load_rows(DatasetSpec(path=str(path)))
    assert f"{path}:3" in str(info.value) and fragment in str(info.value)


def test_missing_file_and_unknown_fixture(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_rows(DatasetSpec(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="available fixtures"):
        load_rows(DatasetSpec(path="fixture:nope"))


def test_heldout_split_is_seeded_and_disjoint() -> None:
    rows = [{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "a"}]}
            for i in range(50)]
    train, held = split_heldout(rows, 0.1, seed=0)
    again, held_again = split_heldout(rows, 0.1, seed=0)
    _, held_other = split_heldout(rows, 0.1, seed=1)
    assert len(held) == 5 and len(train) == 45
    assert held == held_again and train == again and held != held_other
    ids = {r["messages"][0]["content"] for r in train} | {r["messages"][0]["content"] for r in held}
    assert len(ids) == 50
