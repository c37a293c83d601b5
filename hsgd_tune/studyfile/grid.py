"""The configuration grid Λ, its prior weights π(λ), and each configuration's confidence δ_λ.

DESIGN.md §2, "Confidence across a study": a statement about a trial is a statement about its
configuration λ (training is deterministic given λ and the study seed). Samplers such as TPE choose λ
from earlier results on S, so a union bound over the *trial index* does not hold. Instead every
searched knob lives on a finite grid fixed by the study file before any data is seen, with prior weights
π(λ), Σ_λ π(λ) ≤ 1, and every statement about λ uses ``δ_λ = δ·π(λ)``: a union bound over Λ, which
holds whatever the sampler does, however many trials the study runs, and re-evaluating λ repeats one
statement rather than making a new one.

The grid of one knob (fixed by the study file alone):

* ``choices``: the choices.
* a log-scaled float range (the learning rate): ``points_per_decade`` log-spaced points from ``low`` to
  ``high`` (both included); between neighbours a factor of at most ``10^(1/points_per_decade)``.
* a log-scaled int range (the batch size): the powers of two inside it, plus ``low`` and ``high``.
* a linear float range: ``grid_points`` evenly spaced points, ends included.
* a linear int range: every integer in it.

π is uniform over Λ: ``π(λ) = 1/|Λ|``, or ``1/[bound] grid_size`` when the study file names a larger
``grid_size`` (an exported single configuration keeps the statement of the study it came from).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Learning-rate grid density. 10 points per decade puts any sampled value within a factor 10^0.05
#: (12%) of a grid point, finer than the factor-of-2 steps at which learning rates are usually told
#: apart, and costs ln|Λ|: going from 5 to 10 points per decade adds only ln 2 ≈ 0.69 inside the
#: ln(1/δ_λ) term (README, "What the grid union costs").
DEFAULT_POINTS_PER_DECADE = 10
#: Linear float ranges (e.g. momentum 0..0.9): 11 points, a step of a tenth of the range.
DEFAULT_GRID_POINTS = 11
#: Grid points are rounded to this many significant digits (readable params); the ends stay exact.
_DIGITS = 6


def knob_values(knob: Any) -> tuple[Any, ...]:
    """The finite, sorted grid of one knob (a :class:`hsgd_tune.studyfile.config.Knob`), fixed by the file."""
    if knob.kind == "categorical":
        return tuple(knob.choices)
    low, high = knob.low, knob.high
    if knob.kind == "int":
        if knob.log:
            powers = [2**k for k in range(64) if low <= 2**k <= high]
            return tuple(sorted({int(low), *powers, int(high)}))
        return tuple(range(int(low), int(high) + 1))
    if knob.log:
        count = math.ceil(math.log10(high / low) * knob.points_per_decade - 1e-9) + 1
        inner = [float(f"{v:.{_DIGITS}g}") for v in np.geomspace(low, high, count)[1:-1]]
        return (float(low), *inner, float(high))
    inner = [float(f"{v:.{_DIGITS}g}") for v in np.linspace(low, high, knob.grid_points)[1:-1]]
    return (float(low), *inner, float(high))


def snap(knob: Any, value: Any) -> Any:
    """The grid point of ``knob`` nearest to ``value`` (log distance on log scales); choices as given."""
    values = knob_values(knob)
    if knob.kind == "categorical":
        return value
    grid = np.asarray(values, dtype=np.float64)
    if knob.log:
        index = int(np.argmin(np.abs(np.log(grid) - math.log(value))))
    else:
        index = int(np.argmin(np.abs(grid - value)))
    return values[index]


def knob_size(knob: Any) -> int:
    """How many grid points the knob has (without listing a long integer range)."""
    if knob.kind == "int" and not knob.log:
        return int(knob.high) - int(knob.low) + 1
    return len(knob_values(knob))


def grid_size(search: Any) -> int:
    """|Λ| = the product of the knobs' grid sizes (a :class:`hsgd_tune.studyfile.config.SearchConfig`)."""
    return math.prod(knob_size(knob) for knob in search.all_knobs())


def prior_weight(cfg: Any) -> float:
    """π(λ) of every configuration of the study ``cfg``: uniform, ``1/|Λ|`` (or ``1/[bound] grid_size``)."""
    return 1.0 / cfg.grid_size


def statements(cfg: Any) -> tuple[str, ...]:
    """The statements each configuration makes, each getting an equal share of δ_λ (DESIGN.md §2).

    ``trajectory``: the complexity term C (Hoeffding over W^H), which the trajectory bounds rest on;
    ``heldout``: the held-out certificate of the S-model; with ``[certificate] enabled``, also
    ``perturbed`` (perturbed-dynamics certificate) and ``pacbayes`` (learned-posterior certificate).
    Every share is set aside whether or not its statement is ever computed, so certifying only the
    trials chosen after seeing the results keeps the joint ≥ 1 − δ statement.
    """
    return ("trajectory", "heldout") + (("perturbed", "pacbayes") if cfg.certificate.enabled else ())


def statement_deltas(cfg: Any) -> dict[str, float]:
    """Statement name -> its confidence: ``δ_λ / len(statements)``, ``δ_λ = δ·π(λ)``."""
    names = statements(cfg)
    delta_config = cfg.bound.delta * prior_weight(cfg)
    return {name: delta_config / len(names) for name in names}
