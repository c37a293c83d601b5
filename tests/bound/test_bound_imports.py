"""The bound engine imports without the heavy stack (DESIGN.md §1; STYLE.md §9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_importing_bound_imports_neither_torch_optuna_nor_mlflow():
    code = (
        "import hsgd_tune.bound, sys; "
        "heavy = {'torch', 'optuna', 'mlflow'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_bound_exports_its_public_api():
    from hsgd_tune import bound

    assert sorted(bound.__all__) == [
        "Certificate",
        "TrajectoryBound",
        "binary_kl",
        "certificate",
        "complexity_term",
        "configuration_delta",
        "contractive_bound",
        "covering_complexity",
        "fractal_complexity",
        "gaussian_kl",
        "geometric_grid",
        "gronwall_bound",
        "hausdorff_distance",
        "heldout_certificate",
        "heldout_upper",
        "kl_inverse_upper",
        "lipschitz_estimate",
        "mc_error_upper",
        "nearest_points",
        "one_way_distance",
        "pac_bayes_kl_bound",
        "perturbed_bounds",
        "synchronous_distance",
        "tail_index",
        "trajectory_bound",
        "trajectory_gaps",
    ]
