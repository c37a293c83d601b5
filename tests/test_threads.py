"""Torch threads never oversubscribe the cores (issue #17): run --threads, worker --threads,
[run] threads, and a default that shares the process's cores among its workers."""

from __future__ import annotations

import os

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from hsgd_tune.cli.main import main
from hsgd_tune.errors import ConfigError
from hsgd_tune.search.worker import available_cores, default_threads, set_threads
from hsgd_tune.studyfile.config import parse_study, with_run

BASE = {
    "name": "t",
    "data": {"source": "digits", "n_train": 100, "n_val": 100},
    "search": {"learning_rate": {"low": 0.01, "high": 0.1}, "batch_size": {"choices": [8]}},
}


@pytest.fixture
def four_cores(monkeypatch):
    """A process allowed on 4 cores of a larger machine (a container, taskset), all idle."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))


def test_the_default_is_the_process_share_of_its_cores_not_the_machine(four_cores):
    assert available_cores() == 4
    assert [default_threads(k) for k in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


def test_the_default_leaves_the_cores_other_processes_keep_busy(four_cores, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))  # 2.6 cores' worth already running
    assert [default_threads(k) for k in (1, 2, 4)] == [1, 1, 1]
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))  # overloaded: still one
    assert default_threads(1) == 1


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores NumPy's BLAS threads on exit
        yield
    torch.set_num_threads(threads)


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_set_threads_sets_torch_and_blas_threads_and_defaults_within_the_cores(four_cores, restore_threads):
    assert set_threads(1) == 1 and torch.get_num_threads() == 1 and _blas_threads() <= {1}
    assert set_threads(None, workers=2) == 2 and torch.get_num_threads() == 2


def test_run_section_takes_threads_and_the_command_line_overrides_it(tmp_path):
    cfg = parse_study({**BASE, "run": {"threads": 2}}, tmp_path)
    assert cfg.run.threads == 2
    assert with_run(cfg, threads=1).run.threads == 1
    assert with_run(cfg, threads=None).run.threads == 2
    fingerprint = parse_study(BASE, tmp_path).fingerprint()
    assert cfg.fingerprint() == fingerprint  # how a study runs is not what it is


def test_zero_threads_in_the_study_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_study({**BASE, "run": {"threads": 0}}, tmp_path)
    assert info.value.key == "run.threads"


@pytest.mark.parametrize("command", ["run", "worker"])
def test_threads_below_one_on_the_command_line_is_one_line_and_exit_2(command, tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text('name = "t"\n')  # never read: the option is checked first
    assert main([command, str(study), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
