"""`emtune report` and `emtune recommend`: on a hand-made study (Optuna + MLflow, no Ray) with
hand-checked answers, and on one real tiny study run end to end (slow)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import optuna
import pytest

from emtune.cli import recommend as recommend_cli
from emtune.cli import report as report_cli
from emtune.report import ReportError, load_study_data, write_report

PNG = b"\x89PNG\r\n\x1a\n"
# trial -> (kl_weight, ood_drift, indomain_nll, general_misalignment, its Wilson bounds)
TRIALS = {
    0: (0.001, 0.9, 1.0, 0.08, (0.05, 0.12)),
    1: (0.01, 0.5, 1.5, 0.03, (0.01, 0.07)),
    2: (0.1, 0.2, 2.0, 0.005, (0.001, 0.02)),
    3: (1.0, 0.1, 3.0, 0.0, (0.0, 0.01)),
    4: (3.0, 0.3, 3.5, 0.0, (0.0, 0.01)),  # dominated by trial 3
}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    recommend_cli.add_parser(sub)
    report_cli.add_parser(sub)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def blank_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, migrated once per module (creating one takes seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _hand_study(write_spec, blank_db: Path | None = None, infeasible: int | None = None,
                baselines: dict | None = None) -> Path:
    """studies/x with spec.yaml, an Optuna study told by hand, and optionally MLflow runs."""
    spec_path = write_spec(name="x")
    spec_text = spec_path.read_text()
    if infeasible is not None:  # a spec constraint the infeasible trial violates
        spec_text += "constraints:\n  - {metric: train_loss, max: 5.0}\n"
    study_dir = spec_path.parent / "studies" / "x"
    study_dir.mkdir(parents=True)
    (study_dir / "spec.yaml").write_text(spec_text)
    run_ids = {n: f"run{n}" for n in TRIALS}
    if blank_db is not None:
        shutil.copy(blank_db, study_dir / "mlflow.db")
        run_ids = _mlflow_runs(study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="x", storage=f"sqlite:///{study_dir / 'optuna.db'}",
                                directions=["minimize", "minimize"])
    for n, (kl, ood, nll, _, _) in TRIALS.items():
        study.enqueue_trial({"kl_weight": kl})  # the hand value, not a sampled one
        trial = study.ask()
        trial.suggest_float("kl_weight", 1e-3, 10.0, log=True)
        trial.set_user_attr("ray_trial_id", f"ray{n}")
        trial.set_user_attr("mlflow_run_id", run_ids[n])
        trial.set_user_attr("adapter_uri", f"runs:/{run_ids[n]}/adapter")
        if infeasible is not None:
            trial.set_constraint("train_loss<=5", 1.0 if n == infeasible else -1.0)
        study.tell(trial, [ood, nll])
    failed = study.ask()
    failed.set_user_attr("fail_reason", "ValueError: boom")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    for kind, values in (baselines or {}).items():  # as the searcher stores a baseline trial's metrics
        study.set_user_attr(f"baseline:{kind}", values)
    return study_dir


def _mlflow_runs(study_dir: Path) -> dict[int, str]:
    """A parent run and one child run per trial with judge rates, as a real study logs them."""
    from mlflow.tracking import MlflowClient

    from emtune.config import load_spec
    from emtune.tracking import mlflow_runs as runs

    spec = load_spec(study_dir / "spec.yaml")
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    parent = runs.start_parent_run(client, spec, (study_dir / "spec.yaml").read_text())
    experiment_id = runs.ensure_experiment(client, spec)
    ids = {}
    for n, (kl, ood, nll, gm, (low, high)) in TRIALS.items():
        params = {"kl_weight": kl}
        ids[n] = runs.start_trial_run(client, experiment_id, parent, "x", f"ray{n}", params,
                                      spec.with_overrides(params))
        runs.log_final_metrics(client, ids[n], {"ood_drift": ood, "indomain_nll": nll, "train_loss": 1.0 + n,
                                                "general_misalignment": gm, "general_misalignment_low": low,
                                                "general_misalignment_high": high})
        runs.finish_run(client, ids[n], "FINISHED")
    return ids


def test_recommend_best_task_score_under_a_ceiling(write_spec, capsys) -> None:
    study_dir = _hand_study(write_spec)
    # ood_drift <= 0.4 keeps trials 2, 3, 4; the lowest indomain_nll among them is trial 2 (2.0)
    assert recommend_cli.main(_parse(["recommend", str(study_dir), "--max", "ood_drift=0.4"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("recommended: trial 2 of study 'x': best indomain_nll (minimize) = 2 among 3 of 5")
    assert "eliminated by --max ood_drift=0.4: 2" in out
    assert "MLflow run: runs:/run2" in out and "adapter: runs:/run2/adapter" in out and "Ray trial: ray2" in out
    # maximize a metric under a ceiling and a floor: 0.2 <= ood_drift <= 0.6 -> trials 1, 2, 4; max ood is trial 1
    argv = ["recommend", str(study_dir), "--max", "ood_drift=0.6", "--min", "ood_drift=0.2",
            "--maximize", "ood_drift", "--format", "json"]
    assert recommend_cli.main(_parse(argv)) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["trial"], ev["qualifying"], ev["completed"], ev["pareto_rank"]) == (1, 3, 5, 0)
    assert ev["score"] == {"metric": "ood_drift", "direction": "maximize", "value": 0.5}
    assert ev["mlflow_run_id"] == "run1" and ev["adapter_uri"] == "runs:/run1/adapter"


def test_recommend_exits_3_says_what_eliminated_what_and_the_best_reachable(write_spec, capsys) -> None:
    study_dir = _hand_study(write_spec)
    # ood <= 0.15 leaves only trial 3 (eliminates 4); nll <= 2.5 eliminates trials 3 and 4 (2)
    argv = ["recommend", str(study_dir), "--max", "ood_drift=0.15", "--max", "indomain_nll=2.5"]
    with pytest.raises(SystemExit) as exc:
        recommend_cli.main(_parse(argv))
    assert exc.value.code == 3
    out, err = capsys.readouterr()
    assert ("no trial of study 'x' qualifies: of 5 completed trials, --max ood_drift=0.15 eliminated 4; "
            "--max indomain_nll=2.5 eliminated 2") in err
    # the best any trial reaches: ood 0.1 (trial 3), nll 1.0 (trial 0); the task score is nll too
    assert "  ood_drift: 0.1 (trial 3)   [--max ood_drift=0.15]" in out
    assert "  indomain_nll: 1 (trial 0)   [--max indomain_nll=2.5]" in out
    with pytest.raises(SystemExit) as exc:
        recommend_cli.main(_parse([*argv, "--format", "json"]))
    assert exc.value.code == 3
    answer = json.loads(capsys.readouterr().out)
    assert answer["recommended"] is None and answer["completed"] == 5
    assert answer["best_reachable"] == [
        {"metric": "ood_drift", "bound": "--max ood_drift=0.15", "best": 0.1, "trial": 3, "step": None},
        {"metric": "indomain_nll", "bound": "--max indomain_nll=2.5", "best": 1.0, "trial": 0, "step": None},
        {"metric": "indomain_nll", "bound": "task score", "best": 1.0, "trial": 0, "step": None}]
    for argv, message in [
        (["--max", "general_misalignment=0.01"], "it needs a judge"),
        (["--max", "ood_drft=1"], "did you mean 'ood_drift'?"),
        (["--max", "ood_drift"], "expected METRIC=VALUE"),
        (["--minimize", "nope"], "unknown metric 'nope'"),
    ]:
        with pytest.raises(SystemExit) as exc:
            recommend_cli.main(_parse(["recommend", str(study_dir), *argv]))
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_recommend_reads_judge_rates_from_mlflow(write_spec, blank_mlflow_db, capsys) -> None:
    study_dir = _hand_study(write_spec, blank_mlflow_db, infeasible=3)
    # general_misalignment <= 0.01: trials 2, 3, 4; trial 3 breaks the spec constraint; best nll: trial 2
    argv = ["recommend", str(study_dir), "--max", "general_misalignment=0.01", "--format", "json"]
    assert recommend_cli.main(_parse(argv)) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["trial"] == 2 and ev["qualifying"] == 2
    assert ev["metrics"]["general_misalignment"] == pytest.approx(0.005)
    assert ev["defense_params"]["defense.kl_to_reference.weight"] == "0.1"
    assert ev["mlflow_ui"].startswith("http://127.0.0.1:5000/#/experiments/") and ev["mlflow_ui"].endswith(ev["mlflow_run_id"])
    assert {e["by"]: e["trials"] for e in ev["eliminated"]} == {
        "the study's own constraints (spec `constraints`)": 1, "--max general_misalignment=0.01": 2}
    # a ceiling on the Wilson upper bound: only trial 4's high (0.01) passes among feasible ones
    argv = ["recommend", str(study_dir), "--max", "general_misalignment_high=0.01", "--format", "json"]
    assert recommend_cli.main(_parse(argv)) == 0
    assert json.loads(capsys.readouterr().out)["trial"] == 4


def _assert_report_files(out: Path, slugs: list[str]) -> str:
    """Every file is there, PNGs are PNGs, the HTML reaches nothing but 127.0.0.1; returns README."""
    names = {p.name for p in out.iterdir()}
    assert names == {"README.md", "front.html", "fronts_overlay.png", "hypervolume.png", "paper_table.csv",
                     "paper_table.tex", *(f"front_{s}.png" for s in slugs)}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    page = (out / "front.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script src" not in page
    urls = re.findall(r"https?://[^\s\"'<>]+", page)
    assert all(u.startswith("http://127.0.0.1:") for u in urls), urls
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left behind
    return (out / "README.md").read_text()


def test_report_of_hand_study_shows_front_rates_and_links(write_spec, blank_mlflow_db, tmp_path) -> None:
    study_dir = _hand_study(write_spec, blank_mlflow_db, infeasible=3)
    readme = write_report([study_dir], tmp_path / "reports" / "x")
    text = _assert_report_files(readme.parent, ["x"])
    data = load_study_data(study_dir)
    assert [r.number for r in data.table.front] == [2, 1, 0]  # trial 3 infeasible, 4 dominated by 2
    # hypervolume vs the spec reference (5, 8): 0.3*6 + 0.4*6.5 + 4.1*7 = 33.1
    assert "| x | kl_to_reference | ood_drift ↓, indomain_nll ↓ | complete 5, fail 1 | 3 | 33.1 (reference [5.0, 8.0], spec) |" in text
    # the paper's table: one row per front member, rates with their Wilson bounds in percent
    assert "| x | kl_to_reference (kl_weight=0.1) | 0.50% [0.10, 2.00] | 0.2 | 2 |" in text
    assert "| x | kl_to_reference (kl_weight=0.01) | 3.00% [1.00, 7.00] | 0.5 | 1.5 |" in text
    assert "general incoherence, in-domain misalignment, in-domain incoherence, benign score" in text  # said to be missing
    front_table = text.split("### Pareto front")[1].split("<details>")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in front_table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["2", "1", "0"]
    for n in (2, 1, 0):
        assert f"[runs:/{data.trials[n].row.mlflow_run_id}](runs:/{data.trials[n].row.mlflow_run_id})" in front_table
    assert "| 3 | infeasible | 0.1 | 3 |" in text and "ValueError: boom" in text
    assert f"- MLflow tracking URI: `sqlite:///{study_dir / 'mlflow.db'}`, experiment id 1" in text
    assert "- judge: none (judge-free metrics only)" in text
    assert "- general questions: shipped `general_v1` (version `general_v1`, 24 questions; emtune's own wording" in text
    assert "- in-domain questions: held-out prompts of the training data" in text
    spec_block = text.split("```yaml\n")[1].split("```")[0]
    assert "name: x\n" in spec_block and "- {metric: train_loss, max: 5.0}" in spec_block
    assert "optuna-dashboard sqlite:///" in text


BASELINES = {
    "base": {"ood_drift": 0.0, "indomain_nll": 4.0, "general_misalignment": 0.0},
    # Ray's bookkeeping as older studies stored it: never shown
    "undefended": {"ood_drift": 1.2, "indomain_nll": 0.8, "general_misalignment": 0.04, "general_misalignment_low": 0.02,
                   "general_misalignment_high": 0.07, "pid": 4242, "config/spec/seed": 0},
}


def test_paper_table_has_baseline_rows_and_deltas_in_markdown_csv_and_latex(write_spec, blank_mlflow_db,
                                                                              tmp_path) -> None:
    import csv

    study_dir = _hand_study(write_spec, blank_mlflow_db, infeasible=3, baselines=BASELINES)
    out = write_report([study_dir], tmp_path / "reports" / "x").parent
    text = (out / "README.md").read_text()
    paper = text.split("## Per-defense results")[1].split("## Study")[0]
    assert "| x | *base model (no fine-tuning)* | 0.00% | 0 | 4 |" in paper
    assert "| x | *undefended fine-tune* | 4.00% [2.00, 7.00] | 1.2 | 0.8 |" in paper
    # trial 2: 0.5% - 4% = -3.50 pp; ood 0.2 - 1.2 = -1; nll 2.0 - 0.8 = +1.2
    assert "| x | kl_to_reference (kl_weight=0.1) | 0.50% [0.10, 2.00] (Δ -3.50 pp) | 0.2 (Δ -1) | 2 (Δ +1.2) |" in paper
    assert "pid" not in paper and "config/" not in paper
    rows = list(csv.DictReader((out / "paper_table.csv").open()))
    assert [(r["row"], r["trial"]) for r in rows] == [("baseline", ""), ("baseline", ""), ("front", "2"),
                                                      ("front", "1"), ("front", "0")]
    trial2 = rows[2]
    assert float(trial2["general_misalignment"]) == 0.005 and float(trial2["general_misalignment_high"]) == 0.02
    assert float(trial2["general_misalignment_delta_vs_undefended"]) == pytest.approx(-0.035)
    assert float(trial2["indomain_nll_delta_vs_undefended"]) == pytest.approx(1.2)
    assert rows[1]["ood_drift_delta_vs_undefended"] == ""  # a baseline has no delta
    tex = (out / "paper_table.tex").read_text()
    assert "\\begin{tabular}{llrrr}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert "x & kl\\_to\\_reference (kl\\_weight=0.1) & 0.50 {\\scriptsize ($-3.50$)} & 0.2 {\\scriptsize ($-1$)} & " \
           "2 {\\scriptsize ($+1.2$)} \\\\" in tex
    assert "x & \\emph{undefended fine-tune} & 4.00 & 1.2 & 0.8 \\\\" in tex


def test_report_is_all_or_nothing(write_spec, tmp_path, monkeypatch) -> None:
    study_dir = _hand_study(write_spec)  # no MLflow store: Optuna alone, with a note
    out = tmp_path / "reports" / "x"
    text = _assert_report_files(write_report([study_dir], out).parent, ["x"])
    assert "no MLflow store at" in text and "| x | kl_to_reference (kl_weight=0.1) | 0.2 | 2 |" in text
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import emtune.report.writer as writer

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "plot_hypervolume", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report([study_dir], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old report, untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # and no temporary folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not an emtune report"):
        write_report([study_dir], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ReportError, match="no spec.yaml"):
        write_report([tmp_path], tmp_path / "r")


@pytest.mark.slow
def test_report_cli_on_a_real_study(finished_study: Path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished_study, tmp_path / "studies" / "finished")  # found by name under ./studies
    assert report_cli.main(_parse(["report", "finished"])) == 0
    out = tmp_path / "reports" / "finished"
    assert f"report of finished written to {out}" in capsys.readouterr().out
    text = _assert_report_files(out, ["finished"])
    study = optuna.load_study(study_name="finished", storage=f"sqlite:///{finished_study / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    data = load_study_data(tmp_path / "studies" / "finished")
    front = [r.number for r in data.table.front]
    assert 1 <= len(front) <= 2 and data.parent_run_id is not None
    front_table = text.split("### Pareto front")[1].split("<details>")[0]
    for t in trials:
        run_id = t.user_attrs["mlflow_run_id"]
        assert f"runs:/{run_id}" in text
        assert (f"| {t.number} | 0 | {t.values[0]:.4g} | {t.values[1]:.4g} |" in front_table) == (t.number in front)
        assert data.trials[t.number].metrics["train_loss"] > 0  # read back from MLflow
    assert "ood_drift ↓" in text and "indomain_nll ↓" in text
    assert "- MLflow tracking URI: `sqlite:///studies/finished/mlflow.db`, experiment id" in text
    assert f"[runs:/{data.parent_run_id}]" in text and "complete 2" in text
    assert "| finished | kl_to_reference (kl_weight=" in text
    # `recommend` on the same study: the lowest indomain_nll among trials with ood_drift <= its max
    best = min(trials, key=lambda t: (t.values[1], t.number))
    assert recommend_cli.main(_parse(["recommend", "finished", "--format", "json"])) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["trial"] == best.number and ev["adapter_uri"] == f"runs:/{best.user_attrs['mlflow_run_id']}/adapter"
