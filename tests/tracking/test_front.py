"""Front tables from a real Optuna study: ranks, constraints, hypervolume history."""

from __future__ import annotations

import optuna
import pytest

from emtune.tracking.front import format_table, front_table
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
