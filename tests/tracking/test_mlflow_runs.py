"""MLflow run helpers: the tracking retry policy and telling a server outage from a bad request."""

from __future__ import annotations

import socket

import pytest
from mlflow.tracking import MlflowClient

from emtune.tracking.settings import TrackingRetrySpec, TrackingSpec
from emtune.tracking import mlflow_runs as runs


def test_retry_policy_sets_mlflows_variables_and_an_explicit_environment_wins(monkeypatch) -> None:
    for name in runs.RETRY_ENV.values():
        monkeypatch.setenv(name, "unset")  # recorded, so teardown removes what the policy sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    runs.apply_retry_policy(TrackingRetrySpec(max_retries=3, backoff_factor=1, backoff_jitter=0.5))
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "0.5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # set by the user: kept
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3  # MLflow itself reads the value
    # a second study in the same process (tests, a notebook) gets its own values, not the first's
    runs.apply_retry_policy(TrackingRetrySpec(max_retries=5, backoff_factor=0, backoff_jitter=0.0))
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 5
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # still the user's


def test_retry_defaults_are_mlflows_and_bounds_are_checked() -> None:
    assert TrackingSpec().retries == TrackingRetrySpec(max_retries=7, backoff_factor=2, backoff_jitter=1.0, timeout_s=120)
    with pytest.raises(ValueError, match="less than or equal to 10"):
        TrackingRetrySpec(max_retries=11)  # MLflow refuses more than 10


def test_refused_connection_is_an_outage_and_a_missing_run_is_not(monkeypatch, tmp_path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as down:
        MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name("x")
    assert runs.tracking_outage(down.value)
    with pytest.raises(Exception) as missing:
        MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run("0" * 32)
    assert not runs.tracking_outage(missing.value)
    assert not runs.tracking_outage(ValueError("API request to /x failed: bad input"))
