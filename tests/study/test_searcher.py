"""The emtune searcher over a real persistent Optuna study (SQLite)."""

from __future__ import annotations

import math
import pickle

import optuna
import pytest

from emtune.config import load_spec
from emtune.study.outcomes import outcome
from emtune.study.searcher import EmtuneSearcher
from emtune.study.space import suggest


@pytest.fixture
def spec(write_spec):
    path = write_spec()
    text = path.read_text().replace("objectives:", "constraints:\n  - {metric: indomain_nll, max: 5.0}\nobjectives:")
    path.write_text(text)
    return load_spec(path)


def _searcher(spec, tmp_path):
    return EmtuneSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")


def test_complete_fail_and_attrs(spec, tmp_path) -> None:
    searcher = _searcher(spec, tmp_path)
    good = searcher.suggest("ray-a")
    nan = searcher.suggest("ray-b")
    missing = searcher.suggest("ray-c")
    crashed = searcher.suggest("ray-d")
    assert 1e-3 <= good["params"]["kl_weight"] <= 10.0
    searcher.on_trial_complete("ray-a", {"ood_drift": 0.5, "indomain_nll": 6.0, "mlflow_run_id": "r1",
                                         "adapter_uri": "runs:/r1/adapter"})
    searcher.on_trial_complete("ray-b", {"ood_drift": math.nan, "indomain_nll": 3.0})
    searcher.on_trial_complete("ray-c", {"indomain_nll": 3.0})
    searcher.on_trial_complete("ray-d", None, error=True)

    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    a = trials["ray-a"]
    assert a.state == optuna.trial.TrialState.COMPLETE and a.values == [0.5, 6.0]
    assert a.user_attrs["mlflow_run_id"] == "r1" and a.user_attrs["adapter_uri"] == "runs:/r1/adapter"
    assert a.constraints == {"indomain_nll<=5": 1.0}  # 6.0 - 5.0 > 0: infeasible
    assert trials["ray-b"].state == optuna.trial.TrialState.FAIL
    assert "not a finite number" in trials["ray-b"].user_attrs["fail_reason"]
    assert "'ood_drift' is missing" in trials["ray-c"].user_attrs["fail_reason"]
    assert trials["ray-d"].state == optuna.trial.TrialState.FAIL
    assert not [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert study.user_attrs["sampler"]["class"] == "TPESampler" and study.user_attrs["sampler"]["seed"] == 0
    assert {good["optuna_trial"], nan["optuna_trial"], missing["optuna_trial"], crashed["optuna_trial"]} == {0, 1, 2, 3}


def test_pickled_searcher_reopens_the_study_and_finishes_live_trials(spec, tmp_path) -> None:
    searcher = _searcher(spec, tmp_path)
    searcher.suggest("ray-a")
    clone = pickle.loads(pickle.dumps(searcher))
    clone.on_trial_complete("ray-a", {"ood_drift": 1.0, "indomain_nll": 2.0})
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.get_trials()[0].values == [1.0, 2.0]


def test_a_reopened_study_does_not_repeat_the_first_drivers_draws(spec, tmp_path) -> None:
    import shutil

    first = _searcher(spec, tmp_path)
    draw = first.suggest("ray-0")["params"]["kl_weight"]
    first.on_trial_complete("ray-0", {"ood_drift": 1.0, "indomain_nll": 2.0})
    shutil.copy(tmp_path / "optuna.db", tmp_path / "copy.db")
    # `emtune run --extend` / `resume`: a new driver on the same study, still in TPE's random
    # start-up phase (1 of 2 trials); the same seed again would draw the same value again
    later = _searcher(spec, tmp_path).suggest("ray-1")["params"]["kl_weight"]
    assert later != draw
    twin = EmtuneSearcher(spec, f"sqlite:///{tmp_path / 'copy.db'}")
    assert twin.suggest("ray-1")["params"]["kl_weight"] == later  # still reproducible


def test_outcome_pruned_and_error_reason(spec) -> None:
    state, values, reason = outcome(spec, {"early_stopped": True}, False)
    assert state == optuna.trial.TrialState.PRUNED and values is None
    state, _, reason = outcome(spec, {"error": "training loss is not finite"}, False)
    assert state == optuna.trial.TrialState.FAIL and reason == "training loss is not finite"


def test_conditional_parameters(write_spec) -> None:
    path = write_spec()
    text = path.read_text().replace(
        "    kl_weight: {type: float",
        "    defense: {type: categorical, choices: [kl, none]}\n"
        "    kl_weight: {when: {defense: kl}, type: float",
    )
    path.write_text(text)
    space = load_spec(path).search
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    seen = {"kl": 0, "none": 0}
    for _ in range(20):
        values = suggest(study.ask(), space)
        seen[values["defense"]] += 1
        assert ("kl_weight" in values) == (values["defense"] == "kl")
    assert seen["kl"] and seen["none"]


def test_baselines_first_and_relative_objectives_wait_for_them(write_spec, tmp_path) -> None:
    path = write_spec(baselines="true")
    text = path.read_text().replace(
        "  - {name: indomain_nll, direction: minimize, reference: 8.0}",
        "  - {name: indomain_nll, direction: minimize, relative: {to: undefended, how: ratio}}")
    path.write_text(text)
    spec = load_spec(path)
    searcher = _searcher(spec, tmp_path)
    assert searcher.suggest("b1") == {"baseline": "base", "baseline_kinds": ["base"], "params": {}}
    # one undefended fine-tune measures the undefended and the stopped-early baselines
    assert searcher.suggest("b2") == {"baseline": "undefended", "baseline_kinds": ["undefended", "stopped_early"],
                                      "params": {}}
    searcher.suggest("t1")
    # the trial finishes before the undefended baseline: its tell waits
    searcher.on_trial_complete("b1", {"ood_drift": 0.0, "indomain_nll": 5.0})
    searcher.on_trial_complete("t1", {"ood_drift": 0.5, "indomain_nll": 3.0})
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.get_trials()[0].state == RUNNING_STATE
    searcher.on_trial_complete("b2", {"ood_drift": 1.0, "indomain_nll": 4.0, "error_free": True, "train_steps": 8,
                                      "checkpoints": [{"step": 4, "point": "50%",
                                                       "metrics": {"ood_drift": 0.4, "indomain_nll": 4.5}}]})
    trial = study.get_trials()[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.values == [0.5, 0.75]  # indomain_nll 3.0 / undefended 4.0
    assert study.user_attrs["baseline:base"] == {"ood_drift": 0.0, "indomain_nll": 5.0}
    assert study.user_attrs["baseline:stopped_early"] == {"points": [
        {"step": 4, "point": "50%", "ood_drift": 0.4, "indomain_nll": 4.5},
        {"step": 8, "point": "final", "ood_drift": 1.0, "indomain_nll": 4.0, "train_steps": 8.0}]}
    assert searcher.pending_baselines() == []


def test_failed_baseline_fails_relative_trials_with_the_reason(write_spec, tmp_path) -> None:
    path = write_spec(baselines="true")
    path.write_text(path.read_text().replace(
        "  - {name: indomain_nll, direction: minimize, reference: 8.0}",
        "  - {name: indomain_nll, direction: minimize, relative: {to: base}}"))
    spec = load_spec(path)
    searcher = _searcher(spec, tmp_path)
    searcher.suggest("b1"), searcher.suggest("b2"), searcher.suggest("t1")
    searcher.on_trial_complete("b1", None, error=True)
    searcher.on_trial_complete("t1", {"ood_drift": 0.5, "indomain_nll": 3.0})
    trial = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "baseline 'base' has no 'indomain_nll'" in trial.user_attrs["fail_reason"]


RUNNING_STATE = optuna.trial.TrialState.RUNNING


def test_open_study_retries_when_another_process_creates_the_schema_at_once(spec, tmp_path, monkeypatch) -> None:
    import sqlalchemy.exc

    from emtune.study import searcher as searcher_module

    real, calls = optuna.create_study, []

    def racing(**kwargs):
        calls.append(kwargs["storage"])
        if len(calls) == 1:  # what SQLite raises when two processes insert the alembic version
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(**kwargs)

    monkeypatch.setattr(searcher_module.optuna, "create_study", racing)
    study = searcher_module.open_study(spec, f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(calls) == 2 and study.study_name == spec.name
