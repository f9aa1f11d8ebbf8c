"""The trial function's failure reasons: the root cause, with a hint for out-of-memory."""

from __future__ import annotations

from emtune.study.trial import _failure_reason


def test_failure_reason_unwraps_the_root_cause_and_hints_on_oom() -> None:
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError as inner:
            raise ValueError("Training failed on worker 0") from inner
    except ValueError as outer:
        reason = _failure_reason(outer)
    assert reason.startswith("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "lower training.per_device_batch_size" in reason
    assert _failure_reason(KeyError("x")) == "KeyError: 'x'"
