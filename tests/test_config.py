"""StudySpec loading: every shipped spec validates; every mistake names file, line, path, fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emtune.config import StudySpec, load_spec
from emtune.spec_errors import SpecError

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


NEEDS_DATA = {"paper_qwen7b_code.yaml": "data/insecure.jsonl"}  # public EM data emtune does not ship


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_validates(path: Path, tmp_path) -> None:
    if path.name in NEEDS_DATA:
        # without the dataset, the one problem is the missing file, looked for beside the
        # repository's search_spaces/ (relative paths are read from the spec's folder) ...
        if not (path.parents[1] / NEEDS_DATA[path.name]).is_file():
            [(where, message, _)] = _problems(path)
            assert where == "data.train.path" and str(path.parents[1] / NEEDS_DATA[path.name]) in message
        # ... and with it there, wherever emtune runs from, the spec loads
        (tmp_path / "search_spaces").mkdir()
        path = Path(shutil.copy(path, tmp_path / "search_spaces"))
        (tmp_path / NEEDS_DATA[path.name]).parent.mkdir(parents=True)
        (tmp_path / NEEDS_DATA[path.name]).write_text('{"messages": [{"role": "user", "content": "q"}, '
                                                      '{"role": "assistant", "content": "a"}]}\n')
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
