"""The tail index α̂ of the SGD noise (DESIGN.md §2, "tail index" row).

Mohammadi, Mohammadpour & Ogata (2015), "On estimating the tail index and the spectral measure of
multivariate α-stable distributions", Metrika 78: for i.i.d. symmetric α-stable ``X_1..X_K`` split into
``K2`` blocks of ``K1`` consecutive samples with block sums ``Y_i``, ``Y_i`` has the law of
``K1^{1/α} X_1``, hence ``E ln|Y| - E ln|X| = ln(K1)/α`` and

    1/α̂ = (mean_i ln|Y_i| - mean_j ln|X_j|) / ln K1.

Made robust here: samples are centred on their median (the centre of a symmetric law, and unlike the
sample mean not thrown off by one huge draw; skip it for noise centred by construction), the estimate
is the median over several block sizes K1, and α̂ is clipped to (0, 2] (a Gaussian has α = 2; finite
samples can overshoot). For (K, d) input — d coordinates of the noise with different scales — blocks are
summed along the sample axis within each coordinate, so every coordinate's scale cancels in the
difference of log-means and the d coordinates pool their information (Şimşekli et al. 2019 pool
coordinates too, but across scales).
"""

from __future__ import annotations

import math

import numpy as np

from hsgd_tune.bound import _checks

#: Default block sizes K1 (those that fit the sample are used).
BLOCK_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
#: Fewest blocks K2 a block size must leave for the block mean to be worth having.
MIN_BLOCKS = 4


def tail_index_block(samples: np.ndarray, block: int) -> float:
    """``1/α̂`` of the block estimator at one block size K1 (no centring, no clipping).

    Args:
        samples: (K,) or (K, d); axis 0 indexes i.i.d. draws. Trailing samples beyond a multiple of
            ``block`` are dropped.
        block: K1 >= 2.

    Returns:
        ``(mean ln|Y| - mean ln|X|) / ln K1`` over the kept samples (Mohammadi et al. 2015, eq. 2.1).
    """
    x = _checks.finite_array("samples", samples)
    block = _checks.count("block", block, minimum=2)
    if x.shape[0] < block:
        raise ValueError(f"samples must hold at least block={block} draws along axis 0, got {x.shape[0]}")
    return _inverse_alpha(x, _log_abs(x), block)


def _inverse_alpha(x: np.ndarray, log_abs_x: np.ndarray, block: int) -> float:
    """:func:`tail_index_block` given ``ln|x|``, computed once for all block sizes (the costly part)."""
    kept = (x.shape[0] // block) * block
    sums = x[:kept].reshape(kept // block, block, *x.shape[1:]).sum(axis=1)
    return float((float(np.mean(_log_abs(sums))) - float(np.mean(log_abs_x[:kept]))) / math.log(block))


def tail_index(samples: np.ndarray, blocks: tuple[int, ...] = BLOCK_SIZES, center: bool = True) -> float:
    """α̂ in (0, 2]: the median over block sizes of the centred block estimator, clipped.

    Args:
        samples: (K,) or (K, d) draws of the noise, axis 0 the draws (e.g. minibatch gradient minus
            full gradient, one row per minibatch).
        blocks: candidate block sizes K1; those leaving at least ``MIN_BLOCKS`` blocks are used (at least
            the smallest one).
        center: subtract the per-coordinate median first. Pass False for noise whose mean is zero by
            construction (a minibatch gradient minus the full gradient): a median shift of a skewed law
            would be summed K1 times into every block.

    Returns:
        α̂ = 1 / max(median 1/α̂_{K1}, 1/2): 2 for Gaussian-looking noise, smaller for heavier tails.
    """
    x = _checks.finite_array("samples", samples)
    if x.shape[0] < 4:
        raise ValueError(f"samples must hold at least 4 draws along axis 0, got {x.shape[0]}")
    if center:
        x = x - np.median(x, axis=0)
    usable = [k for k in blocks if x.shape[0] // k >= MIN_BLOCKS] or [min(blocks)]
    usable = [_checks.count("block", k, minimum=2) for k in usable]
    if x.shape[0] < usable[0]:
        raise ValueError(f"samples must hold at least block={usable[0]} draws along axis 0, got {x.shape[0]}")
    log_abs_x = _log_abs(x)
    inverse = float(np.median([_inverse_alpha(x, log_abs_x, k) for k in usable]))
    return 1.0 / max(inverse, 0.5)


def log_abs_variance(alpha: float) -> float:
    """``Var ln|X| = π²/12 · (1 + 2/α²)`` for symmetric α-stable X (Zolotarev 1986, §3.6): the spread
    of the estimator's log-means, used to size test tolerances."""
    alpha = _checks.positive("alpha", alpha)
    return math.pi**2 / 12.0 * (1.0 + 2.0 / alpha**2)


def _log_abs(a: np.ndarray) -> np.ndarray:
    # A draw of exactly 0 (possible with float rounding after centring) would give -inf.
    return np.log(np.maximum(np.abs(a), np.finfo(np.float64).tiny))
