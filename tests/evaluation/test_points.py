"""Evaluation points (`evaluation.at`), pruning and the stopped-early baseline in the spec:
resolution by hand, and every mistake reported with its path."""

from __future__ import annotations

import pytest

from emtune.config import load_spec
from emtune.evaluation.points import EvaluationPoint, point_label, resolve_points, stop_points
from emtune.evaluation.checkpoint_checks import pruning_metrics
from emtune.spec_errors import SpecError


def test_points_resolve_by_hand() -> None:
    # 24 steps: 0.25 -> 6, 0.5 -> 12, step 12 again is dropped (same step, first written wins),
    # step 30 and 0.99 (round(23.76) = 24) fall on or after the end: the final point covers them
    points = resolve_points([0.5, 0.25, 12, 30, 0.99], 24)
    assert points == [EvaluationPoint("25%", 6), EvaluationPoint("50%", 12), EvaluationPoint("final", 24)]
    assert [p.final for p in points] == [False, False, True]
    assert resolve_points([], 10) == [EvaluationPoint("final", 10)]
    assert resolve_points([0.01], 10) == [EvaluationPoint("1%", 1), EvaluationPoint("final", 10)]  # at least step 1
    assert (point_label(0.333), point_label(300)) == ("33.3%", "step 300")
    assert stop_points((), ()) == (0.25, 0.5, 0.75)
    assert stop_points((), (0.5,)) == (0.5,) and stop_points((100,), (0.5,)) == (100,)


def _spec(write_spec, evaluation: str = "", search: str = "", training: str = "", objectives: str = ""):
    path = write_spec(max_steps=8)
    text = path.read_text().replace("  max_new_tokens: 6\n", "  max_new_tokens: 6\n" + evaluation)
    text = text.replace("  num_trials: 2\n", "  num_trials: 2\n" + search)
    text = text.replace("  warmup_steps: 0\n", "  warmup_steps: 0\n" + training)
    if objectives:
        text = text.replace("  - {name: indomain_nll, direction: minimize, reference: 8.0}\n", objectives)
    path.write_text(text)
    return path


def _problems(path) -> dict[str, str]:
    """Field path -> message; checks across sections come as one message naming each path."""
    with pytest.raises(SpecError) as info:
        load_spec(path)
    out = {}
    for where, message, _ in info.value.problems:
        for part in message.split("; ") if not where else [message]:
            field, _, text = part.partition(": ") if not where else (where, "", part)
            out[field] = text
    return out


def test_valid_points_pruning_and_its_metrics(write_spec) -> None:
    spec = load_spec(_spec(write_spec, "  at: [0.25, 4]\n", "  pruning: {enabled: true, min_trials: 2}\n"))
    assert spec.evaluation.at == (0.25, 4) and isinstance(spec.evaluation.at[1], int)
    # default: the judge-free objectives, in their own directions
    assert pruning_metrics(spec) == [("ood_drift", "minimize"), ("indomain_nll", "minimize")]
    spec = load_spec(_spec(write_spec, "  at: [0.5]\n", "  pruning: {enabled: true, metrics: [train_loss]}\n"))
    assert pruning_metrics(spec) == [("train_loss", "minimize")]  # not an objective: its better side
    assert spec.baselines.kinds == ("base", "undefended", "stopped_early")


@pytest.mark.parametrize("evaluation, search, training, where, message", [
    ("  at: [1.5]\n", "", "", "evaluation.at", "not a fraction in (0, 1)"),
    ("  at: [0]\n", "", "", "evaluation.at", "step 0 must be at least 1"),
    ("  at: [8, 3]\n", "", "", "evaluation.at", "steps [8] are not before training.max_steps = 8"),
    ("", "  pruning: {enabled: true}\n", "", "search.pruning", "add some to evaluation.at"),
    ("  at: [0.5]\n", "  pruning: {enabled: true, metrics: [general_misalignment]}\n", "",
     "search.pruning.metrics", "pruning compares judge-free metrics only"),
    ("  at: [0.5]\n", "  pruning: {enabled: true, metrics: [persona_projection]}\n", "",
     "search.pruning.metrics", "needs evaluation.monitor.persona_vector or evaluation.monitor.extract_prompts"),
    ("  at: [0.5]\n", "  pruning: {enabled: true, metrics: [od_drift]}\n", "",
     "search.pruning.metrics", "unknown metric 'od_drift'"),
])
def test_mistakes_name_the_field(write_spec, evaluation, search, training, where, message) -> None:
    problems = _problems(_spec(write_spec, evaluation, search, training))
    assert where in problems and message in problems[where], problems


def test_monitor_signals_as_objectives_need_the_monitor(write_spec, tmp_path) -> None:
    persona = "  - {name: persona_projection, direction: minimize}\n"
    problems = _problems(_spec(write_spec, objectives=persona))
    assert "needs evaluation.monitor.persona_vector" in problems["objectives[1].name"], problems
    spec = load_spec(_spec(write_spec, "  monitor: {extract_prompts: evil_v1, extract_filter: none}\n", objectives=persona))
    assert spec.objectives[1].name == "persona_projection" and spec.evaluation.monitor.persona
    problems = _problems(_spec(write_spec, "  monitor: {persona_vector: missing.pt}\n"))
    # a relative path is read from the spec's folder
    missing = problems["evaluation.monitor.persona_vector"]
    assert f"persona vector file {tmp_path / 'missing.pt'} not found" in missing, missing


def test_stop_points_and_baseline_kinds(write_spec) -> None:
    path = write_spec()
    path.write_text(path.read_text().replace("baselines: {enabled: false}",
                                             "baselines: {kinds: [stopped_early], stop_points: [0.5, 2.0]}"))
    assert "not a fraction in (0, 1)" in _problems(path)["baselines.stop_points"]
    path.write_text(path.read_text().replace("stop_points: [0.5, 2.0]", "stop_points: [0.5, 2]"))
    assert load_spec(path).baselines.stop_points == (0.5, 2)
    # stopped_early is a set of points: no objective can be relative to it
    path.write_text(path.read_text().replace("reference: 8.0}", "relative: {to: stopped_early}}"))
    assert "relative.to" in " ".join(_problems(path))
