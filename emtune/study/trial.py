"""One trial: a Ray Tune function that drives a Ray Train fine-tune and tracks it in MLflow.

Ray 2.5x+ (Train V2) no longer takes a Trainer inside a Tuner: the trial is a Tune function that
builds a ``TorchTrainer`` and calls ``fit``. ``ray.tune.*`` is used here, ``ray.train.*`` only in
the workers. The Train run is named after the Tune trial id so a restarted trial finds its run.
A single-worker trial trains in this very process through Ray Train's local mode (no controller
or worker actors to start; ``resources.train_process``, :mod:`emtune.train.launch`); a
multi-worker trial gets Ray Train's worker group.
This function owns its trial's MLflow child run: it logs params, per-step losses, metrics, the
adapter and the generated samples, and closes the run FAILED with the reason when anything
raises; the reported result carries the run id and adapter URI for the searcher.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emtune.config import StudySpec
from emtune.evaluation.judges import JudgeUnavailable
from emtune.evaluation.judging import score_trial
from emtune.evaluation.points import stop_points
from emtune.evaluation.server_backend import GenerationError, GenerationUnavailable, generate_with_judge_stream
from emtune.numbers import finite_numbers
from emtune.study.candidates import track_checkpoints, tracked_checkpoints
from emtune.study.failures import failure_reason, failure_report
from emtune.study.pending import PendingEvaluation, save_pending
from emtune.trial_files import TrialFiles

FAILED, FINISHED = "FAILED", "FINISHED"


def trainer_for(trial_spec: StudySpec, trial_id: str, config: dict[str, Any]) -> Any:
    """The TorchTrainer of one trial: Ray Train's local mode (``num_workers=0``: the training runs
    in this process, no controller or worker actors) when the spec trains in the trial's process
    (``resources.train_process``; one worker by default), else a worker group sized by the spec."""
    import ray.train  # ray stays out of import time: specs and reports load without it
    from ray.train.torch import TorchTrainer

    from emtune.train.launch import train_in_trial_process, train_loop_per_worker  # torch
    from emtune.train.process_group import LoopbackTorchConfig

    res = trial_spec.resources
    storage = trial_spec.study_dir / "ray_results" / "train"
    name = f"train-{trial_id}"
    loop_config = {
        "spec": trial_spec,
        "model_source": config["model_source"],
        "cache_dir": config["cache_dir"],
        "evaluate": config.get("evaluate", True),
        "skip_training": config.get("baseline") == "base",
        "pruning": config.get("pruning"),
    }
    run_config = ray.train.RunConfig(name=name, storage_path=str(storage),
                                     failure_config=ray.train.FailureConfig(max_failures=res.max_failures))
    if res.in_trial_process:
        loop_config.update(run_dir=str(storage / name), max_failures=res.max_failures)
        return TorchTrainer(train_in_trial_process, train_loop_config=loop_config,
                            scaling_config=ray.train.ScalingConfig(num_workers=0), run_config=run_config)
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=LoopbackTorchConfig(),  # a local study's rendezvous store stays on loopback
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=run_config,
    )


@dataclass
class TrainingOutcome:
    """What a trial's training returned: its metrics, its checkpoint folder and the Ray
    ``Checkpoint`` to report to Tune with them (None when nothing was saved)."""

    metrics: dict[str, Any]
    folder: Path | None
    checkpoint: Any = None


def fit_training(trial_spec: StudySpec, trial_id: str, config: dict[str, Any]) -> TrainingOutcome:
    """Train (and evaluate) one trial where its spec says (:func:`trainer_for`)."""
    from ray import tune  # ray loads in the trial process only

    result = trainer_for(trial_spec, trial_id, config).fit()
    if trial_spec.resources.in_trial_process:  # local mode: the training function's return value
        folder = Path(result.return_value["checkpoint"])
        return TrainingOutcome(dict(result.return_value["metrics"]), folder,
                               tune.Checkpoint.from_directory(str(folder)))
    folder = Path(result.checkpoint.path) if result.checkpoint else None
    return TrainingOutcome(dict(result.metrics or {}), folder, result.checkpoint)


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function: fine-tune under the sampled defense settings, evaluate, report.

    Failures are outcomes, reported (not raised) so the searcher tells Optuna FAIL *with the
    reason*: a failed fine-tune (OOM, crash, NaN) ends the trial; a judge or tracking server that
    stays down after training (past its retries) also fails it, but first saves a pending
    evaluation record so ``emtune resume`` finishes the evaluation later from the saved
    checkpoint (adapter and generated samples) without training again.
    """
    from mlflow.tracking import MlflowClient  # mlflow and ray load in the trial process only
    from ray import tune

    from emtune.tracking import mlflow_runs as runs

    started = time.perf_counter()
    os.environ.pop("MLFLOW_RUN_ID", None)
    spec = StudySpec.model_validate(config["spec"])
    runs.apply_retry_policy(spec.tracking.retries)
    trial_id = tune.get_context().get_trial_id()
    uri = config["tracking_uri"]
    client = MlflowClient(uri)
    baseline = config.get("baseline")
    trial_spec = spec.with_overrides(config["params"])
    if baseline:
        trial_spec = baseline_spec(trial_spec, config)
    try:
        done = runs.find_trial_run(client, config["experiment_id"], config["parent_run_id"], trial_id)
        if done is not None and done.info.status == "FINISHED" and "tracked_result" in done.data.tags:
            # Tune restarted a trial that had already finished before its driver stopped: report
            # the tracked result again instead of training twice (no duplicate work or records).
            tune.report({**json.loads(done.data.tags["tracked_result"]),
                         "checkpoints": json.dumps(tracked_checkpoints(client, done.info.run_id))})
            return
        run_id = runs.start_trial_run(client, config["experiment_id"], config["parent_run_id"], spec.name,
                                      trial_id, config["params"], trial_spec, baseline=baseline)
    except Exception as exc:  # noqa: BLE001 - nothing trained yet: fail with the reason, study goes on
        if not runs.tracking_outage(exc):
            raise
        tune.report({"error": "tracking failed before training: " + _tracking_reason(uri, spec, exc)})
        return
    try:
        fit_started = time.perf_counter()
        result = fit_training(trial_spec, trial_id, config)
    except Exception as exc:  # noqa: BLE001 - a failed fine-tune (OOM, worker crash) is an outcome
        reason = failure_report(exc)  # the worker's exception and last frames, not Ray's wrapper
        close_run(client, run_id, reason, details=str(exc))
        tune.report({"error": reason, "mlflow_run_id": run_id})
        return
    except BaseException as exc:  # interrupted: close the run, let Ray handle the stop
        close_run(client, run_id, f"interrupted: {type(exc).__name__}")
        raise
    metrics = result.metrics
    metrics["time/fit_s"] = time.perf_counter() - fit_started
    metrics["time/driver_setup_s"] = fit_started - started
    checkpoint_dir = result.folder
    try:
        metrics = evaluate_and_track(trial_spec, checkpoint_dir, client, run_id, metrics, started,
                                     trial_id=trial_id, params=config["params"])
    except Exception as exc:  # noqa: BLE001 - judge or tracking down past its retries
        reason = evaluation_reason(exc, uri, trial_spec)
        pending = None
        if checkpoint_dir is not None and "error" not in metrics:
            pending = save_pending(trial_spec.study_dir, PendingEvaluation(
                ray_trial_id=trial_id, reason=reason, checkpoint_path=str(checkpoint_dir),
                params=config["params"], metrics=finite_numbers(metrics), mlflow_run_id=run_id,
                optuna_trial=config.get("optuna_trial"), baseline=baseline))
            reason += f" (saved for `emtune resume {trial_spec.study_dir}` to finish later)"
        close_run(client, run_id, reason, pending=pending is not None)
        tune.report({"error": reason, "mlflow_run_id": run_id, "evaluation_pending": pending is not None,
                     "checkpoint_path": str(checkpoint_dir)})
        return
    tune.report(metrics, checkpoint=result.checkpoint)


def evaluate_and_track(trial_spec: StudySpec, checkpoint_dir: Path | None, client: Any, run_id: str,
                       metrics: dict[str, Any], started: float | None = None, trial_id: str = "",
                       params: dict[str, Any] | None = None) -> dict[str, Any]:
    """After training: log the trial's files to its MLflow run (its checkpoints to runs of their
    own, :func:`emtune.study.candidates.track_checkpoints`), generate its answers on the generation
    server (``evaluation.backend: server``; sets already saved are kept), judge its samples, log
    the final metrics at the last training step and close the run. Idempotent, so a failed
    evaluation can simply be run again (the judge cache makes verdicts already paid for free).
    Returns the completed metrics, with ``checkpoints``: a JSON list, one record per evaluated
    checkpoint."""
    from emtune.tracking import mlflow_runs as runs  # mlflow

    metrics = dict(metrics)
    checkpoints: list[dict[str, Any]] = []
    if checkpoint_dir is not None:
        files = TrialFiles(checkpoint_dir)
        history = files.read_history()
        if history:
            runs.log_history(client, run_id, history)
        if files.rollouts.is_file():  # RL: sample rollouts per logged step
            runs.log_jsonl_table(client, run_id, files.rollouts, "rollouts.json")
        if files.monitor.is_file():
            runs.log_history(client, run_id, json.loads(files.monitor.read_text()), prefix="monitor/")
        checkpoints = track_checkpoints(trial_spec, files, client, run_id, trial_id, params or {})
        for extra in files.extra_artifacts():
            client.log_artifact(run_id, str(extra))
        if files.adapter.is_dir():
            runs.log_dir(client, run_id, files.adapter, "adapter")
            metrics["adapter_uri"] = f"runs:/{run_id}/adapter"
        if "error" not in metrics and not metrics.get("pruned") and trial_spec.evaluation.backend == "server":
            metrics.update(generate_with_judge_stream(trial_spec, checkpoint_dir))
        for name in files.sample_sets():
            runs.log_samples_table(client, run_id, files.samples(name), name)
        if "error" not in metrics and not metrics.get("pruned"):
            metrics.update(score_trial(trial_spec, checkpoint_dir, client, run_id))
    if started is not None:
        metrics["time/trial_s"] = time.perf_counter() - started
    runs.log_final_metrics(client, run_id, metrics, step=int(metrics.get("train_steps") or 0))
    metrics["mlflow_run_id"] = run_id
    error = metrics.get("error")
    client.set_tag(run_id, "tracked_result", json.dumps(metrics, default=str)[:4900])
    if metrics.get("pruned"):
        client.set_tag(run_id, "pruned", str(metrics["pruned"]))
    runs.finish_run(client, run_id, FAILED if error else FINISHED, error)
    return {**metrics, "checkpoints": json.dumps(checkpoints)}  # a string: see outcomes.checkpoint_records


def baseline_spec(spec: StudySpec, config: dict[str, Any]) -> StudySpec:
    """The spec of a baseline trial: the study without any defense (``base`` is not trained
    either); measuring ``stopped_early`` too, it is evaluated at the baseline's stop points
    (supervised fine-tuning only: a GRPO study's stopped_early has its final point alone)."""
    trial_spec = spec.model_copy(update={"defenses": ()})
    if "stopped_early" in (config.get("baseline_kinds") or ()) and spec.training.method == "sft":
        at = stop_points(spec.baselines.stop_points, spec.evaluation.at)
        trial_spec = trial_spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"at": at})})
    return trial_spec


def close_run(client: Any, run_id: str, reason: str, pending: bool = False, details: str | None = None) -> None:
    """Close the run FAILED with the reason (and Ray's full error text as ``failure.txt`` when
    given), if the tracking server lets us (it may be the fault)."""
    from emtune.tracking import mlflow_runs as runs  # mlflow

    try:
        if pending:
            client.set_tag(run_id, "evaluation_pending", "true")
        if details:
            client.log_text(run_id, f"{reason}\n\n{details}\n", "failure.txt")
        for candidate in runs.candidate_runs(client, run_id):  # checkpoints tracked before the failure
            if candidate.info.status == "RUNNING":
                runs.finish_run(client, candidate.info.run_id, FAILED, reason)
        runs.finish_run(client, run_id, FAILED, reason)
    except Exception:  # noqa: BLE001 - the outcome still reaches Optuna through the report
        pass


def _tracking_reason(uri: str, spec: StudySpec, exc: BaseException) -> str:
    from emtune.tracking.mlflow_runs import RETRY_ENV  # mlflow

    retries = os.environ.get(RETRY_ENV["max_retries"], spec.tracking.retries.max_retries)  # what MLflow used
    return f"MLflow tracking server {uri} unreachable after {retries} retries (tracking.retries): {failure_reason(exc)}"


def evaluation_reason(exc: BaseException, uri: str, spec: StudySpec) -> str:
    """One line: what failed after training (judge, tracking, other) and why."""
    from emtune.tracking.mlflow_runs import tracking_outage  # mlflow

    if isinstance(exc, JudgeUnavailable):
        return f"evaluation failed: judge unavailable ({exc})"
    if isinstance(exc, GenerationUnavailable):
        return f"evaluation failed: generation server unavailable ({exc})"
    if isinstance(exc, GenerationError):
        return f"evaluation failed: generation server error ({exc})"
    if tracking_outage(exc):
        return "evaluation failed: " + _tracking_reason(uri, spec, exc)
    return "evaluation failed: " + failure_report(exc)
