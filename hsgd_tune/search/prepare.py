"""Before a study exists: the data loaded and the model checked, so a mistake leaves no trace."""

from __future__ import annotations

import os

from hsgd_tune.data.datasets import Dataset, load_dataset
from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile.config import StudyConfig
from hsgd_tune.train.model_check import check_model


def prepare(cfg: StudyConfig) -> Dataset:
    """Load the data and build the model once; every failure names the study file."""
    try:
        try:
            data = load_dataset(cfg.data, cfg.seed)
        except MemoryError:
            raise ConfigError("data", "must fit in memory (lower the split sizes)", cfg.data.source) from None
        largest_batch = max(_knob_values(cfg.search.batch_size))
        if largest_batch > len(data.train.y):
            raise ConfigError(
                "search.batch_size",
                f"must not exceed the {len(data.train.y)} training examples",
                largest_batch,
            )
        n_parameters = check_model(cfg, data)  # built, one batch forward and backward, output size
        check_recording_memory(cfg, n_parameters)
    except ConfigError as exc:
        raise exc.in_file(cfg.source_file) if cfg.source_file else exc from None
    return data


def check_recording_memory(cfg: StudyConfig, n_parameters: int) -> None:
    """Both recorded trajectories must fit in this machine's memory (float32 iterates, or sketches)."""
    t = cfg.training
    width = n_parameters if n_parameters <= t.sketch_above else t.sketch_dim
    needed = 2 * (t.steps // t.record_every + 2) * width * 4
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no limit known
        return
    if needed > memory:
        raise ConfigError(
            "training.record_every",
            f"records {t.steps // t.record_every + 2} iterates of {width} numbers per run "
            f"({needed / 2**30:.3g} GiB), more than this machine's {memory / 2**30:.3g} GiB; "
            "record less often",
            t.record_every,
        )


def _knob_values(knob) -> list:
    return list(knob.choices) if knob.kind == "categorical" else [knob.low, knob.high]
