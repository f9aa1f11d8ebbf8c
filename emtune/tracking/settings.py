"""The ``tracking`` section of a study spec (kept apart from the MLflow code so that loading a
spec does not import MLflow)."""

from __future__ import annotations

from pydantic import Field

from emtune.spec_errors import StrictModel


class TrackingRetrySpec(StrictModel):
    """How long MLflow calls to a tracking *server* are retried (429, 5xx, refused or dropped
    connections) before the trial's tracking fails: exported as MLflow's own
    ``MLFLOW_HTTP_REQUEST_*`` settings in the study driver and every trial. Waits are
    ``backoff_factor * 2**(n-1)`` seconds (plus up to ``backoff_jitter``), capped at 120 s; the
    defaults are MLflow's (about 4 minutes in all). Unused by a SQLite store."""

    max_retries: int = Field(7, ge=0, le=10)
    backoff_factor: int = Field(2, ge=0, le=120)
    backoff_jitter: float = Field(1.0, ge=0)
    timeout_s: int = Field(120, gt=0, description="one request's timeout")


class TrackingSpec(StrictModel):
    """MLflow tracking; no URI means an SQLite store inside the study directory."""

    uri: str | None = None
    experiment: str | None = None
    retries: TrackingRetrySpec = TrackingRetrySpec()
