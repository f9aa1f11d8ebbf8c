"""Run, resume and extend a study: prepare its directory and stages, then drive the trials with
a Ray Tune Tuner over the study's persistent Optuna study and MLflow parent run.

With no ``RAY_ADDRESS`` a local Ray is started in-process; with one, the study joins that
cluster. The same code serves both; only addresses and sizes change.

A study survives its driver: ``resume_study`` restores the Tuner from the study folder (Tune
restarts unfinished trials under their old ids, so the trial function reuses their MLflow runs),
the searcher restores its live trials, and at the end every Optuna trial or MLflow run still
marked RUNNING with no Tune trial behind it is closed as FAIL with the reason. Resuming first
finishes evaluations a judge or tracking outage left pending (``emtune.study.reevaluate``).
``extend`` adds trials to a finished study (same Optuna study, same parent run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emtune.config import StudySpec, spec_to_yaml
from emtune.models import model_cache_dir, resolve_source
from emtune.study.internals import set_stored_user_attr, tuner_searcher
from emtune.study.local_ray import LOOPBACK, close_local_ray
from emtune.study.stages import run_stages
from emtune.study.trial import run_trial

OPTUNA_FILE = "optuna.db"
LOST = "lost: the study driver stopped while this trial ran, and it was not restarted"


@dataclass
class StudyPaths:
    """Where a study keeps its state."""

    root: Path

    @property
    def optuna_url(self) -> str:
        """SQLite storage URL of the persistent Optuna study."""
        return f"sqlite:///{self.root / OPTUNA_FILE}"

    @property
    def spec_file(self) -> Path:
        """The resolved spec (every default filled in) the study was started with."""
        return self.root / "spec.yaml"

    @property
    def cache(self) -> Path:
        """Study stages cached by content hash (tiny model, selections, vectors)."""
        return self.root / "cache"

    @property
    def tune_dir(self) -> Path:
        """Ray Tune experiment folders (``tune``, then ``tune-extend-N``)."""
        return self.root / "ray_results"


LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
}


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set, else start a local Ray closed to the network: every Ray
    server on 127.0.0.1, token authentication on, the token readable by its owner only
    (:mod:`emtune.study.local_ray`).

    The local dashboard is not optional: it serves Ray's state API, through which Ray Train's
    placement-group cleaner learns that a stopped trial's controller died and frees that trial's
    worker placement group. Without it a stopped trial's resources stay reserved.
    """
    import ray  # ray stays out of import time (CLI verbs that read studies do not need it)

    if ray.is_initialized():
        return
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=False)
        return
    # A single machine has no preemption to watch and no train-state to reconcile; a faster
    # controller poll ends each trial sooner (bench/trial_overhead.py measures the saving).
    for name, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
        env[name] = os.environ[name]
    close_local_ray()
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
             runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)


class StudySession:
    """What every way of driving a study shares: paths, stages, tracking, Ray, searcher."""

    def __init__(self, spec: StudySpec, num_cpus: int | None = None):
        from mlflow.tracking import MlflowClient  # mlflow and ray load when a study runs

        from emtune.study.searcher import EmtuneSearcher  # ray
        from emtune.tracking import mlflow_runs as runs

        self.paths = StudyPaths(spec.study_dir)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.model_source = resolve_source(spec.model, model_cache_dir())
        init_ray(num_cpus)
        spec = run_stages(spec, self.paths.cache, self.model_source)
        self.spec = spec
        spec_yaml = spec_to_yaml(spec)
        if not self.paths.spec_file.is_file():
            self.paths.spec_file.write_text(spec_yaml)
        self.tracking_uri = runs.tracking_uri(spec)
        runs.apply_retry_policy(spec.tracking.retries)
        waiting = runs.probe_server(self.tracking_uri, spec.tracking.retries)
        if waiting:
            print(f"[emtune] {waiting}", flush=True)
        self.client = MlflowClient(self.tracking_uri)
        self.parent_run_id = runs.start_parent_run(self.client, spec, spec_yaml)
        self.experiment_id = self.client.get_run(self.parent_run_id).info.experiment_id
        self.searcher = EmtuneSearcher(spec, self.paths.optuna_url)
        self.searcher.trials_root = self.paths.tune_dir

    def trainable(self) -> Any:
        """The trial function with its resources (:func:`driver_resources`)."""
        from ray import tune

        memory = int(self.spec.resources.driver_memory_gb * 2**30)
        return tune.with_resources(run_trial, driver_resources(self.spec.resources, memory))

    def param_space(self) -> dict[str, Any]:
        """Constants every trial receives next to the searcher's ``params``."""
        return {
            "spec": self.spec.model_dump(mode="json"),
            "model_source": self.model_source,
            "cache_dir": str(self.paths.cache),
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
        }

    def new_tuner(self, name: str, num_trials: int) -> Any:
        """A fresh Tuner over this study's searcher."""
        from ray import tune

        from emtune.study.callbacks import StudyProgress  # ray

        return tune.Tuner(
            self.trainable(),
            param_space=self.param_space(),
            tune_config=tune.TuneConfig(
                search_alg=self.searcher,
                num_samples=num_trials,
                max_concurrent_trials=concurrent_trials(self.spec.resources),
                time_budget_s=self.spec.search.time_budget_s,
                # a finished trial's process (torch and the model code imported) serves the next
                # trial: with training in the trial's process, that is a warm worker per slot
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(self.paths.tune_dir),
                # a trial whose process died (killed, out of host memory) starts again under its id
                # and resumes from its latest checkpoint; a failure that raises is an outcome
                failure_config=tune.FailureConfig(max_failures=self.spec.resources.max_failures),
                callbacks=[StudyProgress(self.spec, self.client, self.parent_run_id, self.searcher, num_trials)],
                verbose=0,
            ),
        )

    def fit(self, tuner: Any, searcher: Any = None, lost: frozenset[str] = frozenset()) -> Any:
        """Run the tuner, then close orphans and publish the final front. ``lost`` are the Ray
        trial ids an earlier driver left running: any the tuner did not finish are closed as lost."""
        searcher = searcher or self.searcher
        orphan_reason = LOST
        try:
            tuner.fit()
            # the Tuner returned: a trial still RUNNING in Optuna was stopped by Tune, not lost
            budget = self.spec.search.time_budget_s
            orphan_reason = (f"stopped: the study's time budget (search.time_budget_s = {budget:g} s) ran out "
                             "while this trial ran" if budget else "stopped by Ray Tune before it reported")
        finally:
            table = self.finish(searcher.study, orphan_reason, lost)
        if not os.environ.get("RAY_ADDRESS"):
            wait_for_placement_groups_released()
        return table

    def finish(self, study: Any, orphan_reason: str = LOST, lost: frozenset[str] = frozenset()) -> Any:
        """Close orphans, publish the front and close the parent run. With the tracking server
        down (past its retries) the study still ends: Optuna holds every outcome, and
        ``emtune resume`` publishes to MLflow once the server is back."""
        import sys

        from emtune.study.callbacks import publish_front, study_front  # ray, mlflow
        from emtune.tracking import mlflow_runs as runs

        try:
            close_orphans(study, self.client, self.experiment_id, self.parent_run_id, orphan_reason, lost)
            table = publish_front(self.client, self.parent_run_id, self.spec, study)
            status = "FINISHED" if table.front or not table.counts().get("FAIL") else "FAILED"
            self.client.set_terminated(self.parent_run_id, status=status)
            return table
        except Exception as exc:
            if not runs.tracking_outage(exc):
                raise
            print(f"emtune: MLflow tracking server {self.tracking_uri} is unreachable, so the front was not "
                  f"published; every trial outcome is in Optuna. Run `emtune resume {self.paths.root}` once "
                  "it is back.", file=sys.stderr, flush=True)
            return study_front(self.spec, study)

    def reevaluate_pending(self) -> tuple[int, int]:
        """Finish the evaluations that a judge or tracking outage left pending (see
        ``emtune.study.reevaluate``); returns (finished, still pending)."""
        from emtune.study.reevaluate import reevaluate_pending  # mlflow

        return reevaluate_pending(self.spec, self.searcher.study, self.client, self.experiment_id,
                                  self.parent_run_id, log=lambda line: print(f"[emtune] {line}", flush=True))


def driver_resources(resources: Any, memory: int) -> dict[str, Any]:
    """Resources of a trial's driver: its memory, any custom resources the spec names, and the one
    worker's CPUs and GPUs when it trains in its own process (Ray Train local mode), else no CPU
    (its Train workers hold those; ``{"cpu": 0}`` alone is rejected by Ray, hence the memory)."""
    out: dict[str, Any] = {"cpu": 0, "memory": memory}
    if resources.in_trial_process:
        out["cpu"] = resources.cpus_per_worker
        if resources.gpus_per_worker:
            out["gpu"] = resources.gpus_per_worker
    if resources.driver_resources:
        out["resources"] = dict(resources.driver_resources)
    return out


def concurrent_trials(resources: Any, cluster: dict[str, float] | None = None) -> int:
    """``max_concurrent_trials`` capped by what the cluster can run at once, so no trial driver
    holds a slot while waiting for GPUs (or CPUs) that another trial has."""
    import ray

    cluster = cluster if cluster is not None else ray.cluster_resources()
    if resources.gpus_per_worker > 0:
        fit = int(cluster.get("GPU", 0) // (resources.num_workers * resources.gpus_per_worker))
    else:
        fit = int(cluster.get("CPU", 0) // (resources.num_workers * resources.cpus_per_worker))
    if fit < 1:
        # an autoscaling cluster may add nodes: keep one trial going instead of none
        return 1
    return max(1, min(resources.max_concurrent_trials, fit))


def wait_for_placement_groups_released(timeout_s: float = 20.0) -> bool:
    """Local Ray: wait until Ray Train's cleaner has freed the placement groups of trials Tune
    stopped (it notices a dead controller within seconds) and exited; False, with a warning, if
    some remain."""
    import sys
    import time

    import ray
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    # This study's own Ray: without an address the state API looks for "the" local Ray and fails
    # when another study (or user) runs one on the same machine.
    address = ray.get_runtime_context().gcs_address
    while True:
        held = [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]
        cleaners = list_actors(address=address,
                               filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")])
        if not held and not cleaners:
            return True
        if time.monotonic() > deadline:
            print(f"emtune: warning: {len(held)} placement group(s) of stopped trials still held after "
                  f"{timeout_s:g} s: {', '.join(held)}", file=sys.stderr, flush=True)
            return False
        time.sleep(0.25)


def running_trial_ids(study: Any) -> frozenset[str]:
    """Ray trial ids of the Optuna trials still RUNNING (before a resume: what the stopped driver ran)."""
    import optuna

    return frozenset(t.user_attrs["ray_trial_id"] for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if "ray_trial_id" in t.user_attrs)


def close_orphans(study: Any, client: Any, experiment_id: str, parent_run_id: str, reason: str = LOST,
                  lost: frozenset[str] = frozenset()) -> int:
    """Mark Optuna trials and MLflow child runs still RUNNING (no trial behind them) as failed:
    with ``reason``, or as lost for the Ray trial ids in ``lost`` (a stopped driver's, not restarted)."""
    import optuna

    from emtune.tracking.mlflow_runs import PARENT_TAG, finish_run  # mlflow

    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        why = LOST if trial.user_attrs.get("ray_trial_id") in lost else reason
        set_stored_user_attr(study, trial, "fail_reason", why)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        closed += 1
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    for run in runs:
        finish_run(client, run.info.run_id, "FAILED", LOST if run.data.tags.get("ray_trial_id") in lost else reason)
        closed += 1
    return closed


def run_study(spec: StudySpec, num_cpus: int | None = None, extend: int | None = None) -> Any:
    """Run ``spec`` until its study holds ``search.num_trials`` finished trials (a second ``run``
    of a finished study runs nothing), or ``extend`` more trials of an existing study."""
    import optuna

    from emtune.study.candidates import is_candidate

    session = StudySession(spec, num_cpus)
    previous = sorted(p.name for p in session.paths.tune_dir.glob("tune*") if p.is_dir())
    name = f"tune-extend-{len(previous)}" if previous else "tune"
    if extend is not None:
        count = extend
    else:
        finished = [t for t in session.searcher.study.get_trials(deepcopy=False, states=(
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED))
            if not is_candidate(t)]  # a trial's checkpoints are no trials of their own
        count = max(0, spec.search.num_trials - len(finished))
        if len(finished):
            print(f"[emtune] study {spec.name!r} already has {len(finished)} of {spec.search.num_trials} trials: "
                  f"running {count} more (`--extend N` adds trials beyond that)", flush=True)
    count += len(session.searcher.pending_baselines())
    if count == 0:
        return session.finish(session.searcher.study)
    return session.fit(session.new_tuner(name, count))


def resume_study(spec: StudySpec, num_cpus: int | None = None) -> Any:
    """Continue a study whose driver stopped: restore its latest Tuner and finish its trials."""
    from ray import tune

    session = StudySession(spec, num_cpus)
    session.reevaluate_pending()
    lost = running_trial_ids(session.searcher.study)
    candidates = sorted((p for p in session.paths.tune_dir.glob("tune*") if p.is_dir()),
                        key=lambda p: p.stat().st_mtime)
    if not candidates or not tune.Tuner.can_restore(str(candidates[-1])):
        count = spec.search.num_trials + len(session.searcher.pending_baselines())
        return session.fit(session.new_tuner("tune", count), lost=lost)
    tuner = tune.Tuner.restore(str(candidates[-1]), trainable=session.trainable(),
                               resume_unfinished=True, param_space=session.param_space())
    searcher = tuner_searcher(tuner) or session.searcher
    searcher.trials_root = session.paths.tune_dir
    return session.fit(tuner, searcher, lost)
