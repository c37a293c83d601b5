"""The bound engine: pure NumPy functions on recorded trajectories (DESIGN.md §2).

Imports neither torch, optuna nor mlflow, so it can be tested and reused on saved arrays.
"""

from hsgd_tune.bound.assemble import TrajectoryBound, trajectory_bound
from hsgd_tune.bound.complexity import complexity_term, trial_delta
from hsgd_tune.bound.distance import hausdorff_distance, synchronous_distance
from hsgd_tune.bound.lipschitz import lipschitz_estimate

__all__ = [
    "TrajectoryBound",
    "complexity_term",
    "hausdorff_distance",
    "lipschitz_estimate",
    "synchronous_distance",
    "trajectory_bound",
    "trial_delta",
]
