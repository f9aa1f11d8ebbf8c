"""MLflow runs of a study: one parent run, one nested child run per trial.

Everything goes through an explicit ``MlflowClient(tracking_uri)``: no fluent global state, no
``MLFLOW_RUN_ID`` in any environment, so Ray workers and Tune drivers never attach to the wrong
run. The default store is SQLite inside the study directory, and the experiment is created up
front with an explicit artifact location (otherwise MLflow puts artifacts under whichever
process's working folder created it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from emtune.numbers import finite_numbers, is_finite_number

STUDY_TAG = "emtune.study"
ROLE_TAG = "emtune.role"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(spec: Any) -> str:
    """The spec's tracking URI, else ``MLFLOW_TRACKING_URI``, else SQLite in the study folder."""
    import os

    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{spec.study_dir / 'mlflow.db'}"


def experiment_name(spec: Any) -> str:
    """The MLflow experiment of a study (defaults to ``emtune/<study name>``)."""
    return spec.tracking.experiment or f"emtune/{spec.name}"


def ensure_experiment(client: MlflowClient, spec: Any) -> str:
    """Experiment id, creating it with an explicit artifact location when it is new."""
    name = experiment_name(spec)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(spec).startswith(("sqlite:", "file:")):
        location = (spec.study_dir / "mlartifacts").as_uri()
    # MLflow 3 opens untagged experiments in its GenAI view; studies are classic training runs.
    return client.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def find_parent_run(client: MlflowClient, experiment_id: str, study: str) -> str | None:
    """The study's parent run id if one exists (a resumed study reuses it)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`{ROLE_TAG}` = 'study'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_parent_run(client: MlflowClient, spec: Any, spec_yaml: str) -> str:
    """Create (or reuse) the study's parent run and log the resolved spec on it."""
    experiment_id = ensure_experiment(client, spec)
    run_id = find_parent_run(client, experiment_id, spec.name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        experiment_id, run_name=spec.name, tags={STUDY_TAG: spec.name, ROLE_TAG: "study"}
    )
    run_id = run.info.run_id
    params = {
        "model.source": spec.model.source,
        "data.train": spec.data.train.path if spec.data.train else f"opswap:{spec.data.opswap_role}",
        "defenses": ",".join(d.name for d in spec.defenses) or "none",
        "training.method": spec.training.method,
        "objectives": ",".join(f"{o.name}:{o.direction}" for o in spec.objectives),
        "search.sampler": spec.search.sampler.name,
        "search.num_trials": spec.search.num_trials,
        "seed": spec.seed,
    }
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run_id, spec_yaml, "spec.yaml")
    return run_id


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> Any:
    """The child run of a Ray trial id under this parent, if one was started before."""
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.ray_trial_id = '{trial_id}'"), max_results=1)
    return found[0] if found else None


def start_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, study: str,
                    trial_id: str, params: dict[str, Any], trial_spec: Any, baseline: str | None = None) -> str:
    """Nested child run of one trial, tagged with its parent, study and Ray trial id.

    A trial restarted under the same Ray trial id (worker or driver failure) gets its earlier
    run back, so a resumed study never shows the same trial twice.
    """
    earlier = find_trial_run(client, experiment_id, parent_run_id, trial_id)
    if earlier is not None:
        client.update_run(earlier.info.run_id, status="RUNNING")
        client.set_tag(earlier.info.run_id, "restarts", str(int(earlier.data.tags.get("restarts", "0")) + 1))
        return earlier.info.run_id
    tags = {PARENT_TAG: parent_run_id, STUDY_TAG: study, ROLE_TAG: "trial", "ray_trial_id": trial_id}
    if baseline:
        tags.update({ROLE_TAG: "baseline", "baseline": baseline})
    run = client.create_run(experiment_id, run_name=f"baseline-{baseline}" if baseline else trial_id, tags=tags)
    flat = {f"search.{k}": v for k, v in params.items()}
    for defense in trial_spec.defenses:
        for key, value in defense.model_dump(mode="json").items():
            if key != "name":
                flat[f"defense.{defense.name}.{key}"] = value
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    return run.info.run_id


def start_candidate_run(client: MlflowClient, trial_run_id: str, trial_id: str, step: int, point: str,
                        params: dict[str, Any]) -> str:
    """Nested run of one evaluated checkpoint of a trial (a front candidate), under the trial's run:
    the trial's search params, tagged with the checkpoint's step and point. Reused when it exists."""
    trial = client.get_run(trial_run_id)
    experiment_id = trial.info.experiment_id
    found = [r for r in candidate_runs(client, trial_run_id) if r.data.tags.get("eval_step") == str(step)]
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {PARENT_TAG: trial_run_id, STUDY_TAG: trial.data.tags.get(STUDY_TAG, ""), ROLE_TAG: "candidate",
            "ray_trial_id": trial_id, "eval_step": str(step), "eval_point": point}
    run = client.create_run(experiment_id, run_name=f"{trial_id}@step-{step}", tags=tags)
    flat = {f"search.{k}": v for k, v in params.items()} | {"eval_step": step, "eval_point": point}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    return run.info.run_id


def candidate_runs(client: MlflowClient, trial_run_id: str) -> list[Any]:
    """The checkpoint-candidate runs nested under a trial's run."""
    experiment_id = client.get_run(trial_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{trial_run_id}' and tags.`{ROLE_TAG}` = 'candidate'"), max_results=10000)


def delete_artifacts(client: MlflowClient, tracking_uri: str, run_id: str, path: str) -> None:
    """Remove a run's artifacts under ``path`` (e.g. a dominated candidate's adapter), through the
    run's artifact repository (local folders, ``mlflow-artifacts`` servers, object stores)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=tracking_uri).delete_artifacts(path)


def log_history(client: MlflowClient, run_id: str, rows: list[dict[str, float]], prefix: str = "train/") -> None:
    """Per-step training losses (task loss and every defense term) as stepped metrics (``prefix``
    ``monitor/`` for the monitor's rows)."""
    metrics = [
        Metric(f"{prefix}{key}", float(value), 0, int(row["step"]))
        for row in rows
        for key, value in row.items()
        if key != "step" and is_finite_number(value)
    ]
    for start in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[start : start + 900])


def log_final_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    """Every finite numeric result as a metric at ``step`` (a trial's final metrics at its last
    training step, so the run's latest values are the final ones); everything else is ignored."""
    batch = [Metric(k, v, 0, int(step)) for k, v in finite_numbers(metrics).items()]
    if batch:
        client.log_batch(run_id, metrics=batch)


def log_samples_table(client: MlflowClient, run_id: str, samples_file: Path, name: str) -> None:
    """Generated answers as an MLflow table artifact (browsable in the run's Evaluation tab)."""
    log_jsonl_table(client, run_id, samples_file, f"samples/{name}.json")


def log_jsonl_table(client: MlflowClient, run_id: str, path: Path, artifact_file: str) -> None:
    """A JSONL file as an MLflow table artifact (columns: every key any row has)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if rows:
        keys = list(dict.fromkeys(key for row in rows for key in row))
        client.log_table(run_id, data={key: [row.get(key) for row in rows] for key in keys},
                         artifact_file=artifact_file)


def finish_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """Close a run as FINISHED or FAILED, with the failure reason as a tag."""
    if reason:
        client.set_tag(run_id, "fail_reason", reason[:5000])
    client.set_terminated(run_id, status=status)


def log_json(client: MlflowClient, run_id: str, payload: Any, artifact_file: str) -> None:
    """A JSON artifact (used for fronts and metadata)."""
    client.log_dict(run_id, payload, artifact_file)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Several tags in one call."""
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_dir(client: MlflowClient, run_id: str, folder: Path, artifact_path: str) -> None:
    """Upload a folder (e.g. the adapter) as artifacts."""
    client.log_artifacts(run_id, str(folder), artifact_path)


RETRY_ENV = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


_APPLIED: dict[str, str] = {}  # what apply_retry_policy set in this process


def apply_retry_policy(retries: Any) -> None:
    """Make this process's MLflow client retry a tracking server as the spec says.

    MLflow reads these variables on every request, so setting them in the study driver and at
    the start of each trial (a Ray worker process) is enough. A value the user exported wins;
    one this function set for an earlier study in the same process is replaced.
    """
    import os

    for field, name in RETRY_ENV.items():
        current = os.environ.get(name)
        if current is None or current == _APPLIED.get(name):
            os.environ[name] = _APPLIED[name] = str(getattr(retries, field))


def tracking_outage(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) says the tracking server could not be reached or kept
    failing after MLflow's retries, as opposed to a bad request or a bug."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                             requests.exceptions.RetryError)):
            return True
        text = str(seen)
        if "API request to" in text and ("Max retries exceeded" in text or "ConnectionError" in text
                                         or "Connection refused" in text or "timed out" in text.lower()):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def probe_server(uri: str, retries: Any) -> str | None:
    """For an ``http(s)://`` tracking URI, one quick look at the server's ``/health``: None when it
    answers (or the store is local), else a line saying it is not answering and how long MLflow's
    retries will wait for it, so a study does not sit silent through a mistyped URI."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not answering now"
        waits = sum(min(120, retries.backoff_factor * 2 ** (n - 1)) for n in range(2, retries.max_retries + 1))
        return (f"MLflow tracking server {uri} is not answering ({type(exc).__name__}); "
                f"retrying for up to ~{waits // 60} min {waits % 60} s (tracking.retries)")
