"""A 2-trial study end to end on a real local Ray and a real SQLite MLflow store."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow


def test_two_trial_study_tracks_parent_children_front(finished_study, capsys) -> None:
    out = (finished_study.parents[1] / "run_output.txt").read_text()
    assert "] trial" in out and "[emtune " in out and "front size" in out

    study_dir = finished_study
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emtune/finished")
    assert experiment.artifact_location == (study_dir / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    baselines = {r.data.tags["baseline"]: r for r in runs if r.data.tags.get("emtune.role") == "baseline"}
    assert set(baselines) == {"base", "undefended"}
    assert all(b.info.status == "FINISHED" for b in baselines.values())
    # the base baseline is the untrained model: its adapter is the identity, so no drift at all
    assert baselines["base"].data.metrics["ood_drift"] == pytest.approx(0.0, abs=1e-6)
    assert baselines["base"].data.metrics["train_steps"] == 0
    assert baselines["undefended"].data.metrics["train_steps"] == 2
    assert baselines["undefended"].data.metrics["ood_drift"] > 0
    parents = [r for r in runs if r.data.tags.get("emtune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("emtune.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["pareto_rank"] in {"0", "1"}
        assert {"ood_drift", "indomain_nll", "train_loss"} <= set(child.data.metrics)
        assert "search.kl_weight" in child.data.params
        history = client.get_metric_history(child.info.run_id, "train/task_loss")
        assert [m.step for m in history] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"adapter", "samples"} <= artifacts
    assert "0" in {c.data.tags["pareto_rank"] for c in children}
    hv = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert [m.step for m in hv][-1] == 2 and hv[-1].value > 0
    front_files = {a.path for a in client.list_artifacts(parent.info.run_id, "front")}
    assert {"front/front.json", "front/front.png", "front/front_table.json"} <= front_files

    study = optuna.load_study(study_name="finished", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.get_trials()}
    assert run_ids == {c.info.run_id for c in children}

    assert main(["pareto", str(study_dir), "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in front["objectives"]] == ["ood_drift", "indomain_nll"]
    assert 1 <= len(front["front"]) <= 2
    assert front["baselines"]["base"]["ood_drift"] == pytest.approx(0.0, abs=1e-6)
    assert set(front["baselines"]) == {"base", "undefended", "stopped_early"}
    # stopped early: the undefended fine-tune at step 1 (0.25 and 0.5 of 2 steps) and at its end
    points = front["baselines"]["stopped_early"]["points"]
    assert [p["step"] for p in points] == [1, 2] and points[-1]["ood_drift"] == front["baselines"]["undefended"]["ood_drift"]
    ranks = {c.info.run_id: c.data.tags["pareto_rank"] for c in children}
    assert all(ranks[row["mlflow_run_id"]] == "0" for row in front["front"])


def test_confirm_reevaluates_the_front_from_saved_adapters(finished_study, tmp_path, capsys,
                                                           independent_metrics) -> None:
    from emtune.config import load_spec
    from emtune.models import load_adapter, load_model, load_tokenizer, model_cache_dir, resolve_source
    from emtune.train.worker import prepare_rows

    assert main(["confirm", str(finished_study), "--seeds", "2", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{finished_study / 'mlflow.db'}")
    assert main(["pareto", str(finished_study), "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    spec = load_spec(finished_study / "spec.yaml")
    source = resolve_source(spec.model, model_cache_dir())
    tokenizer = load_tokenizer(source, spec.model)
    _, heldout = prepare_rows(spec, [])
    assert front["front"]
    for row in front["front"]:
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.metrics["confirm/indomain_nll_n"] == 2
        # held-out NLL does not depend on the sampling seed: both seeds equal the NLL of the saved
        # adapter computed independently (Hugging Face's own loss, one row at a time)
        adapter = client.download_artifacts(row["mlflow_run_id"], "adapter", str(tmp_path / str(row["number"])))
        model = load_adapter(load_model(source, spec.model), adapter).eval()
        expected = independent_metrics.nll(model, tokenizer, heldout, spec.data.max_length)
        assert run.data.metrics["confirm/indomain_nll_mean"] == pytest.approx(expected, rel=1e-4)
        assert run.data.metrics["confirm/indomain_nll_std"] == pytest.approx(0.0, abs=1e-6)
        assert row["values"]["indomain_nll"] == pytest.approx(expected, rel=1e-4)  # and the search trial agrees
        assert f"{row['number']:<6}" in out
    with pytest.raises(SystemExit) as info:
        main(["confirm", str(finished_study), "--trial", "99"])
    assert info.value.code == 2


def test_running_a_finished_study_again_runs_nothing(finished_study, capsys, ray_session) -> None:
    storage = f"sqlite:///{finished_study / 'optuna.db'}"
    before = [(t.number, t.state, t.values) for t in optuna.load_study(study_name="finished", storage=storage).trials]
    client = MlflowClient(f"sqlite:///{finished_study / 'mlflow.db'}")
    runs_before = len(client.search_runs([client.get_experiment_by_name("emtune/finished").experiment_id]))
    assert main(["run", str(finished_study.parents[1] / "finished.yaml"), "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "[emtune] study 'finished' already has 2 of 2 trials: running 0 more" in out
    assert [(t.number, t.state, t.values) for t in optuna.load_study(study_name="finished", storage=storage).trials] == before
    assert len(client.search_runs([client.get_experiment_by_name("emtune/finished").experiment_id])) == runs_before
    assert not (finished_study / "ray_results" / "tune-extend-1").exists()
