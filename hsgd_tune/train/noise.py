"""Isotropic α-stable (Lévy) noise for the paper's heavy-tailed SGD (DESIGN.md §2, "Heavy-tailed dynamics").

The recursion is ``w_{k+1} = w_k - η g_k + σ η^{1/α} ξ_k`` with ``ξ_k = sqrt(A_k) · N(0, I_d)`` and
``A_k ~ S(α/2, 1, 2 cos(πα/4)^{2/α}, 0)`` (scipy.stats.levy_stable, default S1 parametrisation): a
sub-Gaussian, rotation-invariant α-stable vector (Samorodnitsky & Taqqu 1994, §2.5). At α = 2 the
subordinator is the constant 2 and ξ is Gaussian N(0, 2I).

The same ξ_k is added to both runs of a twin, so the reference trajectory stays independent of S.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import levy_stable


def subordinators(alpha: float, steps: int, seed: int) -> np.ndarray:
    """(steps,) the positive scalars ``A_k`` of ``ξ_k = sqrt(A_k) · N(0, I)``; all 2 when α = 2."""
    if not 0.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (0, 2], got {alpha!r}")
    if alpha == 2.0:
        return np.full(steps, 2.0)
    scale = 2.0 * math.cos(math.pi * alpha / 4.0) ** (2.0 / alpha)
    rng = np.random.default_rng([seed, 0xA1FA])
    return levy_stable.rvs(alpha / 2.0, 1.0, loc=0.0, scale=scale, size=steps, random_state=rng)


class LevyNoise:
    """The noise increments ``σ η^{1/α} ξ_k`` of one trial, drawn step by step from a fixed seed."""

    def __init__(self, alpha: float, sigma: float, learning_rate: float, steps: int, seed: int, device="cpu"):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.factor = sigma * learning_rate ** (1.0 / alpha)
        self.roots = torch.as_tensor(np.sqrt(subordinators(alpha, steps, seed)), dtype=torch.float32)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed) + 0x5EED)
        self.device = device

    def increment(self, step: int, p: int) -> torch.Tensor:
        """(p,) the increment added at ``step`` (1-based), identical for both runs."""
        gauss = torch.randn(p, generator=self.generator)
        return (self.factor * self.roots[step - 1] * gauss).to(self.device)
