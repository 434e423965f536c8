"""Tests of msdda.evaluation.metrics against hand computations and independent methods."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msdda.errors import MSDDAError
from msdda.evaluation import (
    MetricsError,
    default_reference_point,
    hypervolume,
    mean_ci,
    pareto_front,
    summarise,
    win_rate,
)

# Property tests draw reference points that no point dominates; the warning for that case is tested on its own.
pytestmark = pytest.mark.filterwarnings("ignore::msdda.evaluation.metrics.MetricsWarning")

FAST = settings(max_examples=150, deadline=None)


# ------------------------------------------------------------------------- independent references
def brute_pareto(points: np.ndarray) -> set[int]:
    """O(N^2) definition: not dominated by any row, and no equal row with a lower index."""
    keep = set()
    for i, p in enumerate(points):
        dominated = any(np.all(q >= p) and np.any(q > p) for q in points)
        dup_before = any(np.array_equal(points[j], p) for j in range(i))
        if not dominated and not dup_before:
            keep.add(i)
    return keep


def grid_count_hv(points: np.ndarray, ref: np.ndarray) -> int:
    """Exact hypervolume of integer points by counting covered unit cells of the integer grid."""
    pts = np.asarray(points, dtype=np.int64)
    ref = np.asarray(ref, dtype=np.int64)
    hi = pts.max(axis=0)
    if np.any(hi <= ref):
        hi = np.maximum(hi, ref)
    axes = [np.arange(r, h) for r, h in zip(ref, hi, strict=True)]
    cells = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(ref))
    if cells.size == 0:
        return 0
    # Cell [c, c+1]^M is covered by the box [ref, p] iff p >= c + 1 in every objective.
    covered = np.any(np.all(pts[None, :, :] >= cells[:, None, :] + 1, axis=2), axis=1)
    return int(covered.sum())


def inclusion_exclusion_hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact union volume of boxes [ref, p] by inclusion-exclusion over all subsets (small N only)."""
    d = np.asarray(points, dtype=np.float64) - ref
    d = d[np.all(d > 0, axis=1)]
    total = 0.0
    for r in range(1, len(d) + 1):
        for subset in itertools.combinations(range(len(d)), r):
            total += (-1) ** (r + 1) * float(np.prod(d[list(subset)].min(axis=0)))
    return total


def int_points(m_min: int = 2, m_max: int = 4, n_max: int = 8, hi: int = 6):
    """Small integer point sets (duplicates and boundary values likely), as (points, M)."""
    return st.integers(m_min, m_max).flatmap(
        lambda m: st.lists(
            st.lists(st.integers(0, hi), min_size=m, max_size=m), min_size=1, max_size=n_max
        ).map(lambda rows: np.array(rows, dtype=np.float64))
    )


# ------------------------------------------------------------------------------- hypervolume: 2D
def test_hv_2d_staircase() -> None:
    pts = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    assert hypervolume(pts, [0, 0]) == 6.0  # 3*1 + 2*1 + 1*1
    # Reference (0.5, 0.5), strips of y: (0.5, 1] width 2.5; (1, 2] width 1.5; (2, 3] width 0.5.
    assert hypervolume(pts, [0.5, 0.5]) == pytest.approx(3.25)


def test_hv_2d_dominated_and_duplicate_points_add_nothing() -> None:
    pts = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0.5, 2.9]])
    assert hypervolume(pts, [0, 0]) == 6.0


def test_hv_points_not_strictly_dominating_reference_contribute_nothing() -> None:
    # (5, 0) touches the reference in objective 2; (-1, 9) is below it in objective 1.
    assert hypervolume([[5.0, 0.0], [-1.0, 9.0]], [0.0, 0.0]) == 0.0
    assert hypervolume([[5.0, 0.0], [1.0, 1.0]], [0.0, 0.0]) == 1.0


def test_hv_1d_is_max_distance() -> None:
    assert hypervolume([[0.5], [2.0], [-3.0]], [-1.0]) == 3.0
    assert hypervolume([[-2.0]], [-1.0]) == 0.0


def test_hv_empty_is_zero() -> None:
    assert hypervolume(np.empty((0, 3)), [0, 0, 0]) == 0.0
    assert hypervolume([], [0, 0]) == 0.0


# ------------------------------------------------------------------------------- hypervolume: 3D
def test_hv_3d_single_box() -> None:
    assert hypervolume([[1, 2, 3]], [0, 0, 0]) == 6.0
    assert hypervolume([[1, 2, 3]], [-1, 0, 1]) == 2 * 2 * 2


def test_hv_3d_two_overlapping_boxes_inclusion_exclusion() -> None:
    # |A| + |B| - |A n B| with A n B = [0, min(a, b)].
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == 2 + 2 - 1
    assert hypervolume([[3, 1, 2], [1, 3, 1]], [0, 0, 0]) == 6 + 3 - 1 * 1 * 1
    assert hypervolume([[2, 2, 1], [1, 1, 3]], [0, 0, 0]) == 4 + 3 - 1


def test_hv_3d_three_boxes_hand() -> None:
    # Unit-ish boxes on the axes of a cube corner: 3 boxes of volume 2*1*1 pairwise meeting in the unit cube.
    pts = [[2, 1, 1], [1, 2, 1], [1, 1, 2]]
    assert hypervolume(pts, [0, 0, 0]) == 3 * 2 - 3 * 1 + 1


def test_hv_3d_monte_carlo() -> None:
    rng = np.random.default_rng(1234)
    pts = rng.uniform(0.1, 1.0, size=(25, 3))
    exact = hypervolume(pts, [0, 0, 0])
    samples = rng.uniform(0.0, 1.0, size=(200_000, 3))
    inside = np.zeros(len(samples), dtype=bool)
    for p in pts:
        inside |= np.all(samples <= p, axis=1)
    estimate = inside.mean()
    sigma = np.sqrt(estimate * (1 - estimate) / len(samples))
    assert abs(exact - estimate) < 5 * sigma


def test_hv_3d_grid_count_random_integers() -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(1, 12))
        pts = rng.integers(0, 7, size=(n, 3)).astype(float)
        ref = rng.integers(-1, 2, size=3).astype(float)
        assert hypervolume(pts, ref) == grid_count_hv(pts, ref)


@FAST
@given(int_points(3, 3, n_max=10))
def test_hv_3d_grid_count_property(pts: np.ndarray) -> None:
    assert hypervolume(pts, [0, 0, 0]) == grid_count_hv(pts, np.zeros(3))


# ----------------------------------------------------------------------- hypervolume: M >= 2 exact
@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_hv_matches_inclusion_exclusion_floats(m: int) -> None:
    rng = np.random.default_rng(m)
    for _ in range(10):
        pts = rng.normal(size=(7, m))
        ref = rng.normal(size=m) - 1.0
        assert hypervolume(pts, ref) == pytest.approx(inclusion_exclusion_hv(pts, ref), rel=1e-12, abs=1e-12)


@FAST
@given(int_points(4, 4, n_max=7, hi=4))
def test_hv_4d_grid_count_property(pts: np.ndarray) -> None:
    assert hypervolume(pts, np.zeros(4)) == grid_count_hv(pts, np.zeros(4))


# ------------------------------------------------------------------ hypervolume: property tests
@FAST
@given(int_points(), st.data())
def test_hv_monotone_when_adding_a_point(pts: np.ndarray, data: st.DataObject) -> None:
    m = pts.shape[1]
    extra = np.array(data.draw(st.lists(st.integers(0, 6), min_size=m, max_size=m)), dtype=float)
    ref = np.zeros(m)
    # Integer coordinates: every volume and partial sum is exact in float64, so compare exactly.
    assert hypervolume(np.vstack([pts, extra]), ref) >= hypervolume(pts, ref)


@FAST
@given(int_points(), st.randoms(use_true_random=False))
def test_hv_permutation_invariant(pts: np.ndarray, rnd: random.Random) -> None:
    perm = list(range(len(pts)))
    rnd.shuffle(perm)
    ref = np.zeros(pts.shape[1])
    assert hypervolume(pts[perm], ref) == hypervolume(pts, ref)


@FAST
@given(int_points(), st.data())
def test_hv_invariant_to_adding_dominated_points(pts: np.ndarray, data: st.DataObject) -> None:
    # A point below an existing one (component-wise) lies inside its box.
    i = data.draw(st.integers(0, len(pts) - 1))
    shrink = np.array(data.draw(st.lists(st.integers(0, 3), min_size=pts.shape[1], max_size=pts.shape[1])))
    dominated = pts[i] - shrink
    ref = np.zeros(pts.shape[1])
    assert hypervolume(np.vstack([pts, dominated]), ref) == hypervolume(pts, ref)


@FAST
@given(int_points())
def test_hv_equals_hv_of_pareto_front(pts: np.ndarray) -> None:
    ref = np.zeros(pts.shape[1])
    assert hypervolume(pts[pareto_front(pts)], ref) == hypervolume(pts, ref)


@FAST
@given(
    st.integers(2, 3).flatmap(
        lambda m: st.lists(
            st.lists(st.floats(-10, 10, allow_nan=False), min_size=m, max_size=m), min_size=1, max_size=7
        )
    )
)
def test_hv_floats_match_inclusion_exclusion(rows: list[list[float]]) -> None:
    pts = np.array(rows)
    ref = np.full(pts.shape[1], -10.5)
    assert hypervolume(pts, ref) == pytest.approx(inclusion_exclusion_hv(pts, ref), rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------------------------- Pareto
@FAST
@given(int_points(1, 4, n_max=20, hi=4))
def test_pareto_front_matches_brute_force(pts: np.ndarray) -> None:
    idx = pareto_front(pts)
    assert set(idx.tolist()) == brute_pareto(pts)
    assert len(set(idx.tolist())) == len(idx)
    # Sorted by the first objective, ascending.
    assert np.all(np.diff(pts[idx, 0]) >= 0)


def test_pareto_front_hand() -> None:
    pts = np.array([[3, 1], [1, 3], [2, 2], [1, 1], [2, 2], [0, 3]])
    idx = pareto_front(pts)
    assert idx.tolist() == [1, 2, 0]  # (1,3), (2,2) first copy, (3,1); sorted by objective 1
    assert idx.dtype == np.int64


def test_pareto_front_empty_and_single() -> None:
    assert pareto_front(np.empty((0, 2))).tolist() == []
    assert pareto_front([[1.0, 2.0]]).tolist() == [0]


# -------------------------------------------------------------------------- reference point
def test_default_reference_point_hand() -> None:
    ref = default_reference_point({"a": [[0, 1], [2, 3]], "b": [[4, 2]]}, margin=0.1)
    # min (0, 1), range (4, 2) -> (0 - 0.4, 1 - 0.2)
    np.testing.assert_allclose(ref, [-0.4, 0.8])


def test_default_reference_point_zero_range_stays_below() -> None:
    ref = default_reference_point({"a": [[1, 5], [2, 5]]}, margin=0.1)
    np.testing.assert_allclose(ref, [0.9, 4.5])  # objective 2 constant: margin * |5|
    assert hypervolume([[1, 5], [2, 5]], ref) > 0


def test_default_reference_point_shared_and_dominated_by_all() -> None:
    rng = np.random.default_rng(0)
    by_method = {"msdda": rng.normal(size=(5, 3)), "rs": rng.normal(size=(4, 3)) + 1}
    ref = default_reference_point(by_method)
    for pts in by_method.values():
        assert np.all(pts > ref)


# ---------------------------------------------------------------------------------- mean_ci
def test_mean_ci_single_value() -> None:
    assert mean_ci([2.5]) == (2.5, 2.5, 2.5)


def test_mean_ci_two_values_exact_bootstrap_distribution() -> None:
    # Resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    m, lo, hi = mean_ci([0.0, 1.0], confidence=0.95, n_boot=4000)
    assert (m, lo, hi) == (0.5, 0.0, 1.0)
    m, lo, hi = mean_ci([0.0, 1.0], confidence=0.4, n_boot=4000)
    assert (lo, hi) == (0.5, 0.5)


def test_mean_ci_deterministic_for_seed() -> None:
    x = np.random.default_rng(0).normal(size=50)
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)
    assert mean_ci(x, seed=3) != mean_ci(x, seed=4)


def test_mean_ci_narrows_with_n_and_matches_normal_theory() -> None:
    rng = np.random.default_rng(0)
    widths = {}
    for n in (20, 2000):
        x = rng.normal(loc=1.0, scale=2.0, size=n)
        m, lo, hi = mean_ci(x, n_boot=4000)
        assert lo <= m <= hi
        widths[n] = hi - lo
        normal = 2 * 1.959964 * x.std(ddof=1) / np.sqrt(n)
        assert widths[n] == pytest.approx(normal, rel=0.2)
    assert widths[2000] < widths[20] / 5  # ~ sqrt(100) = 10 times narrower


def test_mean_ci_constant_values() -> None:
    m, lo, hi = mean_ci([0.1] * 37)
    assert lo <= m <= hi
    assert hi - lo < 1e-15


@FAST
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40), st.integers(0, 2**32))
def test_mean_ci_contains_mean(xs: list[float], seed: int) -> None:
    m, lo, hi = mean_ci(xs, n_boot=200, seed=seed)
    assert lo <= m <= hi
    tol = 1e-12 * max(abs(x) for x in xs)  # resample means may round past the data range by an ulp
    assert min(xs) - tol <= lo and hi <= max(xs) + tol


# ---------------------------------------------------------------------------------- win rate
def test_win_rate_hand() -> None:
    # 1>0 win, 2==2 tie, 3<5 loss, 4>1 win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == 0.625
    assert win_rate([1, 1], [1, 1]) == 0.5


def test_win_rate_antisymmetric() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)


# --------------------------------------------------------------------------------- summarise
def _rows() -> list[dict]:
    return [
        {"method": "msdda", "weights": {"aes": 0.5, "align": 0.5}, "aes": 1.0, "align": 2.0},
        {"method": "msdda", "weights": {"align": 0.5, "aes": 0.5}, "aes": 3.0, "align": 4.0},
        {"method": "codE", "weights": {"aes": 0.5, "align": 0.5}, "aes": 0.0, "align": 1.0},
        {"method": "msdda", "weights": {"aes": 0.2, "align": 0.8}, "aes": 5.0, "align": 6.0},
    ]


def test_summarise_groups_means_and_order() -> None:
    out = summarise(_rows(), ["aes", "align"])
    keys = [(g["method"], tuple(g["weights"].values())) for g in out]
    assert keys == [("codE", (0.5, 0.5)), ("msdda", (0.2, 0.8)), ("msdda", (0.5, 0.5))]
    assert [g["n"] for g in out] == [1, 1, 2]
    last = out[2]
    assert last["mean"] == {"aes": 2.0, "align": 3.0}  # dict weights in either key order grouped together
    lo, hi = last["ci95"]["aes"]
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert out[0]["ci95"]["align"] == [1.0, 1.0]


def test_summarise_deterministic_under_row_order() -> None:
    rows = _rows() * 5
    a = summarise(rows, ["aes"])
    b = summarise(list(reversed(rows)), ["aes"])
    assert a == b


def test_summarise_tuple_weights_and_custom_keys() -> None:
    rows = [{"m": "x", "w": (0.3, 0.7), "r": v} for v in (1.0, 2.0, 3.0)]
    out = summarise(rows, ["r"], group_keys=("m", "w"))
    assert out == [
        {"m": "x", "w": (0.3, 0.7), "n": 3, "mean": {"r": 2.0}, "ci95": {"r": out[0]["ci95"]["r"]}}
    ]


# ------------------------------------------------------------------------------------- errors
def test_errors_derive_from_package_base() -> None:
    assert issubclass(MetricsError, MSDDAError)
    assert issubclass(MetricsError, ValueError)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: mean_ci([]), "empty"),
        (lambda: mean_ci([1.0, float("nan"), 2.0]), "nan at index 1"),
        (lambda: mean_ci([1.0, float("inf")]), "inf at index 1"),
        (lambda: mean_ci([[1.0, 2.0]]), "(1, 2)"),
        (lambda: mean_ci([1.0, 2.0], confidence=1.5), "1.5"),
        (lambda: mean_ci([1.0, 2.0], n_boot=0), "0"),
        (lambda: hypervolume([[1.0, 2.0]], [0.0, 0.0, 0.0]), "[0.0, 0.0, 0.0]"),
        (lambda: hypervolume([[1.0, float("nan")]], [0.0, 0.0]), "nan at index (0, 1)"),
        (lambda: hypervolume([[1.0, 2.0]], [0.0, float("-inf")]), "-inf"),
        (lambda: hypervolume([1.0, 2.0], [0.0, 0.0]), "(2,)"),
        (lambda: pareto_front([[[1.0]]]), "(1, 1, 1)"),
        (lambda: win_rate([1, 2, 3], [1, 2]), "(3,) and b_values (2,)"),
        (lambda: win_rate([], []), "empty"),
        (lambda: default_reference_point({}), "{}"),
        (lambda: default_reference_point({"a": [[1, 2]], "b": [[1, 2, 3]]}), "'b' has 3"),
        (lambda: default_reference_point({"a": [[1, 2]]}, margin=-1), "-1"),
        (lambda: summarise([], ["r"]), "empty"),
        (lambda: summarise([{"method": "a", "weights": (1,), "x": 1.0}], ["r"]), "['r']"),
        (lambda: summarise([{"method": "a", "weights": (1,), "r": float("nan")}], ["r"]), "'a'"),
        (lambda: summarise([{"method": "a", "weights": (1,), "r": 1.0}], "r"), "'r'"),
    ],
)
def test_error_messages_name_the_value(call, fragment: str) -> None:
    with pytest.raises(MetricsError, match=re.escape(fragment)):
        call()
