"""Evaluation metrics: means with bootstrap intervals, Pareto fronts, hypervolume, win rates.

Pure numpy. Every objective is MAXIMISED (rewards: larger is better). Points are arrays of shape
(N, M): N candidates (e.g. one per method and preference weight), M objectives, in reward units.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from msdda.errors import MSDDAError

__all__ = [
    "MetricsError",
    "MetricsWarning",
    "default_reference_point",
    "hypervolume",
    "mean_ci",
    "pareto_front",
    "summarise",
    "win_rate",
]

# Resampled indices held in memory at once by the bootstrap (int64 -> 32 MiB); bounds memory for
# large samples while every resample in a block is still drawn and reduced in one numpy call.
_BOOT_BLOCK_ELEMENTS = 1 << 22


class MetricsError(MSDDAError):
    """Bad input to a metric: empty or non-finite values, wrong shapes, invalid options."""


class MetricsWarning(UserWarning):
    """A metric is computable but probably not what was meant (e.g. a hypervolume of 0 from a bad reference)."""


# --------------------------------------------------------------------------------------------- checks
def _finite_1d(values: Any, name: str) -> np.ndarray:
    """Return `values` as a finite float64 vector of shape (n,), n >= 1, or raise MetricsError."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"{name} must be numeric, got {values!r:.200}: {exc}") from exc
    if arr.ndim != 1:
        raise MetricsError(f"{name} must be 1-D (one value per sample), got shape {arr.shape}")
    if arr.size == 0:
        raise MetricsError(f"{name} is empty; at least one value is needed")
    _check_finite(arr, name)
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)
        first = tuple(int(i) for i in where[0])
        first = first[0] if len(first) == 1 else first
        raise MetricsError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (nan/inf); first is "
            f"{float(arr[bad][0])!r} at index {first}. Drop or fix failed samples before computing metrics."
        )


def _points(points: Any, name: str = "points", allow_empty: bool = True) -> np.ndarray:
    """Return `points` as a finite float64 array of shape (N, M), M >= 1, or raise MetricsError."""
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"{name} must be a numeric (N, M) array, got {points!r:.200}: {exc}") from exc
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise MetricsError(
            f"{name} must have shape (N, M) = (points, objectives), got shape {arr.shape}; "
            "wrap a single point as [[...]]"
        )
    if arr.shape[0] == 0 and not allow_empty:
        raise MetricsError(f"{name} is empty (shape {arr.shape}); at least one point is needed")
    if arr.shape[0] > 0 and arr.shape[1] == 0:
        raise MetricsError(f"{name} has no objectives (shape {arr.shape})")
    _check_finite(arr, name)
    return arr


# ------------------------------------------------------------------------------------ mean and CI
def mean_ci(values: Any, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Sample mean with a percentile-bootstrap confidence interval.

    values: shape (n,), finite. Returns (mean, lo, hi) in the units of `values`, lo <= mean <= hi.
    Deterministic for a given `seed` (numpy Generator). n == 1 gives (v, v, v).
    """
    arr = _finite_1d(values, "values")
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise MetricsError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise MetricsError(f"n_boot must be a positive integer, got {n_boot!r}")
    mean = float(arr.mean())
    n = arr.size
    if n == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    boot = np.empty(int(n_boot), dtype=np.float64)
    block = max(1, _BOOT_BLOCK_ELEMENTS // n)
    for start in range(0, int(n_boot), block):  # loop over memory blocks, not over resamples
        stop = min(int(n_boot), start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = arr[idx].mean(axis=1)
    alpha = 1.0 - float(confidence)
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    # The bootstrap distribution is centred on the sample mean, so this only guards rounding
    # (e.g. constant data, where the mean of a resample can differ from `mean` in the last bit).
    return mean, float(min(lo, mean)), float(max(hi, mean))


# ---------------------------------------------------------------------------------------- Pareto
def pareto_front(points: Any) -> np.ndarray:
    """Indices of the non-dominated rows of `points` (shape (N, M)), all objectives maximised.

    q dominates p when q >= p in every objective and q > p in at least one. Of duplicated
    non-dominated points only the lowest index is kept. The result (int64, shape (F,)) is sorted by
    the first objective ascending (ties by the next objectives, then by index).
    """
    pts = _points(points)
    n, m = pts.shape
    if n == 0:
        return np.empty(0, dtype=np.int64)
    # Lexicographically descending order (index ascending among equal rows): anything that weakly
    # dominates p (including an earlier duplicate) comes before p, and a dropped point is weakly
    # dominated by a kept one, so checking each point against the kept set is exact.
    order = np.lexsort([np.arange(n)] + [-pts[:, j] for j in reversed(range(m))])
    if m == 2:
        # Every earlier point has x >= x_i, so i survives iff its y beats all earlier y: O(N log N).
        y = pts[order, 1]
        prev_max = np.maximum.accumulate(np.concatenate(([-np.inf], y[:-1])))
        idx = order[y > prev_max].astype(np.int64)
    else:
        kept_pts = np.empty_like(pts)
        kept: list[int] = []
        for i in order:
            p = pts[i]
            if kept and np.any(np.all(kept_pts[: len(kept)] >= p, axis=1)):
                continue
            kept_pts[len(kept)] = p
            kept.append(int(i))
        idx = np.asarray(kept, dtype=np.int64)
    sort = np.lexsort([idx] + [pts[idx, j] for j in reversed(range(m))])
    return idx[sort]


# ----------------------------------------------------------------------------------- hypervolume
def hypervolume(points: Any, reference_point: Any) -> float:
    """Exact hypervolume dominated by `points` (shape (N, M)) above `reference_point` (shape (M,)).

    Maximisation: the measure of the union of boxes [reference_point, p]. Only points that strictly
    dominate the reference (p > ref in every objective) contribute. Units: product of objective
    units. M = 1: max distance; M = 2: sort sweep, O(N log N); M >= 3: exact slicing along the last
    objective down to the 2-D sweep (O(N^2 log N) for M = 3, exponential in M beyond).
    """
    pts = _points(points)
    try:
        ref = np.asarray(reference_point, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"reference_point must be numeric, got {reference_point!r:.200}: {exc}") from exc
    if ref.ndim != 1 or ref.size == 0:
        raise MetricsError(f"reference_point must have shape (M,), got shape {ref.shape}")
    _check_finite(ref, "reference_point")
    if pts.shape[0] == 0:
        return 0.0
    if pts.shape[1] != ref.size:
        raise MetricsError(
            f"reference_point has {ref.size} objectives ({ref.tolist()}) but points have "
            f"{pts.shape[1]} (shape {pts.shape})"
        )
    d = pts - ref  # distances above the reference; boxes become [0, d]
    d = d[np.all(d > 0.0, axis=1)]
    if d.shape[0] == 0:
        # Not an error (a method may really be dominated), but a reference at or above every point is
        # usually a mistake: say so rather than report 0 silently.
        warnings.warn(
            f"hypervolume is 0: no point strictly dominates reference_point {ref.tolist()} (the points reach at "
            f"most {pts.max(axis=0).tolist()} per objective); choose a reference point below the points, e.g. "
            "default_reference_point(...)",
            MetricsWarning,
            stacklevel=2,
        )
        return 0.0
    if d.shape[1] >= 3:
        d = d[pareto_front(d)]  # dominated boxes add nothing; dropping them shrinks the recursion
    return float(_hv(d))


def _hv(d: np.ndarray) -> float:
    """Volume of the union of boxes [0, d_i]; d: shape (N, M), all entries > 0."""
    m = d.shape[1]
    if m == 1:
        return float(d[:, 0].max())
    if m == 2:
        return _hv2d(d)
    # Slice along the last objective: sorted descending z_0 >= z_1 >= ..., the cross-section for
    # z in (z_{k+1}, z_k] is the (M-1)-D union of the first k+1 boxes.
    order = np.argsort(-d[:, -1], kind="stable")
    d = d[order]
    z = d[:, -1]
    z_next = np.append(z[1:], 0.0)
    total = 0.0
    for k in range(d.shape[0]):
        height = z[k] - z_next[k]
        if height > 0.0:  # equal z values: the slab is empty, its section is counted at the last one
            total += height * _hv(d[: k + 1, :-1])
    return total


def _hv2d(d: np.ndarray) -> float:
    """Area of the union of rectangles [0, x_i] x [0, y_i]; d: shape (N, 2), entries > 0."""
    # Sorted by x descending, the point raising the running max of y adds a strip of width x.
    order = np.lexsort((-d[:, 1], -d[:, 0]))
    x, y = d[order, 0], d[order, 1]
    ymax = np.maximum.accumulate(y)
    gain = np.diff(ymax, prepend=0.0)
    return float(np.dot(x, gain))


def default_reference_point(points_by_method: Mapping[str, Any], margin: float = 0.1) -> np.ndarray:
    """Shared hypervolume reference: component-wise min over all methods' points minus margin*range.

    points_by_method: method name -> points of shape (N_i, M). Returns shape (M,). Every point then
    strictly dominates the reference, so every method's extreme points count. An objective whose
    values are all equal (zero range) uses margin * max(|min|, 1) instead, to stay strictly below.
    """
    if not isinstance(points_by_method, Mapping) or not points_by_method:
        raise MetricsError(
            f"points_by_method must be a non-empty dict name -> (N, M) points, got {points_by_method!r:.200}"
        )
    if not (isinstance(margin, (int, float)) and np.isfinite(margin) and margin > 0):
        raise MetricsError(f"margin must be a finite number > 0, got {margin!r}")
    arrays = []
    for name, pts in points_by_method.items():
        arr = _points(pts, name=f"points of method {name!r}")
        if arr.shape[0] == 0:
            continue
        if arrays and arr.shape[1] != arrays[0].shape[1]:
            raise MetricsError(
                f"method {name!r} has {arr.shape[1]} objectives but earlier methods have {arrays[0].shape[1]}"
            )
        arrays.append(arr)
    if not arrays:
        raise MetricsError("every method in points_by_method has no points")
    allp = np.concatenate(arrays, axis=0)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    span = hi - lo
    scale = np.where(span > 0, span, np.maximum(np.abs(lo), 1.0))
    return lo - float(margin) * scale


# -------------------------------------------------------------------------------------- win rate
def win_rate(a_values: Any, b_values: Any) -> float:
    """Fraction of paired samples where a beats b (a > b counts 1, a == b counts 1/2).

    a_values, b_values: same shape (n,) (or any equal shape), paired by position, e.g. the same
    seed and prompt under method A and baseline B at one preference weight. Returns a value in [0, 1].
    """
    a = np.asarray(a_values, dtype=np.float64)
    b = np.asarray(b_values, dtype=np.float64)
    if a.shape != b.shape:
        raise MetricsError(
            f"win_rate needs paired samples of equal shape, got a_values {a.shape} and b_values {b.shape}"
        )
    if a.size == 0:
        raise MetricsError("win_rate got no samples (empty a_values and b_values)")
    _check_finite(a, "a_values")
    _check_finite(b, "b_values")
    return float(np.mean((a > b) + 0.5 * (a == b)))


# ------------------------------------------------------------------------------------ summarise
def _hashable(value: Any, key: str, row_index: int) -> Hashable:
    """Canonical hashable form of a group value: dicts as sorted (key, value) tuples."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v, key, row_index)) for k, v in value.items()))
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_hashable(v, key, row_index) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    try:
        hash(value)
    except TypeError as exc:
        raise MetricsError(f"row {row_index}: value of {key!r} ({value!r}) cannot be grouped: {exc}") from exc
    return value


def summarise(
    rows: Iterable[Mapping[str, Any]],
    objectives: Sequence[str],
    group_keys: Sequence[str] = ("method", "weights"),
    *,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-group sample count, mean and bootstrap interval of each objective.

    rows: one dict per sample with the `group_keys` (weights: a dict objective -> w or a tuple) and a
    reward value under each name in `objectives`. Returns one dict per group,
    {**group values, "n": int, "mean": {obj: float}, "ci95": {obj: [lo, hi]}}, sorted by group key.
    "ci95" holds the `confidence` interval (0.95 by default); the same `seed` is used for every group.
    """
    if isinstance(objectives, str):
        raise MetricsError(f"objectives must be a list of names, not the string {objectives!r}")
    objectives = list(objectives)
    if not objectives:
        raise MetricsError("objectives is empty; name at least one reward key")
    if any(not isinstance(o, str) for o in objectives):
        raise MetricsError(f"objectives must be a list of names, got {objectives!r}")
    groups: dict[tuple, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise MetricsError(f"row {i} must be a dict, got {type(row).__name__}: {row!r:.200}")
        missing = [k for k in (*group_keys, *objectives) if k not in row]
        if missing:
            raise MetricsError(f"row {i} lacks key(s) {missing}; it has {sorted(map(str, row))}")
        key = tuple(_hashable(row[k], k, i) for k in group_keys)
        group = groups.setdefault(key, {"first": row, "values": {o: [] for o in objectives}})
        for o in objectives:
            group["values"][o].append(row[o])
    if not groups:
        raise MetricsError("rows is empty; nothing to summarise")
    try:
        keys = sorted(groups)
    except TypeError:  # mixed types within one key (e.g. None and str): fall back to a stable text order
        keys = sorted(groups, key=repr)
    out: list[dict[str, Any]] = []
    for key in keys:
        group = groups[key]
        first = group["first"]
        entry: dict[str, Any] = {}
        for k in group_keys:
            v = first[k]
            entry[k] = dict(sorted(v.items(), key=lambda kv: str(kv[0]))) if isinstance(v, Mapping) else v
        entry["n"] = len(group["values"][objectives[0]])
        entry["mean"], entry["ci95"] = {}, {}
        for o in objectives:
            try:
                m, lo, hi = mean_ci(group["values"][o], confidence=confidence, n_boot=n_boot, seed=seed)
            except MetricsError as exc:
                label = ", ".join(f"{k}={first[k]!r}" for k in group_keys)
                raise MetricsError(f"group ({label}), objective {o!r}: {exc}") from exc
            entry["mean"][o] = m
            entry["ci95"][o] = [lo, hi]
        out.append(entry)
    return out
