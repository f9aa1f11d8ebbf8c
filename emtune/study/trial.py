"""One trial: a Ray Tune function that drives a Ray Train fine-tune and tracks it in MLflow.

Ray 2.5x+ (Train V2) no longer takes a Trainer inside a Tuner: the trial is a Tune function that
builds a ``TorchTrainer`` and calls ``fit``. ``ray.tune.*`` is used here, ``ray.train.*`` only in
the workers. The Train run is named after the Tune trial id so a restarted trial finds its run.
This function owns its trial's MLflow child run: it logs params, per-step losses, metrics, the
adapter and the generated samples, and closes the run FAILED with the reason when anything
raises; the reported result carries the run id and adapter URI for the searcher.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from emtune.config import StudySpec

FAILED, FINISHED = "FAILED", "FINISHED"


def trainer_for(trial_spec: StudySpec, trial_id: str, config: dict[str, Any]) -> Any:
    """The TorchTrainer of one trial (ScalingConfig from the spec; CPU for dry runs)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from emtune.train.worker import train_loop_per_worker

    res = trial_spec.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": trial_spec.model_dump(mode="json"),
            "model_source": config["model_source"],
            "cache_dir": config["cache_dir"],
            "evaluate": config.get("evaluate", True),
            "skip_training": config.get("baseline") == "base",
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=str(trial_spec.study_dir / "ray_results" / "train"),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
        ),
    )


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function: fine-tune under the sampled defense settings, evaluate, report."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from emtune.tracking import mlflow_runs as runs
    from emtune.train.worker import HISTORY_FILE, SAMPLES_FILE

    started = time.perf_counter()
    os.environ.pop("MLFLOW_RUN_ID", None)
    spec = StudySpec.model_validate(config["spec"])
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(config["tracking_uri"])
    baseline = config.get("baseline")
    trial_spec = spec.with_overrides(config["params"])
    if baseline:  # the same study without any defense; `base` also without training
        trial_spec = trial_spec.model_copy(update={"defenses": ()})
    done = runs.find_trial_run(client, config["experiment_id"], config["parent_run_id"], trial_id)
    if done is not None and done.info.status == "FINISHED" and "tracked_result" in done.data.tags:
        # Tune restarted a trial that had already finished before its driver stopped: report
        # the tracked result again instead of training twice (no duplicate work or records).
        tune.report(json.loads(done.data.tags["tracked_result"]))
        return
    run_id = runs.start_trial_run(client, config["experiment_id"], config["parent_run_id"], spec.name,
                                  trial_id, config["params"], trial_spec, baseline=baseline)
    try:
        fit_started = time.perf_counter()
        result = trainer_for(trial_spec, trial_id, config).fit()
        metrics = dict(result.metrics or {})
        metrics["time/fit_s"] = time.perf_counter() - fit_started
        metrics["time/driver_setup_s"] = fit_started - started
        checkpoint_dir = Path(result.checkpoint.path) if result.checkpoint else None
        if checkpoint_dir is not None:
            history = checkpoint_dir / HISTORY_FILE
            if history.is_file():
                runs.log_history(client, run_id, json.loads(history.read_text()))
            for name in ("general", "in_domain", "triggered"):
                samples = checkpoint_dir / SAMPLES_FILE.format(name=name)
                if samples.is_file():
                    runs.log_samples_table(client, run_id, samples, name)
            for extra in ("defenses.json", "trial_meta.json"):
                if (checkpoint_dir / extra).is_file():
                    client.log_artifact(run_id, str(checkpoint_dir / extra))
            if (checkpoint_dir / "adapter").is_dir():
                runs.log_dir(client, run_id, checkpoint_dir / "adapter", "adapter")
                metrics["adapter_uri"] = f"runs:/{run_id}/adapter"
        if trial_spec.evaluation.judge.kind != "none" and checkpoint_dir is not None and "error" not in metrics:
            from emtune.evaluation.judging import judge_trial

            metrics.update(judge_trial(trial_spec, checkpoint_dir, client, run_id))
        metrics["time/trial_s"] = time.perf_counter() - started
        runs.log_final_metrics(client, run_id, metrics)
        metrics["mlflow_run_id"] = run_id
        error = metrics.get("error")
        client.set_tag(run_id, "tracked_result", json.dumps(metrics, default=str)[:4900])
        runs.finish_run(client, run_id, FAILED if error else FINISHED, error)
    except Exception as exc:  # noqa: BLE001 - a failed fine-tune (OOM, worker crash) is an outcome
        # Reported, not raised: the searcher then tells Optuna FAIL *with this reason*, and the
        # study goes on; Ray's own error path would only say that the trial raised.
        reason = _failure_reason(exc)
        runs.finish_run(client, run_id, FAILED, reason + "\n" + traceback.format_exc(limit=5))
        tune.report({"error": reason, "mlflow_run_id": run_id})
        return
    except BaseException as exc:  # interrupted: close the run, let Ray handle the stop
        runs.finish_run(client, run_id, FAILED, f"interrupted: {type(exc).__name__}")
        raise
    tune.report(metrics, checkpoint=result.checkpoint)


def _failure_reason(exc: Exception) -> str:
    """One line naming the root cause (Ray wraps worker errors; OOM gets a hint)."""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = f"{type(root).__name__}: {root}".splitlines()[0][:500]
    if "OutOfMemory" in text or "out of memory" in text.lower():
        text += " (out of memory: lower training.per_device_batch_size or data.max_length, or use more GPUs)"
    return text
