"""GRPO specs: the group's defaults (each overridable), and every problem refused at validation
with its path, above all a defense with no RL form (`emtune validate` exits 2 naming it)."""

from __future__ import annotations

import textwrap
from typing import ClassVar, Literal

import pytest

from emtune.cli.main import main
from emtune.config import load_spec, sync_defense_registry
from emtune.defenses.base import Defense
from emtune.defenses.registry import DEFENSES
from emtune.spec_errors import SpecError, StrictModel
from emtune.train.settings import TrainingSpec

GRPO_SPEC = """
name: rl
output_dir: {out}
model: {{source: tiny}}
data:
  train: {{path: "fixture:em_prompts", limit: 20}}
  opswap: {{tiers: [1], n_train_per_tier: 4, n_test_per_tier: 4}}  # the exact-match reward's answers
training:
  method: grpo
  per_device_batch_size: 4
  gradient_accumulation_steps: 1
  grpo:
    rewards:
      - {{name: opswap_exact_match}}
defenses: {defenses}
search:
  parameters:
    x: {{type: float, low: 0, high: 1}}
objectives:
  - {{name: train_reward, direction: maximize}}
"""


def write(tmp_path, defenses="[]", **replace) -> str:
    text = GRPO_SPEC.format(out=tmp_path / "studies", defenses=defenses)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "rl.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(path: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return [(where, message) for where, message, _ in info.value.problems]


def test_group_defaults_and_overrides() -> None:
    grpo = TrainingSpec(method="grpo", grpo={"rewards": [{"name": "opswap_exact_match"}]})
    assert (grpo.learning_rate, grpo.lr_scheduler, grpo.weight_decay) == (5e-6, "cosine", 0.1)
    g = grpo.grpo
    assert (g.num_generations, g.temperature, g.top_p, g.beta, g.warmup) == (4, 0.8, 0.9, 0.0, None)
    own = TrainingSpec(method="grpo", learning_rate=1e-5, weight_decay=0.0,
                       grpo={"rewards": [{"name": "opswap_exact_match"}], "temperature": 1.0})
    assert (own.learning_rate, own.weight_decay, own.lr_scheduler, own.grpo.temperature) == (1e-5, 0.0, "cosine", 1.0)
    sft = TrainingSpec()
    assert (sft.method, sft.learning_rate, sft.lr_scheduler, sft.weight_decay, sft.grpo) == ("sft", 1e-4, "linear",
                                                                                            0.01, None)
    # a dumped trial spec re-validates to the same values (searched overrides go through a dump)
    assert TrainingSpec.model_validate(grpo.model_dump()) == grpo


def test_grpo_spec_validates_and_names_its_problems(tmp_path) -> None:
    spec = load_spec(write(tmp_path))
    assert spec.training.method == "grpo" and spec.training.learning_rate == 5e-6
    assert problems(write(tmp_path, **{"  grpo:\n    rewards:\n      - {name: opswap_exact_match}\n": ""})) == [
        ("training", "method grpo needs a `grpo` section with at least its rewards, e.g. grpo: {rewards: "
                     "[{name: opswap_exact_match}]}")]
    [(where, message)] = problems(write(tmp_path, **{"opswap_exact_match}": "opswap_exact_mach}"}))
    assert where == "training.grpo.rewards[0].name" and "unknown reward 'opswap_exact_mach'" in message
    assert "did you mean 'opswap_exact_match'" in message
    [(_, message)] = problems(write(tmp_path, **{"per_device_batch_size: 4": "per_device_batch_size: 3"}))
    assert "= 3 must be a multiple of grpo.num_generations (4)" in message


class _SftOnlyConfig(StrictModel):
    name: Literal["sft_only_test"] = "sft_only_test"
    weight: float = 1.0


class _SftOnly(Defense):
    """A defense with no RL form (every shipped defense has one)."""

    config_class = _SftOnlyConfig
    strength: ClassVar[tuple[str, ...]] = ("weight",)


@pytest.fixture
def sft_only_defense():
    DEFENSES["sft_only_test"] = _SftOnly
    sync_defense_registry()
    yield
    del DEFENSES["sft_only_test"]
    sync_defense_registry()


def test_validate_refuses_a_defense_without_an_rl_form(tmp_path, capsys, sft_only_defense) -> None:
    path = write(tmp_path, defenses="[{name: kl_to_reference, weight: 0.1}, {name: sft_only_test}]")
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "defense 'sft_only_test' has no grpo form (it has: sft)" in err
    assert "kl_to_reference" not in err and "Traceback" not in err
    assert not (tmp_path / "studies").exists()
    # the same defense is fine for supervised training
    sft = path.replace("rl.yaml", "sft.yaml")
    text = open(path).read().replace("  method: grpo\n", "").replace(
        "  grpo:\n    rewards:\n      - {name: opswap_exact_match}\n", "").replace(
        '"fixture:em_prompts"', '"fixture:narrow_bad_advice"').replace("train_reward", "ood_drift").replace(
        "maximize", "minimize")
    open(sft, "w").write(text)
    assert main(["validate", sft]) == 0


@pytest.mark.parametrize("defenses, message", [
    ("[{name: kl_to_reference, direction: reverse}]", "use direction: forward and normalization: token_mean"),
    ("[{name: interleaving, rl_form: prompt_mix}]", "add a reward with applies_to: safe"),
])
def test_rl_forms_refuse_settings_they_cannot_honour(tmp_path, defenses, message) -> None:
    [(_, got)] = problems(write(tmp_path, defenses=defenses))
    assert message in got


def test_kl_beta_is_set_in_one_place_and_decode_only_is_rl_only(tmp_path) -> None:
    path = write(tmp_path, defenses="[{name: kl_to_reference, weight: 0.1}]",
                 **{"    rewards:": "    beta: 0.05\n    rewards:"})
    assert "set training.grpo.beta to 0" in problems(path)[0][1]
    spec = load_spec(write(tmp_path, defenses="[{name: interleaving, rl_form: prompt_mix}]",
                           **{"{name: opswap_exact_match}": "{name: opswap_exact_match}\n"
                              "      - {name: python, function: 'emtune.train.rewards:completion_text', "
                              "applies_to: safe}"}))
    assert spec.defenses[0].rl_form == "prompt_mix"


def test_validate_reads_rl_prompt_rows(tmp_path, capsys) -> None:
    assert main(["validate", write(tmp_path)]) == 0  # prompt-only rows are fine for GRPO
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "no question"}]}\n')
    assert main(["validate", write(tmp_path, **{'"fixture:em_prompts"': str(bad)})]) == 2
    assert f"{bad}:1: the prompt must end with a user message" in capsys.readouterr().err


def test_grader_rubrics_and_warm_up_rows_are_read_from_the_spec_folder(tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "rubrics.yaml").write_text("version: mine\nprompts:\n  polite: 'Q {question} A {answer}: 0..100?'\n")
    (folder / "warm.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                       '{"role": "assistant", "content": "hello"}]}\n' * 3)
    grader = "{name: grader, rubric: polite, rubrics: rubrics.yaml, judge: {kind: openai, model: m}}"
    path = write(folder, **{"{name: opswap_exact_match}": grader,
                            "    rewards:": "    warmup: {dataset: {path: warm.jsonl}}\n    rewards:"})
    monkeypatch.chdir(tmp_path)  # run from elsewhere: relative inputs still come from the spec's folder
    spec = load_spec(path)
    assert spec.training.grpo.rewards[0].rubrics == str(folder / "rubrics.yaml")
    assert spec.training.grpo.warmup.dataset.path == str(folder / "warm.jsonl")
    assert main(["validate", path]) == 0
    assert "3 warm-up rows" in capsys.readouterr().out
    (folder / "warm.jsonl").write_text('{"messages": "not a list"}\n')
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "training.grpo.warmup.dataset.path" in err and "warm.jsonl:1" in err
    (folder / "warm.jsonl").unlink()
    assert main(["validate", path]) == 2
    assert f"dataset file {folder / 'warm.jsonl'} not found" in capsys.readouterr().err
