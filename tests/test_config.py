"""StudySpec loading: every shipped spec validates; every mistake names file, line, path, fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from emtune.config import StudySpec, load_spec
from emtune.spec_errors import SpecError

# The paper's spec needs public data emtune does not ship: tests/study/test_paper_spec.py covers it.
SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml")
                 if p.name not in ("paper_qwen7b_code.yaml", "paper_rl.yaml"))  # paper_rl: test_paper_rl_spec.py


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, StudySpec)
    assert spec.search.parameters
    # both ends of every searched range give a valid trial spec
    for name, param in spec.search.parameters.items():
        if param.type != "categorical" and param.target:
            for end in (param.low, param.high):
                spec.with_overrides({name: int(end) if param.type == "int" else end})


def test_dryrun_matches_the_issue() -> None:
    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "dryrun.yaml")
    kl = spec.search.parameters["kl_weight"]
    assert (kl.low, kl.high, kl.log) == (1e-3, 10.0, True)
    assert spec.search.num_trials == 6 and spec.resources.max_concurrent_trials == 2
    assert spec.model.source == "tiny"


def test_overrides_write_into_the_named_defense(write_spec) -> None:
    spec = load_spec(write_spec())
    trial = spec.with_overrides({"kl_weight": 0.37})
    assert trial.defenses[0].weight == 0.37
    assert spec.defenses[0].weight == 0.1  # the study spec is untouched (frozen)


def _problems(path: Path) -> list[tuple[str, str, int | None]]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def test_misspelled_key_gets_a_suggestion_and_line(write_spec) -> None:
    path = write_spec()
    path.write_text(path.read_text().replace("learning_rate:", "lerning_rate:"))
    [(where, message, line)] = _problems(path)
    assert where == "training.lerning_rate"
    assert "did you mean 'learning_rate'" in message
    assert path.read_text().splitlines()[line - 1].strip().startswith("lerning_rate")


def test_bad_values_are_all_reported_with_paths(write_spec) -> None:
    path = write_spec()
    text = path.read_text().replace("learning_rate: 1.0e-2", "learning_rate: -1")
    text = text.replace("weight: 0.1", "weight: -0.5")
    path.write_text(text)
    problems = {where: message for where, message, _ in _problems(path)}
    assert "training.learning_rate" in problems and "greater than 0" in problems["training.learning_rate"]
    assert "defenses[0].weight" in problems and "greater than or equal to 0" in problems["defenses[0].weight"]


def test_unknown_defense_is_named_with_a_close_match(write_spec) -> None:
    path = write_spec()
    path.write_text(path.read_text().replace("- name: kl_to_reference", "- name: kl_to_referense"))
    problems = _problems(path)
    assert any(w == "defenses[0].name" and "did you mean 'kl_to_reference'" in m for w, m, _ in problems)


def test_empty_search_space(write_spec) -> None:
    path = write_spec()
    text = path.read_text()
    start = text.index("  parameters:")
    end = text.index("  sampler:")
    path.write_text(text[:start] + "  parameters: {}\n" + text[end:])
    [(where, message, _)] = _problems(path)
    assert where == "search.parameters" and "empty" in message


def test_target_must_exist_and_range_must_be_valid(write_spec) -> None:
    path = write_spec()
    path.write_text(path.read_text().replace("target: defenses.kl_to_reference.weight", "target: defenses.feature_l2.weight"))
    [(where, message, _)] = _problems(path)
    assert where == "search.parameters.kl_weight.target" and "feature_l2" in message

    path = write_spec()
    path.write_text(path.read_text().replace("low: 1.0e-3, high: 10.0, log: true", "low: -1.0, high: 10.0"))
    [(where, message, _)] = _problems(path)
    assert where == "search.parameters.kl_weight" and "-1.0" in message


def test_missing_dataset_and_unknown_metric(write_spec) -> None:
    path = write_spec()
    text = path.read_text().replace('"fixture:narrow_bad_advice"', "no/such/file.jsonl")
    path.write_text(text.replace("name: ood_drift", "name: odd_drift"))
    problems = {where: message for where, message, _ in _problems(path)}
    assert "objectives[0].name" in problems and "unknown metric 'odd_drift'" in problems["objectives[0].name"]
    path.write_text(text)
    [(where, message, _)] = _problems(path)
    assert where == "data.train.path" and "not found" in message


def test_judge_metrics_need_a_judge(write_spec) -> None:
    path = write_spec()
    path.write_text(path.read_text().replace("name: ood_drift", "name: general_misalignment"))
    [(where, message, line)] = _problems(path)
    assert where == "objectives[0].name" and path.read_text().splitlines()[line - 1].lstrip().startswith(
        "- {name: general_misalignment")
    assert "needs a judge" in message and "general_misalignment" in message


def test_set_overrides_apply_before_validation(write_spec) -> None:
    path = write_spec()
    spec = load_spec(path, ["model.source=tiny", "defenses.kl_to_reference.weight=0.5", "training.max_steps=7",
                            "model.tiny.pretrain_steps=3", "evaluation.in_domain={domain: code}",
                            "defenses.0.tokens=response"])
    assert spec.defenses[0].weight == 0.5 and spec.defenses[0].tokens == "response"
    assert spec.training.max_steps == 7 and spec.model.tiny.pretrain_steps == 3
    assert spec.evaluation.in_domain.domain == "code"
    for bad, message in (("training.max_steps", "expected KEY=VALUE"), ("defenses.feature_l2.weight=1", "no list entry"),
                         ("seed.x=1", "'seed' is a value, not a section"), ("seed=[1", "not valid YAML")):
        with pytest.raises(SpecError, match=message):
            load_spec(path, [bad])
    with pytest.raises(SpecError, match="max_steps"):
        load_spec(path, ["training.max_steps=-1"])  # an override is validated like the file


def test_relative_question_files_resolve_from_the_spec_folder(write_spec, tmp_path, monkeypatch) -> None:
    (tmp_path / "q.yaml").write_text("- {id: a, type: free_form, paraphrases: [hi]}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the spec's folder (write_spec writes beside q.yaml)
    spec = load_spec(write_spec(), ["evaluation.question_set=q.yaml"])
    assert spec.evaluation.question_set == str(tmp_path / "q.yaml")  # Ray workers run in other folders
    with pytest.raises(SpecError, match=f"evaluation.in_domain.questions: file {tmp_path / 'missing.jsonl'} not found"):
        load_spec(write_spec(), ["evaluation.in_domain.questions=missing.jsonl"])
