"""Evaluation points: where in its training a trial is evaluated (``evaluation.at``).

Every trial is evaluated at the end of its training (the ``final`` point); ``evaluation.at`` adds
earlier points, each written as a fraction of the trial's optimizer steps (a number in (0, 1),
e.g. ``0.5``) or as a step count (a whole number, e.g. ``300``). Each evaluated point is a
candidate on the study's front in its own right: the trial stopped there. Fractions are resolved
against the trial's own step count once training knows it (a defense that adds training rows adds
steps), steps are taken as written; points that fall on or after the last step are covered by the
final one, and two points on the same step are evaluated once.

A point's ``label`` names it across trials ("25%", "step 300", "final"): pruning compares a
trial's values with other trials' values at the point with the same label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Sequence, Union

from pydantic import AfterValidator, StrictFloat, StrictInt

FINAL = "final"
#: Stop points of the ``stopped_early`` baseline when the spec names none and ``evaluation.at``
#: has no point before the final one.
DEFAULT_STOP_POINTS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class EvaluationPoint:
    """One point of a trial's training where it is evaluated: its label and optimizer step."""

    label: str
    step: int

    @property
    def final(self) -> bool:
        """True for the end of training."""
        return self.label == FINAL


def point_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid entry of ``evaluation.at`` (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is neither a fraction in (0, 1) nor a whole step count"
    if isinstance(value, int):
        return None if value >= 1 else f"step {value} must be at least 1"
    if not 0 < value < 1:
        return (f"{value!r} is not a fraction in (0, 1); write step counts as whole numbers "
                "(e.g. 300) and leave out 1.0 (the final point is always evaluated)")
    return None


def point_label(value: int | float) -> str:
    """The label of an ``evaluation.at`` entry: ``"25%"`` for 0.25, ``"step 300"`` for 300."""
    if isinstance(value, int):
        return f"step {value}"
    return f"{100 * value:g}%"


def resolve_points(at: Iterable[int | float], total_steps: int) -> list[EvaluationPoint]:
    """The points of a trial of ``total_steps`` optimizer steps, by step, ending with the final.

    A fraction f is step ``max(1, round(f * total_steps))``. Points on or after the last step are
    dropped (the final point covers them); of two points on one step the first written is kept.
    """
    seen: dict[int, EvaluationPoint] = {}
    for value in at:
        step = value if isinstance(value, int) else max(1, round(value * total_steps))
        if step < total_steps and step not in seen:
            seen[step] = EvaluationPoint(point_label(value), step)
    return [seen[s] for s in sorted(seen)] + [EvaluationPoint(FINAL, total_steps)]


def stop_points(baseline_points: Sequence[int | float], at: Sequence[int | float]) -> tuple[int | float, ...]:
    """The stop points the ``stopped_early`` baseline is evaluated at: ``baselines.stop_points``
    when given, else the study's own ``evaluation.at``, else :data:`DEFAULT_STOP_POINTS`."""
    return tuple(baseline_points) or tuple(at) or DEFAULT_STOP_POINTS


def _valid_points(value: tuple[int | float, ...]) -> tuple[int | float, ...]:
    problems = [problem for problem in map(point_problem, value) if problem]
    if problems:
        raise ValueError("; ".join(problems))
    return value


#: Evaluation points in a spec: fractions of a trial's steps (floats in (0, 1)) or step counts (ints).
Points = Annotated[tuple[Union[StrictInt, StrictFloat], ...], AfterValidator(_valid_points)]
