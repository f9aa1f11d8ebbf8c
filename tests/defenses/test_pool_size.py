"""The pool-size check at validation: a searched interleaving ratio that needs more rows than the
pool holds is refused by `emtune validate` (exit 2) with the pool size, the largest feasible ratio
and the fix, unless the draw is with replacement."""

from __future__ import annotations

import json

import pytest

from emtune.cli.main import main
from emtune.config import load_spec
from emtune.data.loading import DataSpec
from emtune.data.sizes import task_rows
from emtune.spec_errors import SpecError

SPEC = """
name: pool
output_dir: {out}
model: {{source: tiny}}
data:
  train: {{path: {train}}}
  heldout_fraction: 0.1
defenses:
  - {{name: interleaving, ratio: 0.0, pool: {pool}{extra}}}
search:
  parameters:
    ratio: {{type: float, target: defenses.interleaving.ratio, low: 0.01, high: {high}, log: true}}
objectives:
  - {{name: ood_drift, direction: minimize}}
"""


def _task_file(tmp_path, n: int):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(n)))
    return path


def _write(tmp_path, pool: str, high: float, extra: str = "", n_task: int = 60):
    path = tmp_path / "pool.yaml"
    path.write_text(SPEC.format(out=tmp_path / "studies", train=_task_file(tmp_path, n_task), pool=pool,
                                high=high, extra=extra))
    return path


def test_searched_ratio_over_the_pool_is_refused_with_the_fix(tmp_path, write_wildguardmix, capsys) -> None:
    parquet = write_wildguardmix(tmp_path / "wg.parquet", benign=12, harmful=4, prompt_only=4)
    pool = ("{path: " + str(parquet) + ", columns: {user: prompt, assistant: response}, "
            "where: {response_harm_label: unharmful}}")
    path = _write(tmp_path, pool, high=0.5)  # 60 rows - 6 held out = 54 training rows; 0.5 x 54 = 27 > 12
    with pytest.raises(SpecError) as info:
        load_spec(path)
    messages = [m for _, m, _ in info.value.problems]
    assert any("interleaving: ratio 0.5 (search.parameters.ratio.high) needs 27 safety rows for 54 training rows, "
               "but the pool " + str(parquet) + " holds 12; the largest feasible ratio is 0.2222" in m
               and "with_replacement: true" in m for m in messages), messages
    assert main(["validate", str(path)]) == 2
    assert "largest feasible ratio is 0.2222" in capsys.readouterr().err
    ok = _write(tmp_path, pool, high=0.22)  # 0.22 x 54 = 11.88 -> 12 rows: fits exactly
    assert load_spec(ok).defenses[0].name == "interleaving"
    replaced = _write(tmp_path, pool, high=0.5, extra=", with_replacement: true")
    assert load_spec(replaced).defenses[0].with_replacement


def test_fixture_pool_and_opswap_rows_count(tmp_path) -> None:
    path = _write(tmp_path, '"fixture:safe_instruct"', high=0.5, n_task=1000)  # 900 x 0.5 = 450 > 300
    with pytest.raises(SpecError, match="holds 300; the largest feasible ratio is 0.3333"):
        load_spec(path)
    spec = load_spec(_write(tmp_path, '"fixture:safe_instruct"', high=0.3, n_task=1000))
    assert task_rows(spec.data) == 900
    data = DataSpec.model_validate({**spec.data.model_dump(), "opswap": {"n_train_per_tier": 10, "n_test_per_tier": 2}})
    assert task_rows(data) == 930  # OpSwap's 3 x 10 train rows are mixed in
    as_task = DataSpec.model_validate({**data.model_dump(), "opswap_role": "task"})
    assert task_rows(as_task) == 30


def test_unknown_sizes_are_not_guessed(tmp_path) -> None:
    path = _write(tmp_path, '"hub:allenai/wildguardmix"', high=0.5)
    assert load_spec(path).defenses[0].pool == "hub:allenai/wildguardmix"  # a hub pool is not read offline
    declared = _write(tmp_path, "{path: hub:allenai/wildguardmix, config: wildguardtrain, num_rows: 20, "
                                "columns: {user: prompt, assistant: response}, where: {response_harm_label: unharmful}}",
                      high=0.5)
    with pytest.raises(SpecError, match="holds 20"):
        load_spec(declared)
