"""Input checks shared by the bound functions.

Every check names the parameter, the rule and the value, so a bad call is fixed from the message
alone (STYLE.md §4). They raise plain ``ValueError``: a bad array here is a programming error of the
caller, not a user-facing config error.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def count(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int, requiring an integer (not a bool or float) ``>= minimum``."""
    # bool is an Integral; True as a sample size is always a bug. ValueError, not TypeError, so
    # callers catch one exception type for every bad input.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def real(name: str, value: object) -> float:
    """Return ``value`` as a finite float (ints accepted, bools and non-numbers rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")  # noqa: TRY004
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return as_float


def positive(name: str, value: object) -> float:
    """Return ``value`` as a finite float ``> 0``."""
    as_float = real(name, value)
    if as_float <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return as_float


def probability(name: str, value: object) -> float:
    """Return ``value`` as a float strictly inside (0, 1), as a confidence level must be."""
    as_float = real(name, value)
    if not 0.0 < as_float < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return as_float


def finite_array(name: str, value: object) -> np.ndarray:
    """Return ``value`` as a non-empty, all-finite float64 array of any shape."""
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {array.shape!r}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must contain only finite values, got {_nonfinite(array)}")
    return array


def point_set(name: str, value: object) -> np.ndarray:
    """Return ``value`` as a float64 (N, p) array of N >= 1 finite points in R^p, p >= 1."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, p), got shape {array.shape!r}")
    return finite_array(name, array)


def _nonfinite(array: np.ndarray) -> str:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    return f"{bad} non-finite of {array.size} (shape {array.shape!r})"
