"""Study stages: work a defense needs once per study, before the trials, shared by all of them.

Each defense declares its stage as ``prepare(config, stage)`` (the defense seam,
:mod:`emtune.defenses.base`); :func:`prepare_stages` asks every listed defense, lending it the
study's services (:class:`~emtune.defenses.base.StageServices`), and returns the spec with the
stages' outputs filled in. Today three defenses have stages: persona steering and CAFT extract
persona vectors, and Interleaving+/++ trains its misaligned ensemble (LoRA adapters fine-tuned
undefended on EM datasets, on the same base). The EM monitor (``evaluation.monitor``) has one too:
the persona vector it projects on. All run where trials run (a Ray Train run, a Ray task with a
trial worker's resources), and all are cached in the study folder by content hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable

from emtune.config import DatasetSpec, StudySpec, TrainingSpec
from emtune.defenses.base import StageServices
from emtune.defenses.persona_filter import PairFilter
from emtune.defenses.persona_steering import PersonaExtraction, stage_vectors
from emtune.defenses.registry import DEFENSES
from emtune.study.failures import failure_report
from emtune.study.trial import fit_training
from emtune.trial_files import TrialFiles


def _stage_key(spec: StudySpec, dataset: str | DatasetSpec) -> str:
    described = dataset.model_dump(mode="json", exclude={"origin"}) if isinstance(dataset, DatasetSpec) else dataset
    payload = {"model": spec.model.model_dump(mode="json"), "lora": spec.lora.model_dump(mode="json"),
               "training": spec.training.model_dump(mode="json"), "dataset": described,
               "max_length": spec.data.max_length, "seed": spec.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def supervised_training(training: TrainingSpec) -> TrainingSpec:
    """The misaligned ensemble is fine-tuned supervised on its EM datasets, also in an RL study:
    there the SFT defaults apply, with the study's batch, step count and precision."""
    if training.method == "sft":
        return training
    keep = ("max_steps", "num_epochs", "per_device_batch_size", "gradient_accumulation_steps", "bf16", "optimizer")
    return TrainingSpec(**{name: getattr(training, name) for name in keep})


def misaligned_adapter(spec: StudySpec, dataset: str | DatasetSpec, cache_dir: Path, model_source: str,
                       log: Callable[[str], None] = print) -> Path:
    """The undefended adapter for ``dataset`` (a path, or a DatasetSpec used as the training
    data), trained now unless the cache already holds it."""
    path = dataset.path if isinstance(dataset, DatasetSpec) else dataset
    stem = Path(path.split(":")[-1]).stem
    folder = cache_dir / "misaligned" / f"{stem}-{_stage_key(spec, dataset)}"
    if (folder / "adapter_config.json").is_file():
        return folder
    if isinstance(dataset, DatasetSpec):
        train = dataset
    else:
        train = spec.data.train.model_copy(update={"path": dataset}) if spec.data.train else DatasetSpec(path=dataset)
    stage = spec.model_copy(update={"defenses": (), "training": supervised_training(spec.training),
                                    "data": spec.data.model_copy(update={"train": train, "opswap": None})})
    log(f"[emtune] stage: training the undefended adapter on {path} (cached as {folder.name})")
    args = (stage, f"stage-{folder.name}", {"model_source": model_source, "cache_dir": str(cache_dir),
                                            "evaluate": False})
    # in the trial's process (local mode) means in this one: train in a Ray task with a trial's
    # resources instead, so a GPU stage does not run on the head node
    if stage.resources.in_trial_process:
        result = run_where_trials_run(stage, fit_training, *args)
    else:
        result = fit_training(*args)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(TrialFiles(result.folder).adapter, tmp)
    tmp.rename(folder)
    return folder


def run_where_trials_run(spec: StudySpec, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` as a Ray task with one trial worker's CPUs and GPUs (inline without Ray)."""
    import ray

    if not ray.is_initialized():
        return fn(*args, **kwargs)
    res = spec.resources
    task = ray.remote(fn).options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_retries=0)
    return ray.get(task.remote(*args, **kwargs))


def stage_services(spec: StudySpec, cache_dir: Path, model_source: str,
                   log: Callable[[str], None] = print) -> StageServices:
    """The services a study lends its defenses' stages."""
    return StageServices(
        spec=spec, cache_dir=Path(cache_dir), model_source=model_source,
        train_undefended_adapter=lambda dataset: misaligned_adapter(spec, dataset, Path(cache_dir), model_source, log),
        run_task=partial(run_where_trials_run, spec),
        log=lambda line: log(f"[emtune] {line}"),
    )


def prepare_stages(spec: StudySpec, cache_dir: Path, model_source: str,
                   services: StageServices | None = None) -> StudySpec:
    """Run the stage of every listed defense; return the spec with their outputs filled in."""
    services = services or stage_services(spec, cache_dir, model_source)
    defenses = [DEFENSES[d.name].prepare(d, services) for d in spec.defenses]
    monitor = spec.evaluation.monitor
    if monitor.extract_prompts and not monitor.persona_vector:
        rule = PairFilter() if monitor.extract_filter == "judge" else None
        path = stage_vectors(services, PersonaExtraction(monitor.extract_prompts, monitor.extract_max_new_tokens, 1, rule))
        monitor = monitor.model_copy(update={"persona_vector": path})
    if defenses == list(spec.defenses) and monitor == spec.evaluation.monitor:
        return spec
    evaluation = spec.evaluation.model_copy(update={"monitor": monitor}).model_dump(mode="python")
    return StudySpec.model_validate({**spec.model_dump(mode="python"), "evaluation": evaluation,
                                     "defenses": [d.model_dump() for d in defenses]})


class StageFailed(RuntimeError):
    """A study stage raised: the message is its root cause and last frames (where it ran)."""


def run_stages(spec: StudySpec, cache_dir: Path, model_source: str) -> StudySpec:
    """:func:`prepare_stages`; a failure becomes :class:`StageFailed` naming its root cause,
    recorded first on the study's MLflow parent run (FAILED, ``fail_reason`` tag)."""
    try:
        return prepare_stages(spec, cache_dir, model_source)
    except Exception as exc:  # noqa: BLE001 - any stage error: say its cause, not Ray's wrapper
        reason = "study stage failed: " + failure_report(exc)
        _record_on_parent_run(spec, reason)
        raise StageFailed(reason) from exc


def _record_on_parent_run(spec: StudySpec, reason: str) -> None:
    from mlflow.tracking import MlflowClient  # mlflow loads when a study runs

    from emtune.config import spec_to_yaml
    from emtune.tracking import mlflow_runs as runs

    try:
        client = MlflowClient(runs.tracking_uri(spec))
        parent = runs.start_parent_run(client, spec, spec_to_yaml(spec))
        runs.finish_run(client, parent, "FAILED", reason)
    except Exception as exc:  # noqa: BLE001 - tracking down too: the reason is still printed
        if not runs.tracking_outage(exc):
            raise
