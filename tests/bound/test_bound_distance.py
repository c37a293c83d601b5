"""Hausdorff and synchronous distances against naive loops, hand values and their properties."""

from __future__ import annotations

import numpy as np
import pytest

from hsgd_tune.bound import hausdorff_distance, synchronous_distance


def naive_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Obviously-correct reference: double loop over direct differences."""

    def directed(x: np.ndarray, y: np.ndarray) -> float:
        return max(min(float(np.linalg.norm(xi - yj)) for yj in y) for xi in x)

    return max(directed(a, b), directed(b, a))


def naive_synchronous(a: np.ndarray, b: np.ndarray) -> float:
    return max(float(np.linalg.norm(a[k] - b[k])) for k in range(len(a)))


def naive_expansion_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook |x|^2 + |y|^2 - 2 x.y shortcut, no safeguards: what cancellation breaks."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    dist = np.sqrt(np.maximum(sq, 0.0))
    return float(max(dist.min(axis=1).max(), dist.min(axis=0).max()))


@pytest.mark.parametrize(
    ("n", "m", "p", "chunk_rows"),
    [
        (1, 1, 1, 256),
        (1, 7, 3, 256),
        (7, 1, 3, 256),
        (40, 25, 5, 256),
        (40, 25, 5, 3),
        (9, 30, 2, 1),
    ],
)
def test_hausdorff_matches_naive_double_loop(n, m, p, chunk_rows):
    rng = np.random.default_rng(n * 1000 + m * 10 + p)
    a, b = rng.normal(size=(n, p)), rng.normal(size=(m, p)) + 0.5
    assert hausdorff_distance(a, b, chunk_rows=chunk_rows) == pytest.approx(naive_hausdorff(a, b), rel=1e-12)


def test_hausdorff_of_point_and_segment_ends_on_a_line_is_3():
    # A = {0}, B = {0, 3}: every a is at 0 from B, but 3 in B is 3 from A -> max(0, 3) = 3.
    assert hausdorff_distance(np.array([[0.0]]), np.array([[0.0], [3.0]])) == 3.0


def test_hausdorff_on_a_line_is_symmetric_in_its_arguments():
    assert hausdorff_distance(np.array([[0.0], [3.0]]), np.array([[0.0]])) == 3.0


def test_hausdorff_uses_euclidean_norm():
    # (0, 0) to (3, 4): the 3-4-5 triangle.
    assert hausdorff_distance(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])) == 5.0


def test_hausdorff_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(1).normal(size=(50, 4))
    assert hausdorff_distance(a, a, chunk_rows=7) == 0.0


def test_hausdorff_ignores_order_and_repetition_of_points():
    a = np.random.default_rng(2).normal(size=(20, 3))
    shuffled_with_repeats = np.concatenate([a[::-1], a[:5]])
    assert hausdorff_distance(a, shuffled_with_repeats) == 0.0


def test_hausdorff_is_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 6)), rng.normal(size=(17, 6))
    assert hausdorff_distance(a, b) == pytest.approx(hausdorff_distance(b, a), rel=1e-14)


def test_hausdorff_is_at_most_synchronous_distance_for_same_index_pairs():
    rng = np.random.default_rng(4)
    a = np.cumsum(rng.normal(size=(60, 5)), axis=0)  # random-walk "trajectories"
    b = a + rng.normal(scale=0.3, size=a.shape)
    assert hausdorff_distance(a, b) <= synchronous_distance(a, b)


def test_hausdorff_is_translation_invariant():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(25, 4)), rng.normal(size=(35, 4))
    shift = rng.normal(scale=100.0, size=4)
    assert hausdorff_distance(a + shift, b + shift) == pytest.approx(hausdorff_distance(a, b), rel=1e-9)


def test_hausdorff_stays_accurate_for_nearby_points_with_large_norms():
    # Points around 1e4 with 1e-3 offsets: |x|^2 ~ 1e8 while distances^2 ~ 1e-6, so the plain
    # expansion loses most digits; the result must still match direct differences.
    rng = np.random.default_rng(6)
    base = 1e4 + rng.normal(size=(1, 8))
    a = base + 1e-3 * rng.normal(size=(40, 8))
    b = base + 1e-3 * rng.normal(size=(30, 8))
    reference = naive_hausdorff(a, b)
    assert abs(naive_expansion_hausdorff(a, b) / reference - 1.0) > 1e-6  # the case is hard
    assert hausdorff_distance(a, b, chunk_rows=16) == pytest.approx(reference, rel=1e-9)


def test_hausdorff_stays_accurate_for_a_long_trajectory_with_tiny_offsets():
    # Diameter ~1e4 but distances ~1e-6: centering cannot remove the cancellation here, the
    # candidate shortlist plus exact recomputation has to.
    rng = np.random.default_rng(7)
    a = np.linspace(0.0, 1e4, 200)[:, None] * rng.normal(size=(1, 3))
    b = a + 1e-6 * rng.normal(size=a.shape)
    reference = naive_hausdorff(a, b)
    assert abs(naive_expansion_hausdorff(a, b) / reference - 1.0) > 1e-6  # the case is hard
    assert hausdorff_distance(a, b, chunk_rows=32) == pytest.approx(reference, rel=1e-9)


def test_hausdorff_is_exact_when_many_points_tie_within_rounding():
    # A huge-diameter set next to a cluster of 100 points 1e-7 apart: every cluster point is a
    # candidate nearest neighbour, and with chunk_rows=1, p=3 they are rechecked in several batches.
    cluster = np.zeros((100, 3))
    cluster[:, 0] = 1e6 + 1e-7 * np.arange(100)
    far = np.array([[-1e6, 0.0, 0.0], [1e6 - 5e-6, 0.0, 0.0]])
    assert hausdorff_distance(far, cluster, chunk_rows=1) == pytest.approx(
        naive_hausdorff(far, cluster), rel=1e-12
    )


def test_hausdorff_does_not_depend_on_chunk_rows():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(33, 4)), rng.normal(size=(21, 4))
    results = {hausdorff_distance(a, b, chunk_rows=c) for c in (1, 2, 5, 32, 33, 1000)}
    assert len(results) == 1


def test_synchronous_distance_matches_loop():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(45, 7)), rng.normal(size=(45, 7))
    assert synchronous_distance(a, b) == pytest.approx(naive_synchronous(a, b), rel=1e-14)


def test_synchronous_distance_pairs_by_index_not_by_nearest_point():
    # Same set, reversed order: Hausdorff 0, synchronous |0 - 2| = 2.
    a = np.array([[0.0], [1.0], [2.0]])
    assert synchronous_distance(a, a[::-1]) == 2.0


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros((0, 2)), np.zeros((3, 2)), "a must be non-empty"),
        (np.zeros((3, 2)), np.zeros((0, 2)), "b must be non-empty"),
        (np.zeros(3), np.zeros((3, 1)), r"a must be a 2-D array \(N, p\)"),
        (np.zeros((3, 2)), np.zeros((3, 3)), "same number of columns p"),
        (np.array([[np.nan]]), np.zeros((1, 1)), "a must contain only finite values"),
        (np.zeros((1, 1)), np.array([[np.inf]]), "b must contain only finite values"),
    ],
)
def test_hausdorff_rejects_bad_point_sets(a, b, message):
    with pytest.raises(ValueError, match=message):
        hausdorff_distance(a, b)


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.0, True])
def test_hausdorff_rejects_chunk_rows_that_is_not_a_positive_integer(chunk_rows):
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1"):
        hausdorff_distance(np.zeros((2, 1)), np.zeros((2, 1)), chunk_rows=chunk_rows)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros((3, 2)), np.zeros((4, 2)), r"same shape \(N, p\)"),
        (np.zeros((3, 2)), np.zeros((3, 1)), r"same shape \(N, p\)"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "a must be non-empty"),
        (
            np.zeros((2, 2)),
            np.full((2, 2), np.nan),
            "b must contain only finite values",
        ),
    ],
)
def test_synchronous_distance_rejects_bad_point_sets(a, b, message):
    with pytest.raises(ValueError, match=message):
        synchronous_distance(a, b)


# ---------------------------------------------------------------------------------------------
# One-way distance and nearest points (the pairing of the trajectory gap bound)
# ---------------------------------------------------------------------------------------------


def test_nearest_points_match_a_naive_loop():
    from hsgd_tune.bound import nearest_points

    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(40, 7)), rng.normal(size=(25, 7))
    j, d = nearest_points(a, b, chunk_rows=8)
    for k in range(len(a)):
        dists = [float(np.linalg.norm(a[k] - y)) for y in b]
        assert j[k] == int(np.argmin(dists))
        assert d[k] == pytest.approx(min(dists), rel=1e-12)


def test_nearest_points_take_the_lowest_index_on_a_tie():
    from hsgd_tune.bound import nearest_points

    j, d = nearest_points(np.array([[0.0]]), np.array([[1.0], [-1.0], [1.0]]))
    assert j.tolist() == [0] and d.tolist() == [1.0]


def test_one_way_distance_is_the_directed_half_of_hausdorff_and_can_be_smaller():
    from hsgd_tune.bound import one_way_distance

    # The S-iterates hug the start of a reference trajectory that runs on: each S-iterate has a
    # near H-iterate (one-way 0.1) but the far H-iterate has no near S-iterate (Hausdorff 5).
    s = np.array([[0.0], [0.1], [0.2]])
    h = np.array([[0.0], [0.2], [5.2]])
    assert one_way_distance(s, h) == pytest.approx(0.1)
    assert hausdorff_distance(s, h) == pytest.approx(5.0)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    assert one_way_distance(a, b) <= hausdorff_distance(a, b)
    assert max(one_way_distance(a, b), one_way_distance(b, a)) == pytest.approx(naive_hausdorff(a, b))
