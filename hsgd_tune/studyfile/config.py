"""Study file (TOML) → frozen dataclasses, validated where it enters.

The study file is split like the config of a careful experiment: what determines a trial's result
(data, model, search space, training, bound, objectives, sampler) and how the study is run (``[run]``:
budget, storage, experiment). Only the former enters :meth:`StudyConfig.fingerprint`, so a study can be
resumed with a larger budget or another storage URL but not with another search space.

Every error is a :class:`ConfigError` naming the file, the key, the rule and the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile import grid

DATA_SOURCES = ("digits", "breast_cancer", "wine", "synthetic", "csv")
TASKS = ("classification", "regression")
MODEL_KINDS = ("mlp", "linear", "cnn", "entry_point")
#: [model] keys of the convolutional model only (kind = "cnn").
CNN_KEYS = ("channels", "image_shape", "kernel_size")
SAMPLERS = ("tpe", "random", "grid", "nsga2")
DEVICES = ("cpu", "cuda", "auto")
#: Objectives a study may minimise; each is a metric every completed trial reports.
OBJECTIVES = (
    "val_loss",
    "val_error",
    "risk_bound",
    "gap_bound",
    "decoupling_distance",
    "train_loss",
    "certificate",
    "heldout_loss",  # the S-model on H (hsgd_tune/certify/estimates.py)
    "crossfit_loss",  # mean of the S-model on H and the H-model on S
)
#: Knobs the trainer itself understands; they leave the theory's scope (plain SGD), so trials using
#: them are tagged as such. Other knob names are passed to a user model's entry point.
TRAINING_KNOBS = ("momentum", "weight_decay")
#: Knobs of the injected α-stable noise ([training.noise] searched); inside the theory.
NOISE_KNOBS = ("noise_alpha", "noise_sigma")
POSTERIOR_KINDS = ("layer", "weight", "isotropic")
DIAGNOSE_TRIALS = ("recommended", "front", "all", "none")  # which trials get certificate and diagnostics


# ---------------------------------------------------------------------------------------------
# The dataclasses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    kind: str = "teacher"
    n_features: int = 20
    n_classes: int = 3
    noise: float = 0.1
    hidden: int = 32


@dataclass(frozen=True)
class DataConfig:
    source: str
    n_train: int
    n_val: int
    n_reference: int | None = None
    n_test: int = 0
    task: str | None = None
    path: Path | None = None
    target: str | None = None
    reference_as_validation: bool = False
    synthetic: SyntheticConfig = SyntheticConfig()


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"
    widths: tuple[int, ...] = (64, 64)
    entry_point: str | None = None
    channels: tuple[int, ...] = ()  # cnn: output channels of each conv + ReLU + 2×2 max-pool block
    image_shape: tuple[int, ...] = ()  # cnn: (channels, height, width) of a row, e.g. (1, 8, 8)
    kernel_size: int = 3  # cnn: odd, "same" padding


@dataclass(frozen=True)
class Knob:
    """One searched hyperparameter: a float or int range (optionally log-scaled) or a choice. Its
    values are snapped to a finite grid (grid.py): ``points_per_decade`` for a log-scaled float range,
    ``grid_points`` for a linear one."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    points_per_decade: int | None = None  # log float ranges
    grid_points: int | None = None  # linear float ranges


@dataclass(frozen=True)
class SearchConfig:
    learning_rate: Knob
    batch_size: Knob
    knobs: tuple[Knob, ...] = ()

    def all_knobs(self) -> tuple[Knob, ...]:
        return (self.learning_rate, self.batch_size, *self.knobs)


@dataclass(frozen=True)
class NoiseConfig:
    """Isotropic α-stable noise added to both runs (DESIGN.md §2, heavy-tailed dynamics); off at σ = 0."""

    alpha: float = 2.0
    sigma: float = 0.0


@dataclass(frozen=True)
class CertificateConfig:
    """The learned-posterior (PAC-Bayes) and perturbed-dynamics certificates (DESIGN.md §2); each takes
    a share of the configuration's δ_λ (grid.py)."""

    enabled: bool = True
    posterior: str = "layer"  # learned variances per "layer" or per "weight", or "isotropic"
    steps: int = 150  # optimisation steps of the posterior
    mc_draws: int = 5  # independent weight draws per example of S for the certified empirical error


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Tail index of the gradient noise and the analytic decoupling bounds; ``trials`` also says which
    trials get the PAC-Bayes certificate."""

    #: "recommended": after the study, the recommended trial and the runner-up (and a trial that is
    #: picked); "front": after the study, the whole Pareto front; "all": inside every trial; "none":
    #: only on request (``hsgd-tune certify``). A study with ``certificate`` among its objectives
    #: certifies every trial whatever this says.
    trials: str = "recommended"
    tail_index: bool = True
    analytic: bool = True
    checkpoints: int = 3  # recorded iterates where α̂ and M̂ are measured
    noise_draws: int = 64  # minibatch gradients per checkpoint for α̂
    fractal: bool = False  # complexity from the covering numbers / dimension of the reference trajectory


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 1000
    record_every: int = 20
    divergence_factor: float = 100.0
    noise: NoiseConfig = NoiseConfig()
    sketch_above: int = 200_000  # models with more parameters record JL sketches (sketch.py)
    sketch_dim: int = 2048  # k, the sketch's dimension


@dataclass(frozen=True)
class BoundConfig:
    delta: float = 0.05
    loss_clip: float = 5.0
    lipschitz_subsample: int = 64
    #: |Λ| the uniform prior over configurations is spread over; None: the search grid's size. Only
    #: larger values are allowed (Σπ ≤ 1); ``pick`` exports set it so a single configuration keeps the
    #: statement its study made.
    grid_size: int | None = None


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "tpe"
    grid_points: int = 5  # grid sampler: learning rates per decade range


@dataclass(frozen=True)
class RunConfig:
    n_trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    experiment: str | None = None
    threads: int | None = None  # torch threads per worker process; None: its share of the cores


@dataclass(frozen=True)
class RankConfig:
    """How ``rank`` recommends one trial: among the finished trials whose ``within`` metric is at most
    ``best + tolerance·|best| + standard_errors·SE(best)``, the one with the smallest ``prefer`` metric
    (SE: the standard error of the best trial's estimate; ``within`` must then be an estimate that
    has one). Like ``[run]``, it changes no trial's result, so it is not part of the fingerprint."""

    # The default (the smallest cross-fit loss) is the rule that benchmarks/selection.py found never
    # worse than validating on V ∪ H and better than V alone with small V (benchmarks/README.md).
    within: str = "crossfit_loss"
    tolerance: float = 0.0
    prefer: str = "risk_bound"  # breaks exact ties only, with tolerance = standard_errors = 0
    standard_errors: float = 0.0


@dataclass(frozen=True)
class StudyConfig:
    name: str
    data: DataConfig
    model: ModelConfig
    search: SearchConfig
    seed: int = 0
    device: str = "cpu"
    training: TrainingConfig = TrainingConfig()
    bound: BoundConfig = BoundConfig()
    objectives: tuple[str, ...] = ("crossfit_loss", "risk_bound")
    certificate: CertificateConfig = CertificateConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    sampler: SamplerConfig = SamplerConfig()
    run: RunConfig = RunConfig()
    rank: RankConfig = RankConfig()
    source_file: Path | None = field(default=None, compare=False)

    @property
    def grid_size(self) -> int:
        """|Λ|, the configurations δ is divided over (DESIGN.md §2: δ_λ = δ·π(λ), π uniform)."""
        return self.bound.grid_size if self.bound.grid_size is not None else grid.grid_size(self.search)

    @property
    def diagnose_every_trial(self) -> bool:
        """Certificate and diagnostics inside every trial (else after the study, or on request)."""
        return self.diagnostics.trials == "all" or "certificate" in self.objectives

    @property
    def experiment_name(self) -> str:
        return self.run.experiment or f"hsgd-{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved config as plain JSON-able values (for logging)."""
        tree = _jsonable(dataclasses.asdict(self))
        if self.model.kind != "cnn":  # other studies' configs, params and fingerprints stay as they were
            for key in CNN_KEYS:
                tree["model"].pop(key)
        return tree

    def fingerprint(self) -> str:
        """Hash of everything that determines trial results (not ``run``, not the file's path)."""
        payload = self.to_dict()
        payload.pop("run")
        payload.pop("rank")
        payload.pop("source_file")
        # Which trials get the diagnostics changes no objective (a certificate objective forces
        # "all"), so it may change between resumes, and studies made before it existed still resume.
        payload["diagnostics"].pop("trials")
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Reading a TOML table with errors that name file, key, rule and value
# ---------------------------------------------------------------------------------------------

_REQUIRED = object()


class _Table:
    """A TOML table being read: typed getters, and :meth:`done` rejects keys nobody asked for."""

    def __init__(self, raw: dict[str, Any], prefix: str):
        self.raw, self.prefix, self.seen = raw, prefix, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def has(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, kind: str, default: Any = _REQUIRED) -> Any:
        self.seen.add(name)
        if name not in self.raw:
            if default is _REQUIRED:
                raise ConfigError(self.key(name), f"is required ({kind})", None)
            return default
        return _check_type(self.key(name), self.raw[name], kind)

    def table(self, name: str, required: bool = False) -> _Table:
        self.seen.add(name)
        raw = self.raw.get(name, _REQUIRED if required else {})
        if raw is _REQUIRED:
            raise ConfigError(self.key(name), "is a required table", None)
        if not isinstance(raw, dict):
            raise ConfigError(self.key(name), "must be a table", raw)
        return _Table(raw, f"{self.key(name)}.")

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            allowed = ", ".join(sorted(self.seen)) or "none"
            name = unknown[0]
            raise ConfigError(self.key(name), f"unknown key (allowed here: {allowed})", self.raw[name])


def _check_type(key: str, value: Any, kind: str) -> Any:
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "list": lambda v: isinstance(v, list),
    }[kind]
    if not ok(value):
        raise ConfigError(key, f"must be {'a' if kind != 'int' else 'an'} {kind}", value)
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, "must be a finite number", value)
    return value


def _positive(table: _Table, name: str, kind: str, default: Any = _REQUIRED) -> Any:
    value = table.get(name, kind, default)
    if value is not None and value <= 0:
        raise ConfigError(table.key(name), "must be positive", value)
    return value


def _one_of(table: _Table, name: str, allowed: tuple[str, ...], default: Any = _REQUIRED) -> Any:
    value = table.get(name, "str", default)
    if value is not None and value not in allowed:
        raise ConfigError(table.key(name), f"must be one of {', '.join(allowed)}", value)
    return value


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


#: Sizes beyond these are typing mistakes, not studies (a synthetic set with 10**9 features, 10**12
#: SGD steps): refused with the rule rather than met with a MemoryError mid-way.
LIMITS = {
    "data.synthetic.n_features": 100_000,
    "data.synthetic.n_classes": 10_000,
    "data.synthetic.hidden": 100_000,
    "data.n_train": 100_000_000,
    "data.n_val": 100_000_000,
    "data.n_reference": 100_000_000,
    "data.n_test": 100_000_000,
    "training.steps": 100_000_000,
    "training.sketch_dim": 100_000,
}


def _check_limits(cfg: Any, prefix: str) -> None:
    for key, limit in LIMITS.items():
        section, _, name = key.rpartition(".")
        if section == prefix and (value := getattr(cfg, name)) is not None and value > limit:
            raise ConfigError(key, f"must be at most {limit:_}", value)


def _read_synthetic(t: _Table) -> SyntheticConfig:
    cfg = SyntheticConfig(
        kind=_one_of(t, "kind", ("teacher", "mixture"), "teacher"),
        n_features=_positive(t, "n_features", "int", 20),
        n_classes=t.get("n_classes", "int", 3),
        noise=t.get("noise", "float", 0.1),
        hidden=_positive(t, "hidden", "int", 32),
    )
    if cfg.n_classes < 2:
        raise ConfigError(t.key("n_classes"), "must be at least 2", cfg.n_classes)
    if cfg.noise < 0:
        raise ConfigError(t.key("noise"), "must be non-negative", cfg.noise)
    _check_limits(cfg, "data.synthetic")
    t.done()
    return cfg


def _read_data(t: _Table, base_dir: Path) -> DataConfig:
    source = _one_of(t, "source", DATA_SOURCES)
    path = t.get("path", "str", None)
    target = t.get("target", "str", None)
    if source == "csv":
        if path is None:
            raise ConfigError(t.key("path"), "is required when source = 'csv'", None)
        if target is None:
            raise ConfigError(t.key("target"), "is required when source = 'csv'", None)
    elif path is not None or target is not None:
        name = "path" if path is not None else "target"
        raise ConfigError(t.key(name), "is only allowed when source = 'csv'", path or target)
    has_synth = t.has("synthetic")
    synthetic = _read_synthetic(t.table("synthetic"))
    if has_synth and source != "synthetic":
        raise ConfigError(t.key("synthetic"), "is only allowed when source = 'synthetic'", source)
    cfg = DataConfig(
        source=source,
        n_train=_positive(t, "n_train", "int"),
        n_val=_positive(t, "n_val", "int"),
        n_reference=_positive(t, "n_reference", "int", None),
        n_test=t.get("n_test", "int", 0),
        task=_one_of(t, "task", TASKS, None),
        path=(base_dir / path).resolve() if path is not None else None,
        target=target,
        reference_as_validation=t.get("reference_as_validation", "bool", False),
        synthetic=synthetic,
    )
    if cfg.n_test < 0:
        raise ConfigError(t.key("n_test"), "must be non-negative", cfg.n_test)
    if cfg.task == "regression" and source in ("digits", "breast_cancer", "wine"):
        raise ConfigError(t.key("task"), f"must be classification for {source}", cfg.task)
    _check_limits(cfg, "data")
    t.done()
    return cfg


def _read_model(t: _Table) -> ModelConfig:
    kind = _one_of(t, "kind", MODEL_KINDS, "mlp")
    widths = t.get("widths", "list", [64, 64] if kind == "mlp" else [])
    for i, w in enumerate(widths):
        if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
            raise ConfigError(t.key(f"widths[{i}]"), "must be a positive integer", w)
    if kind == "linear" and widths:
        raise ConfigError(t.key("widths"), "must be empty for a linear model", widths)
    entry_point = t.get("entry_point", "str", None)
    if (kind == "entry_point") != (entry_point is not None):
        raise ConfigError(t.key("entry_point"), "is required exactly when kind = 'entry_point'", entry_point)
    if kind == "cnn":
        if widths:
            raise ConfigError(t.key("widths"), "must be empty for a cnn (its layers are `channels`)", widths)
        cnn = _read_cnn(t)
        t.done()
        return ModelConfig(kind=kind, widths=(), **cnn)
    for key in CNN_KEYS:
        if t.has(key):
            raise ConfigError(t.key(key), "is only allowed when kind = 'cnn'", t.raw[key])
    t.done()
    return ModelConfig(kind=kind, widths=tuple(widths), entry_point=entry_point)


def _read_cnn(t: _Table) -> dict[str, Any]:
    """channels, image_shape and kernel_size of a CNN; whether image_shape matches the data's
    feature count is checked when the data are loaded (models.build_model)."""
    channels = t.get("channels", "list", [16, 32])
    if not channels:
        raise ConfigError(t.key("channels"), "must name at least one convolution", channels)
    for i, c in enumerate(channels):
        if not isinstance(c, int) or isinstance(c, bool) or c <= 0:
            raise ConfigError(t.key(f"channels[{i}]"), "must be a positive integer", c)
    shape = t.get("image_shape", "list")
    if len(shape) != 3 or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in shape):
        rule = "must be [channels, height, width] of positive integers"
        raise ConfigError(t.key("image_shape"), rule, shape)
    smallest = 2 ** len(channels)  # each block halves height and width (2×2 max-pool)
    if min(shape[1:]) < smallest:
        rule = f"must be at least {smallest}×{smallest} pixels for {len(channels)} pooling blocks"
        raise ConfigError(t.key("image_shape"), rule, shape)
    kernel = _positive(t, "kernel_size", "int", 3)
    if kernel % 2 == 0:
        raise ConfigError(t.key("kernel_size"), "must be odd (same padding)", kernel)
    return {"channels": tuple(channels), "image_shape": tuple(shape), "kernel_size": kernel}


def _read_knob(t: _Table, name: str, default_kind: str) -> Knob:
    if t.has("choices"):
        choices = t.get("choices", "list")
        if not choices:
            raise ConfigError(t.key("choices"), "must not be empty", choices)
        for i, c in enumerate(choices):
            if isinstance(c, (dict, list)):
                raise ConfigError(t.key(f"choices[{i}]"), "must be a number, string or bool", c)
        t.done()
        return Knob(name, "categorical", choices=tuple(choices))
    kind = _one_of(t, "type", ("float", "int"), default_kind)
    log = t.get("log", "bool", default_kind == "float" or name == "batch_size")
    low, high = t.get("low", kind), t.get("high", kind)
    if not low < high:
        raise ConfigError(t.key("high"), f"must exceed low = {low} (empty search range)", high)
    if log and low <= 0:
        raise ConfigError(t.key("low"), "must be positive for a log range", low)
    # The grid Λ (grid.py): fixed here, before any data is seen.
    ppd = points = None
    if kind == "float" and log:
        ppd = _positive(t, "points_per_decade", "int", grid.DEFAULT_POINTS_PER_DECADE)
    elif kind == "float":
        points = t.get("grid_points", "int", grid.DEFAULT_GRID_POINTS)
        if points < 2:
            raise ConfigError(t.key("grid_points"), "must be at least 2 (the range's ends)", points)
    t.done()
    return Knob(name, kind, low=low, high=high, log=log, points_per_decade=ppd, grid_points=points)


def _read_search(t: _Table, model: ModelConfig) -> SearchConfig:
    lr = _read_knob(t.table("learning_rate", required=True), "learning_rate", "float")
    if lr.kind == "categorical" and any(not _is_number(c) or c <= 0 for c in lr.choices):
        raise ConfigError(t.key("learning_rate.choices"), "must be positive numbers", lr.choices)
    if lr.kind != "categorical" and lr.low <= 0:
        raise ConfigError(t.key("learning_rate.low"), "must be positive", lr.low)
    bs = _read_knob(t.table("batch_size", required=True), "batch_size", "int")
    values = bs.choices if bs.kind == "categorical" else (bs.low, bs.high)
    if bs.kind == "float" or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ConfigError(t.key("batch_size"), "must be positive integers", list(values))
    knobs_table = t.table("knobs")
    knobs = []
    for name in sorted(knobs_table.raw):
        knob = _read_knob(knobs_table.table(name), name, "float")
        _check_noise_knob(knobs_table.key(name), knob)
        if model.kind != "entry_point" and name not in (*TRAINING_KNOBS, *NOISE_KNOBS):
            raise ConfigError(
                knobs_table.key(name),
                f"built-in models accept only the knobs {', '.join((*TRAINING_KNOBS, *NOISE_KNOBS))}",
                name,
            )
        knobs.append(knob)
    knobs_table.done()
    t.done()
    return SearchConfig(learning_rate=lr, batch_size=bs, knobs=tuple(knobs))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_noise_knob(key: str, knob: Knob) -> None:
    """noise_alpha must stay in (0, 2] and noise_sigma >= 0 over the whole searched range."""
    if knob.name not in NOISE_KNOBS:
        return
    values = knob.choices if knob.kind == "categorical" else (knob.low, knob.high)
    if any(not _is_number(v) for v in values):
        raise ConfigError(key, "must be numbers", list(values))
    if knob.name == "noise_alpha" and any(not 0 < v <= 2 for v in values):
        raise ConfigError(key, "must lie in (0, 2]", list(values))
    if knob.name == "noise_sigma" and any(v < 0 for v in values):
        raise ConfigError(key, "must be non-negative", list(values))


def _read_noise(t: _Table) -> NoiseConfig:
    cfg = NoiseConfig(alpha=t.get("alpha", "float", 2.0), sigma=t.get("sigma", "float", 0.0))
    if not 0 < cfg.alpha <= 2:
        raise ConfigError(t.key("alpha"), "must lie in (0, 2]", cfg.alpha)
    if cfg.sigma < 0:
        raise ConfigError(t.key("sigma"), "must be non-negative", cfg.sigma)
    t.done()
    return cfg


def _read_certificate(t: _Table) -> CertificateConfig:
    cfg = CertificateConfig(
        enabled=t.get("enabled", "bool", True),
        posterior=_one_of(t, "posterior", POSTERIOR_KINDS, "layer"),
        steps=t.get("steps", "int", CertificateConfig.steps),
        mc_draws=_positive(t, "mc_draws", "int", 5),
    )
    if cfg.steps < 0:
        raise ConfigError(t.key("steps"), "must be non-negative", cfg.steps)
    t.done()
    return cfg


def _read_diagnostics(t: _Table) -> DiagnosticsConfig:
    cfg = DiagnosticsConfig(
        trials=_one_of(t, "trials", DIAGNOSE_TRIALS, "recommended"),
        tail_index=t.get("tail_index", "bool", True),
        analytic=t.get("analytic", "bool", True),
        checkpoints=_positive(t, "checkpoints", "int", 3),
        noise_draws=_positive(t, "noise_draws", "int", 64),
        fractal=t.get("fractal", "bool", False),
    )
    if cfg.noise_draws < 8:
        raise ConfigError(t.key("noise_draws"), "must be at least 8 (α̂ needs blocks)", cfg.noise_draws)
    t.done()
    return cfg


def _read_training(t: _Table) -> TrainingConfig:
    cfg = TrainingConfig(
        steps=_positive(t, "steps", "int", 1000),
        record_every=_positive(t, "record_every", "int", 20),
        divergence_factor=_positive(t, "divergence_factor", "float", 100.0),
        noise=_read_noise(t.table("noise")),
        sketch_above=_positive(t, "sketch_above", "int", 200_000),
        sketch_dim=_positive(t, "sketch_dim", "int", 2048),
    )
    if cfg.record_every > cfg.steps:
        raise ConfigError(t.key("record_every"), f"must not exceed steps = {cfg.steps}", cfg.record_every)
    _check_limits(cfg, "training")
    t.done()
    return cfg


def _read_bound(t: _Table) -> BoundConfig:
    if t.has("max_trials"):  # study files written before the configuration-grid union
        raise ConfigError(
            t.key("max_trials"),
            "is no longer used: δ is divided over the configuration grid (search.*.points_per_decade), "
            "not over trials, so a study may be extended; remove it",
            t.raw["max_trials"],
        )
    cfg = BoundConfig(
        delta=t.get("delta", "float", 0.05),
        loss_clip=_positive(t, "loss_clip", "float", 5.0),
        lipschitz_subsample=_positive(t, "lipschitz_subsample", "int", 64),
        grid_size=_positive(t, "grid_size", "int", None),
    )
    if not 0 < cfg.delta < 1:
        raise ConfigError(t.key("delta"), "must lie strictly between 0 and 1", cfg.delta)
    t.done()
    return cfg


def _read_objectives(t: _Table) -> tuple[str, ...]:
    names = t.get("minimize", "list", list(StudyConfig.objectives))
    if not names:
        raise ConfigError(t.key("minimize"), "must name at least one objective", names)
    for i, name in enumerate(names):
        if name not in OBJECTIVES:
            raise ConfigError(t.key(f"minimize[{i}]"), f"must be one of {', '.join(OBJECTIVES)}", name)
    if len(set(names)) != len(names):
        raise ConfigError(t.key("minimize"), "must not repeat an objective", names)
    t.done()
    return tuple(names)


def _read_sampler(t: _Table) -> SamplerConfig:
    cfg = SamplerConfig(
        kind=_one_of(t, "kind", SAMPLERS, "tpe"),
        grid_points=_positive(t, "grid_points", "int", 5),
    )
    t.done()
    return cfg


def _read_rank(t: _Table) -> RankConfig:
    cfg = RankConfig(
        within=_one_of(t, "within", OBJECTIVES, RankConfig.within),
        tolerance=t.get("tolerance", "float", RankConfig.tolerance),
        prefer=_one_of(t, "prefer", OBJECTIVES, RankConfig.prefer),
        standard_errors=t.get("standard_errors", "float", 0.0),
    )
    if cfg.tolerance < 0:
        raise ConfigError(
            t.key("tolerance"), "must be non-negative (a fraction of the best value)", cfg.tolerance
        )
    check_standard_errors(cfg, t.key("standard_errors"))
    t.done()
    return cfg


#: Objectives that are estimates with a standard error (hsgd_tune/certify/estimates.py), usable with
#: ``[rank] standard_errors``.
ESTIMATES = ("val_loss", "heldout_loss", "crossfit_loss")


def check_standard_errors(rule: RankConfig, key: str) -> None:
    """``standard_errors`` must be >= 0 and needs a ``within`` that has a standard error."""
    if rule.standard_errors < 0:
        raise ConfigError(key, "must be non-negative (a number of standard errors)", rule.standard_errors)
    if rule.standard_errors and rule.within not in ESTIMATES:
        raise ConfigError(
            key,
            f"needs [rank] within to be an estimate with a standard error ({', '.join(ESTIMATES)})",
            rule.within,
        )


def _read_run(t: _Table) -> RunConfig:
    cfg = RunConfig(
        n_trials=_positive(t, "n_trials", "int", 20),
        timeout=_positive(t, "timeout", "float", None),
        storage=t.get("storage", "str", None),
        experiment=t.get("experiment", "str", None),
        threads=_positive(t, "threads", "int", None),
    )
    t.done()
    return cfg


#: A study name becomes a folder name (``mlruns/reports/<name>``), part of a file name (``pick``'s
#: export), an MLflow experiment and model name and a quoted value in MLflow filter strings, so it is
#: kept to characters that are safe in all of them: letters and digits (any script), space and
#: ``_ - . ' + , @ ( )``; no slash, no double quote, no control character.
NAME_MAX_LENGTH = 100
_NAME_PUNCTUATION = frozenset(" _-.'+,@()")


def check_study_name(name: str, key: str = "name") -> str:
    """``name`` if it is a safe study name, else a ConfigError saying which rule it breaks."""
    rule = None
    if not name or name != name.strip():
        rule = "must be non-empty, without leading or trailing spaces"
    elif len(name) > NAME_MAX_LENGTH:
        rule = f"must be at most {NAME_MAX_LENGTH} characters"
    elif name.startswith("."):  # '.', '..', and hidden names: a folder of that name is not the study's
        rule = "must not start with a dot"
    elif bad := [c for c in name if not (c.isalnum() or c in _NAME_PUNCTUATION)]:
        rule = (
            "may hold only letters, digits, spaces and _ - . ' + , @ ( ) "
            f"(not {bad[0]!r}: names become folder names and MLflow filter values)"
        )
    if rule is not None:
        raise ConfigError(key, rule, name)
    return name


def child_path(parent: Path, name: str) -> Path:
    """``parent / name`` for a name from the user or a study, refused unless it stays inside ``parent``
    (defence in depth: names are checked when a study is created, but a study made by an older
    version, or a name typed on the command line, is not)."""
    path = parent / name
    if path.parent != parent or not path.resolve().is_relative_to(parent.resolve()) or name in (".", ".."):
        raise ConfigError("name", f"must not lead outside {parent}", name)
    return path


def _check_entry_point(spec: str, base_dir: Path, import_code: bool) -> None:
    """Fail at load time, not mid-study, when a user's ``module:function`` cannot be imported.
    Importing runs the user's code: commands that only read a study pass ``import_code=False``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("model.entry_point", "must look like 'module:function'", spec)
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    if import_code:
        import_entry_point(spec)


def import_entry_point(spec: str) -> Any:
    """The callable a ``module:function`` entry point names; every failure of the user's module
    (an exception, or ``sys.exit`` while it is imported) is one ConfigError naming it."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # the module ran a script's exit on import
        rule = f"module must import without exiting (it called sys.exit({exc.code!r}) on import)"
        raise ConfigError("model.entry_point", rule, spec) from None
    except Exception as exc:  # any import failure is the user's module's, report it in one line
        reason = str(exc) or type(exc).__name__
        raise ConfigError("model.entry_point", f"module must import ({reason})", spec) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError("model.entry_point", f"must name a callable in {module_name}", spec)
    return factory


def parse_study(raw: dict[str, Any], base_dir: Path, import_code: bool = True) -> StudyConfig:
    """Validate an already-parsed TOML document (relative paths resolve against ``base_dir``).
    ``import_code``: import a user entry point's module (this runs its code) to check it."""
    top = _Table(raw, "")
    name = check_study_name(top.get("name", "str"))
    model = _read_model(top.table("model"))
    cfg = StudyConfig(
        name=name,
        seed=top.get("seed", "int", 0),
        device=_one_of(top, "device", DEVICES, "cpu"),
        data=_read_data(top.table("data", required=True), base_dir),
        model=model,
        search=_read_search(top.table("search", required=True), model),
        training=_read_training(top.table("training")),
        bound=_read_bound(top.table("bound")),
        objectives=_read_objectives(top.table("objectives")),
        sampler=_read_sampler(top.table("sampler")),
        certificate=_read_certificate(top.table("certificate")),
        diagnostics=_read_diagnostics(top.table("diagnostics")),
        run=_read_run(top.table("run")),
        rank=_read_rank(top.table("rank")),
    )
    top.done()
    searched = grid.grid_size(cfg.search)
    if cfg.bound.grid_size is not None and cfg.bound.grid_size < searched:
        raise ConfigError(
            "bound.grid_size",
            f"must be at least the search grid's {searched} configurations (prior weights sum to ≤ 1)",
            cfg.bound.grid_size,
        )
    if "certificate" in cfg.objectives and not cfg.certificate.enabled:
        rule = "may name 'certificate' only when certificate.enabled"
        raise ConfigError("objectives.minimize", rule, "certificate")
    if model.entry_point is not None:
        _check_entry_point(model.entry_point, base_dir, import_code)
    return cfg


def load_study(path: str | Path, import_code: bool = True) -> StudyConfig:
    """Read and validate a study file; every failure is a ConfigError naming ``path``. A study file
    with a model entry point runs code: ``import_code=False`` only checks its form (for commands
    that read a study and build no model)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("(file)", "study file must exist", str(path), file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("(file)", f"study file must be readable UTF-8 ({exc})", str(path), path) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(syntax)", "must be valid TOML", str(exc), file=path) from None
    try:
        cfg = parse_study(raw, path.resolve().parent, import_code)
    except ConfigError as exc:
        raise exc.in_file(path) from None
    return dataclasses.replace(cfg, source_file=path)


def with_run(cfg: StudyConfig, **changes: Any) -> StudyConfig:
    """The same study with some ``[run]`` settings overridden (e.g. from the command line)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    # Any budget: δ is divided over the configuration grid, not over trials (grid.py).
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **changes))
