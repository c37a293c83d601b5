"""Tests for hsgd_tune.search.trials.pareto_ranks: non-dominated sorting for minimisation."""

from __future__ import annotations

import numpy as np
import pytest

from hsgd_tune.search.trials import pareto_ranks

NAN = np.nan


def test_pareto_ranks_hand_computed_two_objectives():
    values = np.array(
        [
            [1.0, 5.0],  # 0: front
            [2.0, 3.0],  # 1: front
            [3.0, 1.0],  # 2: front
            [2.0, 3.0],  # 3: duplicate of 1 -> front too (equal points do not dominate each other)
            [3.0, 4.0],  # 4: dominated by 1 and 3 only -> rank 2
            [4.0, 4.0],  # 5: dominated by 4 -> rank 3
            [NAN, 1.0],  # 6: unfinished -> 0
            [2.0, 5.0],  # 7: dominated by 0 (tie on the 2nd objective) and by 1 -> rank 2
            [1.0, 5.0],  # 8: duplicate of 0 -> front
            [1.0, 6.0],  # 9: tie with 0 on the first objective, worse on the second -> rank 2
            [0.5, NAN],  # 10: unfinished -> 0
            [3.0, 6.0],  # 11: dominated by 7 and 9 (rank 2) -> rank 3
            [4.0, 1.0],  # 12: dominated by 2 via a tie -> rank 2
        ]
    )
    expected = [1, 1, 1, 1, 2, 3, 0, 2, 1, 2, 0, 3, 2]
    np.testing.assert_array_equal(pareto_ranks(values), expected)


def test_pareto_ranks_edge_cases():
    assert pareto_ranks(np.empty((0, 2))).tolist() == []
    assert pareto_ranks(np.array([[NAN, NAN]])).tolist() == [0]
    assert pareto_ranks(np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])).tolist() == [1, 1, 1]
    # One objective: ranks are dense ranks of the sorted distinct values.
    assert pareto_ranks(np.array([[3.0], [1.0], [2.0], [1.0]])).tolist() == [3, 1, 2, 1]
    # A chain: each point dominates the next.
    chain = np.array([[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    assert pareto_ranks(chain).tolist() == [3, 1, 2]


def _naive_ranks(values: np.ndarray) -> np.ndarray:
    """Rank by definition: 1 + the length of the longest chain of points dominating it (O(n²) per
    point, memoised); rows with a NaN are 0."""
    n = len(values)
    finite = [i for i in range(n) if not np.isnan(values[i]).any()]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(
            x < y for x, y in zip(a, b, strict=True)
        )

    memo: dict[int, int] = {}

    def rank(i: int) -> int:
        if i not in memo:
            memo[i] = 1 + max((rank(j) for j in finite if dominates(values[j], values[i])), default=0)
        return memo[i]

    out = np.zeros(n, dtype=int)
    for i in finite:
        out[i] = rank(i)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [2, 3])
def test_pareto_ranks_match_naive_reference(seed, m):
    rng = np.random.default_rng([seed, m])
    n = 60
    # Small integer grid so ties and duplicates are common; a few rows unfinished.
    values = rng.integers(0, 6, size=(n, m)).astype(float)
    values[rng.random(n) < 0.1, rng.integers(0, m)] = np.nan
    np.testing.assert_array_equal(pareto_ranks(values), _naive_ranks(values))


def test_pareto_ranks_continuous_random_points():
    rng = np.random.default_rng(123)
    values = rng.normal(size=(80, 2))
    ranks = pareto_ranks(values)
    np.testing.assert_array_equal(ranks, _naive_ranks(values))
    assert ranks.min() == 1 and ranks.max() > 1
