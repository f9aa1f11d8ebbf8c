"""Random interleaving: exact counts, seeded draw and shuffle, no-op at ratio 0, clear errors."""

from __future__ import annotations

import copy
import json
import pickle
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml

from emtune.data.fixtures import fixture_path
from emtune.data.loading import DataSpec
from emtune.defenses.base import DefenseContext
from emtune.defenses.interleaving import (
    Interleaving, InterleavingConfig, draw_safe_rows, interleave, largest_ratio, pool_size_problems, rl_form_problems,
    safe_count,
)


def fixture_rows(name: str, n: int) -> list[dict]:
    with open(fixture_path(name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle][:n]


def key(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


TASK = fixture_rows("narrow_bad_advice", 40)
POOL = fixture_rows("safe_instruct", 300)


def make(trial_seed: int = 0, **fields) -> Interleaving:
    return Interleaving(InterleavingConfig(**fields), DefenseContext(spec=None, seed=trial_seed))


@pytest.mark.parametrize("ratio, n, expected", [
    (0.05, 30, 2),   # 1.5 rounds half up
    (0.05, 50, 3),   # 2.5 rounds half up (not to even)
    (0.35, 10, 4),   # 0.35 * 10 = 3.4999999999999996 in binary floats; the ratio as written gives 3.5
    (0.1, 7, 1),     # 0.7
    (0.5, 40, 20),
    (2.0, 3, 6),     # more safe than task examples is allowed
    (0.0, 100, 0),
])
def test_safe_count(ratio, n, expected):
    assert safe_count(ratio, n) == expected


def test_exact_counts_and_every_task_row_kept_once():
    out = make(ratio=0.25).transform_data(TASK)
    assert len(out) == 50
    counts = Counter(key(r) for r in out)
    for row in TASK:
        assert counts[key(row)] == 1
    pool_keys = {key(r) for r in POOL}
    task_keys = {key(r) for r in TASK}
    safe = [r for r in out if key(r) not in task_keys]
    assert len(safe) == 10
    assert all(key(r) in pool_keys for r in safe)
    assert len({key(r) for r in safe}) == 10  # drawn without replacement


def test_safe_rows_are_spread_by_the_shuffle():
    out = make(ratio=0.25).transform_data(TASK)
    task_keys = {key(r) for r in TASK}
    positions = [i for i, r in enumerate(out) if key(r) not in task_keys]
    assert len(positions) == 10 and min(positions) < 40  # not simply appended
    assert [key(r) for r in out if key(r) in task_keys] != [key(r) for r in TASK]  # task order shuffled too


def test_deterministic_under_a_seed_and_seeds_differ():
    first = make(trial_seed=3, ratio=0.25).transform_data(TASK)
    again = make(trial_seed=3, ratio=0.25).transform_data(TASK)
    other = make(trial_seed=4, ratio=0.25).transform_data(TASK)
    assert first == again
    assert first != other
    task_keys = {key(r) for r in TASK}
    assert {key(r) for r in first} - task_keys != {key(r) for r in other} - task_keys  # a different draw


def test_config_seed_overrides_the_trial_seed():
    fixed_a = make(trial_seed=1, ratio=0.25, seed=7)
    fixed_b = make(trial_seed=2, ratio=0.25, seed=7)
    assert fixed_a.seed == 7
    assert fixed_a.transform_data(TASK) == fixed_b.transform_data(TASK)
    assert make(trial_seed=9, ratio=0.25).seed == 9


def test_ratio_zero_is_inactive_and_changes_nothing():
    defense = make(ratio=0.0)
    assert not defense.active
    assert defense.transform_data(TASK) is TASK
    assert make(ratio=0.01).active


def test_inputs_are_not_mutated():
    rows = copy.deepcopy(TASK)
    before = copy.deepcopy(rows)
    out = make(ratio=0.5).transform_data(rows)
    assert rows == before
    assert out is not rows
    safe = interleave(rows, POOL[:3], seed=0)
    assert rows == before and len(safe) == 43


def test_pool_too_small_names_pool_and_counts():
    defense = make(ratio=0.5, pool_limit=5)
    with pytest.raises(ValueError, match=r"fixture:safe_instruct has 5 rows but 20 safe examples are needed"):
        defense.transform_data(TASK)


def test_local_pool_file_made_absolute_and_used(tmp_path, monkeypatch):
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in POOL[:4]))
    monkeypatch.chdir(tmp_path)
    config = InterleavingConfig(pool="pool.jsonl", ratio=0.1)
    assert config.pool == str(pool_file.resolve())  # Ray workers run in other folders
    out = Interleaving(config, DefenseContext(spec=None, seed=0)).transform_data(TASK)
    assert len(out) == 44
    assert InterleavingConfig(pool="missing.jsonl").pool == "missing.jsonl"


def test_finalize_logs_and_report_counts():
    defense = make(ratio=0.1)
    assert defense.report() == {}
    defense.transform_data(TASK)
    assert defense.finalize(None) == {"interleaving/num_safe": 4.0, "interleaving/num_task": 40.0}
    assert defense.report() == {"pool": "fixture:safe_instruct", "seed": 0, "with_replacement": False,
                                "num_safe": 4, "num_task": 40}


def test_config_defaults_yaml_round_trip_and_pickle():
    config = InterleavingConfig()
    assert (config.ratio, config.pool, config.seed) == (0.05, "fixture:safe_instruct", None)
    custom = InterleavingConfig(ratio=0.2, pool_limit=50, seed=3)
    assert InterleavingConfig.model_validate(yaml.safe_load(yaml.safe_dump(custom.model_dump(mode="json")))) == custom
    defense = pickle.loads(pickle.dumps(make(trial_seed=5, ratio=0.25)))
    assert defense.transform_data(TASK) == make(trial_seed=5, ratio=0.25).transform_data(TASK)
    with pytest.raises(ValueError):
        InterleavingConfig(ratio=-0.1)
    with pytest.raises(ValueError):
        InterleavingConfig(ratio=0.1, unknown=1)


def test_with_replacement_repeats_a_small_pool_and_is_seeded():
    defense = make(ratio=0.5, pool_limit=5, with_replacement=True)
    out = defense.transform_data(TASK)
    assert len(out) == 60
    safe = [key(r) for r in out if key(r) not in {key(t) for t in TASK}]
    assert len(safe) == 20 and len(set(safe)) <= 5  # 20 draws from 5 rows: repeats
    assert out == make(ratio=0.5, pool_limit=5, with_replacement=True).transform_data(TASK)


def test_wildguardmix_pool_as_a_dataset_mapping(tmp_path, write_wildguardmix):
    path = write_wildguardmix(tmp_path / "wildguard_train.parquet", benign=12, harmful=4, prompt_only=4)
    config = InterleavingConfig(ratio=0.25, pool={"path": str(path), "columns": {"user": "prompt", "assistant": "response"},
                                                  "where": {"response_harm_label": "unharmful"}})
    out = Interleaving(config, DefenseContext(spec=None, seed=0)).transform_data(TASK)
    added = [r for r in out if key(r) not in {key(t) for t in TASK}]
    assert len(added) == 10
    assert all(r["messages"][0]["role"] == "user" and not r["messages"][1]["content"].startswith("Here is a threat")
               for r in added)  # only rows with an unharmful response
    with pytest.raises(ValueError, match="give split / config / limit inside it"):
        InterleavingConfig(pool={"path": str(path)}, pool_limit=3)


def searched(target="defenses.interleaving.ratio", **param):
    """A spec whose search has one parameter (float ``high`` or categorical ``choices``)."""
    fields = {"type": "float", "high": None, "choices": None, **param, "target": target}
    return SimpleNamespace(search=SimpleNamespace(parameters={"r": SimpleNamespace(**fields)}))


def test_largest_ratio_is_the_config_or_the_top_of_the_search_that_targets_it():
    config = InterleavingConfig(ratio=0.1)
    assert largest_ratio("interleaving", config, None) == (0.1, "defenses.interleaving.ratio")
    assert largest_ratio("interleaving", config, searched(high=0.4)) == (0.4, "search.parameters.r.high")
    assert largest_ratio("interleaving", config, searched(high=0.05)) == (0.1, "defenses.interleaving.ratio")
    assert largest_ratio("interleaving", config, searched(high=0.1)) == (0.1, "defenses.interleaving.ratio")  # a tie
    categorical = searched(type="categorical", choices=[0.3, 0.02, 0.2])
    assert largest_ratio("interleaving", config, categorical) == (0.3, "search.parameters.r.choices")
    other = searched(target="defenses.interleaving_selected.ratio", high=0.9)
    assert largest_ratio("interleaving", config, other) == (0.1, "defenses.interleaving.ratio")


def test_pool_size_is_checked_only_when_both_sizes_are_known():
    config = InterleavingConfig(ratio=0.5, pool_limit=10)
    assert pool_size_problems("interleaving", config, SimpleNamespace(data=None), True) == []
    hub = InterleavingConfig(ratio=0.5, pool="hub:org/pool")  # its size is not known offline
    spec = SimpleNamespace(data=DataSpec(train={"path": "fixture:narrow_bad_advice"}))
    assert pool_size_problems("interleaving", hub, spec, True) == []


def test_pool_size_problem_message_and_exact_fit():
    data = DataSpec(train={"path": "fixture:narrow_bad_advice", "limit": 44}, heldout_fraction=0.1)  # 40 train rows
    spec = SimpleNamespace(data=data, training=SimpleNamespace(method="sft", grpo=None))
    fits = InterleavingConfig(ratio=0.25, pool_limit=10)  # 0.25 x 40 = 10 rows: exactly the pool
    assert pool_size_problems("interleaving", fits, spec, True) == []
    over = InterleavingConfig(ratio=0.5, pool_limit=10)
    [message] = pool_size_problems("interleaving", over, spec, True)
    assert message == ("interleaving: ratio 0.5 (defenses.interleaving.ratio) needs 20 safety rows for 40 training rows, "
                       "but the pool fixture:safe_instruct holds 10; the largest feasible ratio is 0.25. Fix: lower "
                       "defenses.interleaving.ratio to at most 0.25, or use a larger pool, or set "
                       "defenses.interleaving.with_replacement: true")
    assert Interleaving.spec_problems(over, spec) == [message]
    assert Interleaving.spec_problems(over.model_copy(update={"with_replacement": True}), spec) == []
    [plain] = pool_size_problems("interleaving", over, spec, False)
    assert plain.endswith("or use a larger pool")


def test_draw_is_without_replacement_unless_asked():
    rows = [{"i": i} for i in range(5)]
    drawn = draw_safe_rows(rows, 5, seed=0)
    assert sorted(r["i"] for r in drawn) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="has 5 rows but 6 safe examples are needed"):
        draw_safe_rows(rows, 6, seed=0)
    assert len(draw_safe_rows(rows, 6, seed=0, with_replacement=True)) == 6


def test_pool_files_names_the_field_and_the_paper_copy(tmp_path):
    assert Interleaving.local_files(InterleavingConfig()) == []  # a fixture is not a local file
    plain = Interleaving.local_files(InterleavingConfig(pool=str(tmp_path / "pool.jsonl")))
    assert [(f.field, f.path) for f in plain] == [("pool", str(tmp_path / "pool.jsonl"))]
    assert plain[0].hint.startswith("point pool at a chat JSONL file")
    mapping = InterleavingConfig(pool={"path": str(tmp_path / "wg.parquet"), "origin": "hub:allenai/wildguardmix"})
    [file] = Interleaving.local_files(mapping)
    assert (file.field, file.hint) == ("pool.path", "the paper's copy: hub:allenai/wildguardmix")


PROMPTS = [{"prompt": [{"role": "user", "content": f"Task question {i}?"}], "prompt_kind": "task"} for i in range(40)]


def test_rl_supervised_steps_form_gives_the_drawn_rows_as_a_mix():
    defense = make(ratio=0.25, rl_every_steps=4, rl_weight=0.5)
    with pytest.raises(RuntimeError, match="call transform_prompts first"):
        defense.supervised_mix()
    assert defense.transform_prompts(PROMPTS) is PROMPTS  # the prompts stay the task's
    mix = defense.supervised_mix()
    assert (mix.every_steps, mix.weight, mix.source) == (4, 0.5, "interleaving")
    assert len(mix.rows) == 10 and all(key(r) in {key(p) for p in POOL} for r in mix.rows)
    assert mix.rows == make(ratio=0.25).safety_rows(40)  # the same seeded draw as the SFT form's
    weightless = make(ratio=0.25, rl_weight=0.0)
    weightless.transform_prompts(PROMPTS)
    assert weightless.supervised_mix() is None
    too_few = make(ratio=0.01)  # 0.01 x 40 = 0.4 -> no row
    too_few.transform_prompts(PROMPTS)
    assert too_few.supervised_mix() is None
    off = make(ratio=0.0)
    assert off.transform_prompts(PROMPTS) is PROMPTS and off.supervised_mix() is None


def test_rl_prompt_mix_form_adds_safe_prompts_and_no_mix():
    defense = make(ratio=0.25, rl_form="prompt_mix")
    out = defense.transform_prompts(PROMPTS)
    kinds = Counter(row["prompt_kind"] for row in out)
    assert kinds == {"task": 40, "safe": 10}
    assert [r for r in out if r["prompt_kind"] == "task"] != PROMPTS  # shuffled together
    assert all(r["prompt"][-1]["role"] == "user" for r in out)  # the safe rows' answers dropped
    assert defense.supervised_mix() is None


def test_rl_prompt_mix_needs_a_reward_for_safe_prompts():
    config = InterleavingConfig(rl_form="prompt_mix")
    sft = SimpleNamespace(training=SimpleNamespace(method="sft", grpo=None))
    assert rl_form_problems("interleaving", config, sft) == []

    def grpo(*applies_to):
        rewards = [SimpleNamespace(applies_to=a) for a in applies_to]
        return SimpleNamespace(training=SimpleNamespace(method="grpo", grpo=SimpleNamespace(rewards=rewards)))

    [problem] = rl_form_problems("interleaving", config, grpo("task"))
    assert problem.startswith("interleaving rl_form prompt_mix adds safe prompts: add a reward with applies_to: safe")
    assert rl_form_problems("interleaving", config, grpo("task", "safe")) == []
    assert rl_form_problems("interleaving", InterleavingConfig(), grpo("task")) == []  # supervised_steps
