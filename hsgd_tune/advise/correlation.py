"""Rank correlation between a generalization measure and the observed generalization gap.

A measure is useful to an advisor when it *orders* trials like the true gap does (DESIGN.md §2, "How
the bound is judged"). Two numbers, from Jiang et al. 2020, "Fantastic Generalization Measures and
Where to Find Them" (ICLR), §3:

- :func:`kendall_tau` — Kendall's τ over all trials (eq. 3);
- :func:`granulated_kendall` — ψ_i, the average τ over the groups of trials in which only
  hyperparameter i varies (eq. 4), and Ψ, the mean of the ψ_i. A measure that merely tracks the
  learning rate scores well on τ over an lr × batch-size grid, but gets ψ_batch_size ≈ 0.

Conventions (explicit, because they change the numbers):

- **τ is Kendall's τ-b**, the variant ``scipy.stats.kendalltau`` computes by default:
  (concordant − discordant) / sqrt((n0 − ties_x)(n0 − ties_y)), n0 = n(n−1)/2. Without ties it equals
  Jiang et al.'s eq. 3 (τ-a); with ties, a tied pair counts neither way, and τ-b rescales so that a
  perfect ordering of the untied pairs still scores ±1.
- **A measure (or gap) that is constant** on the trials compared cannot order them: τ-b is then 0/0,
  and we return **0.0** ("no ranking information"), as Jiang et al.'s formula would (every pair
  tied). scipy returns NaN there. This matters for ψ_i: a measure blind to hyperparameter i is
  constant in every group where only i varies, and must score ψ_i = 0, not be skipped.
- **NaN** in the measure or the gap (a diverged trial, a metric a trial did not report) drops that
  trial before anything else; ±inf are kept as the extreme values they are. With fewer than 2 trials
  left, τ is undefined and NaN is returned.
- **Groups for ψ_i**: trials that share the values of every other hyperparameter. A group in which
  hyperparameter i takes fewer than 2 distinct values (after dropping NaN trials) contributes
  nothing: it is neither a term nor counted in the average. ψ_i is NaN when no group contributes;
  Ψ is the mean of the ψ_i that are not NaN (NaN when none is).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def kendall_tau(measure, gap) -> float:
    """Kendall's τ-b between ``measure`` (n,) and ``gap`` (n,); NaN pairs dropped (module doc).

    O(n²) pairwise signs, which is exact and plenty fast for the few hundred trials of a study.
    """
    m, g = _paired(measure, gap)
    if len(m) < 2:
        return float("nan")
    upper = np.triu_indices(len(m), k=1)
    # Comparisons instead of np.sign(a - b), so that inf - inf does not become NaN.
    sm = (_compare(m))[upper]
    sg = (_compare(g))[upper]
    untied_m = np.count_nonzero(sm)
    untied_g = np.count_nonzero(sg)
    if untied_m == 0 or untied_g == 0:
        return 0.0  # a constant measure (or gap) orders nothing
    return float(np.sum(sm * sg) / np.sqrt(float(untied_m) * float(untied_g)))


def granulated_kendall(measure, gap, hparams: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """Ψ and ψ_i (Jiang et al. 2020, eq. 4) for each column ``i`` of ``hparams`` (module doc).

    ``hparams`` has one row per trial, aligned with ``measure`` and ``gap`` (n,), and one column per
    hyperparameter (e.g. ``learning_rate``, ``batch_size``); values are grouped on exact equality,
    so they should come from a grid.
    """
    m = np.asarray(measure, dtype=float)
    g = np.asarray(gap, dtype=float)
    if not (m.shape == g.shape == (len(hparams),)):
        raise ValueError(
            f"measure, gap and hparams must have one entry per trial; got shapes {m.shape}, {g.shape} "
            f"and {len(hparams)} rows"
        )
    if hparams.isna().any().any():
        raise ValueError("hparams must not contain NaN: a trial's hyperparameters are always known")
    keep = ~(np.isnan(m) | np.isnan(g))
    table = hparams.reset_index(drop=True).loc[keep].copy()
    table["_m"], table["_g"] = m[keep], g[keep]
    columns = list(hparams.columns)
    psi = {str(name): _psi(table, name, [c for c in columns if c != name]) for name in columns}
    finite = [v for v in psi.values() if not np.isnan(v)]
    big_psi = float(np.mean(finite)) if finite else float("nan")
    return big_psi, psi


def _psi(table: pd.DataFrame, name, others: list) -> float:
    """Average τ over the groups in which only ``name`` varies (others fixed)."""
    groups = [table] if not others else [grp for _, grp in table.groupby(others, sort=False)]
    taus = [kendall_tau(grp["_m"], grp["_g"]) for grp in groups if grp[name].nunique() >= 2]
    return float(np.mean(taus)) if taus else float("nan")


def _paired(measure, gap) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(measure, dtype=float).ravel()
    g = np.asarray(gap, dtype=float).ravel()
    if m.shape != g.shape:
        raise ValueError(f"measure and gap must have the same length; got {m.size} and {g.size}")
    keep = ~(np.isnan(m) | np.isnan(g))
    return m[keep], g[keep]


def _compare(x: np.ndarray) -> np.ndarray:
    """(n, n) matrix of sign(x_i − x_j) in {−1, 0, 1}, exact for infinite values."""
    return (x[:, None] > x[None, :]).astype(np.int8) - (x[:, None] < x[None, :]).astype(np.int8)
