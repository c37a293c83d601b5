"""Fractal complexity of the reference trajectory (DESIGN.md §2, "fractal complexity" row).

The complexity term ``C`` pays ``ln N`` for a union bound over the N recorded reference iterates. A
coarser union bound pays only for an ε-cover of ``W^H``: its centres are points of ``W^H`` (independent of
S), and every other point is within ε of one, where ``g = R_B - R̂_{S,B}`` moves by at most ``2Lε``:

    sup_{W^H} g <= B·sqrt((ln N(ε) + ln(|grid|/δ)) / (2n)) + 2Lε       (union bound over an ε grid).

``covering_complexity`` is this bound (it holds if ``L̂ >= L``, like the gap bound). ``fractal_complexity``
replaces ``ln N(ε)`` by ``d̂·ln(diam/ε)`` with ``d̂`` the box-counting dimension of ``W^H`` estimated from
the same covers (Şimşekli et al. 2020; Dupuis & Viallard, arXiv 2312.00427): an *estimate* — a finite set
has dimension 0, and the slope is read off a few scales.
"""

from __future__ import annotations

import math

import numpy as np

from hsgd_tune.bound import _checks


def covering_number(points: np.ndarray, eps: float) -> int:
    """Size of a greedy ε-cover of ``points`` by their own members (every point within ε of a centre).

    Args:
        points: (N, p).
        eps: ε > 0.

    Returns:
        The number of centres, in [1, N] (an upper bound on the minimal cover with centres in the set).
    """
    points = _checks.point_set("points", points)
    eps = _checks.positive("eps", eps)
    uncovered = np.ones(len(points), dtype=bool)
    centres = 0
    while uncovered.any():
        centre = points[np.argmax(uncovered)]
        uncovered &= np.linalg.norm(points - centre, axis=1) > eps
        centres += 1
    return centres


def diameter(points: np.ndarray) -> float:
    """``max_{i,j} ‖x_i - x_j‖`` of (N, p) points."""
    points = _checks.point_set("points", points)
    sq = np.sum(points**2, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * points @ points.T
    return float(math.sqrt(max(float(d2.max()), 0.0)))


def epsilon_grid(diam: float, size: int = 20, low_fraction: float = 1e-3) -> np.ndarray:
    """(size,) geometric scales from ``low_fraction·diam`` to ``diam``, fixed before looking at S."""
    diam = _checks.positive("diam", diam)
    return np.geomspace(low_fraction * diam, diam, _checks.count("size", size, minimum=2))


def box_dimension(points: np.ndarray, eps_grid: np.ndarray) -> float:
    """Least-squares slope of ``ln N(ε)`` against ``ln(1/ε)`` over the scales where ``1 < N(ε) < N``.

    Returns 0 when fewer than two scales are informative (a point, or too coarse a grid).
    """
    points = _checks.point_set("points", points)
    eps_grid = _checks.finite_array("eps_grid", eps_grid)
    counts = np.array([covering_number(points, float(e)) for e in eps_grid])
    keep = (counts > 1) & (counts < len(points))
    if keep.sum() < 2:
        return 0.0
    slope = np.polyfit(np.log(1.0 / eps_grid[keep]), np.log(counts[keep]), 1)[0]
    return float(max(slope, 0.0))


def covering_complexity(
    points: np.ndarray, lipschitz: float, loss_clip: float, n: int, delta: float, eps_grid: np.ndarray
) -> tuple[float, float]:
    """``min_ε B·sqrt((ln N(ε) + ln(|grid|/δ))/(2n)) + 2L̂ε`` and its ε (holds if ``L̂ >= L``)."""
    counts = [covering_number(points, float(e)) for e in eps_grid]
    return _minimise(np.log(counts), eps_grid, lipschitz, loss_clip, n, delta)


def fractal_complexity(
    points: np.ndarray, lipschitz: float, loss_clip: float, n: int, delta: float, eps_grid: np.ndarray
) -> tuple[float, float, float]:
    """``min_ε B·sqrt((d̂·ln(diam/ε) + ln(|grid|/δ))/(2n)) + 2L̂ε``, its ε and d̂ (estimated).

    Args:
        points: (N, p) the recorded reference iterates ``W^H``.
        lipschitz: L̂ >= 0.
        loss_clip: B > 0.
        n: |S| >= 1.
        delta: this statement's confidence level.
        eps_grid: (G,) scales fixed in advance (see :func:`epsilon_grid`).
    """
    dim = box_dimension(points, eps_grid)
    log_counts = dim * np.log(diameter(points) / np.asarray(eps_grid))
    value, eps = _minimise(np.maximum(log_counts, 0.0), eps_grid, lipschitz, loss_clip, n, delta)
    return value, eps, dim


def _minimise(log_counts, eps_grid, lipschitz, loss_clip, n, delta) -> tuple[float, float]:
    lipschitz = _checks.real("lipschitz", lipschitz)
    loss_clip = _checks.positive("loss_clip", loss_clip)
    n = _checks.count("n", n)
    delta = _checks.probability("delta", delta)
    eps_grid = _checks.finite_array("eps_grid", eps_grid)
    confidence = math.log(len(eps_grid)) - math.log(delta)
    values = (
        loss_clip * np.sqrt((np.asarray(log_counts) + confidence) / (2.0 * n)) + 2.0 * lipschitz * eps_grid
    )
    best = int(np.argmin(values))
    return float(values[best]), float(eps_grid[best])
