"""Number helpers of the front tables and reports: digits that keep distinct values distinct,
formatting, and which result keys a trial reported itself."""

from __future__ import annotations

from emtune.numbers import distinct_digits, format_number, reported_metrics


def test_distinct_digits_hand_cases():
    assert distinct_digits([1.0, 2.0]) == 4  # at least 4
    assert distinct_digits([3.8967, 3.8974]) == 5  # 3.897 and 3.897 at 4 digits
    assert distinct_digits([1.0000000001, 1.0000000002]) == 11
    assert distinct_digits([1.000000000001, 1.000000000002]) == 12  # needs 13: capped at 12
    assert distinct_digits([1.0001, 1.0002], minimum=2, maximum=3) == 3
    assert distinct_digits([None, "x", 2.5, 2.5]) == 4


def test_format_number():
    assert format_number(3.14159) == "3.142"
    assert format_number(3.14159, 2) == "3.1"
    assert format_number(None) == "-"
    assert format_number(7) == "7" and format_number("COMPLETE") == "COMPLETE"


def test_reported_metrics_leave_out_ray_bookkeeping_and_config():
    result = {"ood_drift": 0.25, "pid": 1234, "time_total_s": 3.0, "config/weight": 0.5, "loss": float("nan"),
              "general_misalignment": 2}
    assert reported_metrics(result) == {"ood_drift": 0.25, "general_misalignment": 2.0}
