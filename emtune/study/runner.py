"""Run a study: prepare its directory and stages, then drive the trials with a Ray Tune Tuner.

With no ``RAY_ADDRESS`` a local Ray is started in-process; with one, the study joins that
cluster. The same code serves both; only addresses and sizes change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emtune.config import StudySpec, spec_to_yaml

OPTUNA_FILE = "optuna.db"


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


def model_cache_dir() -> Path:
    """Shared cache for materialised tiny models (EMTUNE_CACHE_DIR, else ~/.cache/emtune)."""
    return Path(os.environ.get("EMTUNE_CACHE_DIR", Path.home() / ".cache" / "emtune")).expanduser()


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` when set, else start a local Ray (dashboard off, loopback only)."""
    import ray

    if ray.is_initialized():
        return
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False, configure_logging=False)


def run_study(spec: StudySpec, num_cpus: int | None = None) -> Any:
    """Run every trial of ``spec``; returns the final front table."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from emtune.models import resolve_source
    from emtune.study.callbacks import StudyProgress, publish_front
    from emtune.study.searcher import EmtuneSearcher
    from emtune.study.trial import run_trial
    from emtune.tracking import mlflow_runs as runs

    paths = StudyPaths(spec.study_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    spec_yaml = spec_to_yaml(spec)
    paths.spec_file.write_text(spec_yaml)
    model_source = resolve_source(spec.model, model_cache_dir())
    uri = runs.tracking_uri(spec)
    client = MlflowClient(uri)
    parent_run_id = runs.start_parent_run(client, spec, spec_yaml)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    init_ray(num_cpus)
    searcher = EmtuneSearcher(spec, paths.optuna_url)
    progress = StudyProgress(spec, client, parent_run_id, searcher)
    res = spec.resources
    trainable = tune.with_resources(run_trial, {"cpu": 0, "memory": int(res.driver_memory_gb * 2**30)})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "spec": spec.model_dump(mode="json"),
            "model_source": model_source,
            "cache_dir": str(paths.cache),
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
        },
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=spec.search.num_trials,
            max_concurrent_trials=res.max_concurrent_trials,
            time_budget_s=spec.search.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(paths.root / "ray_results"),
            callbacks=[progress],
            verbose=0,
        ),
    )
    try:
        tuner.fit()
    finally:
        table = publish_front(client, parent_run_id, spec, searcher.study)
        failed = table.counts().get("FAIL", 0)
        client.set_terminated(parent_run_id, status="FINISHED" if not failed or table.front else "FAILED")
    return table
