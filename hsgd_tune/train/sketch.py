"""A Johnson–Lindenstrauss sketch of recorded iterates, for models too large to record in full.

A twin run records 2N iterates of p weights each; for a large model that is most of a trial's
memory. Above ``training.sketch_above`` parameters, each iterate w is recorded as ``S w`` with
``S = R / sqrt(k)``, R a fixed k × p matrix of independent random signs (±1) drawn from the study
seed, the same for both runs and every trial. The bound's distances are then computed between
sketches, and they are *estimates*:

    Achlioptas (2003), "Database-friendly random projections", Theorem 1.1 and its proof: for any
    fixed x and sign matrix R, P(‖Sx‖² ∉ [(1−ε₂)‖x‖², (1+ε₂)‖x‖²]) ≤ 2·exp(−(k/2)(ε₂²/2 − ε₂³/3)).

A union bound over the pairs whose distance the bound uses (the N² pairs (S-iterate, H-iterate):
the Hausdorff and synchronous distances are max/min over these) gives: with probability ≥ 1 − η,
every such distance is within a factor (1 ± ε) of the true one, and so are the Hausdorff and the
synchronous distance themselves (a max of mins of values each scaled by [1−ε, 1+ε]). We take
ε₂ = ε(2 − ε), so that 1 − ε₂ = (1 − ε)² and 1 + ε₂ ≤ (1 + ε)² (squared distances → distances).
This is sharper than the textbook k ≥ 8 ln(n²/η)/ε²: e.g. N = 41, η = 0.05, ε = 0.1 needs k = 1411.

R is never stored: its columns are regenerated block by block from (seed, block) when a batch of
iterates is sketched, so memory is O(k · block), not O(k · p). Sign bits are cheap to draw
(unpacked from random bytes), far cheaper than Gaussian entries, and enjoy the same bound.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Entries of R regenerated at a time (k × block columns): 16 MiB of float32.
_BLOCK_ELEMENTS = 1 << 22
_SEED_TAG = 0x4A4C  # "JL": keeps the sketch's random stream apart from the study's other streams


def pair_failure_probability(k: int, epsilon: float) -> float:
    """Bound on P(‖Sx‖ ∉ [(1−ε)‖x‖, (1+ε)‖x‖]) for one fixed x (Achlioptas 2003, Thm 1.1 proof).

    Args:
        k: sketch dimension, >= 1.
        epsilon: distance distortion ε in (0, 1).
    """
    eps2 = epsilon * (2.0 - epsilon)  # squared-distance distortion; see the module docstring
    return min(1.0, 2.0 * math.exp(-0.5 * k * (eps2**2 / 2.0 - eps2**3 / 3.0)))


def distortion_epsilon(k: int, n_pairs: int, eta: float) -> float:
    """Smallest ε (to 1e-6) with ``n_pairs · pair_failure_probability(k, ε) <= eta``; 1.0 if none.

    With probability >= 1 − η, all ``n_pairs`` sketched distances are within (1 ± ε) of the truth.
    """
    if n_pairs * pair_failure_probability(k, 1.0 - 1e-9) > eta:
        return 1.0
    lo, hi = 0.0, 1.0 - 1e-9  # failure bound decreases in ε on (0, 1): bisect
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if n_pairs * pair_failure_probability(k, mid) > eta else (lo, mid)
    return hi


def dimension_for(epsilon: float, n_pairs: int, eta: float) -> int:
    """Smallest k such that all ``n_pairs`` distances keep (1 ± ε) with probability >= 1 − η."""
    eps2 = epsilon * (2.0 - epsilon)
    rate = 0.5 * (eps2**2 / 2.0 - eps2**3 / 3.0)
    return math.ceil(math.log(2.0 * n_pairs / eta) / rate)


class SignSketch:
    """x (c, p) → x Sᵀ (c, k), S = R/sqrt(k), R ∈ {±1}^{k×p} regenerated from ``seed`` per block."""

    def __init__(self, n_parameters: int, dim: int, seed: int):
        self.n_parameters, self.dim, self.seed = n_parameters, dim, seed
        self.block = max(8, (_BLOCK_ELEMENTS // dim) // 8 * 8)  # whole bytes of sign bits

    def signs(self, block_index: int) -> torch.Tensor:
        """Columns of R in block ``block_index`` as float32 (k, width); the same on every call."""
        start = block_index * self.block
        width = min(self.block, self.n_parameters - start)
        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, _SEED_TAG, block_index])  # ≥ 0
        n_bytes = self.block // 8
        bits = np.unpackbits(rng.integers(0, 256, size=(self.dim, n_bytes), dtype=np.uint8), axis=1)
        signs = bits[:, :width].astype(np.float32)
        signs *= 2.0
        signs -= 1.0
        return torch.from_numpy(signs)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (c, p) float → (c, k) float32; linear, so distances between sketches estimate distances."""
        x = x.detach().float().cpu()
        out = torch.zeros(x.shape[0], self.dim)
        for i, start in enumerate(range(0, self.n_parameters, self.block)):
            out.addmm_(x[:, start : start + self.block], self.signs(i).T)
        return out / math.sqrt(self.dim)

    def matrix(self) -> torch.Tensor:
        """The whole S (k, p): for tests on small p only."""
        return self.apply(torch.eye(self.n_parameters)).T


#: η of the distortion statement logged with a sketched trial: within (1 ± ε) w.p. >= 1 − η.
ETA = 0.05


def sketch_assumptions(dim: int, n_points: int) -> tuple[float, dict[str, str]]:
    """ε for the N² (S-iterate, H-iterate) pairs of a sketched trial, and its assumption tags."""
    epsilon = distortion_epsilon(dim, n_points**2, ETA)
    within = f"within (1 ± {epsilon:.3g}) of the true distance with probability >= {1 - ETA:g}"
    sketched = f"JL sketches (k={dim}) of the iterates"
    tags = {
        "decoupling_distance": f"estimated: Hausdorff distance between {sketched}; {within}",
        "synchronous_distance": f"estimated: max same-step distance between {sketched}; {within}",
        "gap_bound": "holds if L̂ ≥ L and the sketched decoupling distance is not an underestimate",
        "risk_bound": "as gap_bound; on the loss clipped at B",
    }
    return epsilon, tags
