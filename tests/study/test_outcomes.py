"""What Optuna is told about a finished trial, by hand: constraint values (max, min, missing,
non-finite, relative to a baseline), relative objectives (difference, ratio, zero baseline), and
FAIL for anything that is not a finite number."""

from __future__ import annotations

import math
from types import SimpleNamespace

import json

import optuna
import pytest

from emtune.search_spec import ConstraintSpec, ObjectiveSpec, Relative
from emtune.study.outcomes import (
    MISSING_METRIC_VIOLATION, baseline_record, baseline_trials, checkpoint_records, constraint_violations, outcome,
    relative_value,
)

COMPLETE, FAIL, PRUNED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                          optuna.trial.TrialState.PRUNED)
BASELINES = {"undefended": {"general_misalignment": 0.2, "indomain_nll": 2.0, "ood_drift": 0.0},
             "base": {"error": "the baseline trial failed"}}


def spec(*objectives: ObjectiveSpec) -> SimpleNamespace:
    return SimpleNamespace(objectives=objectives)


def test_max_and_min_constraints_are_signed_by_optunas_convention() -> None:
    constraints = (ConstraintSpec(metric="indomain_nll", max=5.0),
                   ConstraintSpec(metric="opswap_exact_match", min=0.8),
                   ConstraintSpec(metric="general_incoherence", min=0.1, max=0.3))
    metrics = {"indomain_nll": 6.5, "opswap_exact_match": 0.9, "general_incoherence": 0.05}
    assert constraint_violations(constraints, metrics) == pytest.approx({
        "indomain_nll<=5": 1.5,          # 6.5 - 5.0 > 0: violated by 1.5
        "opswap_exact_match>=0.8": -0.1,  # 0.8 - 0.9 < 0: met with room 0.1
        "general_incoherence>=0.1": 0.05,  # 0.1 - 0.05 > 0: violated
        "general_incoherence<=0.3": -0.25,  # 0.05 - 0.3: met
    })
    met = constraint_violations(constraints, {"indomain_nll": 4.0, "opswap_exact_match": 0.7,
                                              "general_incoherence": 0.2})
    assert met == pytest.approx({"indomain_nll<=5": -1.0, "opswap_exact_match>=0.8": 0.1,
                                 "general_incoherence>=0.1": -0.1, "general_incoherence<=0.3": -0.1})


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf, "0.1", True])
def test_a_missing_or_non_finite_constraint_metric_is_violated(value) -> None:
    constraints = (ConstraintSpec(metric="opswap_exact_match", min=0.5),
                   ConstraintSpec(metric="indomain_nll", max=5.0))
    metrics = {"indomain_nll": 1.0} if value is None else {"indomain_nll": 1.0, "opswap_exact_match": value}
    got = constraint_violations(constraints, metrics)
    assert got == {"opswap_exact_match>=0.5": MISSING_METRIC_VIOLATION, "indomain_nll<=5": -4.0}
    assert MISSING_METRIC_VIOLATION > 0


def test_relative_constraints_bound_the_difference_or_ratio_to_the_baseline() -> None:
    difference = ConstraintSpec(metric="general_misalignment", max=0.05,
                                relative=Relative(to="undefended", how="difference"))
    ratio = ConstraintSpec(metric="indomain_nll", min=0.9, relative=Relative(to="undefended", how="ratio"))
    got = constraint_violations((difference, ratio), {"general_misalignment": 0.3, "indomain_nll": 1.5}, BASELINES)
    # 0.3 - 0.2 = 0.1 -> 0.1 - 0.05 = 0.05 violated; 1.5 / 2.0 = 0.75 -> 0.9 - 0.75 = 0.15 violated
    assert got == pytest.approx({"general_misalignment<=0.05": 0.05, "indomain_nll>=0.9": 0.15})
    # without the baseline's metric the bound cannot be checked: violated, not feasible
    failed = ConstraintSpec(metric="indomain_nll", max=1.0, relative=Relative(to="base", how="ratio"))
    assert constraint_violations((failed,), {"indomain_nll": 0.1}, BASELINES) == {"indomain_nll<=1": MISSING_METRIC_VIOLATION}
    assert constraint_violations((failed,), {"indomain_nll": 0.1}) == {"indomain_nll<=1": MISSING_METRIC_VIOLATION}


def test_relative_value_difference_ratio_and_zero_baseline() -> None:
    difference = ObjectiveSpec(name="general_misalignment", direction="minimize",
                               relative=Relative(to="undefended", how="difference"))
    ratio = ObjectiveSpec(name="indomain_nll", direction="minimize", relative=Relative(to="undefended", how="ratio"))
    plain = ObjectiveSpec(name="indomain_nll", direction="minimize")
    assert relative_value(0.05, difference, BASELINES) == (pytest.approx(-0.15), None)  # 0.05 - 0.2
    assert relative_value(3.0, ratio, BASELINES) == (pytest.approx(1.5), None)  # 3.0 / 2.0
    assert relative_value(3.0, plain, {}) == (3.0, None)
    zero = ObjectiveSpec(name="ood_drift", direction="minimize", relative=Relative(to="undefended", how="ratio"))
    value, problem = relative_value(0.4, zero, BASELINES)
    assert value is None and "zero 'undefended' baseline" in problem
    zero_difference = zero.model_copy(update={"relative": Relative(to="undefended", how="difference")})
    assert relative_value(0.4, zero_difference, BASELINES) == (pytest.approx(0.4), None)  # 0.4 - 0 is fine
    value, problem = relative_value(0.4, ratio.model_copy(update={"relative": Relative(to="base", how="ratio")}), BASELINES)
    assert value is None and "the baseline trial failed" in problem


def test_outcome_complete_with_relative_values() -> None:
    objectives = spec(ObjectiveSpec(name="general_misalignment", direction="minimize",
                                    relative=Relative(to="undefended", how="difference")),
                      ObjectiveSpec(name="indomain_nll", direction="minimize",
                                    relative=Relative(to="undefended", how="ratio")))
    state, values, reason = outcome(objectives, {"general_misalignment": 0.05, "indomain_nll": 3.0}, False, BASELINES)
    assert (state, reason) == (COMPLETE, None) and values == pytest.approx([-0.15, 1.5])
    state, values, reason = outcome(objectives, {"general_misalignment": 0.05, "indomain_nll": 3.0}, False, {})
    assert state == FAIL and values is None and "has no 'general_misalignment'" in reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1.0", True])
def test_a_non_finite_objective_fails_the_trial(value) -> None:
    objectives = spec(ObjectiveSpec(name="ood_drift", direction="minimize"),
                      ObjectiveSpec(name="indomain_nll", direction="minimize"))
    state, values, reason = outcome(objectives, {"ood_drift": 0.1, "indomain_nll": value}, False)
    assert state == FAIL and values is None
    assert reason == f"objective 'indomain_nll' is not a finite number ({value!r})"


def test_outcome_states_and_reasons() -> None:
    objectives = spec(ObjectiveSpec(name="ood_drift", direction="minimize"))
    assert outcome(objectives, {"ood_drift": 0.25}, False) == (COMPLETE, [0.25], None)
    assert outcome(objectives, {"ood_drift": 0}, False) == (COMPLETE, [0.0], None)
    assert outcome(objectives, {"indomain_nll": 1.0}, False) == (
        FAIL, None, "objective 'ood_drift' is missing from the trial's result")
    assert outcome(objectives, None, False) == (FAIL, None, "the trial reported no result")
    assert outcome(objectives, {}, False) == (FAIL, None, "the trial reported no result")
    assert outcome(objectives, {"ood_drift": 0.25, "early_stopped": True}, False) == (
        PRUNED, None, "stopped early by the scheduler")
    assert outcome(objectives, {"ood_drift": 0.25, "error": "judge down"}, False) == (FAIL, None, "judge down")
    assert outcome(objectives, {"error": "OOM"}, True) == (FAIL, None, "OOM")
    state, _, reason = outcome(objectives, None, True)
    assert state == FAIL and "raised an error" in reason


def test_a_baseline_keeps_its_finite_numbers_or_its_failure() -> None:
    assert baseline_record({"ood_drift": 0.5, "train_steps": 2, "run": "r1", "bad": math.nan}, False) == \
        {"ood_drift": 0.5, "train_steps": 2.0}
    assert baseline_record({"ood_drift": 0.5, "error": "judge down"}, False) == {"error": "judge down"}
    assert baseline_record({"ood_drift": 0.5}, True) == {"error": "the baseline trial failed"}
    assert baseline_record({"error": "OOM"}, True) == {"error": "OOM"}
    assert baseline_record(None, False) == {"error": "the baseline trial failed"}
    assert baseline_record({}, False) == {"error": "the baseline trial failed"}


def test_baseline_trials_share_one_undefended_fine_tune():
    assert baseline_trials(["base", "undefended", "stopped_early"]) == [["base"], ["undefended", "stopped_early"]]
    assert baseline_trials(["undefended"]) == [["undefended"]]
    assert baseline_trials(["base"]) == [["base"]]
    assert baseline_trials([]) == []


def test_checkpoint_records_from_the_json_string_or_a_list_by_step():
    records = [{"step": 8, "point": "checkpoint-8"}, {"step": 4, "point": "checkpoint-4"}]
    assert checkpoint_records({"checkpoints": json.dumps(records)}) == records[::-1]
    assert checkpoint_records({"checkpoints": records}) == records[::-1]
    assert checkpoint_records({"ood_drift": 1.0}) == [] and checkpoint_records(None) == []


def test_stopped_early_record_lists_every_point_then_the_end():
    checkpoints = json.dumps([{"step": 2, "point": "checkpoint-2", "metrics": {"ood_drift": 0.5, "x": "text"}}])
    result = {"ood_drift": 0.75, "train_steps": 6, "pid": 7, "checkpoints": checkpoints}
    assert baseline_record(result, False, "stopped_early") == {"points": [
        {"step": 2, "point": "checkpoint-2", "ood_drift": 0.5},
        {"step": 6, "point": "final", "ood_drift": 0.75, "train_steps": 6.0}]}
    assert baseline_record({"ood_drift": 0.75}, False, "stopped_early")["points"] == [
        {"step": 0, "point": "final", "ood_drift": 0.75}]
