"""Torch-side measurements behind the certificate, the tail index and the analytic bounds.

Everything here evaluates a trained model at recorded iterates (flat (p,) vectors of a twin run); the
arithmetic that turns the measurements into bounds is pure NumPy/SciPy in :mod:`hsgd_tune.bound`.

* :func:`fit_posterior`: the PAC-Bayes posterior ``Q = N(μ, diag s²)`` (per-layer or per-weight
  variances, learned mean) minimising a differentiable relaxation of the bound on S, as Dziugaite &
  Roy (2017) did, with the prior ``N(w_H, λ I)`` centred on the reference run; or DESIGN.md's
  isotropic ``Q = N(w_S, σ²I)``.
* :func:`draw_errors`: the Monte-Carlo errors of weights drawn from Q (for the certificate on S, and
  for the perturbed model's test error in benchmarks).
* :func:`iterate_risks`, :func:`mean_gradient_norms`, :func:`trajectory_measures`: the risks on S at
  recorded iterates and L_pop, behind the trajectory gap bound (every trial).
* :func:`heldout`: the held-out certificate of the S-model (every trial).
* :func:`perturbed_errors`: the Monte Carlo behind the perturbed-dynamics certificate.
* :func:`gradient_noise`: minibatch minus full-batch gradients on S, for the tail index.
* :func:`top_hessian_eigenvalue`, :func:`gradient_mismatch`: M̂ and Ê of the analytic bounds.
* :func:`measure`: all of it for one trial, as loggable metrics and assumption tags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from hsgd_tune import bound
from hsgd_tune.certify import backprop
from hsgd_tune.train.twin import (
    H_RUN,
    S_RUN,
    grouping_plan,
    per_example_error,
    per_example_loss,
    stack_plan_parameters,
    stacked_forward,
)

#: Prior standard deviations the certificate may use; fixed before seeing S (union bound over them).
PRIOR_STD_GRID = bound.geometric_grid(1e-4, 1.0, 41)
#: Adam's step sizes for Q's mean and log standard deviations (benchmarks/posterior_settings.py).
MEAN_LR, STD_LR = 7.5e-3, 0.05
POSTERIOR_KINDS = ("layer", "weight", "isotropic")


# ---------------------------------------------------------------------------------------------
# A model as a function of a flat weight vector
# ---------------------------------------------------------------------------------------------


class FlatModel:
    """``model`` evaluated at flat weight vectors (the coordinates of a trajectory)."""

    def __init__(self, model: nn.Module, task: str):
        self.model, self.task = model, task
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]
        self.chain = _linear_chain(self)  # a chain of Linear and unit-wise layers, or None

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def group_index(self) -> torch.Tensor:
        """(p,) the parameter tensor (layer weight or bias) each coordinate belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(p,) weights, (n, d) inputs → (n, k) outputs. A chain of Linear and unit-wise layers (the
        built-in MLP and linear models) by the same ``F.linear`` calls its modules make (the same
        numbers and gradients, tests/test_certificate_equivalence.py) without ``functional_call``'s
        set-up on every call; any other model through ``functional_call``."""
        if self.chain is not None:
            return backprop.forward(self.chain, self.params(flat), x)[0]
        return functional_call(self.model, self.params(flat), (x,))

    def forward_many(self, flats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(m, p) weights → (m, n, k) outputs, one batched pass."""
        return vmap(self.forward, in_dims=(0, None))(flats, x)

    def loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean training loss (the unclipped ℓ SGD descends) at one weight vector."""
        return per_example_loss(self.forward(flat, x), y, self.task).mean()


def _bounded_error(out: torch.Tensor, y: torch.Tensor, task: str, loss_clip: float) -> torch.Tensor:
    """(..., n) out → (..., n) errors in [0, 1]: the 0-1 error, or ``ℓ_B/B`` for regression."""
    if task == "classification":
        return per_example_error(out, y.expand(out.shape[:-1]), task)
    return per_example_loss(out, y.expand(out.shape[:-1]), task).clamp(max=loss_clip) / loss_clip


def _soft_error(out: torch.Tensor, y: torch.Tensor, task: str, loss_clip: float) -> torch.Tensor:
    """Differentiable stand-in for :func:`_bounded_error` (training the posterior only): ``1 - p_y``."""
    if task == "classification":
        p_y = torch.softmax(out, dim=-1).gather(-1, y.expand(out.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return 1.0 - p_y
    return per_example_loss(out, y.expand(out.shape[:-1]), task).clamp(max=loss_clip) / loss_clip


def derived_seed(settings: Any, purpose: str) -> int:
    """A Monte-Carlo seed from (study seed, configuration, purpose): two configurations, or two
    purposes within one, never share their random draws, and a configuration re-evaluated draws the
    same ones (its statement is repeated, not renewed)."""
    fields = dataclasses.asdict(settings)
    key = json.dumps({"config": fields, "purpose": purpose}, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


# ---------------------------------------------------------------------------------------------
# Risks along both trajectories, L_pop and the held-out certificate (every trial: cheap)
# ---------------------------------------------------------------------------------------------


#: Weight vectors per stacked pass of the functions below. Small chunks keep each pass's activations
#: in cache: on the CNN of studies/cnn_digits.toml (V = 500 rows, 96 points) the L_pop gradients
#: took 0.23 s in chunks of 4 and 0.34 s in chunks of 32; chunks of 1 pay the per-pass overhead.
CHUNK = 4


def _stacked(iterates: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(iterates), dtype=torch.float32)


def _forward_many(fm: FlatModel, flats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(m, p) weights; (n, d) inputs shared by all, or (m, n, d), model i on its own rows x[i] →
    (m, n, k) outputs, as ``fm.forward_many`` (or ``vmap(fm.forward)`` for own rows). A model of
    :func:`~hsgd_tune.train.twin.grouping_plan`'s layers (the built-in MLP and CNN, a user's Sequential of
    common layers) takes one stacked pass (:func:`~hsgd_tune.train.twin.stacked_forward`: batched matrix
    products, one convolution of all m models' channels, channels-last pooling) instead of
    ``vmap(functional_call)``, whose batching rules copy every activation to move the model dimension
    in and out of the channels (several times slower for a CNN); equal to float rounding
    (tests/test_diagnostics_trajectory.py), bit for bit in the certificates' uses on the built-in
    models (tests/test_certificate_equivalence.py)."""
    plan = grouping_plan(fm.model)
    if plan is None:
        return fm.forward_many(flats, x) if x.dim() == 2 else vmap(fm.forward)(flats, x)
    m = flats.shape[0]
    params = [c.view(m, *shape) for c, shape in zip(flats.split(fm.sizes, dim=1), fm.shapes, strict=True)]
    return stacked_forward(plan, stack_plan_parameters(plan, params), x)


def _per_iterate(fm: FlatModel, iterates: np.ndarray, x: torch.Tensor, summary, chunk: int) -> np.ndarray:
    """(m,) ``summary(outputs)`` at each of the (m, p) iterates, in stacked passes of ``chunk``;
    ``summary`` maps (c, n, k) outputs to (c,)."""
    with torch.no_grad():
        return torch.cat([summary(_forward_many(fm, w, x)) for w in _stacked(iterates).split(chunk)]).numpy()


def iterate_risks(
    fm: FlatModel,
    iterates: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_clip: float,
    chunk: int = CHUNK,
) -> np.ndarray:
    """(m,) ``R̂_B(w) = mean_i min(ℓ(w, z_i), B)`` on (x, y) at each of the (m, p) iterates."""

    def risk(logits: torch.Tensor) -> torch.Tensor:
        losses = per_example_loss(logits, y.expand(logits.shape[:-1]), fm.task).clamp(max=loss_clip)
        return losses.mean(dim=1).double()

    return _per_iterate(fm, iterates, x, risk, chunk)


def iterate_errors(
    fm: FlatModel,
    iterates: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_clip: float,
    chunk: int = CHUNK,
) -> np.ndarray:
    """(m,) mean bounded error (0-1, or ``ℓ_B/B`` for regression) on (x, y) at each iterate."""

    def error(logits: torch.Tensor) -> torch.Tensor:
        # In float64: a mean of n float32 zeros and ones would not be an exact count over n.
        return _bounded_error(logits, y, fm.task, loss_clip).double().mean(dim=1)

    return _per_iterate(fm, iterates, x, error, chunk)


def mean_gradient_norms(
    fm: FlatModel, points: np.ndarray, x: torch.Tensor, y: torch.Tensor, loss_clip: float, chunk: int = CHUNK
) -> np.ndarray:
    """(m,) ``‖∇_w mean_i min(ℓ(w, z_i), B)‖`` at each of the (m, p) points: the gradient of the
    clipped empirical risk on (x, y), an estimate of the population risk's gradient when (x, y) is
    independent of the points' choice. One backward pass per chunk: each point's loss depends on
    its own row only, so the gradient of their sum holds every point's gradient."""
    norms = []
    for w in _stacked(points).split(chunk):
        w = w.clone().requires_grad_(True)
        logits = _forward_many(fm, w, x)
        risk = per_example_loss(logits, y.expand(logits.shape[:-1]), fm.task).clamp(max=loss_clip).mean(dim=1)
        (grad,) = torch.autograd.grad(risk.sum(), w)
        norms.append(torch.linalg.vector_norm(grad, dim=1).detach())
    return torch.cat(norms).double().numpy()


#: Where on each segment [w^H_j(k), w^S_k] the mean gradient is measured (0: the H end, 1: the S end).
SEGMENT_POINTS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class TrajectoryMeasures:
    """What the trajectory gap bound needs beyond the iterates (bound.trajectory_bound)."""

    risks_s: np.ndarray  # (N,) R̂_{S,B}(w^S_k)
    risks_h: np.ndarray  # (N,) R̂_{S,B}(w^H_j)
    lipschitz_pop: float  # max of the mean-gradient norms on V along the segments


def trajectory_measures(data, run, loss_clip: float) -> TrajectoryMeasures | None:
    """Risks on S at every recorded iterate of both runs, and L_pop on V (independent of S) along
    the segments from each S-iterate to its nearest H-iterate; None for sketched trajectories."""
    fm = FlatModel(run.model, data.task)
    if run.trajectories.shape[2] != fm.n_params:
        return None
    traj_s, traj_h = (run.trajectories[r].astype(np.float64) for r in (S_RUN, H_RUN))
    train, val = _tensors(data.train, data.task), _tensors(data.val, data.task)
    with _one_thread_and_blas():
        nearest, _ = bound.nearest_points(traj_s, traj_h)
        # Each distinct segment once; t = 0 is an H-iterate, shared by the S-iterates paired with it.
        pairs = sorted(set(zip(nearest.tolist(), range(len(traj_s)), strict=True)))
        ends = traj_h[sorted(set(nearest.tolist()))]
        inner = [traj_h[j] + t * (traj_s[k] - traj_h[j]) for j, k in pairs for t in SEGMENT_POINTS if t > 0]
        points = np.concatenate([ends, np.asarray(inner)]) if inner else ends
        risks = iterate_risks(fm, np.concatenate([traj_s, traj_h]), *train, loss_clip)
        grads = mean_gradient_norms(fm, points, *val, loss_clip)
    n = len(traj_s)
    return TrajectoryMeasures(risks[:n], risks[n:], float(np.max(grads)))


def heldout(cfg, data, run, delta: float) -> Measurements:
    """The held-out certificate (DESIGN.md §2): the errors on H of the final S-model and of every
    recorded S-iterate (the S-run never trains on H), turned into kl-inverse binomial bounds with the
    configuration's held-out share ``delta`` of δ_λ."""
    out = Measurements()
    fm = FlatModel(run.model, data.task)
    x, y = _tensors(data.reference, data.task)
    with _one_thread():
        if run.trajectories.shape[2] == fm.n_params:
            errors = iterate_errors(fm, run.trajectories[S_RUN], x, y, cfg.bound.loss_clip)
        else:  # sketched: only the final model is at hand
            with torch.no_grad():
                errors = _bounded_error(run.model(x), y, data.task, cfg.bound.loss_clip).double().mean()
            errors = errors.reshape(1).numpy()
    last, every = bound.heldout_certificate(errors, len(y), delta)
    out.metrics["certificate/heldout_error"] = last
    out.metrics["certificate/heldout_measured"] = float(errors[-1])
    out.tags |= {f"hsgd.assumption.{k}": v for k, v in bound.heldout.assumptions().items()}
    if errors.size > 1:
        out.metrics["certificate/heldout_error_max"] = every
    out.tags["hsgd.assumption.certificate/heldout_measured"] = "measured: mean error of the S-model on H"
    return out


class _one_thread:
    """Many small tensor ops: one thread avoids the spin-waiting that costs several times more CPU
    when the machine is shared; restored on exit."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


class _one_thread_and_blas(_one_thread):
    """:class:`_one_thread`, and one thread for NumPy's BLAS too (threadpoolctl, which MLflow's
    scikit-learn brings; skipped without it): on a busy 2-core machine the nearest-iterate search's
    matrix products took 0.3 s a trial with OpenBLAS's two threads, 0.01 s with one. The search's
    result does not depend on it (its distances are direct differences)."""

    def __enter__(self):
        super().__enter__()
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - a dependency of scikit-learn, hence of MLflow
            self.blas = None
        else:
            self.blas = threadpool_limits(limits=1, user_api="blas")

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.blas is not None:
            self.blas.restore_original_limits()


# ---------------------------------------------------------------------------------------------
# The PAC-Bayes posterior and its Monte-Carlo errors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posterior:
    """``Q = N(mean, diag std²)`` and the prior ``N(prior_mean, prior_std² I)`` it is certified against."""

    mean: np.ndarray  # (p,)
    std: np.ndarray  # (p,)
    prior_mean: np.ndarray  # (p,) the reference run's final weights
    prior_std: float  # a point of PRIOR_STD_GRID
    kind: str

    @property
    def kl(self) -> float:
        return bound.gaussian_kl(self.mean, self.std**2, self.prior_mean, self.prior_std**2)


class _Adam:
    """``torch.optim.Adam`` (default betas and ε, no weight decay) as its single-tensor path updates
    CPU tensors, operation for operation, so the posterior is bit for bit the one torch's optimiser
    finds (tests/test_certificate_equivalence.py), without its per-step hooks and without importing
    ``torch._dynamo``, which ``torch.optim`` does on first use (over a second per process)."""

    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, groups: list[tuple[torch.Tensor, float]]):
        self.groups = [
            (p, lr, torch.zeros_like(p, memory_format=torch.preserve_format), torch.zeros_like(p))
            for p, lr in groups
        ]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: tuple[torch.Tensor, ...]) -> None:
        self.steps += 1
        b1, b2, step = self.BETA1, self.BETA2, float(self.steps)
        bias_correction1, bias_correction2 = 1 - b1**step, 1 - b2**step
        for (param, lr, exp_avg, exp_avg_sq), grad in zip(self.groups, grads, strict=True):
            exp_avg.lerp_(grad, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.EPS)
            param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


#: Parameter-free layers that act on each unit of each row on its own.
_UNITWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.Identity)


def _linear_chain(fm: FlatModel) -> list | None:
    """The model as a list of ``(weight name, bias name or None)`` for each ``nn.Linear`` and the
    unit-wise modules between them, when it is an ``nn.Sequential`` of only those (the built-in MLP
    and linear models) whose Linear layers hold every parameter; None for any other model."""
    model = fm.model
    if type(model) is not nn.Sequential:
        return None
    chain, covered = [], set()
    modules = list(model._modules.items())  # named_children() would skip a module used twice
    if len({id(m) for _, m in modules}) != len(modules):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None  # functional_call would run them
    for name, module in modules:
        if type(module) is nn.Linear:
            bias = f"{name}.bias" if module.bias is not None else None
            chain.append((f"{name}.weight", bias))
            covered |= {f"{name}.weight", bias} - {None}
        elif type(module) in _UNITWISE:
            chain.append(module)
        else:
            return None
    return chain if covered == set(fm.names) and len(fm.names) == len(covered) else None


def _kl_torch(mean, var_q, prior_mean, var_p):
    ratio = var_q / var_p
    return 0.5 * ((ratio - 1.0 - torch.log(ratio)).sum() + (mean - prior_mean).pow(2).sum() / var_p)


def fit_posterior(
    fm: FlatModel,
    w_s: np.ndarray,
    w_h: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kind: str = "layer",
    steps: int = 150,
    delta: float = 0.01,
    loss_clip: float = 5.0,
    batch: int = 128,
    check_every: int = 25,
    seed: int = 0,
) -> Posterior:
    """Minimise a relaxation of the PAC-Bayes-kl bound over Q on S (Dziugaite & Roy 2017, §3).

    The relaxation is ``(sqrt(ê + c/2) + sqrt(c/2))²`` with ``c = (KL + ln(2√n/δ'))/n`` (from
    ``kl(ê‖e) >= (e-ê)²/(2e)``), ê the soft error ``1 - p_y`` of one reparameterised draw per step on a
    random ``batch`` of S (Adam; the certificate itself is evaluated afterwards on all of S; a chain
    model's gradients are written out, backprop.py). The defaults — 150 steps on minibatches of 128, a
    larger step for the mean (MEAN_LR) — found tighter certificates than 300 steps on all of S did, in
    a quarter of the time, on the MLP and the CNN (benchmarks/posterior_settings.py); any Q is
    allowed, the certificate holds for each. The prior
    variance is set to its KL-optimal value ``(Σ s² + ‖μ - w_H‖²)/p`` at each step and snapped to the
    grid at the end (the grid point of least KL). Every ``check_every`` steps the current Q is scored by
    the actual bound with an 8-draw Monte Carlo of the error; the best snapshot is returned.
    ``kind``: ``"layer"`` (one variance per parameter tensor), ``"weight"`` (one per weight) or
    ``"isotropic"`` (DESIGN.md's ``N(w_S, σ²I)`` against ``N(w_H, σ²I)``, σ the grid point of least
    relaxed bound).
    """
    if kind not in POSTERIOR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(POSTERIOR_KINDS)}, got {kind!r}")
    if kind == "isotropic":
        return _isotropic_posterior(fm, w_s, w_h, x, y, delta, loss_clip, seed)
    gen = torch.Generator().manual_seed(seed)
    n, p = len(y), fm.n_params
    prior_mean = torch.as_tensor(w_h, dtype=torch.float32)
    mean = torch.as_tensor(w_s, dtype=torch.float32).clone().requires_grad_(True)
    groups = fm.group_index() if kind == "layer" else torch.arange(p)
    start = max(float(torch.linalg.vector_norm(mean.detach() - prior_mean)) / math.sqrt(p), 1e-4)
    log_std = torch.full((int(groups.max()) + 1,), math.log(start), requires_grad=True)
    optimiser = _Adam([(mean, MEAN_LR), (log_std, STD_LR)])
    by_hand = _by_hand(fm)
    confidence = math.log(2.0 * math.sqrt(n) / delta)
    best = (math.inf, mean.detach().clone(), log_std.detach().clone())
    for step in range(steps + 1):
        if step % check_every == 0 or step == steps:
            # The relaxation rewards confidence the 0-1 error does not; keep the snapshot whose
            # bound, with a small Monte Carlo of the actual error, is lowest.
            best = min(
                best,
                _snapshot(fm, mean, log_std, groups, prior_mean, x, y, loss_clip, n, delta, seed + step),
                key=lambda t: t[0],
            )
        if step == steps:
            break
        noise = torch.randn(p, generator=gen)
        idx = torch.randperm(n, generator=gen)[:batch]
        relaxation = _relaxation_by_hand if by_hand else _relaxation_by_autograd
        optimiser.step(
            relaxation(fm, mean, log_std, groups, prior_mean, noise, x[idx], y[idx], confidence, n, loss_clip)
        )
    mean_np = best[1].numpy().astype(np.float64)
    std_np = torch.exp(best[2])[groups].numpy().astype(np.float64)
    kls = [bound.gaussian_kl(mean_np, std_np**2, w_h, s**2) for s in PRIOR_STD_GRID]
    return Posterior(
        mean_np, std_np, np.asarray(w_h, np.float64), float(PRIOR_STD_GRID[np.argmin(kls)]), kind
    )


def _relaxation_by_autograd(fm, mean, log_std, groups, prior_mean, noise, x, y, confidence, n, loss_clip):
    """∇ of the relaxed bound w.r.t. (mean, log_std) at the draw ``mean + std · noise``, on (x, y)."""
    var_q = torch.exp(2.0 * log_std)[groups]
    var_p = (var_q.sum() + (mean - prior_mean).pow(2).sum()) / len(mean)
    kl = _kl_torch(mean, var_q, prior_mean, var_p)
    err = _soft_error(fm.forward(mean + var_q.sqrt() * noise, x), y, fm.task, loss_clip).mean()
    c = (kl + confidence) / n
    relaxed = (torch.sqrt(err + c / 2) + torch.sqrt(c / 2)) ** 2
    return torch.autograd.grad(relaxed, (mean, log_std))


def _relaxation_by_hand(fm, mean, log_std, groups, prior_mean, noise, x, y, confidence, n, loss_clip):
    """:func:`_relaxation_by_autograd` with the chain rule written out, for a chain model (backprop.py).

    With the prior variance at its KL-optimal value ``v = A/p``, ``A = Σ s² + ‖μ - w_H‖²``, the KL is
    ``(p ln(A/p) - Σ ln s²)/2``; its gradients are ``p (μ - w_H)/A`` in μ and ``p s²/A - 1`` in each
    weight's ln s (v's own derivative drops out at its optimum, so these are what autograd finds
    through v). The draw ``μ + s·ε`` passes the network's gradient g on as g to μ and g·ε·s to ln s."""
    with torch.no_grad():
        p = len(mean)
        std = torch.exp(log_std)[groups]
        var_q = std * std
        diff = mean - prior_mean
        total = float(var_q.sum() + diff.dot(diff))
        kl = 0.5 * (p * math.log(total / p) - float(torch.log(var_q).sum()))
        draw = mean + std * noise
        params = fm.params(draw)
        out, saved = backprop.forward(fm.chain, params, x)
        err, grad_out = _soft_error_gradient(out, y, fm.task, loss_clip)
        network = torch.empty(p)
        backprop.backward(fm.chain, params, saved, grad_out, fm.params(network))
        c = (kl + confidence) / n
        s1, s2 = math.sqrt(err + c / 2), math.sqrt(c / 2)
        d_err = (s1 + s2) / s1  # ∂ relaxed / ∂ err
        d_kl = (s1 + s2) * (1 / s1 + 1 / s2) / 2 / n  # ∂ relaxed / ∂ KL
        g_mean = network.mul_(d_err)
        g_weight_std = g_mean * noise * std + d_kl * (var_q * (p / total) - 1.0)
        g_mean.add_(diff, alpha=d_kl * p / total)
        return g_mean, torch.zeros_like(log_std).index_add_(0, groups, g_weight_std)


def _soft_error_gradient(out: torch.Tensor, y: torch.Tensor, task: str, loss_clip: float):
    """(mean of :func:`_soft_error` on the rows, its gradient w.r.t. the (rows, k) outputs)."""
    rows = len(y)
    if task == "classification":
        probs = torch.softmax(out, dim=-1)
        p_y = probs.gather(1, y.unsqueeze(1))  # (rows, 1)
        grad = (probs * p_y).scatter_add_(1, y.unsqueeze(1), -p_y)  # ∂(1 - p_y)/∂out = p_y (p - e_y)
        return 1.0 - float(p_y.mean()), grad.div_(rows)
    residual = out.squeeze(-1) - y
    squared = residual * residual
    err = float(squared.clamp(max=loss_clip).mean()) / loss_clip
    grad = torch.where(squared <= loss_clip, residual * (2.0 / (loss_clip * rows)), 0.0)
    return err, grad.unsqueeze(-1)


def _snapshot(fm, mean, log_std, groups, prior_mean, x, y, loss_clip, n, delta, seed, draws=8):
    """(pilot bound, mean, log_std) at the current Q: 8 draws of the bounded error on S, the KL with
    the KL-optimal prior variance, Maurer's kl-inverse."""
    mean_c, log_std_c = mean.detach().clone(), log_std.detach().clone()
    std = torch.exp(log_std_c)[groups]
    var_p = float((std.pow(2).sum() + (mean_c - prior_mean).pow(2).sum()) / len(mean_c))
    kl = float(_kl_torch(mean_c, std.pow(2), prior_mean, var_p))
    err = float(draw_errors(fm, mean_c.numpy(), std.numpy(), x, y, draws, loss_clip, seed).mean())
    return bound.pac_bayes_kl_bound(err, kl, n, delta), mean_c, log_std_c


def _isotropic_posterior(fm, w_s, w_h, x, y, delta, loss_clip, seed) -> Posterior:
    """σ from the grid by a small pilot Monte Carlo of the relaxed bound (fresh draws certify later)."""
    n = len(y)
    dist2 = float(np.sum((np.asarray(w_s, np.float64) - w_h) ** 2))
    best, best_std = math.inf, float(PRIOR_STD_GRID[0])
    for std in PRIOR_STD_GRID:
        c = (dist2 / (2 * std**2) + math.log(2.0 * math.sqrt(n) / delta)) / n
        if c >= 1.0:
            continue
        err = float(draw_errors(fm, w_s, np.full_like(w_s, std), x, y, 16, loss_clip, seed).mean())
        relaxed = (math.sqrt(err + c / 2) + math.sqrt(c / 2)) ** 2
        if relaxed < best:
            best, best_std = relaxed, float(std)
    full = np.full(len(w_s), best_std)
    return Posterior(np.asarray(w_s, np.float64), full, np.asarray(w_h, np.float64), best_std, "isotropic")


def pointwise_draw_errors(
    fm: FlatModel,
    mean: np.ndarray,
    std: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    draws: int,
    loss_clip: float = 5.0,
    seed: int = 0,
    chunk: int = 2000,
    local: bool = True,
) -> np.ndarray:
    """(n, draws) errors, each (example, draw) pair with its *own* independent weights ``w ~ Q``.

    All n·draws terms are independent given S, with mean ``ê_Q``; Hoeffding's (1963, Thm 1) kl form
    then bounds ê_Q with n·draws in place of the number of draws (:func:`bound.mc_error_upper`), far
    tighter than re-using one draw on all of S at the same cost in random numbers.

    For a chain of ``nn.Linear`` and unit-wise layers (:func:`_linear_chain`: the built-in MLP and
    linear models) the weights are not drawn: each pair's network output is drawn from exactly its
    distribution under its own weights (:func:`_sampled_outputs`, the local reparameterisation of
    Kingma et al. 2015), with a few random numbers per hidden unit instead of one per weight. Any
    other model (and ``local=False``) draws the (n·draws, p) weights themselves. The terms have the
    same law either way, so the statement and its Monte-Carlo correction are unchanged.
    """
    gen = torch.Generator().manual_seed(seed)
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    chain = fm.chain if local else None
    if chain is not None:
        mean_p, var_p = fm.params(mean_t), fm.params(std_t * std_t)
        xs, ys = x.repeat_interleave(draws, dim=0), y.repeat_interleave(draws, dim=0)
        with torch.no_grad():
            errors = [
                _bounded_error(_sampled_outputs(chain, mean_p, var_p, xb, gen), yb, fm.task, loss_clip)
                for xb, yb in zip(xs.split(chunk), ys.split(chunk), strict=True)
            ]
        return torch.cat(errors).double().numpy().reshape(len(y), draws)
    xs = x.repeat_interleave(draws, dim=0).unsqueeze(1)  # (n·draws, 1, d)
    ys = y.repeat_interleave(draws, dim=0).unsqueeze(1)  # (n·draws, 1)
    errors = []
    with torch.no_grad():
        for start in range(0, len(ys), chunk):
            xb, yb = xs[start : start + chunk], ys[start : start + chunk]
            weights = mean_t + std_t * torch.randn(len(yb), len(mean_t), generator=gen)
            out = _forward_many(fm, weights, xb)  # (chunk, 1, outputs): each weight its example
            errors.append(_bounded_error(out, yb, fm.task, loss_clip)[:, 0])
    return torch.cat(errors).double().numpy().reshape(len(y), draws)


def _sampled_outputs(chain: list, mean: dict, var: dict, x: torch.Tensor, gen: torch.Generator):
    """(rows, k) outputs of a :func:`_linear_chain` model at the rows of x, each row under its own
    weights drawn from ``N(mean, diag var)``, without drawing them. Given its input h (a function of
    the earlier layers' weights only), a Linear layer's output with weights ``W ~ N(M, diag S²)`` and
    bias ``b ~ N(m, diag s²)``, independent of those, is Gaussian with mean ``M h + m``, variance
    ``S² h² + s²`` and independent units (each unit has its own row of W): that is what is drawn, layer
    by layer, so each row's output has exactly the law it has under its own weight draw."""
    h = x
    for layer in chain:
        if isinstance(layer, tuple):
            weight, bias = layer
            loc = F.linear(h, mean[weight], mean[bias] if bias else None)
            scale = F.linear(h * h, var[weight], var[bias] if bias else None).sqrt_()
            h = loc + scale * torch.randn(loc.shape, generator=gen)
        else:
            h = layer(h)
    return h


def draw_errors(
    fm: FlatModel,
    mean: np.ndarray,
    std: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    m: int,
    loss_clip: float = 5.0,
    seed: int = 0,
    chunk: int = 100,
) -> np.ndarray:
    """(m,) the error on (x, y) — 0-1, or ``ℓ_B/B`` for regression — of m independent draws from Q."""
    gen = torch.Generator().manual_seed(seed)
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    errors = []
    with torch.no_grad():
        for start in range(0, m, chunk):
            k = min(chunk, m - start)
            draws = mean_t + std_t * torch.randn(k, len(mean_t), generator=gen)
            out = _forward_many(fm, draws, x)  # (k, n, outputs)
            errors.append(_bounded_error(out, y, fm.task, loss_clip).mean(dim=1))
    return torch.cat(errors).double().numpy()


# ---------------------------------------------------------------------------------------------
# Gradient noise, curvature and gradient mismatch
# ---------------------------------------------------------------------------------------------


def full_gradient(fm: FlatModel, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(p,) ∇ of the mean training loss at w: by hand for a chain model (backprop.py), else plain
    autograd (torch.func.grad is far slower here)."""
    if _by_hand(fm):
        with torch.no_grad():
            params, saved, rows = _loss_pass(fm, w, x, y)
            grad = torch.empty(fm.n_params)
            backprop.backward(fm.chain, params, saved, rows, fm.params(grad))
            return grad.div_(len(y))
    w = w.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fm.loss(w, x, y), w)[0]


def _by_hand(fm: FlatModel) -> bool:
    """Whether ``fm``'s gradients are written out (backprop.py) rather than left to autograd."""
    return fm.chain is not None and backprop.supports(fm.chain)


def _loss_pass(fm: FlatModel, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """A chain model's forward pass at w: its parameters, what backprop.backward needs, and each row's
    loss gradient w.r.t. its outputs (the δ that back-propagation starts from)."""
    params = fm.params(w)
    out, saved = backprop.forward(fm.chain, params, x)
    return params, saved, _loss_gradient_rows(out, y, fm.task)


def _loss_gradient_rows(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """(rows, k) ∂ℓ_i/∂out_i of each row's own training loss (cross-entropy or squared error)."""
    if task == "classification":
        return torch.softmax(out, dim=-1).scatter_add_(1, y.unsqueeze(1), torch.full((len(y), 1), -1.0))
    return (2.0 * (out.squeeze(-1) - y)).unsqueeze(-1)


def gradient_noise(
    fm: FlatModel, w: np.ndarray, x: torch.Tensor, y: torch.Tensor, batch_size: int, draws: int, seed: int
) -> np.ndarray:
    """(draws, p) minibatch gradient minus full-batch gradient on S at w, the trial's batch size: the
    SGD noise whose tail index α̂ measures. Each minibatch is drawn from a fresh permutation, so the
    draws are independent: consecutive batches of one epoch would partition S, and their noises
    (summed in α̂'s blocks) would cancel, pushing α̂ towards 2. A chain model's minibatch gradients
    come from one backward pass of all of S (backprop.subset_gradients): the same gradients to float
    rounding, without a pass per minibatch."""
    w_t = torch.as_tensor(w, dtype=torch.float32)
    full = full_gradient(fm, w_t, x, y)
    rng = np.random.default_rng(seed)
    positions = torch.as_tensor(np.stack([rng.permutation(len(y))[:batch_size] for _ in range(draws)]))
    if _by_hand(fm):
        with torch.no_grad():
            params, saved, rows = _loss_pass(fm, w_t, x, y)
            sums = backprop.subset_gradients(fm.chain, fm.names, params, saved, rows, positions)
            batch_grads = sums.div_(positions.shape[1])
    else:
        batch_grads = torch.stack([full_gradient(fm, w_t, x[pos], y[pos]) for pos in positions])
    return (batch_grads - full).double().numpy()


def top_hessian_eigenvalue(
    fm: FlatModel, w: np.ndarray, x: torch.Tensor, y: torch.Tensor, iterations: int = 20, seed: int = 0
) -> float:
    """Largest |eigenvalue| of ∇²R̂(w) by power iteration on Hessian-vector products (an estimate:
    finitely many iterations, and only at w). HVPs by double backward through one gradient graph."""
    w_t = torch.as_tensor(w, dtype=torch.float32).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fm.loss(w_t, x, y), w_t, create_graph=True)
    v = torch.randn(len(w_t), generator=torch.Generator().manual_seed(seed))
    v = v / torch.linalg.vector_norm(v)
    value = 0.0
    for _ in range(iterations):
        # H v as the gradient of the scalar g·v: the same backward pass as passing v as g's output
        # gradient, without the sympy import (0.4 s) torch makes for a non-scalar output's gradient.
        (hv,) = torch.autograd.grad(torch.dot(g, v), w_t, retain_graph=True)
        value = float(torch.linalg.vector_norm(hv))
        if value == 0.0:
            return 0.0
        v = hv / value
    return value


def gradient_mismatch(fm: FlatModel, traj_h: np.ndarray, train: tuple, reference: tuple) -> np.ndarray:
    """(N,) ``‖∇R̂_S(w^H_k) - ∇R̂_H(w^H_k)‖`` at each recorded reference iterate (Ê is the max), one
    pass of S and H together per iterate: the difference of the two mean gradients is the gradient
    of ``Σ_S ℓ/n - Σ_H ℓ/m``, each row's loss weighted ±. By hand for a chain model (backprop.py)."""
    (x_s, y_s), (x_h, y_h) = train, reference
    x, y = torch.cat([x_s, x_h]), torch.cat([y_s, y_h])
    weights = torch.cat([torch.full((len(y_s),), 1.0 / len(y_s)), torch.full((len(y_h),), -1.0 / len(y_h))])
    gaps, grad = [], torch.empty(fm.n_params)
    for w in np.asarray(traj_h):
        w_t = torch.as_tensor(w, dtype=torch.float32)
        if _by_hand(fm):
            with torch.no_grad():
                params, saved, rows = _loss_pass(fm, w_t, x, y)
                backprop.backward(fm.chain, params, saved, rows.mul_(weights[:, None]), fm.params(grad))
        else:
            w_t.requires_grad_(True)
            weighted = (per_example_loss(fm.forward(w_t, x), y, fm.task) * weights).sum()
            (grad,) = torch.autograd.grad(weighted, w_t)
        gaps.append(float(torch.linalg.vector_norm(grad)))
    return np.asarray(gaps)


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


@dataclass
class Measurements:
    """What :func:`measure` found: loggable metrics, assumption tags and the objects behind them."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    certificate: Any = None  # bound.Certificate
    posterior: Posterior | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _checkpoints(n_points: int, count: int) -> list[int]:
    """Indices of ``count`` recorded iterates spread over the run, the last included, step 0 not."""
    if n_points < 2:
        return [n_points - 1]
    picks = np.linspace(1, n_points - 1, min(count, n_points - 1)).round().astype(int)
    return sorted(set(picks.tolist()))


def measure(cfg, data, settings, run, trajectory, deltas: dict[str, float]) -> Measurements:
    """Certificate, tail index and analytic bounds of one trained trial.

    Args:
        cfg: the StudyConfig (``certificate``, ``diagnostics`` and ``bound`` sections).
        data: the Dataset the twin was trained on.
        settings: the trial's TrainSettings.
        run: the TwinRun (full trajectories (2, N, p) and the S-run's final model).
        trajectory: the trial's bound.TrajectoryBound (L̂ and C, to flag vacuous distance bounds).
        deltas: each statement's share of δ_λ (grid.statement_deltas): ``pacbayes``, ``perturbed``.
    """
    out = Measurements()
    fm = FlatModel(run.model, data.task)
    if run.trajectories.shape[2] != fm.n_params:  # sketched trajectories hold no weights
        out.tags["hsgd.diagnostics"] = "skipped: trajectories are sketched, the weights were not kept"
        return out
    train = _tensors(data.train, data.task)
    with _one_thread():
        _measure_all(out, cfg, data, settings, run, fm, train, trajectory, deltas)
    return out


def _measure_all(out, cfg, data, settings, run, fm, train, trajectory, deltas) -> None:
    for name, enabled, step in (
        ("certificate", cfg.certificate.enabled, _certificate),
        ("perturbed", cfg.certificate.enabled, _perturbed),
        ("tail", cfg.diagnostics.tail_index, _tail),
        ("analytic", cfg.diagnostics.analytic, _analytic),
        ("fractal", cfg.diagnostics.fractal, _fractal),
    ):
        if enabled:
            started = time.perf_counter()
            step(out, cfg, data, settings, run, fm, train, trajectory, deltas)
            out.seconds[name] = time.perf_counter() - started


def _tensors(split, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(split.x, dtype=torch.float32)
    y = torch.as_tensor(split.y)
    return x, (y.long() if task == "classification" else y.float())


def trivial_error(task: str, n_outputs: int) -> float:
    """The error a certificate must beat to say anything: 1 - 1/k (guessing) or 1 (``ℓ_B/B``)."""
    return 1.0 - 1.0 / n_outputs if task == "classification" else 1.0


def _certificate(out, cfg, data, settings, run, fm, train, trajectory, deltas) -> None:
    delta_c = deltas["pacbayes"]
    x, y = train
    grid = len(PRIOR_STD_GRID)
    ws, wh = (run.trajectories[r, -1].astype(np.float64) for r in (S_RUN, H_RUN))
    posterior = fit_posterior(
        fm,
        ws,
        wh,
        x,
        y,
        kind=cfg.certificate.posterior,
        steps=cfg.certificate.steps,
        delta=delta_c / 2 / grid,
        loss_clip=cfg.bound.loss_clip,
        seed=derived_seed(settings, "pacbayes/fit"),
    )
    errors = pointwise_draw_errors(
        fm,
        posterior.mean,
        posterior.std,
        x,
        y,
        cfg.certificate.mc_draws,
        cfg.bound.loss_clip,
        derived_seed(settings, "pacbayes/monte-carlo"),
    )
    cert = bound.certificate(
        float(errors.mean()), errors.size, posterior.kl, len(y), delta_c, posterior.prior_std, grid
    )
    trivial = trivial_error(data.task, data.n_outputs)
    out.certificate, out.posterior = cert, posterior
    out.metrics.update(cert.metrics())
    out.metrics["certificate/trivial"] = trivial
    out.metrics["certificate/posterior_std_median"] = float(np.median(posterior.std))
    out.metrics["certificate/distance_to_prior"] = float(np.linalg.norm(posterior.mean - wh))
    out.tags.update({f"hsgd.assumption.{k}": v for k, v in cert.assumptions().items()})
    out.tags["hsgd.certificate.posterior"] = posterior.kind
    out.tags["hsgd.vacuous.certificate"] = str(cert.bound >= min(trivial, 0.5)).lower()


#: Examples of S and weight draws per σ of the pilot Monte Carlo that picks σ_k (then fresh draws certify).
#: 128 examples (256 before issue #17) gave the quick-start's trials the same mean perturbed bound.
_PILOT_EXAMPLES, _PILOT_DRAWS = 128, 2


def choose_sigma(fm, w: np.ndarray, distance: float, x, y, n: int, delta: float, loss_clip: float, seed: int):
    """σ of the grid with the smallest pilot bound for ``Q = N(w, σ²I)`` with KL ``distance²/(2σ²)``.

    Any choice is allowed (the certificate pays a union bound over the grid); the pilot's draws are
    not reused by the certified Monte Carlo. The same standard-normal draws are scaled by every σ,
    so the comparison between grid points is not blurred by independent noise."""
    confidence = math.log(2.0 * math.sqrt(n) / delta)
    sigmas = [s for s in PRIOR_STD_GRID if (distance**2 / (2 * s * s) + confidence) / n < 1.0]
    if not sigmas:  # the KL alone makes every bound trivial: report the least KL
        return float(PRIOR_STD_GRID[-1])
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=gen)[:_PILOT_EXAMPLES]
    w_t = torch.as_tensor(w, dtype=torch.float32)
    noise = torch.randn(_PILOT_DRAWS, len(w_t), generator=gen)  # (m, p)
    scales = torch.as_tensor(sigmas, dtype=torch.float32)[:, None, None]  # (G, 1, 1)
    weights = (w_t + scales * noise).reshape(-1, len(w_t))  # (G·m, p)
    with torch.no_grad():
        err = _bounded_error(_forward_many(fm, weights, x[idx]), y[idx], fm.task, loss_clip).mean(dim=1)
    err = err.view(len(sigmas), _PILOT_DRAWS).mean(dim=1).double().numpy()
    pilot = [
        bound.pac_bayes_kl_bound(float(e), distance**2 / (2 * s * s), n, delta)
        for e, s in zip(err, sigmas, strict=True)
    ]
    return float(sigmas[int(np.argmin(pilot))])


def _perturbed(out, cfg, data, settings, run, fm, train, trajectory, deltas) -> None:
    """The perturbed-dynamics certificate at every recorded step (bound/perturbed.py): σ_k by a
    pilot, then one fresh weight draw per example of S (n independent terms) for ê_{Q_k}."""
    x, y = train
    delta = deltas["perturbed"]
    traj_s, traj_h = (run.trajectories[r].astype(np.float64) for r in (S_RUN, H_RUN))
    steps, grid = len(traj_s), len(PRIOR_STD_GRID)
    distances = np.linalg.norm(traj_s - traj_h, axis=1)
    delta_pb = delta / 2.0 / (steps * grid)
    sigmas, errors = np.empty(steps), np.empty(steps)
    for k in range(steps):
        seed = derived_seed(settings, f"perturbed/{k}")
        sigmas[k] = choose_sigma(
            fm, traj_s[k], distances[k], x, y, len(y), delta_pb, cfg.bound.loss_clip, seed
        )
        draws = pointwise_draw_errors(
            fm, traj_s[k], np.full(len(traj_s[k]), sigmas[k]), x, y, 1, cfg.bound.loss_clip, seed + 1
        )
        errors[k] = float(draws.mean())
    bounds = bound.perturbed_bounds(errors, len(y), distances, sigmas, len(y), grid, delta)
    out.metrics.update(
        {
            "certificate/perturbed_bound": float(bounds[-1]),
            "certificate/perturbed_bound_max": float(bounds.max()),
            "certificate/perturbed_sigma": float(sigmas[-1]),
            "certificate/perturbed_kl": float(distances[-1] ** 2 / (2 * sigmas[-1] ** 2)),
            "certificate/perturbed_mc_error": float(errors[-1]),
        }
    )
    out.tags |= {f"hsgd.assumption.{k}": v for k, v in bound.perturbed.assumptions().items()}


def _tail(out, cfg, data, settings, run, fm, train, trajectory, deltas) -> None:
    x, y = train
    if settings.batch_size >= len(y):
        out.tags["hsgd.assumption.tail/alpha"] = "not measured: full-batch steps have no gradient noise"
        return
    alphas = {}
    for k in _checkpoints(run.trajectories.shape[1], cfg.diagnostics.checkpoints):
        noise = gradient_noise(
            fm,
            run.trajectories[S_RUN, k],
            x,
            y,
            settings.batch_size,
            cfg.diagnostics.noise_draws,
            derived_seed(settings, f"tail/{k}"),
        )
        alphas[int(run.record_steps[k])] = bound.tail_index(noise, center=False)  # centred by construction
    out.metrics["tail/alpha"] = float(np.median(list(alphas.values())))
    out.metrics["tail/alpha_min"] = float(min(alphas.values()))
    out.metrics.update({f"tail/alpha_step_{step}": a for step, a in alphas.items()})
    out.tags["hsgd.assumption.tail/alpha"] = (
        "estimated: Mohammadi et al. (2015) block estimator on minibatch-minus-full gradients on S "
        "(independent minibatches, a fresh permutation each) at "
        f"{len(alphas)} recorded S-run iterates, median over block sizes, clipped to (0, 2]"
    )


#: Distance bounds above this are logged as this value (MLflow stores finite numbers) and flagged.
_LOG_CAP = 1e30


def _analytic(out, cfg, data, settings, run, fm, train, trajectory, deltas) -> None:
    reference = _tensors(data.reference, data.task)
    traj_h = run.trajectories[H_RUN]
    checks = _checkpoints(traj_h.shape[0], cfg.diagnostics.checkpoints)
    smooth = max(
        top_hessian_eigenvalue(fm, traj_h[k], *train, iterations=8, seed=derived_seed(settings, "hessian"))
        for k in checks
    )
    smooth += settings.weight_decay
    mismatch = float(gradient_mismatch(fm, traj_h, train, reference).max())
    eta, steps = settings.learning_rate, settings.steps
    bounds = {"gronwall_bound": bound.gronwall_bound(eta, smooth, mismatch, steps)}
    if run.model is not None and _is_linear(run.model) and settings.weight_decay > 0:
        wd = settings.weight_decay
        bounds["contractive_bound"] = bound.contractive_bound(eta, wd, max(smooth, wd), mismatch, steps)
    out.metrics["analytic/smoothness"] = smooth
    out.metrics["analytic/mismatch"] = mismatch
    out.metrics["analytic/measured_distance"] = float(trajectory.synchronous_distance)
    for name, value in bounds.items():
        out.metrics[f"analytic/{name}"] = min(value, _LOG_CAP)
        useless = trajectory.complexity + trajectory.lipschitz_pop * value > trajectory.loss_clip
        if not math.isfinite(trajectory.lipschitz_pop):  # sketched: only the uniform form
            useless = trajectory.complexity + 2 * trajectory.lipschitz * value > trajectory.loss_clip
        out.tags[f"hsgd.vacuous.analytic/{name}"] = str(bool(useless)).lower()
    scope = "momentum makes them inapplicable; " if settings.momentum else ""
    out.tags["hsgd.assumption.analytic"] = (
        f"diagnostic: {scope}M̂ by power iteration at {len(checks)} reference iterates (+ weight decay), Ê at "
        "the recorded reference iterates with full-batch gradients; exact only for full-batch GD with the "
        f"true constants; values above {_LOG_CAP:g} are logged as {_LOG_CAP:g}"
    )


def _fractal(out, cfg, data, settings, run, fm, train, trajectory, deltas) -> None:
    """Covering / dimension complexity of W^H in place of ln N, on the trajectory bound's δ share."""
    from hsgd_tune.bound import fractal

    traj_h = run.trajectories[H_RUN].astype(np.float64)
    diam = fractal.diameter(traj_h)
    if diam == 0.0:
        return
    grid = fractal.epsilon_grid(diam)
    args = (
        traj_h,
        trajectory.lipschitz,
        trajectory.loss_clip,
        trajectory.n_train,
        trajectory.delta,
        grid,
    )
    covering, _ = fractal.covering_complexity(*args)
    value, eps, dim = fractal.fractal_complexity(*args)
    two_l_d = 2 * trajectory.lipschitz * trajectory.decoupling_distance
    out.metrics.update(
        {
            "fractal/dimension": dim,
            "fractal/epsilon": eps,
            "fractal/complexity": value,
            "fractal/covering_complexity": covering,
            "fractal/gap_bound": value + two_l_d,
            "fractal/covering_gap_bound": covering + two_l_d,
        }
    )
    out.tags["hsgd.assumption.fractal/complexity"] = (
        "estimated: box-counting dimension of the recorded reference iterates in place of ln N, min over a "
        "fixed ε grid (union bound), + 2L̂ε; covering_complexity uses the counted covers and holds if L̂ >= L"
    )


def _is_linear(model: nn.Module) -> bool:
    """A single affine layer: convex losses, so L2 weight decay m makes the objective m-strongly convex."""
    return sum(1 for p in model.parameters() if p.dim() == 2) == 1 and not any(
        isinstance(m, (nn.ReLU,)) for m in model.modules()
    )
