"""Front tables from a real Optuna study: ranks, constraints, hypervolume history."""

from __future__ import annotations

import optuna
import pytest

from emtune.tracking.front import FrontTable, TrialRow, format_table, front_table
from emtune.tracking.plots import plot_front


def _study(points, infeasible=()):
    study = optuna.create_study(directions=["minimize", "minimize"])
    for i, values in enumerate(points):
        trial = study.ask()
        trial.suggest_float("w", 0, 1)
        trial.set_user_attr("mlflow_run_id", f"run{i}")
        trial.set_constraint("c", 1.0 if i in infeasible else -1.0)
        study.tell(trial, values)
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return study


def test_ranks_front_and_hypervolume() -> None:
    # (1,3) (2,2) (3,1) are non-dominated; (3,3) is rank 1; (0.5,0.5) dominates all but is infeasible
    study = _study([(1, 3), (2, 2), (3, 1), (3, 3), (0.5, 0.5)], infeasible={4})
    table = front_table(study, ["a", "b"], ["minimize", "minimize"], reference=[4.0, 4.0])
    ranks = {r.number: r.rank for r in table.rows}
    assert ranks == {0: 0, 1: 0, 2: 0, 3: 1, 4: None, 5: None}
    assert [r.number for r in table.front] == [0, 1, 2]
    assert table.hypervolume == pytest.approx([3.0, 5.0, 6.0, 6.0, 6.0])
    assert table.counts() == {"COMPLETE": 5, "FAIL": 1}
    text = format_table(table)
    assert "front size 3; hypervolume 6" in text
    d = table.to_dict()
    assert d["hypervolume"] == pytest.approx(6.0) and [t["mlflow_run_id"] for t in d["front"]] == ["run0", "run1", "run2"]


def test_derived_reference_and_plot(tmp_path) -> None:
    study = _study([(1, 3), (3, 1)])
    table = front_table(study, ["a", "b"], ["minimize", "minimize"])
    assert table.reference_source == "derived"
    assert table.reference == pytest.approx([3.2, 3.2])  # worst + 10% of the range
    png = plot_front(table, tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ordered_study():
    """Four trials told out of order (2, 1, 0, 3), one exactly on its constraint bound, one FAIL
    re-evaluated as a later trial, two baselines."""
    dists = {"w": optuna.distributions.FloatDistribution(0, 1), "k": optuna.distributions.IntDistribution(1, 9)}
    study = optuna.create_study(directions=["minimize", "minimize"])
    for params in ({"w": 0.125, "k": 1}, {"w": 0.5, "k": 2}, {"w": 0.75, "k": 3}, {"w": 0.1, "k": 4},
                   {"w": 0.9, "k": 5}):
        study.enqueue_trial(params)
    trials = [study.ask(dists) for _ in range(5)]
    values = {0: (1.0, 1.0), 1: (2.0, 2.0), 2: (3.0, 3.0), 3: (0.5, 4.0)}
    constraints = {0: -1.0, 1: -1.0, 2: -1.0, 3: 0.0}  # 0.0: the bound is met exactly
    for number in (2, 1, 0, 3):
        trials[number].set_constraint("c", constraints[number])
        study.tell(trials[number], values[number])
    study.tell(trials[4], state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({"w": 0.9})
    redo = study.ask({"w": dists["w"]})
    redo.set_user_attr("reevaluates", 4)
    study.tell(redo, (0.25, 5.0))
    study.set_user_attr("baseline:undefended", {"a": 1.5, "b": 2.25, "other": 9.0})
    study.set_user_attr("baseline:base", {"error": "the baseline trial failed"})
    return study


def test_front_table_by_hand_states_feasibility_order_and_history() -> None:
    table = front_table(_ordered_study(), ["a", "b"], ["minimize", "minimize"], reference=[4.0, 6.0])
    rows = {r.number: r for r in table.rows}
    assert {n: (r.state, r.rank, r.feasible) for n, r in rows.items()} == {
        0: ("COMPLETE", 0, True), 1: ("COMPLETE", 1, True), 2: ("COMPLETE", 2, True),
        3: ("COMPLETE", 0, True),  # constraint value 0.0 is met
        4: ("REEVALUATED", None, True), 5: ("COMPLETE", 0, True)}
    assert table.counts() == {"COMPLETE": 5, "REEVALUATED": 1}
    assert [r.number for r in table.front] == [5, 3, 0]  # by the first objective: 0.25, 0.5, 1.0
    # completion order 2, 1, 0, 3, 5 (not trial order): boxes to (4, 6) are added as they arrive
    # (3,3): 1*3 = 3; (2,2): 2*4 = 8; (1,1): 3*5 = 15; (0.5,4): + 0.5*2 = 16; (0.25,5): + 0.25*1 = 16.25
    assert table.hypervolume == pytest.approx([3.0, 8.0, 15.0, 16.0, 16.25])
    assert table.baselines == {"undefended": {"a": 1.5, "b": 2.25, "other": 9.0},
                               "base": {"error": "the baseline trial failed"}}
    front = table.to_dict()
    assert front["hypervolume"] == pytest.approx(16.25) and [t["number"] for t in front["front"]] == [5, 3, 0]
    # one order everywhere: the front by the first objective, then higher ranks, then the rest
    assert [t["number"] for t in front["trials"]] == [5, 3, 0, 1, 2, 4]
    assert front["front"][0]["values"] == {"a": 0.25, "b": 5.0}  # objective values by name


def test_format_table_by_hand() -> None:
    table = front_table(_ordered_study(), ["a", "b"], ["minimize", "minimize"], reference=[4.0, 6.0])
    assert format_table(table) == "\n".join([
        "trial  rank  a     b  k  w      state",
        "-----  ----  ----  -  -  -----  --------",
        "5      0     0.25  5  -  0.9    COMPLETE",
        "3      0     0.5   4  4  0.1    COMPLETE",
        "0      0     1     1  1  0.125  COMPLETE",
        "baseline base: the baseline trial failed",
        "baseline undefended: a 1.5, b 2.25",
        "",
        "front size 3; hypervolume 16.25 (reference [4.0, 6.0], spec); trials: complete 5, reevaluated 1",
    ])
    every = format_table(table, all_trials=True).splitlines()
    assert every[2:8] == [
        "5      0     0.25  5  -  0.9    COMPLETE",
        "3      0     0.5   4  4  0.1    COMPLETE",
        "0      0     1     1  1  0.125  COMPLETE",
        "1      1     2     2  2  0.5    COMPLETE",
        "2      2     3     3  3  0.75   COMPLETE",
        "4      -     -     -  5  0.9    REEVALUATED",
    ]


def _table() -> FrontTable:
    """Six trials: two on the front, a dominated one (rank 1) whose first objective is lower than a
    front member's, a feasible-less unranked one, a failure and a running trial; two baselines."""
    rows = [
        TrialRow(0, "FAIL", {"w": 0.1}, None, False, fail_reason="boom\nTraceback ..."),
        TrialRow(1, "COMPLETE", {"w": 0.2}, [0.15, 0.3], True, rank=1, mlflow_run_id="r1"),
        TrialRow(2, "COMPLETE", {"w": 0.3}, [0.4, 0.05], True, rank=0, mlflow_run_id="r2"),
        TrialRow(3, "COMPLETE", {"w": 0.4}, [0.2, 0.9], False),
        TrialRow(4, "COMPLETE", {"w": 0.5}, [0.1, 0.1], True, rank=0),
        TrialRow(5, "RUNNING", {"w": 0.6}, None, False),
    ]
    return FrontTable(["ood_drift", "general_misalignment"], ["minimize", "minimize"], rows,
                      baselines={"undefended": {"ood_drift": 0.3, "general_misalignment": 0.5},
                                 "instruct": {"error": "no adapter"}})


def test_one_order_for_every_table_front_first():
    table = _table()
    assert [r.number for r in table.ordered()] == [4, 2, 1, 3, 0, 5]  # rank, first objective, number
    assert [r.number for r in table.ordered(all_trials=False)] == [4, 2]
    assert [r.number for r in table.front] == [4, 2]


def test_csv_records_baselines_then_trials():
    records = _table().records()
    assert [(r["kind"], r["trial"]) for r in records] == [("baseline", "instruct"), ("baseline", "undefended"),
                                                          ("trial", 4), ("trial", 2)]
    assert records[0] == {"kind": "baseline", "trial": "instruct", "step": "", "rank": "", "state": "FAIL",
                          "feasible": "",
                          "ood_drift": "", "general_misalignment": "", "w": "", "mlflow_run_id": "",
                          "note": "no adapter"}
    assert records[1]["state"] == "COMPLETE" and records[1]["ood_drift"] == 0.3
    assert records[3] == {"kind": "trial", "trial": 2, "step": "", "rank": 0, "state": "COMPLETE", "feasible": True,
                          "ood_drift": 0.4, "general_misalignment": 0.05, "w": 0.3, "mlflow_run_id": "r2", "note": ""}
    every = {r["trial"]: r for r in _table().records(all_trials=True) if r["kind"] == "trial"}
    assert every[3]["rank"] == "" and every[3]["mlflow_run_id"] == ""
    assert every[0]["note"] == "boom" and every[0]["ood_drift"] == ""


def test_text_table_marks_the_infeasible_trial():
    lines = format_table(_table(), all_trials=True).splitlines()
    by_trial = {line.split()[0]: line.split() for line in lines[2:] if line.split() and line.split()[0].isdigit()}
    assert by_trial["3"][1] == "infeasible" and by_trial["1"][1] == "1" and by_trial["0"][1] == "-"
