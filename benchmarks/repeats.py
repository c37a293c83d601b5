"""How many trials does a study spend on a configuration it already has?

Each sampler (TPE, random, NSGA-II) proposes configurations on the quick-start's grid Λ (20 trials) and
on a 30-point grid (24 trials), against a synthetic objective with one optimum (no training: the
count depends only on the sampler), for 5 study seeds. The sampler of this checkout runs side by side
with the one of an earlier revision (its ``hsgd_tune/search/study.py`` read from git).

    python benchmarks/repeats.py --against fe4ecf8~1   # before the sampler kept off taken configurations
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsgd_tune.search import study as current  # noqa: E402
from hsgd_tune.studyfile.config import load_study  # noqa: E402


def study_module_at(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:hsgd_tune/search/study.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "study_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("study_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repeats(module, cfg, n_trials: int, seed: int) -> int:
    cfg = dataclasses.replace(cfg, seed=seed)
    study = optuna.create_study(directions=["minimize"] * 2, sampler=module.make_sampler(cfg, 0))
    seen = []
    for _ in range(n_trials):
        trial = study.ask()
        params = module.sample_params(trial, cfg)
        seen.append(tuple(params.values()))
        study.tell(trial, [abs(math.log10(params["learning_rate"]) + 1.5), abs(params["batch_size"] - 32)])
    return n_trials - len(set(seen))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", required=True, help="git revision whose sampler to compare with")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    before = study_module_at(args.against)
    quickstart = load_study(REPO / "studies" / "quickstart.toml")
    print(f"repeated trials per study ({args.seeds} seeds), {args.against} → this checkout")
    for kind in ("tpe", "random", "nsga2"):
        cfg = dataclasses.replace(quickstart, sampler=dataclasses.replace(quickstart.sampler, kind=kind))
        rate = dataclasses.replace(cfg.search.learning_rate, low=1e-3, high=1.0, points_per_decade=3)
        batch = dataclasses.replace(cfg.search.batch_size, choices=(16, 32, 64))
        small = dataclasses.replace(
            cfg, search=dataclasses.replace(cfg.search, learning_rate=rate, batch_size=batch)
        )
        for label, grid_cfg, n in (
            ("quick-start grid, 20 trials", cfg, 20),
            ("30-point grid, 24 trials", small, 24),
        ):
            old = [repeats(before, grid_cfg, n, s) for s in range(args.seeds)]
            new = [repeats(current, grid_cfg, n, s) for s in range(args.seeds)]
            print(f"  {kind:6s} {label:28s} before {old}  now {new}")


if __name__ == "__main__":
    main()
