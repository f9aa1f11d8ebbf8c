"""A training error reaches the three places a user looks, with its type, message and last
frames: the Optuna trial's ``fail_reason``, the trial's MLflow run, and the printed progress. Both
places a trial trains are covered: its own process (``resources.train_process: trial``, Ray Train's
local mode, the default for one worker) and Ray Train's worker group (``workers``).

The training raises emtune's own "no chat template" ValueError: the study's model is a local folder
whose tokenizer has no chat template, which only the training finds out (it loads the model).
"""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from emtune.cli.main import main

pytestmark = pytest.mark.slow

#: Where each path trains, as the reason names it ("" : the trial's own process, no wrapper).
WHERE = {"trial": "", "workers": " (Train worker rank 0)"}


def _train_in(path, train_process: str, **extra: int) -> None:
    settings = ", ".join(f"{k}: {v}" for k, v in {"max_concurrent_trials": 1, **extra}.items())
    text = path.read_text().replace("resources: {max_concurrent_trials: 2}",
                                    f"resources: {{{settings}, train_process: {train_process}}}")
    assert f"train_process: {train_process}" in text
    path.write_text(text)


@pytest.mark.parametrize("train_process", sorted(WHERE))
def test_a_training_error_reaches_optuna_mlflow_and_the_progress_line(write_spec, save_tiny_base, tmp_path,
                                                                      capsys, train_process) -> None:
    import ray

    model = tmp_path / "no-template-model"
    save_tiny_base(model)
    (model / "chat_template.jinja").unlink()
    path = write_spec(name="workererror", num_trials=1)
    text = path.read_text().replace("  source: tiny\n  tiny: {pretrain_steps: 20}\n", f"  source: {model}\n")
    assert str(model) in text
    path.write_text(text)
    _train_in(path, train_process)
    ray.shutdown()
    try:
        code = main(["run", str(path), "--num-cpus", "2"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 1, out  # no completed trial: no front
    expected = (f"ValueError: model {str(model)!r} has no chat template: emtune trains chat models; "
                "use an instruct model" + WHERE[train_process])
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
    recorded = open(full).read()
    assert recorded.startswith(reason) and "has no chat template" in recorded.split(reason, 1)[1]
    if train_process == "workers":  # Ray's whole text, for the record
        assert "Training failed due to worker errors" in recorded

    failed = [i for i, line in enumerate(out.splitlines()) if "FAILED" in line and "trial " in line]
    assert failed, out
    after = out.splitlines()[failed[0] + 1:failed[0] + len(lines) + 1]
    assert after[0] == "    " + expected and frame in after[-1], out


#: How the reason names the killed process on each path.
KILLED = {"trial": "the trial's process", "workers": "Train worker rank 0"}


@pytest.mark.parametrize("train_process", sorted(KILLED))
def test_a_killed_training_process_says_it_died_and_which_process(write_spec, capsys, train_process,
                                                                  training_pids) -> None:
    """SIGKILL to the process that trains (no restarts allowed): the reason names the death,
    Ray's exit detail and the killed process, in Optuna, MLflow and the printed progress."""
    import os
    import signal
    import threading
    import time

    import psutil
    import ray

    path = write_spec(name="workerdeath", num_trials=1, max_steps=400)
    _train_in(path, train_process)
    killed: list[int] = []

    def kill_the_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for pid in training_pids(train_process):  # this test's Ray only, never another's
                try:
                    if psutil.Process(pid).cpu_times().user > 3.0:  # past its imports: training
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        break
                except (psutil.Error, OSError):
                    continue
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_training, daemon=True)
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
    assert reason.startswith("ActorDiedError: the process died: "), reason
    assert reason.splitlines()[0].endswith(f"({KILLED[train_process]}, pid {killed[0]})"), reason
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("emtune/workerdeath").experiment_id])
             if r.data.tags.get("emtune.role") == "trial"]
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == reason
    assert "    " + reason.splitlines()[0] in out.splitlines()
