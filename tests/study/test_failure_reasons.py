"""A Train worker's error reaches the three places a user looks, with its type, message and last
frames: the Optuna trial's ``fail_reason``, the trial's MLflow run, and the printed progress.

The worker raises emtune's own "no chat template" ValueError: the study's model is a local folder
whose tokenizer has no chat template, which only the worker finds out (it loads the model).
"""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow


def test_a_worker_error_reaches_optuna_mlflow_and_the_progress_line(write_spec, save_tiny_base, tmp_path,
                                                                    capsys) -> None:
    import ray

    model = tmp_path / "no-template-model"
    save_tiny_base(model)
    (model / "chat_template.jinja").unlink()
    path = write_spec(name="workererror", num_trials=1)
    text = path.read_text().replace("  source: tiny\n  tiny: {pretrain_steps: 20}\n", f"  source: {model}\n")
    assert str(model) in text
    path.write_text(text)
    ray.shutdown()
    try:
        code = main(["run", str(path), "--num-cpus", "2"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 1, out  # no completed trial: no front
    expected = (f"ValueError: model {str(model)!r} has no chat template: emtune trains chat models; "
                "use an instruct model (Train worker rank 0)")
    frame = "emtune/models.py:"

    study_dir = path.parent / "studies" / "workererror"
    [trial] = optuna.load_study(study_name="workererror", storage=f"sqlite:///{study_dir / 'optuna.db'}").get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    lines = reason.splitlines()
    assert lines[0] == expected, reason
    assert frame in lines[-1] and lines[-1].rstrip().endswith("in load_tokenizer: raise ValueError("), reason
    assert 2 <= len(lines) <= 4, reason  # the line and at most three frames

    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emtune/workererror")
    [run] = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("emtune.role") == "trial"]
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == reason
    full = client.download_artifacts(run.info.run_id, "failure.txt", str(tmp_path))
    assert "Training failed due to worker errors" in open(full).read()  # Ray's whole text, for the record

    failed = [i for i, line in enumerate(out.splitlines()) if "FAILED" in line and "trial " in line]
    assert failed, out
    after = out.splitlines()[failed[0] + 1:failed[0] + len(lines) + 1]
    assert after[0] == "    " + expected and frame in after[-1], out


def test_a_killed_worker_says_it_died_and_which_process(write_spec, tmp_path, capsys) -> None:
    """SIGKILL to the trial's Train worker (no restarts allowed): the reason names the death,
    Ray's exit detail and the killed process, in Optuna, MLflow and the printed progress."""
    import os
    import signal
    import threading
    import time

    import psutil
    import ray

    path = write_spec(name="workerdeath", num_trials=1, max_steps=400)
    killed: list[int] = []

    def kill_our_train_worker() -> None:
        me = psutil.Process()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for child in me.children(recursive=True):  # this test's Ray only, never another's
                try:
                    if "RayTrainWorker" in " ".join(child.cmdline()) and child.cpu_times().user > 2.0:
                        os.kill(child.pid, signal.SIGKILL)
                        killed.append(child.pid)
                        break
                except psutil.Error:
                    continue
            time.sleep(0.2)

    killer = threading.Thread(target=kill_our_train_worker, daemon=True)
    ray.shutdown()
    killer.start()
    try:
        code = main(["run", str(path), "--num-cpus", "2"])
    finally:
        ray.shutdown()
    killer.join(timeout=5)
    out = capsys.readouterr().out
    assert killed and code == 1, out

    study_dir = path.parent / "studies" / "workerdeath"
    [trial] = optuna.load_study(study_name="workerdeath", storage=f"sqlite:///{study_dir / 'optuna.db'}").get_trials()
    reason = trial.user_attrs["fail_reason"]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert reason.startswith("ActorDiedError: the process died: ") and f"pid {killed[0]})" in reason, reason
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("emtune/workerdeath").experiment_id])
             if r.data.tags.get("emtune.role") == "trial"]
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == reason
    assert "    " + reason.splitlines()[0] in out.splitlines()
