"""Broken specs, as a new user writes them: each must fail `emtune validate` with exit 2 and a line
``file:line: path: message`` whose line is the one the mistake is on, whose path names the key,
and whose message says how to fix it. A spec that passes is one `emtune run` accepts (the
one-trial runs of every shipped spec are tests/study/test_shipped_after_validate.py)."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest

from emtune.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
BASE = """\
name: broken
seed: 0
output_dir: {out}
model:
  source: tiny
  tiny: {{pretrain_steps: 0}}
lora: {{r: 4, alpha: 8}}
data:
  train: {{path: "fixture:narrow_bad_advice", limit: 40}}
  heldout_fraction: 0.2
  max_length: 64
training:
  learning_rate: 1.0e-2
  max_steps: 2
defenses:
  - name: kl_to_reference
    weight: 0.1
search:
  parameters:
    kl_weight: {{type: float, target: defenses.kl_to_reference.weight, low: 1.0e-3, high: 10.0, log: true}}
  sampler:
    name: tpe
  num_trials: 2
objectives:
  - {{name: ood_drift, direction: minimize}}
  - {{name: indomain_nll, direction: minimize}}
evaluation:
  question_set: general_v1
  samples_per_question: 1
baselines: {{enabled: false}}
"""
KL = "kl_weight: {type: float, target: defenses.kl_to_reference.weight, low: 1.0e-3, high: 10.0, log: true}"
ALL = "all_defenses.yaml"
RL = "rl_dryrun.yaml"
RL_OPSWAP = "  opswap:\n    tiers: [1]\n    n_train_per_tier: 8\n    n_test_per_tier: 8\n  opswap_role: task\n"
RL_PROMPTS = '  train: {path: "fixture:em_prompts"}\n'
BAD_ROWS = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' \
           '{"messages": [{"role": "user", "content": "no answer"}]}\n'

# (id, base (None = BASE, or a shipped spec), [(old, new)], path, fix in the message, text on the line)
CASES = [
    # --- `when` conditions that can never hold ------------------------------------------------
    ("when-impossible-value", ALL, [("when: {defense: kl_to_reference}", "when: {defense: kl}")],
     "search.parameters.kl_weight.when.defense", "did you mean 'kl_to_reference'?", "kl_weight:"),
    ("when-unknown-parameter", ALL, [("when: {defense: feature_l2}", "when: {defence: feature_l2}")],
     "search.parameters.ldifs_weight.when.defence", "did you mean 'defense'?", "ldifs_weight:"),
    ("when-later-parameter", None, [(KL, KL[:-1] + ", when: {mode: on}}\n    mode: {type: categorical, choices: [on, off]}")],
     "search.parameters.kl_weight.when.mode", "move 'mode' above 'kl_weight'", "kl_weight:"),
    ("when-out-of-range", None, [(KL, KL + "\n    other: {type: float, low: 0.1, high: 0.2, when: {kl_weight: 20.0}}")],
     "search.parameters.other.when.kl_weight", "ranges over 0.001..10", "other:"),
    # --- distributions Optuna would refuse ------------------------------------------------------
    ("log-and-step", None, [("log: true}", "log: true, step: 0.5}")],
     "search.parameters.kl_weight", "drop `step` or set `log: false`", "kl_weight:"),
    ("int-not-whole", None, [(KL, KL + "\n    layer: {type: int, low: 1.5, high: 4}")],
     "search.parameters.layer", "needs whole numbers", "layer:"),
    ("int-log-from-zero", None, [(KL, KL + "\n    layer: {type: int, low: 0, high: 4, log: true}")],
     "search.parameters.layer", "needs `low` >= 1", "layer:"),
    ("low-not-below-high", None, [("low: 1.0e-3, high: 10.0", "low: 10.0, high: 1.0e-3")],
     "search.parameters.kl_weight", "must be below `high`", "kl_weight:"),
    ("log-from-zero", None, [("low: 1.0e-3", "low: 0.0")], "search.parameters.kl_weight", "needs `low` > 0", "kl_weight:"),
    ("categorical-with-range", None, [("type: float, target", "type: categorical, choices: [0.1, 1.0], target")],
     "search.parameters.kl_weight", "takes `choices`, not low/high", "kl_weight:"),
    ("categorical-repeated-choice", None, [(KL, KL + "\n    pick: {type: categorical, choices: [a, b, a]}")],
     "search.parameters.pick", "listed twice", "pick:"),
    # --- sampler arguments ------------------------------------------------------------------------
    ("sampler-arg-misspelled", None, [("    name: tpe", "    name: tpe\n    args: {n_startup_trialz: 3}")],
     "search.sampler.args.n_startup_trialz", "did you mean 'n_startup_trials'?", "args:"),
    ("sampler-arg-of-another-sampler", None, [("    name: tpe", "    name: tpe\n    args: {population_size: 8}")],
     "search.sampler.args.population_size", "TPESampler takes no argument 'population_size'", "args:"),
    ("sampler-arg-wrong-type", None, [("    name: tpe", "    name: tpe\n    args: {n_startup_trials: three}")],
     "search.sampler.args.n_startup_trials", "must be int", "args:"),
    ("sampler-arg-python-object", None, [("    name: tpe", "    name: nsga2\n    args: {crossover: sbx}")],
     "search.sampler.args.crossover", "takes a Python object", "args:"),
    ("sampler-seed-in-args", None, [("    name: tpe", "    name: tpe\n    args: {seed: 3}")],
     "search.sampler.args.seed", "search.sampler.seed", "args:"),
    ("sampler-refuses-value", None, [("    name: tpe", "    name: nsga2\n    args: {population_size: 1}")],
     "search.sampler.args", "NSGAIISampler refuses these arguments", "args:"),
    ("sampler-name-misspelled", None, [("name: tpe", "name: tpee")], "search.sampler.name", "did you mean 'tpe'?",
     "name: tpee"),
    # --- misspelled keys at every level -----------------------------------------------------------
    ("top-level-key", None, [("training:", "traning:")], "traning", "did you mean 'training'?", "traning:"),
    ("section-key", None, [("learning_rate:", "lerning_rate:")], "training.lerning_rate",
     "did you mean 'learning_rate'?", "lerning_rate:"),
    ("defense-key", None, [("    weight: 0.1", "    weigth: 0.1")], "defenses[0].weigth", "did you mean 'weight'?",
     "weigth:"),
    ("parameter-key", None, [("low: 1.0e-3", "lwo: 1.0e-3")], "search.parameters.kl_weight.lwo",
     "did you mean 'low'?", "kl_weight:"),
    ("defense-name", None, [("- name: kl_to_reference", "- name: kl_to_referense")], "defenses[0].name",
     "did you mean 'kl_to_reference'?", "kl_to_referense"),
    ("target-field", None, [("kl_to_reference.weight", "kl_to_reference.weigth")], "search.parameters.kl_weight.target",
     "did you mean 'weight'?", "kl_weight:"),
    ("target-defense-not-listed", None, [("target: defenses.kl_to_reference.weight", "target: defenses.feature_l2.weight")],
     "search.parameters.kl_weight.target", "add a `- name: feature_l2` entry under `defenses:`", "kl_weight:"),
    ("objective-metric", None, [("name: ood_drift", "name: odd_drift")], "objectives[0].name",
     "did you mean 'ood_drift'?", "odd_drift"),
    ("objective-direction", None, [("{name: ood_drift, direction: minimize}", "{name: ood_drift, direction: minimise}")],
     "objectives[0].direction", "did you mean 'minimize'?", "minimise"),
    ("constraint-metric", None, [("baselines:", "constraints:\n  - {metric: train_los, max: 5}\nbaselines:")],
     "constraints[0].metric", "did you mean 'train_loss'?", "train_los"),
    ("judge-kind", None, [("  samples_per_question: 1", "  samples_per_question: 1\n  judge: {kind: openia}")],
     "evaluation.judge.kind", "did you mean 'openai'?", "openia"),
    ("inoculation-prompt", None, [("  - name: kl_to_reference\n    weight: 0.1",
                                   "  - name: kl_to_reference\n    weight: 0.1\n  - {name: inoculation, prompt: evil_genral}")],
     "defenses[1]", "did you mean 'evil_general'?", "evil_genral"),
    ("searched-choice-invalid-for-target", None, [
        ("  - name: kl_to_reference\n    weight: 0.1", "  - name: kl_to_reference\n    weight: 0.1\n  - {name: inoculation}"),
        (KL, KL + "\n    prompt: {type: categorical, target: defenses.inoculation.prompt, choices: [none, evil_genral]}")],
     "search.parameters.prompt", "did you mean 'evil_general'?", "prompt:"),
    ("persona-prompt-set", None, [("  - name: kl_to_reference\n    weight: 0.1", "  - name: kl_to_reference\n    weight: 0.1\n"
                                   "  - {name: persona_steering, alpha: 1.0, layer: 1, extract_prompts: evil_v2, "
                                   "extract_filter: none}")],
     "defenses[1].extract_prompts", "did you mean 'evil_v1'?", "evil_v2"),
    ("fixture-name", None, [("fixture:narrow_bad_advice", "fixture:narrow_bad_advise")], "data.train.path",
     "did you mean 'narrow_bad_advice'?", "narrow_bad_advise"),
    ("question-set-name", None, [("question_set: general_v1", "question_set: general_v2")], "evaluation.question_set",
     "did you mean 'general_v1'?", "general_v2"),
    # --- cross-field problems, each on its own line -----------------------------------------------
    ("judged-metric-without-judge", None, [("name: ood_drift", "name: general_misalignment")], "objectives[0].name",
     "set evaluation.judge.kind", "general_misalignment"),
    ("defense-listed-twice", None, [("    weight: 0.1", "    weight: 0.1\n  - name: kl_to_reference\n    weight: 0.2")],
     "defenses[1].name", "listed twice", "- name: kl_to_reference"),
    ("relative-without-baseline", None, [("{name: ood_drift, direction: minimize}",
                                          "{name: ood_drift, direction: minimize, relative: {to: undefended}}")],
     "objectives[0].relative.to", "add 'undefended' to baselines.kinds", "relative"),
    ("constraint-without-bound", None, [("baselines:", "constraints:\n  - {metric: train_loss}\nbaselines:")],
     "constraints[0]", "needs `max` or `min`", "train_loss"),
    ("persona-layer-past-the-model", None, [("  - name: kl_to_reference\n    weight: 0.1", "  - name: kl_to_reference\n"
                                             "    weight: 0.1\n  - {name: persona_steering, alpha: 1.0, layer: 5, "
                                             "extract_prompts: evil_v1, extract_filter: none}")],
     "defenses[1]", "use 1..2", "layer: 5"),
    # --- wrong types and out-of-range values --------------------------------------------------------
    ("type-float", None, [("learning_rate: 1.0e-2", "learning_rate: fast")], "training.learning_rate", "valid number",
     "learning_rate: fast"),
    ("type-int", None, [("num_trials: 2", "num_trials: many")], "search.num_trials", "valid integer", "num_trials"),
    ("type-name-pattern", None, [("name: broken", "name: my study")], "name", "should match pattern", "name: my study"),
    ("range-fraction", None, [("heldout_fraction: 0.2", "heldout_fraction: 1.5")], "data.heldout_fraction",
     "less than 1", "heldout_fraction"),
    ("range-num-trials", None, [("num_trials: 2", "num_trials: 0")], "search.num_trials", "greater than 0", "num_trials"),
    ("range-end-invalid-for-target", None, [("low: 1.0e-3, high: 10.0, log: true", "low: -1.0, high: 10.0")],
     "search.parameters.kl_weight", "kl_weight = -1.0 would make defenses.kl_to_reference.weight invalid", "kl_weight:"),
    ("missing-section", None, [("objectives:\n  - {name: ood_drift, direction: minimize}\n"
                                "  - {name: indomain_nll, direction: minimize}\n", "")],
     "objectives", "required field is missing", None),
    # --- files and sources --------------------------------------------------------------------------
    ("missing-file", None, [('"fixture:narrow_bad_advice"', "data/missing.jsonl")], "data.train.path",
     "fix the path (a relative path is read from the spec's folder)", "missing.jsonl"),
    ("bad-rows", None, [('"fixture:narrow_bad_advice"', "rows.jsonl")], "data.train.path",
     "rows.jsonl:2: no assistant message", "rows.jsonl"),
    ("hub-id-without-org", None, [("fixture:narrow_bad_advice", "hub:nonexistent")], "data.train.path",
     "hub:ORG/NAME", "hub:nonexistent"),
    ("model-not-a-folder-nor-hub-id", None, [("  source: tiny", "  source: Qwen2.5-7B-Instruct")], "model.source",
     "nor a hub id ORG/NAME", "Qwen2.5-7B-Instruct"),
    # --- the RL setting (training.method: grpo) ------------------------------------------------------
    ("rl-unknown-reward", RL, [("name: opswap_exact_match", "name: opswap_exact")],
     "training.grpo.rewards[0].name", "did you mean 'opswap_exact_match'?", "opswap_exact"),
    ("rl-missing-rubric-file", RL, [("- name: opswap_exact_match", "- {name: grader, rubric: polite, rubrics: "
                                     "mine/rubrics.yaml, judge: {kind: openai, model: m}}")],
     "training.grpo.rewards[0]", "relative to the spec's folder", "rubrics.yaml"),
    ("rl-batch-not-whole-groups", RL, [("per_device_batch_size: 32", "per_device_batch_size: 30")],
     "training.per_device_batch_size", "must be a multiple of grpo.num_generations (4)", "per_device_batch_size"),
    ("rl-kl-form-it-cannot-honour", RL, [("weight: 0.1", "weight: 0.1\n    direction: reverse")],
     "defenses[0]", "use direction: forward", "kl_to_reference"),
    ("rl-warm-up-without-answers", RL, [(RL_OPSWAP, RL_PROMPTS)], "training.grpo.warmup",
     "set warmup.dataset to a chat dataset", "warmup:"),
    ("rl-exact-match-without-answers", RL, [(RL_OPSWAP, RL_PROMPTS)], "training.grpo.rewards[0]",
     "train on OpSwap (data.opswap) or set answer_field", "opswap_exact_match"),
    ("rl-grpo-section-without-method", None, [("  max_steps: 2\n", "  max_steps: 2\n  grpo: {rewards: "
                                               "[{name: opswap_exact_match}]}\n")],
     "training", "only applies with method: grpo", "training:"),
]
LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<path>\S+): (?P<message>.*)$")


def _write(tmp_path: Path, base: str | None, edits: list[tuple[str, str]]) -> Path:
    text = (ROOT / "search_spaces" / base).read_text() if base else BASE.format(out=tmp_path / "studies")
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    (tmp_path / "rows.jsonl").write_text(BAD_ROWS)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def _problems(err: str) -> list[dict]:
    return [m.groupdict() for m in map(LINE.match, err.splitlines()) if m]


def test_the_base_spec_is_valid(tmp_path, capsys) -> None:
    assert main(["validate", str(_write(tmp_path, None, []))]) == 0
    assert "ok: study 'broken', 2 trials over [kl_weight]" in capsys.readouterr().out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_spec_exits_2_with_line_path_and_fix(case, tmp_path, capsys) -> None:
    _, base, edits, path, fix, line_has = case
    spec = _write(tmp_path, base, edits)
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    found = [p for p in _problems(err) if p["path"] == path]
    assert found, err
    problem = next((p for p in found if fix in p["message"]), None)
    assert problem is not None, f"no fix {fix!r} in {err}"
    assert problem["file"] == str(spec)
    if line_has is not None:
        assert line_has in spec.read_text().splitlines()[int(problem["line"]) - 1], (problem, err)
    assert not (tmp_path / "studies").exists()


def test_every_problem_of_a_spec_in_one_run(tmp_path, capsys) -> None:
    # four problems in four sections, one of them cross-field, one an input file
    spec = _write(tmp_path, None, [("learning_rate:", "lerning_rate:"), ("name: ood_drift", "name: general_misalignment"),
                                   ('"fixture:narrow_bad_advice"', "rows.jsonl"), ("log: true}", "log: true, step: 0.5}")])
    assert main(["validate", str(spec)]) == 2
    paths = {p["path"] for p in _problems(capsys.readouterr().err)}
    assert paths == {"training.lerning_rate", "objectives[0].name", "data.train.path", "search.parameters.kl_weight"}


def test_a_misspelled_direction_is_one_problem(tmp_path, capsys) -> None:
    spec = _write(tmp_path, None, [("{name: ood_drift, direction: minimize}", "{name: ood_drift, direction: minimise}")])
    assert main(["validate", str(spec)]) == 2
    assert [p["path"] for p in _problems(capsys.readouterr().err)] == ["objectives[0].direction"]


def test_yaml_syntax_error_has_its_line(tmp_path, capsys) -> None:
    spec = _write(tmp_path, None, [("  max_steps: 2", "  max_steps: [2")])
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^{re.escape(str(spec))}:\d+: not valid YAML", err, re.M) and "Traceback" not in err


def test_relative_paths_are_read_from_the_spec_folder(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text(BAD_ROWS.splitlines()[0] + "\n")
    spec = _write(tmp_path, None, [('"fixture:narrow_bad_advice"', "data/rows.jsonl")])
    monkeypatch.chdir(tmp_path / "data")  # not where the spec is
    assert main(["validate", str(spec)]) == 0
    assert "1 train rows" in capsys.readouterr().out


def test_validate_never_reaches_the_network(tmp_path, monkeypatch, capsys) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("validate opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    spec = _write(tmp_path, None, [("fixture:narrow_bad_advice", "hub:some-org/some-data"),
                                   ("  source: tiny", "  source: some-org/some-model")])
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "not checked offline: hub:some-org/some-data, some-org/some-model (--online asks the hub)" in out


def test_online_without_the_hub_exits_4(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = _write(tmp_path, None, [("fixture:narrow_bad_advice", "hub:some-org/some-data")])
    assert main(["validate", "--online", str(spec)]) == 4
    assert "HF_HUB_OFFLINE is set; unset it to check hub ids online" in capsys.readouterr().err


def test_validate_takes_several_specs_and_study_folders(tmp_path, capsys) -> None:
    good = _write(tmp_path, None, [])
    study = tmp_path / "studies" / "broken"
    study.mkdir(parents=True)
    shutil.copy(good, study / "spec.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("learning_rate:", "lerning_rate:"))
    assert main(["validate", str(good), str(study), str(bad), "--format", "csv"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "file,line,path,message,status"
    assert [row.split(",")[-1] for row in out[1:]] == ["ok", "ok", "problem"]
    assert out[2].startswith(f"{study / 'spec.yaml'},,,") and out[3].startswith(f"{bad},13,training.lerning_rate,")
