"""Fractal complexity (hsgd_tune.bound.fractal): covers, dimension, and the minimised bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hsgd_tune.bound.fractal import (
    box_dimension,
    covering_complexity,
    covering_number,
    diameter,
    epsilon_grid,
    fractal_complexity,
)


def test_greedy_cover_of_evenly_spaced_points_by_hand():
    line = np.arange(10.0)[:, None]  # 0, 1, ..., 9
    assert covering_number(line, 1.5) == 5  # centres 0, 2, 4, 6, 8 each cover their right neighbour
    assert covering_number(line, 0.5) == 10
    assert covering_number(line, 100.0) == 1


def test_every_point_is_within_eps_of_a_centre():
    pts = np.random.default_rng(0).normal(size=(200, 3))
    eps = 0.7
    # Rebuild the greedy centres and check coverage directly.
    uncovered, centres = np.ones(200, bool), []
    while uncovered.any():
        c = pts[np.argmax(uncovered)]
        centres.append(c)
        uncovered &= np.linalg.norm(pts - c, axis=1) > eps
    dist = np.min(np.linalg.norm(pts[:, None] - np.array(centres)[None], axis=2), axis=1)
    assert dist.max() <= eps and len(centres) == covering_number(pts, eps)


@pytest.mark.parametrize(("shape", "expected"), [("segment", 1.0), ("square", 2.0)])
def test_box_dimension_of_a_segment_and_a_square(shape, expected):
    rng = np.random.default_rng(1)
    segment = np.c_[rng.uniform(size=2000), np.zeros(2000)]
    pts = segment if shape == "segment" else rng.uniform(size=(3000, 2))
    grid = np.geomspace(0.03, 0.15, 8)
    # Edges (fewer balls needed near the boundary) and a finite sample bias the slope down a little.
    assert box_dimension(pts, grid) == pytest.approx(expected, abs=0.3)


def test_diameter_matches_naive_pairs():
    pts = np.random.default_rng(2).normal(size=(30, 4))
    naive = max(np.linalg.norm(a - b) for a in pts for b in pts)
    assert diameter(pts) == pytest.approx(naive, rel=1e-9)


def test_covering_complexity_is_the_minimum_over_the_grid_by_hand():
    pts = np.arange(10.0)[:, None]
    grid = np.array([0.5, 1.5, 100.0])
    b, n, delta, lip = 1.0, 100, 0.05, 0.01
    naive = [
        b * math.sqrt((math.log(k) + math.log(3 / delta)) / (2 * n)) + 2 * lip * e
        for k, e in zip((10, 5, 1), grid, strict=True)
    ]
    value, eps = covering_complexity(pts, lip, b, n, delta, grid)
    assert value == pytest.approx(min(naive)) and eps == grid[int(np.argmin(naive))]


def test_fractal_complexity_with_zero_lipschitz_prefers_the_coarsest_scale():
    pts = np.random.default_rng(3).normal(size=(50, 5))
    grid = epsilon_grid(diameter(pts))
    value, eps, dim = fractal_complexity(pts, 0.0, 5.0, 500, 0.01, grid)
    assert eps == grid[-1] and dim >= 0
    assert value == pytest.approx(5.0 * math.sqrt((math.log(len(grid)) - math.log(0.01)) / 1000))
