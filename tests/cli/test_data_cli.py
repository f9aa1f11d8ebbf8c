"""`emtune data select`: writes the selected rows and scores, exits 2 on bad input, never half-writes."""

from __future__ import annotations

import argparse
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emtune.cli import data as data_cli  # noqa: E402
from emtune.models import TinyModelSpec  # noqa: E402
from emtune.data import selection  # noqa: E402
from emtune.data.fixtures import fixture_path  # noqa: E402

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_perturbed_adapter, save_tiny_base):
    """A saved tiny base model, two perturbed adapters and a 20-row pool file."""
    root = tmp_path_factory.mktemp("cli")
    base, tokenizer = save_tiny_base(root / "base")
    adapters = []
    for k, scale in enumerate((0.6, -0.9)):
        adapters.append(save_perturbed_adapter(tokenizer, root / f"em_{k}", k + 1, scale))
    with open(fixture_path("safe_instruct"), encoding="utf-8") as handle:
        pool = [json.loads(line) for line in handle][:20]
    (root / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    return {"root": root, "base": str(root / "base"), "adapters": adapters, "pool": pool,
            "pool_file": str(root / "pool.jsonl")}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emtune")
    data_cli.add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def select_argv(tiny, out, *extra) -> list[str]:
    argv = ["data", "select", "--model", tiny["base"], "--pool", tiny["pool_file"], "--n", "6",
            "--max-length", "256", "--out", str(out)]
    for path in tiny["adapters"]:
        argv += ["--adapter", path]
    return argv + list(extra)


def test_select_writes_rows_and_scores(tiny, tmp_path, capsys, monkeypatch):
    out, scores = tmp_path / "selected.jsonl", tmp_path / "scores.jsonl"
    assert run(select_argv(tiny, out, "--scores", str(scores), "--cache-dir", str(tmp_path / "cache"))) == 0
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(selected) == 6
    assert all(row in tiny["pool"] for row in selected)
    assert not any(selection.is_refusal(selection.final_answer(r)) for r in selected)  # plus_plus default
    table = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [t["index"] for t in table] == list(range(20))
    for t in table:  # each score is the formula applied to the written NLLs
        mean = sum(t["misaligned_nll"]) / 2
        assert t["score"] == pytest.approx((mean - t["aligned_nll"]) / (t["aligned_nll"] + 1.0))
    chosen = [t for t in table if t["selected"]]
    assert len(chosen) == 6 and not any(t["refusal"] for t in chosen)
    best_other = max(t["score"] for t in table if not t["selected"] and not t["refusal"])
    assert min(t["score"] for t in chosen) >= best_other
    # rows come out best first
    assert selected == [tiny["pool"][t["index"]] for t in sorted(chosen, key=lambda t: -t["score"])]
    assert "selected 6 of 20 pool rows (plus_plus" in capsys.readouterr().out

    # with the same cache folder a second run does not score again
    calls = []
    real = selection.answer_nll
    monkeypatch.setattr(selection, "answer_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tmp_path / "again.jsonl"
    assert run(select_argv(tiny, again, "--cache-dir", str(tmp_path / "cache"))) == 0
    assert calls == [] and again.read_text() == out.read_text()


def test_missing_adapter_exits_2_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "selected.jsonl"
    argv = select_argv(tiny, out) + ["--adapter", str(tmp_path / "no_such_adapter")]
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_adapter" in err and "not found" in err
    assert not out.exists()


def test_too_many_rows_requested_exits_2_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "selected.jsonl"
    argv = select_argv(tiny, out)
    argv[argv.index("--n") + 1] = "20"  # 20 rows, some of them refusals
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    assert "20 examples requested" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file left


@pytest.mark.parametrize("change, message", [
    (("--n", "0"), "--n must be a positive"),
    (("--pool", "missing.jsonl"), "dataset file not found"),
    (("--out", "/nonexistent_dir/x.jsonl"), "does not exist"),
])
def test_bad_arguments_exit_2(tiny, tmp_path, capsys, change, message):
    argv = select_argv(tiny, tmp_path / "out.jsonl")
    argv[argv.index(change[0]) + 1] = change[1]
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
