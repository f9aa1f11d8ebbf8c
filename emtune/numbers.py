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
