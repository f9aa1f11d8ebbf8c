"""The trial function's failure reasons (root cause, OOM hint; what failed after training) and
the cluster-derived trial concurrency."""

from __future__ import annotations

import pytest

from emtune.study.failures import failure_reason
from emtune.study.trial import evaluation_reason


def test_failure_reason_unwraps_the_root_cause_and_hints_on_oom() -> None:
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError as inner:
            raise ValueError("Training failed on worker 0") from inner
    except ValueError as outer:
        reason = failure_reason(outer)
    assert reason.startswith("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "lower training.per_device_batch_size" in reason
    assert failure_reason(KeyError("x")) == "KeyError: 'x'"


def test_concurrent_trials_fit_the_cluster() -> None:
    from emtune.config import ResourcesSpec
    from emtune.study.runner import concurrent_trials

    gpu = ResourcesSpec(num_workers=2, gpus_per_worker=1, max_concurrent_trials=8)
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 4  # 8 GPUs / (2 workers x 1 GPU)
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 1}) == 1  # autoscaler may add more: keep one
    half = ResourcesSpec(gpus_per_worker=0.5, max_concurrent_trials=3)
    assert concurrent_trials(half, {"GPU": 4}) == 3  # fractional GPUs: 8 fit, the spec caps at 3
    cpu = ResourcesSpec(cpus_per_worker=1, max_concurrent_trials=4)
    assert concurrent_trials(cpu, {"CPU": 2}) == 2


def test_driver_resources_and_fsdp_arguments(write_spec) -> None:
    from emtune.config import ResourcesSpec, load_spec
    from emtune.study.runner import driver_resources
    from emtune.train.sft import _parallelism

    pinned = ResourcesSpec(driver_resources={"on_demand": 0.001}, train_process="workers")
    assert driver_resources(pinned, 2**30) == {"cpu": 0, "memory": 2**30, "resources": {"on_demand": 0.001}}
    assert driver_resources(ResourcesSpec(num_workers=2), 5) == {"cpu": 0, "memory": 5}
    # one worker trains in the trial's own process, which then holds that worker's CPUs and GPUs
    assert driver_resources(ResourcesSpec(), 5) == {"cpu": 1.0, "memory": 5}
    assert driver_resources(ResourcesSpec(cpus_per_worker=4, gpus_per_worker=1), 5) == {"cpu": 4, "gpu": 1, "memory": 5}
    spec = load_spec(write_spec())
    assert _parallelism(spec) == {}
    sharded = spec.model_copy(update={"resources": ResourcesSpec(num_workers=4, gpus_per_worker=1, strategy="fsdp")})
    assert _parallelism(sharded)["fsdp"] == "full_shard auto_wrap"


def testevaluation_reason_names_the_judge_or_the_tracking_server(write_spec, monkeypatch) -> None:
    import socket

    from mlflow.tracking import MlflowClient

    from emtune.config import load_spec
    from emtune.evaluation.judges import JudgeUnavailable

    spec = load_spec(write_spec())
    judge = JudgeUnavailable("3 of 8 items got no score after 6 retries (last error: 503)", 3, 8)
    assert evaluation_reason(judge, "sqlite:///x", spec) == (
        "evaluation failed: judge unavailable (3 of 8 items got no score after 6 retries (last error: 503))")
    with socket.socket() as sock:  # a port nobody listens on: the server is down
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as down:
        MlflowClient(uri).set_tag("0" * 32, "k", "v")
    reason = evaluation_reason(down.value, uri, spec)
    assert reason.startswith(f"evaluation failed: MLflow tracking server {uri} unreachable after 0 retries (tracking.retries): ")
    assert evaluation_reason(ValueError("bad"), uri, spec) == "evaluation failed: ValueError: bad"
