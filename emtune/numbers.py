"""Plain checks on metric values, shared by tracking, the searcher and the trial driver."""

from __future__ import annotations

import math
from typing import Any, Mapping


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is neither NaN nor infinite (booleans are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are finite numbers, as floats (others left out)."""
    return {key: float(value) for key, value in values.items() if is_finite_number(value)}


#: Keys Ray Tune adds to every reported result (``ray.tune.result.AUTO_RESULT_KEYS`` and its
#: other bookkeeping); a result's flattened ``config/...`` entries are Ray's too.
RAY_RESULT_KEYS = frozenset((
    "training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname", "pid",
    "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "config", "checkpoint_dir_name", "done", "trial_id", "experiment_tag",
    "should_checkpoint", "episodes_this_iter", "timesteps_this_iter",
))


def reported_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a trial's result that the trial itself reported (Ray's bookkeeping
    such as ``pid`` and the flattened ``config/...`` keys left out)."""
    return {key: value for key, value in finite_numbers(values).items()
            if key not in RAY_RESULT_KEYS and not key.startswith("config/")}


def distinct_digits(values: Any, minimum: int = 4, maximum: int = 12) -> int:
    """The fewest significant digits (at least ``minimum``) at which distinct values also print
    distinctly, so two front members never look equal (3.8967 and 3.8974 need 5)."""
    numbers = sorted({float(v) for v in values if is_finite_number(v)})
    for digits in range(minimum, maximum + 1):
        if len({f"{v:.{digits}g}" for v in numbers}) == len(numbers):
            return digits
    return maximum


def format_number(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``-`` for None, other values as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
