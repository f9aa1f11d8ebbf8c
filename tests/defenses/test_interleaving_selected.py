"""Interleaving+ / ++ end to end on a tiny model: scores, selection, shared cache, errors."""

from __future__ import annotations

import json
import os
import pickle
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emtune.models import ModelSpec, TinyModelSpec  # noqa: E402
from emtune.data import selection  # noqa: E402
from emtune.data.fixtures import fixture_path  # noqa: E402
from emtune.data.loading import DataSpec  # noqa: E402
from emtune.defenses.base import DefenseContext, StageServices  # noqa: E402
from emtune.defenses.interleaving_selected import (  # noqa: E402
    SelectedInterleaving,
    SelectedInterleavingConfig,
    dataset_path,
)
from emtune.models import build_tiny_model  # noqa: E402

TINY = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                     pretrain_steps=0)


def fixture_rows(name: str, n: int) -> list[dict]:
    with open(fixture_path(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle][:n]


TASK = fixture_rows("narrow_bad_advice", 40)
POOL = fixture_rows("safe_instruct", 20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_perturbed_adapter, save_tiny_base):
    """A saved tiny base model + tokenizer and two adapters with perturbed lora_B weights."""
    root = tmp_path_factory.mktemp("tiny")
    base, tokenizer = save_tiny_base(root / "base")
    adapters = []
    for k, scale in enumerate((0.6, -0.9)):
        adapters.append(save_perturbed_adapter(tokenizer, root / f"em_{k}", k + 1, scale))
    return {"root": root, "tokenizer": tokenizer, "base": str(root / "base"), "adapters": adapters}


def make(tiny, cache_dir, trial_seed=0, **fields) -> SelectedInterleaving:
    fields = {"pool_limit": 20, "misaligned_adapters": tuple(tiny["adapters"]), "max_length": 256, **fields}
    context = DefenseContext(spec=None, tokenizer=tiny["tokenizer"], seed=trial_seed, cache_dir=cache_dir,
                             extras={"model_source": tiny["base"]})
    return SelectedInterleaving(SelectedInterleavingConfig(**fields), context)


def reference_scores(tiny, adapters):
    """Gap scores computed independently: one fresh model per adapter, no cache, no switching."""
    from peft import PeftModel

    tok = tiny["tokenizer"]
    aligned = selection.answer_nll(build_tiny_model(TINY, len(tok)), tok, POOL, 256)
    misaligned = [selection.answer_nll(PeftModel.from_pretrained(build_tiny_model(TINY, len(tok)), p), tok, POOL, 256)
                  for p in adapters]
    return selection.gap_scores(misaligned, aligned, 1.0)


def key(row):
    return json.dumps(row, sort_keys=True)


def test_end_to_end_selection_and_shared_cache(tiny, tmp_path, monkeypatch):
    calls = []
    real = selection.answer_nll

    def counting(*args, **kwargs):  # counts forward sweeps; the results are the real ones
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "answer_nll", counting)
    cache = tmp_path / "cache"
    defense = make(tiny, cache, ratio=0.25)  # 10 of 20 pool rows
    out = defense.transform_data(TASK)
    assert len(calls) == 3  # aligned + two adapters
    files = list((cache / "selection").glob("*.json"))
    table_file = cache / "selection" / f"{defense.selection_key}.json"
    assert table_file.is_file() and len(files) == 2  # score table + one selected set
    stored = json.loads(table_file.read_text())
    monkeypatch.setattr(selection, "answer_nll", real)
    want = reference_scores(tiny, tiny["adapters"])
    assert stored["scores"] == pytest.approx(want, abs=1e-4)

    # the selected rows are the top 10 non-refusals by the independently computed scores
    expected = selection.select_top(POOL, want, 10, drop_refusals=True)
    task_keys = {key(r) for r in TASK}
    safe = [key(r) for r in out if key(r) not in task_keys]
    assert sorted(safe) == sorted(key(POOL[i]) for i in expected)
    assert not any(selection.is_refusal(selection.final_answer(json.loads(s))) for s in safe)
    assert len(out) == 50 and sum(key(r) in task_keys for r in out) == 40

    # a second trial (new defense object, other seed) reuses the cache: no forward pass at all
    monkeypatch.setattr(selection, "answer_nll", counting)
    calls.clear()
    again = make(tiny, cache, trial_seed=1, ratio=0.25).transform_data(TASK)
    assert calls == []
    assert sorted(key(r) for r in again) == sorted(key(r) for r in out)  # same set
    assert again != out  # shuffled by the other trial seed
    logs = defense.finalize(None)
    assert logs["interleaving_selected/num_safe"] == 10.0 and logs["interleaving_selected/num_adapters"] == 2.0
    assert logs["interleaving_selected/pool_refusals"] == sum(
        selection.is_refusal(selection.final_answer(r)) for r in POOL)
    report = defense.report()
    assert report["indices"] == expected and report["scores_key"] == defense.selection_key
    assert report["variant"] == "plus_plus" and report["misaligned_adapters"] == tiny["adapters"]


def test_plus_keeps_refusals_and_leave_out_scores_one_adapter(tiny, tmp_path):
    cache = tmp_path / "cache"
    plus = make(tiny, cache, ratio=0.1, variant="plus", leave_out=("em_0",))  # by folder name
    out = plus.transform_data(TASK)
    want = reference_scores(tiny, tiny["adapters"][1:])
    expected = selection.select_top(POOL, want, 4)
    task_keys = {key(r) for r in TASK}
    assert sorted(key(r) for r in out if key(r) not in task_keys) == sorted(key(POOL[i]) for i in expected)
    both = make(tiny, cache, ratio=0.1, variant="plus")
    both.transform_data(TASK)
    assert both.selection_key != plus.selection_key  # leaving an adapter out is another score table


def test_inactive_at_ratio_zero_needs_nothing(tmp_path):
    defense = SelectedInterleaving(SelectedInterleavingConfig(ratio=0.0), DefenseContext(spec=None))
    assert not defense.active
    assert defense.transform_data(TASK) is TASK


def test_missing_ensemble_and_bad_leave_out_are_clear(tiny, tmp_path):
    empty = SelectedInterleaving(SelectedInterleavingConfig(), DefenseContext(spec=None, cache_dir=tmp_path))
    with pytest.raises(ValueError, match=r"misaligned_adapters is empty.*emtune data select"):
        empty.transform_data(TASK)
    with pytest.raises(ValidationError, match="leave_out entry 'code' matches none"):
        SelectedInterleavingConfig(misaligned_adapters=tuple(tiny["adapters"]), leave_out=("code",))
    all_out = make(tiny, tmp_path, leave_out=tuple(tiny["adapters"]))
    with pytest.raises(ValueError, match="removes every misaligned adapter"):
        all_out.transform_data(TASK)
    missing = make(tiny, tmp_path, misaligned_adapters=(str(tmp_path / "nope"),))
    with pytest.raises(ValueError, match="nope.*not found"):
        missing.transform_data(TASK)


def test_pool_too_small_after_dropping_refusals(tiny, tmp_path):
    defense = make(tiny, tmp_path, ratio=0.5)  # 20 needed, 20 rows of which some are refusals
    with pytest.raises(ValueError, match=r"pool fixture:safe_instruct.*20 examples requested"):
        defense.transform_data(TASK)


def test_config_defaults_yaml_round_trip_and_pickle(tiny, tmp_path):
    config = SelectedInterleavingConfig()
    assert (config.ratio, config.variant, config.epsilon, config.refusal_window_words) == (0.05, "plus_plus", 1.0, 10)
    assert config.refusal_keywords == ("sorry", "apologize", "cannot", "can't", "i'm unable", "i am unable")
    custom = SelectedInterleavingConfig(ratio=0.2, variant="plus", misaligned_adapters=tuple(tiny["adapters"]),
                                        leave_out=("em_1",), epsilon=0.5)
    dumped = yaml.safe_dump(custom.model_dump(mode="json"))
    assert SelectedInterleavingConfig.model_validate(yaml.safe_load(dumped)) == custom
    defense = pickle.loads(pickle.dumps(make(tiny, tmp_path, ratio=0.1)))
    assert defense.config.ratio == 0.1 and defense.active
    with pytest.raises(ValidationError):
        SelectedInterleavingConfig(variant="plus_plus_plus")
    with pytest.raises(ValidationError):
        SelectedInterleavingConfig(epsilon=0.0)


def test_ratio_rounding_to_zero_adds_nothing_and_scores_nothing(tiny, tmp_path):
    defense = make(tiny, tmp_path, ratio=0.01)  # 0.01 x 40 = 0.4 -> 0 rows
    out = defense.transform_data(TASK)
    assert out == TASK and out is not TASK
    assert not (tmp_path / "selection").exists()


def test_dataset_paths_made_absolute_and_bare_leave_out_names_kept(tiny, tmp_path, monkeypatch):
    (tmp_path / "em.jsonl").write_text("")
    (tmp_path / "sub" / "em_0").mkdir(parents=True)
    (tmp_path / "em_0").mkdir()
    monkeypatch.chdir(tmp_path)
    config = SelectedInterleavingConfig(
        misaligned_adapters=("sub/em_0",), leave_out=("em_0", "sub/em_0"),
        misaligned_datasets=("em.jsonl", {"path": "em.jsonl", "origin": "hub:org/em"}, "fixture:narrow_bad_advice"))
    assert config.misaligned_adapters == (str(tmp_path / "sub" / "em_0"),)
    assert config.misaligned_datasets[0] == str(tmp_path / "em.jsonl")
    assert config.misaligned_datasets[1].path == str(tmp_path / "em.jsonl")
    assert config.misaligned_datasets[2] == "fixture:narrow_bad_advice"
    assert config.leave_out == ("em_0", str(tmp_path / "sub" / "em_0"))  # a bare folder name stays a name
    assert [dataset_path(d) for d in config.misaligned_datasets] == [str(tmp_path / "em.jsonl")] * 2 + [
        "fixture:narrow_bad_advice"]


def test_local_files_lists_pool_adapters_and_local_datasets(tmp_path):
    config = SelectedInterleavingConfig(
        pool=str(tmp_path / "pool.jsonl"), misaligned_adapters=(str(tmp_path / "a"), str(tmp_path / "b")),
        misaligned_datasets=(str(tmp_path / "em.jsonl"), "hub:org/em", {"path": str(tmp_path / "wg.jsonl"),
                                                                          "origin": "hub:org/wg"},
                             {"path": str(tmp_path / "x.jsonl")}))
    files = SelectedInterleaving.local_files(config)
    assert [(f.field, f.path, f.folder) for f in files] == [
        ("pool", str(tmp_path / "pool.jsonl"), False),
        ("misaligned_adapters.0", str(tmp_path / "a"), True),
        ("misaligned_adapters.1", str(tmp_path / "b"), True),
        ("misaligned_datasets.0", str(tmp_path / "em.jsonl"), False),
        ("misaligned_datasets.2.path", str(tmp_path / "wg.jsonl"), False),
        ("misaligned_datasets.3.path", str(tmp_path / "x.jsonl"), False),
    ]
    assert files[3].hint == files[5].hint == "an EM dataset (chat JSONL) to train an undefended adapter on"
    assert files[4].hint == "the paper's copy: hub:org/wg"


def test_spec_problems_need_an_ensemble_only_when_active():
    sft = SimpleNamespace(method="sft", grpo=None)
    no_data = SimpleNamespace(data=None, training=sft)
    [problem] = SelectedInterleaving.spec_problems(SelectedInterleavingConfig(ratio=0.05), no_data)
    assert problem.startswith("interleaving_selected needs misaligned_adapters")
    off = SelectedInterleavingConfig().model_copy(update=SelectedInterleaving.off)
    assert SelectedInterleaving.spec_problems(off, no_data) == []
    assert SelectedInterleaving.spec_problems(SelectedInterleavingConfig(misaligned_adapters=("a",)), no_data) == []
    assert SelectedInterleaving.spec_problems(SelectedInterleavingConfig(misaligned_datasets=("fixture:x",)), no_data) == []
    data = DataSpec(train={"path": "fixture:narrow_bad_advice", "limit": 44}, heldout_fraction=0.1)  # 40 train rows
    over = SelectedInterleavingConfig(ratio=0.5, pool_limit=10, misaligned_adapters=("a",))
    [message] = SelectedInterleaving.spec_problems(over, SimpleNamespace(data=data, training=sft))
    assert message.endswith("Fix: lower defenses.interleaving_selected.ratio to at most 0.25, or use a larger pool")


def test_prepare_trains_the_ensemble_once_and_maps_leave_out(tmp_path):
    trained = []

    def train(dataset):
        trained.append(dataset_path(dataset))
        return tmp_path / f"adapter-{len(trained)}"

    services = StageServices(spec=None, cache_dir=tmp_path, model_source="tiny", train_undefended_adapter=train,
                             run_task=None)
    given = SelectedInterleavingConfig(misaligned_adapters=("/given",))
    assert SelectedInterleaving.prepare(given, services) is given and trained == []
    config = SelectedInterleavingConfig(misaligned_adapters=("/given",), leave_out=("fixture:em_b",),
                                        misaligned_datasets=("fixture:em_a", "fixture:em_b"))
    prepared = SelectedInterleaving.prepare(config, services)
    assert trained == ["fixture:em_a", "fixture:em_b"]
    assert prepared.misaligned_adapters == ("/given", str(tmp_path / "adapter-1"), str(tmp_path / "adapter-2"))
    assert prepared.misaligned_datasets == () and prepared.leave_out == (str(tmp_path / "adapter-2"),)


def test_scoring_length_and_model_source(tiny, tmp_path):
    assert make(tiny, tmp_path, max_length=64)._max_length() == 64
    unset = SelectedInterleaving(SelectedInterleavingConfig(), DefenseContext(spec=SimpleNamespace(data=DataSpec(
        train={"path": "fixture:narrow_bad_advice"}, max_length=300))))
    assert unset._max_length() == 300
    assert SelectedInterleaving(SelectedInterleavingConfig(), DefenseContext(spec=None))._max_length() == 2048
    # the study's model source (extras) wins over resolving the spec's model again
    spec = SimpleNamespace(model=ModelSpec(source=str(tmp_path / "not-there")))
    defense = SelectedInterleaving(SelectedInterleavingConfig(), DefenseContext(
        spec=spec, tokenizer=tiny["tokenizer"], extras={"model_source": tiny["base"]}))
    model, tokenizer = defense._load_model_and_tokenizer()
    assert tokenizer is tiny["tokenizer"] and model.config.num_hidden_layers == TINY.num_layers


def test_score_table_reads_the_pool_itself(tiny, tmp_path):
    defense = make(tiny, tmp_path, ratio=0.25)
    defense.transform_data(TASK)
    table = make(tiny, tmp_path, ratio=0.25).score_table()  # the pool rows read by the defense: same table
    assert table.key == defense.selection_key and len(table.scores) == len(POOL)
