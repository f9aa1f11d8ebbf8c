"""Content-hash keys and atomic files of the selection cache (no model needed)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from emtune.models import ModelSpec, TinyModelSpec
from emtune.data import selection_cache as sc
from emtune.data.selection import gap_scores


def fake_adapter(folder, weights: bytes):
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "README.md").write_text("model card")
    return folder


ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(["Sure, here it is.", "Sorry, I can't.", "Yes.", "No."])]


def test_key_depends_on_content_not_order(tmp_path):
    a = fake_adapter(tmp_path / "a", b"\x01\x02")
    b = fake_adapter(tmp_path / "b", b"\x03")
    key = sc.scores_key(ROWS, [a, b], "m", 1.0, 128)
    assert key == sc.scores_key(ROWS, [b, a], "m", 1.0, 128)  # the ensemble mean ignores order
    assert key != sc.scores_key(ROWS, [a], "m", 1.0, 128)
    assert key != sc.scores_key(ROWS, [a, b], "m", 0.5, 128)
    assert key != sc.scores_key(ROWS, [a, b], "m", 1.0, 64)
    assert key != sc.scores_key(ROWS, [a, b], "other", 1.0, 128)
    assert key != sc.scores_key(ROWS[:3], [a, b], "m", 1.0, 128)
    (b / "README.md").write_text("edited card")  # the model card is not part of the identity
    assert key == sc.scores_key(ROWS, [a, b], "m", 1.0, 128)
    (b / "adapter_model.safetensors").write_bytes(b"\x04")
    assert key != sc.scores_key(ROWS, [a, b], "m", 1.0, 128)


def test_adapter_folder_checks(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        sc.adapter_digest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        sc.adapter_digest(tmp_path / "empty")


def test_scoring_identity():
    from emtune.models import scoring_identity

    assert scoring_identity(ModelSpec(source="Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16")) == \
        "Qwen/Qwen2.5-7B-Instruct@default:bfloat16"
    tiny_a = scoring_identity(ModelSpec(tiny=TinyModelSpec(seed=0)))
    assert tiny_a.startswith("tiny:") and tiny_a != scoring_identity(ModelSpec(tiny=TinyModelSpec(seed=1)))


def test_cached_table_is_read_back_and_selection_cached(tmp_path):
    a = fake_adapter(tmp_path / "a", b"\x01")
    aligned, misaligned = [1.0, 1.0, 2.0, 1.0], [[2.0, 5.0, 2.0, 1.5]]
    table = sc.ScoreTable(key=sc.scores_key(ROWS, [a], "m", 1.0, 128), model="m", epsilon=1.0, max_length=128,
                          adapters=[str(a)], aligned_nll=aligned, misaligned_nll=misaligned,
                          scores=gap_scores(misaligned, aligned))
    assert table.scores == pytest.approx([0.5, 2.0, 0.0, 0.25])
    sc.write_json_atomic(tmp_path / "cache" / "selection" / f"{table.key}.json", asdict(table))

    def must_not_load():
        raise AssertionError("a cache hit must not load a model")

    got = sc.load_or_compute_scores(tmp_path / "cache", ROWS, [a], "m", must_not_load, 1.0, 128)
    assert got == table

    plus = sc.load_or_select(tmp_path / "cache", table, ROWS, 2, "plus")
    assert plus["indices"] == [1, 0] and plus["num_refusals"] == 1
    plus_plus = sc.load_or_select(tmp_path / "cache", table, ROWS, 2, "plus_plus")
    assert plus_plus["indices"] == [0, 3]
    assert plus_plus["mean_selected_score"] == pytest.approx(0.375)
    files = sorted(p.name for p in (tmp_path / "cache" / "selection").iterdir())
    assert len(files) == 3 and not any(name.endswith(".tmp") for name in files)
    stored = json.loads((tmp_path / "cache" / "selection" / [f for f in files if "plus_plus" in f][0]).read_text())
    assert stored["indices"] == [0, 3]
    with pytest.raises(ValueError, match="variant"):
        sc.load_or_select(None, table, ROWS, 2, "plusplus")
