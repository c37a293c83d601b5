"""Distances between the two recorded trajectories (DESIGN.md §2, "decoupling distance").

The decoupling lemma of Dupuis & Viallard (arXiv 2312.00427) charges the data dependence of the
bound to a geometric distance between the empirical trajectory ``W^S`` and the reference trajectory
``W^H``: ``sup_{W^S} g <= sup_{W^H} g + 2L * d_H(W^S, W^H)``. Here the sets are the recorded
iterates, (N, p) arrays with one point per row.
"""

from __future__ import annotations

import numpy as np

from hsgd_tune.bound import _checks

_EPS = np.finfo(np.float64).eps


def hausdorff_distance(a: np.ndarray, b: np.ndarray, chunk_rows: int = 256) -> float:
    """Symmetric Hausdorff distance between two finite point sets, Euclidean norm.

    ``d_H(A, B) = max(sup_{x in A} inf_{y in B} |x - y|, sup_{y in B} inf_{x in A} |x - y|)``:
    the decoupling distance ``D`` of DESIGN.md §2 (Dupuis & Viallard, arXiv 2312.00427,
    decoupling lemma).

    Args:
        a: (N, p) points, e.g. the recorded iterates of the S-run.
        b: (M, p) points, e.g. the recorded iterates of the H-run.
        chunk_rows: rows of one set compared at a time; no matrix larger than
            ``chunk_rows x M`` (or ``chunk_rows x N``) is built, so long trajectories fit in memory.

    Returns:
        The distance, accurate to the rounding of a direct ``|x - y|`` (not only to the
        ``|x|^2 + |y|^2 - 2 x.y`` expansion used to search for nearest points).
    """
    a, b, chunk_rows, center = _checked_pair(a, b, chunk_rows)
    a_centered, b_centered = a - center, b - center
    return max(
        _directed(a, b, a_centered, b_centered, chunk_rows),
        _directed(b, a, b_centered, a_centered, chunk_rows),
    )


def nearest_points(a: np.ndarray, b: np.ndarray, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each point of ``a``, the index of its nearest point in ``b`` and the distance to it.

    The pairing behind the one-way distance and the trajectory gap bound (DESIGN.md §2): each
    recorded S-iterate ``w^S_k`` is compared with its nearest reference iterate ``w^H_{j(k)}``.

    Args:
        a: (N, p) points, e.g. the recorded S-run iterates.
        b: (M, p) points, e.g. the recorded H-run iterates.
        chunk_rows: rows of ``a`` compared at a time (memory ``chunk_rows x M``).

    Returns:
        ``(j, d)``: (N,) int indices into b (the lowest index on a tie) and (N,) distances
        ``|a_k - b_{j(k)}|``, accurate to the rounding of a direct difference.
    """
    a, b, chunk_rows, center = _checked_pair(a, b, chunk_rows)
    return _nearest(a, b, a - center, b - center, chunk_rows)


def _checked_pair(a, b, chunk_rows: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Both point sets checked (same p), ``chunk_rows`` checked, and their common mean. Distances are
    translation invariant; centering on the common mean shrinks the norms that the
    ``|x|^2 + |y|^2 - 2 x.y`` expansion's rounding error scales with, so far fewer candidate pairs
    survive the search."""
    a = _checks.point_set("a", a)
    b = _checks.point_set("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of columns p, got {a.shape!r} and {b.shape!r}")
    center = (a.sum(axis=0) + b.sum(axis=0)) / (a.shape[0] + b.shape[0])
    return a, b, _checks.count("chunk_rows", chunk_rows), center


def one_way_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``sup_{x in A} inf_{y in B} |x - y|``: the decoupling distance D of DESIGN.md §2 (each S-iterate
    to its nearest H-iterate). At most the symmetric Hausdorff distance, and all the decoupling
    argument needs: only the S-iterates must be close to some reference iterate.

    Args:
        a: (N, p) points (the S-run iterates); b: (M, p) points (the H-run iterates).
    """
    return float(np.max(nearest_points(a, b)[1]))


def synchronous_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between same-index points: ``D_sync = max_k |a_k - b_k|``.

    Pairing each point with the one recorded at the same step is one admissible choice of
    "nearest" point, so ``D_sync >= d_H(A, B)`` (DESIGN.md §2, decoupling distance row).

    Args:
        a: (N, p) points, e.g. the S-run iterates at the recorded steps.
        b: (N, p) points, the H-run iterates at the same steps.

    Returns:
        ``max_k |a_k - b_k|`` in the Euclidean norm.
    """
    a = _checks.point_set("a", a)
    b = _checks.point_set("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (N, p), got {a.shape!r} and {b.shape!r}")
    diff = a - b  # (N, p)
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", diff, diff))))


def _directed(
    x: np.ndarray,
    y: np.ndarray,
    x_centered: np.ndarray,
    y_centered: np.ndarray,
    chunk_rows: int,
) -> float:
    """``sup_i inf_j |x_i - y_j|`` for x (N, p), y (M, p), given the same sets centered.

    The expansion ``|x|^2 + |y|^2 - 2 x.y`` is one matrix product, but it cancels badly when the
    distances are small next to the norms. So it only shortlists: every pair whose squared distance
    could, within a rigorous rounding bound, be a row minimum is recomputed as a direct difference
    from the uncentered inputs.
    """
    return float(np.max(_nearest(x, y, x_centered, y_centered, chunk_rows)[1]))


def _nearest(
    x: np.ndarray, y: np.ndarray, x_centered: np.ndarray, y_centered: np.ndarray, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) index of the nearest y_j and (N,) distance to it, for every x_i."""
    p = x.shape[1]
    # Error of the expansion <= 2*gamma_{p+2}*(|x|^2+|y|^2) (dot products of length p, two adds);
    # centering adds <= 4*eps*(|x|^2+|y|^2). 4*gamma_{p+4} covers both with a margin.
    k = p + 4
    tolerance_factor = 4.0 * k * _EPS / (1.0 - k * _EPS)
    y_sq = np.einsum("ij,ij->i", y_centered, y_centered)  # (M,)
    indices, distances = [], []
    for start in range(0, x.shape[0], chunk_rows):
        x_chunk = x_centered[start : start + chunk_rows]  # (c, p)
        x_sq = np.einsum("ij,ij->i", x_chunk, x_chunk)  # (c,)
        norms = x_sq[:, None] + y_sq[None, :]  # (c, M)
        # True squared distances are >= 0; clipping keeps the estimate inside the error interval.
        approx = np.maximum(norms - 2.0 * (x_chunk @ y_centered.T), 0.0)  # (c, M)
        tolerance = tolerance_factor * norms  # (c, M)
        # Each row's true minimum is <= upper; any pair whose lower end is <= upper may attain it.
        upper = np.min(approx + tolerance, axis=1)  # (c,)
        candidates = (approx - tolerance <= upper[:, None]) | ~np.isfinite(approx)
        rows, cols = np.nonzero(candidates)
        arg, row_min = _exact_row_min(
            x[start : start + chunk_rows],
            y,
            rows,
            cols,
            max_elements=chunk_rows * y.shape[0],
        )
        indices.append(arg)
        distances.append(row_min)
    return np.concatenate(indices), np.concatenate(distances)


def _exact_row_min(
    x: np.ndarray, y: np.ndarray, rows: np.ndarray, cols: np.ndarray, max_elements: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row i of x (c, p): argmin (lowest j on a tie) and min over the listed pairs (i, j) of the
    direct ``|x_i - y_j|``.

    Pairs are processed in batches of at most ``max_elements`` array entries, so a degenerate
    case with many candidates costs time, not memory.
    """
    row_min = np.full(x.shape[0], np.inf)  # (c,)
    row_arg = np.full(x.shape[0], -1, dtype=np.int64)  # (c,)
    batch = max(1, max_elements // x.shape[1])
    for start in range(0, rows.size, batch):
        r, c = rows[start : start + batch], cols[start : start + batch]
        diff = x[r] - y[c]  # (batch, p)
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        # Candidates come row-major with increasing j: a strict "<" keeps the lowest j on a tie.
        for i, j, d in zip(r.tolist(), c.tolist(), dist.tolist(), strict=True):
            if d < row_min[i]:
                row_min[i], row_arg[i] = d, j
    return row_arg, row_min
