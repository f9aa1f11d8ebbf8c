"""`emtune report` and `emtune recommend` with checkpoint candidates, the stopped-early arm and
the monitor's rank correlation, on a hand-made study (Optuna + MLflow, no Ray)."""

from __future__ import annotations

import argparse
import json
import math

import optuna
import pytest

from emtune.cli import recommend as recommend_cli
from emtune.evaluation.monitor import spearman
from emtune.report import load_study_data, write_report

# (trial, step) -> ood_drift, indomain_nll, judged general misalignment, persona_projection
POINTS = {
    (0, 2): (0.10, 3.0, 0.00, -0.5), (0, 4): (0.30, 2.0, 0.10, 0.1), (0, 8): (0.90, 1.0, 0.30, 0.9),
    (1, 2): (0.05, 3.5, 0.05, -0.2), (1, 4): (0.20, 2.5, 0.05, 0.0), (1, 8): (0.40, 2.2, 0.20, 0.5),
}
STOPPED_EARLY = [{"step": 2, "point": "25%", "ood_drift": 0.2, "indomain_nll": 3.2},
                 {"step": 8, "point": "final", "ood_drift": 0.08, "indomain_nll": 1.1}]


@pytest.fixture
def candidate_study(write_spec, tmp_path):
    """Two trials of 8 steps, each evaluated at steps 2 and 4: Optuna trials told as the searcher
    tells them, MLflow runs as the trial driver logs them (judged rates and the monitor)."""
    from mlflow.tracking import MlflowClient

    from emtune.config import load_spec
    from emtune.study.candidates import tell_candidates
    from emtune.tracking import mlflow_runs as runs

    spec_path = write_spec(name="c")
    study_dir = spec_path.parent / "studies" / "c"
    study_dir.mkdir(parents=True)
    (study_dir / "spec.yaml").write_text(spec_path.read_text())
    spec = load_spec(study_dir / "spec.yaml")
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    parent = runs.start_parent_run(client, spec, "spec")
    experiment = client.get_run(parent).info.experiment_id
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="c", storage=f"sqlite:///{study_dir / 'optuna.db'}",
                                directions=["minimize", "minimize"])
    study.set_user_attr("baseline:stopped_early", {"points": STOPPED_EARLY})
    for trial_number, kl in ((0, 0.01), (1, 1.0)):
        run = runs.start_trial_run(client, experiment, parent, "c", f"ray{trial_number}", {"kl_weight": kl}, spec)
        checkpoints = []
        for step in (2, 4):
            drift, nll, misaligned, persona = POINTS[(trial_number, step)]
            candidate = runs.start_candidate_run(client, run, f"ray{trial_number}", step, f"{25 * step // 2}%", {})
            metrics = {"ood_drift": drift, "indomain_nll": nll, "general_misalignment": misaligned,
                       "persona_projection": persona}
            runs.log_final_metrics(client, candidate, metrics, step=step)
            checkpoints.append({"step": step, "point": f"{25 * step // 2}%", "mlflow_run_id": candidate,
                                "adapter_uri": f"runs:/{candidate}/adapter", "metrics": metrics})
        drift, nll, misaligned, persona = POINTS[(trial_number, 8)]
        runs.log_final_metrics(client, run, {"ood_drift": drift, "indomain_nll": nll, "persona_projection": persona,
                                             "general_misalignment": misaligned}, step=8)
        study.enqueue_trial({"kl_weight": kl})
        trial = study.ask()
        trial.suggest_float("kl_weight", 1e-3, 10.0, log=True)
        for key, value in {"ray_trial_id": f"ray{trial_number}", "mlflow_run_id": run, "eval_step": 8,
                           "eval_point": "final", "adapter_uri": f"runs:/{run}/adapter"}.items():
            trial.set_user_attr(key, value)
        tell_candidates(study, spec, study.get_trials(deepcopy=False)[trial.number], {"checkpoints": checkpoints}, {})
        study.tell(trial, [drift, nll])
    return study_dir


def _parse(argv):
    parser = argparse.ArgumentParser()
    recommend_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_recommend_picks_a_checkpoint_and_gives_its_adapter(candidate_study, capsys) -> None:
    # indomain_nll under ood_drift <= 0.35: 0@2 (3.0), 0@4 (2.0) and the second trial's two checkpoints
    # (3.5, 2.5) -> 0 @ step 4
    assert recommend_cli.main(_parse(["recommend", str(candidate_study), "--max", "ood_drift=0.35"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("recommended: trial 0 @ step 4 of study 'c': best indomain_nll (minimize) = 2 among 4 of 6 "
                          "candidates (trials and their checkpoints)")
    assert "trial 0's fine-tune stopped at step 4" in out
    argv = ["recommend", str(candidate_study), "--max", "ood_drift=0.35", "--format", "json"]
    assert recommend_cli.main(_parse(argv)) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["trial"], ev["step"], ev["checkpoint"], ev["candidate"]) == (0, 4, True, "0 @ step 4")
    assert ev["adapter_uri"] == f"runs:/{ev['mlflow_run_id']}/adapter" and ev["metrics"]["general_misalignment"] == 0.1
    # trials' own points only: the second trial (Optuna trial 3: 0 and its checkpoints 1, 2 came
    # first), at (0.40, 2.2), is the one under ood_drift <= 0.5
    argv = ["recommend", str(candidate_study), "--max", "ood_drift=0.5", "--final-only", "--format", "json"]
    assert recommend_cli.main(_parse(argv)) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["candidate"], ev["completed"], ev["counted"]) == ("3", 2, "completed trials")


def test_report_shows_candidates_the_stopped_early_arm_and_the_monitor(candidate_study, tmp_path) -> None:
    data = load_study_data(candidate_study)
    # the second trial is Optuna trial 3. Front: 3@2 (0.05, 3.5), 0@2 (0.1, 3.0), 3@4 (0.2, 2.5),
    # 0@4 (0.3, 2.0), 0 (0.9, 1.0); 3 (0.4, 2.2) is dominated by 0@4
    assert [r.label for r in data.table.front] == ["3 @ step 2", "0 @ step 2", "3 @ step 4", "0 @ step 4", "0"]
    text = write_report([candidate_study], tmp_path / "r").read_text()
    assert "- candidates: 6 (3.0 per trial" in text and "5 on the front" in text
    front = text.split("### Pareto front")[1].split("<details>")[0]
    assert "| 3 @ step 2 | 0 | 0.05 | 3.5 | 1 |" in front
    assert "kl_to_reference (kl_weight=0.01) @ step 4" in text  # the paper-format table names the checkpoint
    arm = text.split("### Early stopping as an arm")[1].split("###")[0]
    # (0.2, 3.2) at step 2 is dominated by 3@4 (0.2, 2.5) and 0@2 (0.1, 3.0); (0.08, 1.1) by none
    assert "| 25% | 2 | 0.2 | 3.2 | 2 |" in arm and "| final | 8 | 0.08 | 1.1 | 0 |" in arm
    assert "1 stop point(s) are dominated by no front candidate" in arm
    monitor = text.split("### Can the judge-free monitor be trusted here?")[1].split("###")[0]
    drift = [p[0] for p in POINTS.values()]
    persona = [p[3] for p in POINTS.values()]
    judged = [p[2] for p in POINTS.values()]
    for name, signal in (("ood_drift", drift), ("persona_projection", persona)):
        c = spearman(signal, judged)
        assert f"| {name} | {c.rho:.2f} | [{c.low:.2f}, {c.high:.2f}] | 6 |" in monitor
    assert spearman(persona, judged).rho == pytest.approx(0.9856, abs=1e-4) and not math.isnan(spearman(drift, judged).rho)
