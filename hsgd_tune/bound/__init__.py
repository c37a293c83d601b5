"""The bound engine: pure NumPy functions on recorded trajectories (DESIGN.md §2).

Imports neither torch, optuna nor mlflow, so it can be tested and reused on saved arrays.
"""

from hsgd_tune.bound.analytic import contractive_bound, gronwall_bound
from hsgd_tune.bound.assemble import TrajectoryBound, trajectory_bound, trajectory_gaps
from hsgd_tune.bound.complexity import complexity_term, configuration_delta
from hsgd_tune.bound.distance import (
    hausdorff_distance,
    nearest_points,
    one_way_distance,
    synchronous_distance,
)
from hsgd_tune.bound.fractal import covering_complexity, fractal_complexity
from hsgd_tune.bound.heldout import heldout_certificate, heldout_upper
from hsgd_tune.bound.lipschitz import lipschitz_estimate
from hsgd_tune.bound.pacbayes import (
    Certificate,
    binary_kl,
    certificate,
    gaussian_kl,
    geometric_grid,
    kl_inverse_upper,
    mc_error_upper,
    pac_bayes_kl_bound,
)
from hsgd_tune.bound.perturbed import perturbed_bounds
from hsgd_tune.bound.tail_index import tail_index

__all__ = [
    "Certificate",
    "TrajectoryBound",
    "binary_kl",
    "certificate",
    "contractive_bound",
    "covering_complexity",
    "fractal_complexity",
    "gaussian_kl",
    "geometric_grid",
    "gronwall_bound",
    "kl_inverse_upper",
    "mc_error_upper",
    "pac_bayes_kl_bound",
    "tail_index",
    "complexity_term",
    "configuration_delta",
    "hausdorff_distance",
    "heldout_certificate",
    "heldout_upper",
    "lipschitz_estimate",
    "nearest_points",
    "one_way_distance",
    "perturbed_bounds",
    "synchronous_distance",
    "trajectory_bound",
    "trajectory_gaps",
]
