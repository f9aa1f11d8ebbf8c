"""Tests for emtune.tracking.pareto: fronts, ranks, hypervolume, history, reference, validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from emtune.tracking.pareto import (
    dominating_count,
    hypervolume,
    hypervolume_history,
    pareto_front,
    pareto_ranks,
    reference_from_points,
)

MIN2 = ["minimize", "minimize"]
MIN3 = ["minimize"] * 3


# ---------- brute-force oracles (independent of the module) ----------


def _dominates(a, b, directions):
    better_or_equal = all(
        (x <= y) if d == "minimize" else (x >= y) for x, y, d in zip(a, b, directions)
    )
    strictly = any((x < y) if d == "minimize" else (x > y) for x, y, d in zip(a, b, directions))
    return better_or_equal and strictly


def _brute_ranks(points, directions, feasible):
    left = [i for i in range(len(points)) if feasible[i]]
    ranks = [None] * len(points)
    rank = 0
    while left:
        front = [i for i in left if not any(_dominates(points[j], points[i], directions) for j in left)]
        for i in front:
            ranks[i] = rank
        left = [i for i in left if i not in front]
        rank += 1
    return ranks


def _inclusion_exclusion_hv(points, reference):
    """Union volume of boxes [p, reference] by inclusion-exclusion (minimization, small n)."""
    inside = [np.asarray(p, float) for p in points if np.all(np.asarray(p) < reference)]
    total = 0.0
    for size in range(1, len(inside) + 1):
        for subset in itertools.combinations(inside, size):
            corner = np.max(subset, axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.asarray(reference) - corner))
    return total


# ---------- pareto_front ----------


def test_front_2d_with_duplicates_and_dominated_points():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 5)]
    # (3,4) is dominated by (2,3); (5,5) by everything; the two (2,3) do not dominate each other.
    assert pareto_front(points, MIN2) == [0, 1, 3, 4]


def test_front_3d_hand_made():
    points = [(1, 2, 3), (2, 1, 3), (3, 3, 1), (2, 2, 3), (3, 3, 3)]
    # (2,2,3) is dominated by (1,2,3); (3,3,3) by every other point.
    assert pareto_front(points, MIN3) == [0, 1, 2]


def test_front_with_maximize_direction():
    # (accuracy up, misalignment down)
    points = [(0.9, 0.3), (0.8, 0.1), (0.7, 0.2), (0.95, 0.5), (0.9, 0.4)]
    directions = ["maximize", "minimize"]
    assert pareto_front(points, directions) == [0, 1, 3]
    # Flipping the first direction changes the answer: now low accuracy is good.
    assert pareto_front(points, ["minimize", "minimize"]) == [1, 2]


def test_front_empty_single_and_numpy_input():
    assert pareto_front([], MIN2) == []
    assert pareto_front([(3.0, 4.0)], MIN2) == [0]
    arr = np.array([[1.0, 2.0], [2.0, 1.0], [2.0, 2.0]])
    assert pareto_front(arr, MIN2) == [0, 1]


# ---------- pareto_ranks ----------


def test_ranks_2d_hand_made():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 5)]
    assert pareto_ranks(points, MIN2) == [0, 0, 1, 0, 0, 2]


def test_ranks_3d_and_maximize():
    points = [(1, 2, 3), (2, 1, 3), (3, 3, 1), (2, 2, 3), (3, 3, 3)]
    assert pareto_ranks(points, MIN3) == [0, 0, 0, 1, 2]
    points = [(0.9, 0.3), (0.8, 0.1), (0.7, 0.2), (0.95, 0.5), (0.9, 0.4)]
    assert pareto_ranks(points, ["maximize", "minimize"]) == [0, 0, 1, 0, 1]


def test_infeasible_point_never_ranked_even_if_dominating():
    points = [(0, 0), (1, 3), (2, 2), (3, 3)]
    # (0,0) dominates everything but violates a constraint: it gets None and does not push the
    # others down, so (1,3) and (2,2) are the front and (3,3) is rank 1.
    assert pareto_ranks(points, MIN2, feasible=[False, True, True, True]) == [None, 0, 0, 1]
    assert pareto_ranks(points, MIN2) == [0, 1, 1, 2]
    assert pareto_ranks(points, MIN2, feasible=[False] * 4) == [None] * 4


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_random_sets_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    m = 2 + seed % 3
    directions = [str(d) for d in rng.choice(["minimize", "maximize"], size=m)]
    # Small integer grid on odd seeds so that ties and exact duplicates occur.
    if seed % 2:
        points = rng.integers(0, 5, size=(60, m)).astype(float).tolist()
    else:
        points = rng.normal(size=(60, m)).tolist()
    feasible = (rng.random(60) > 0.2).tolist()
    expected = _brute_ranks(points, directions, [True] * 60)
    assert pareto_ranks(points, directions) == expected
    assert pareto_front(points, directions) == [i for i, r in enumerate(expected) if r == 0]
    assert pareto_ranks(points, directions, feasible) == _brute_ranks(points, directions, feasible)


# ---------- hypervolume ----------


def test_hypervolume_2d_staircase():
    # Boxes to (4,4): widths 3,2,1 stacked in strips of height 1 -> 3 + 2 + 1 = 6.
    assert hypervolume([(1, 3), (2, 2), (3, 1)], MIN2, [4, 4]) == pytest.approx(6.0)
    # Same set seen as maximization with reference (0,0): [0,3]x[0,1] + [0,2]x[1,2] + [0,1]x[2,3].
    maxi = ["maximize", "maximize"]
    assert hypervolume([(3, 1), (2, 2), (1, 3)], maxi, [0, 0]) == pytest.approx(6.0)


def test_hypervolume_ignores_points_not_strictly_better_than_reference():
    base = [(1, 3), (2, 2), (3, 1)]
    extra = [(5, 0), (0, 4), (4, 0), (2.5, 2.5)]  # outside, on the boundary, or dominated
    assert hypervolume(base + extra, MIN2, [4, 4]) == pytest.approx(6.0)
    assert hypervolume([(5, 5)], MIN2, [4, 4]) == 0.0
    assert hypervolume([], MIN2, [4, 4]) == 0.0


def test_hypervolume_3d_hand_computed():
    assert hypervolume([(1, 1, 1)], MIN3, [2, 2, 2]) == pytest.approx(1.0)
    # Boxes 2*2*1 = 4 and 1*1*2 = 2 overlap in [1,2]^3 = 1 -> 5.
    assert hypervolume([(0, 0, 1), (1, 1, 0)], MIN3, [2, 2, 2]) == pytest.approx(5.0)
    # Three boxes of 2 each; each pair overlaps in [1,2]^3 (1), so does the triple:
    # 3*2 - 3*1 + 1 = 4.
    pts = [(0, 1, 1), (1, 0, 1), (1, 1, 0)]
    assert hypervolume(pts, MIN3, [2, 2, 2]) == pytest.approx(4.0)
    # Maximizing the last objective: flip z -> -z, reference -2, same volume.
    mixed = ["minimize", "minimize", "maximize"]
    assert hypervolume([(0, 1, -1), (1, 0, -1), (1, 1, 0)], mixed, [2, 2, -2]) == pytest.approx(4.0)


def test_hypervolume_4d_hand_computed():
    # 2*2*2*1 = 8 plus 1*1*1*2 = 2 minus the overlap [1,2]^4 = 1 -> 9.
    pts = [(0, 0, 0, 1), (1, 1, 1, 0)]
    assert hypervolume(pts, ["minimize"] * 4, [2, 2, 2, 2]) == pytest.approx(9.0)


@pytest.mark.parametrize("m", [3, 4])
def test_hypervolume_integer_grid_count(m):
    # With integer points and reference, the volume is exactly the number of unit cells whose
    # lower corner is weakly dominated by some point.
    rng = np.random.default_rng(10 + m)
    side = 8
    points = rng.integers(0, side, size=(25, m))
    cells = np.array(list(itertools.product(range(side), repeat=m)))
    covered = np.zeros(len(cells), dtype=bool)
    for p in points:
        covered |= np.all(cells >= p, axis=1)
    expected = float(covered.sum())
    assert hypervolume(points.tolist(), ["minimize"] * m, [side] * m) == expected


@pytest.mark.parametrize("m", [2, 3, 4])
def test_hypervolume_random_matches_inclusion_exclusion(m):
    rng = np.random.default_rng(100 + m)
    points = rng.random((9, m))
    reference = np.full(m, 1.0)
    expected = _inclusion_exclusion_hv(points.tolist(), reference)
    assert hypervolume(points.tolist(), ["minimize"] * m, reference.tolist()) == pytest.approx(
        expected, rel=1e-9
    )
    # Same sets as maximization of (1 - x) with reference 0.
    maxi = ["maximize"] * m
    flipped = (1.0 - points).tolist()
    assert hypervolume(flipped, maxi, [0.0] * m) == pytest.approx(expected, rel=1e-9)


def test_hypervolume_3d_monte_carlo():
    rng = np.random.default_rng(7)
    points = rng.random((40, 3))
    samples = rng.random((200_000, 3))
    dominated = np.zeros(len(samples), dtype=bool)
    for p in points:
        dominated |= np.all(samples >= p, axis=1)
    estimate = dominated.mean()  # volume of the unit cube is 1
    # Standard error is below 0.0012 for 200k samples; 5 sigma.
    assert hypervolume(points.tolist(), MIN3, [1, 1, 1]) == pytest.approx(estimate, abs=0.006)


# ---------- hypervolume_history ----------


def test_history_hand_made_2d():
    points = [(3, 1), (3, 3), (1, 3), (2, 2), (5, 0), (2, 2)]
    # (3,1): 1*3 = 3; (3,3) is dominated; {(3,1),(1,3)} covers 3 + 3 - 1 (overlap [3,4]^2) = 5;
    # adding (2,2) gives the staircase 6; (5,0) lies outside the reference; the duplicate adds 0.
    assert hypervolume_history(points, MIN2, [4, 4]) == pytest.approx([3, 3, 5, 6, 6, 6])


@pytest.mark.parametrize("m", [2, 3, 4])
def test_history_equals_prefix_hypervolume_and_is_monotone(m):
    rng = np.random.default_rng(20 + m)
    directions = ["minimize"] * (m - 1) + ["maximize"]
    points = rng.integers(0, 6, size=(30, m)).astype(float).tolist()
    reference = reference_from_points(points, directions)
    feasible = (rng.random(30) > 0.25).tolist()
    history = hypervolume_history(points, directions, reference, feasible)
    assert len(history) == 30
    assert all(b >= a for a, b in zip(history, history[1:]))
    for i in range(30):
        prefix = [p for p, ok in zip(points[: i + 1], feasible[: i + 1]) if ok]
        assert history[i] == pytest.approx(hypervolume(prefix, directions, reference))
    unconstrained = hypervolume_history(points, directions, reference)
    assert unconstrained[-1] == pytest.approx(hypervolume(points, directions, reference))
    assert unconstrained[-1] >= history[-1]


def test_history_infeasible_point_is_ignored():
    points = [(2, 2), (0, 0), (1, 3)]
    history = hypervolume_history(points, MIN2, [4, 4], feasible=[True, False, True])
    # (2,2) -> 4; (0,0) ignored; (1,3) adds the strip [1,2]x[3,4] -> 5.
    assert history == pytest.approx([4, 4, 5])


# ---------- reference_from_points ----------


def test_reference_from_points():
    points = [(1, 10, 0), (3, 10, 0), (2, 10, 0)]
    directions = ["minimize", "maximize", "maximize"]
    # obj 0: worst 3, range 2 -> 3 + 0.1*2; obj 1: constant 10 -> 10 - 0.1*10;
    # obj 2: constant 0 -> 0 - 0.1*1.
    assert reference_from_points(points, directions) == pytest.approx([3.2, 9.0, -0.1])
    assert reference_from_points(points, directions, margin=0.5) == pytest.approx([4.0, 5.0, -0.5])
    # Every observed point strictly beats the reference, so each adds volume.
    ref = reference_from_points([(1, 3), (3, 1)], MIN2)
    assert ref == pytest.approx([3.2, 3.2])
    # Two 2.2 x 0.2 strips overlapping in a 0.2 x 0.2 corner.
    assert hypervolume([(1, 3), (3, 1)], MIN2, ref) == pytest.approx(0.44 + 0.44 - 0.04)


def test_reference_from_points_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one point"):
        reference_from_points([], MIN2)
    with pytest.raises(ValueError, match="margin"):
        reference_from_points([(1, 2)], MIN2, margin=-0.1)


# ---------- validation ----------


def test_validation_messages_name_the_culprit():
    with pytest.raises(ValueError, match=r"point 1 has 3 values, expected 2"):
        pareto_front([(1, 2), (1, 2, 3)], MIN2)
    with pytest.raises(ValueError, match=r"directions\[1\] is 'max'"):
        pareto_ranks([(1, 2)], ["minimize", "max"])
    with pytest.raises(ValueError, match=r"point 2, objective 1 is NaN"):
        hypervolume([(1, 2), (2, 1), (0, float("nan"))], MIN2, [3, 3])
    with pytest.raises(ValueError, match=r"point 0, objective 0 is infinite"):
        pareto_front([(float("inf"), 1)], MIN2)
    with pytest.raises(ValueError, match=r"not the string 'minimize'"):
        pareto_front([(1,)], "minimize")
    with pytest.raises(ValueError, match="empty"):
        pareto_front([], [])
    with pytest.raises(ValueError, match=r"reference has 3 values, expected 2"):
        hypervolume([(1, 2)], MIN2, [3, 3, 3])
    with pytest.raises(ValueError, match=r"reference, objective 1 is NaN"):
        hypervolume_history([(1, 2)], MIN2, [3, float("nan")])
    with pytest.raises(ValueError, match=r"feasible has 1 entries, expected 2"):
        pareto_ranks([(1, 2), (2, 1)], MIN2, feasible=[True])
    with pytest.raises(ValueError, match="not a number"):
        pareto_front([(1, "a")], MIN2)
    with pytest.raises(ValueError, match=r"point 0 is not a sequence"):
        pareto_front([1.0, 2.0], MIN2)


def test_one_objective_hypervolume_is_the_distance_from_the_best_to_the_reference():
    assert hypervolume([[3.0], [1.0], [2.0]], ["minimize"], [5.0]) == pytest.approx(4.0)  # 5 - 1
    assert hypervolume([[3.0], [1.0]], ["maximize"], [0.5]) == pytest.approx(2.5)  # 3 - 0.5
    assert hypervolume_history([[3.0], [1.0], [2.0]], ["minimize"], [5.0]) == pytest.approx([2.0, 4.0, 4.0])


def test_reference_margin_zero_and_spreads_below_one():
    # margin 0 puts the reference on the worst value itself; a negative margin is refused
    assert reference_from_points([[1.0, 4.0], [3.0, 2.0]], MIN2, margin=0.0) == [3.0, 4.0]
    with pytest.raises(ValueError, match="margin"):
        reference_from_points([[1.0, 4.0]], MIN2, margin=-0.1)
    # a spread of 0.3 scales the margin (0.5 + 0.1 * 0.3), not the worst value's size
    assert reference_from_points([[0.2], [0.5]], ["minimize"]) == [pytest.approx(0.53)]
    assert reference_from_points([[0.2], [0.5]], ["maximize"]) == [pytest.approx(0.17)]  # 0.2 - 0.1 * 0.3


def test_dominating_count_by_hand():
    others = [[1.0, 1.0], [2.0, 0.5], [0.5, 3.0], [1.0, 2.0]]
    # (1, 2) minimising both: dominated by (1, 1) only ((1, 2) itself is no worse but not better)
    assert dominating_count([1.0, 2.0], others, ["minimize", "minimize"]) == 1
    # maximising the second: (0.5, 3) is better on both; (1, 2) equals it
    assert dominating_count([1.0, 2.0], others, ["minimize", "maximize"]) == 1
    assert dominating_count([3.0, 3.0], others, ["minimize", "minimize"]) == 4
    assert dominating_count([1.0, 2.0], [], ["minimize", "minimize"]) == 0
