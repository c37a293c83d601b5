"""The twin SGD run: the same recursion on S (empirical dynamics) and on H (reference dynamics).

Both runs share everything random — the initialisation and the sequence of minibatch positions — so
the only thing that differs is the data they see (DESIGN.md §2, "Reference dynamics"). The H-run's
trajectory is then independent of S, which is what the bound needs.

Runs are advanced in lock step: every step is one forward and one backward pass over a stacked
batch of shape (2, b, d). For the built-in models the weights are stacked too, (2, out, in), and the
pass is a batched matrix product, so two runs cost about one; a user's ``nn.Module`` is stepped as two
copies inside the same loop.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from hsgd_tune.data import Dataset, Split
from hsgd_tune.errors import DivergedError
from hsgd_tune.models import ModelSpec, build_model, linear_layers, load_flat_parameters

S_RUN, H_RUN = 0, 1


@dataclass(frozen=True)
class TrainSettings:
    """What one trial trains with (sampled values plus the fixed study settings)."""

    learning_rate: float
    batch_size: int
    steps: int
    record_every: int
    seed: int
    divergence_factor: float = 100.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss_clip: float = 5.0
    lipschitz_subsample: int = 64
    device: str = "cpu"

    @property
    def outside_theory(self) -> list[str]:
        """Why the trial leaves the theory's scope (plain SGD on a fixed loss), if it does."""
        reasons = []
        if self.momentum:
            reasons.append("momentum")
        if self.weight_decay:
            reasons.append("weight_decay")
        return reasons


@dataclass
class TwinRun:
    """What a twin run leaves behind: both trajectories, curves, final metrics and the S-model."""

    record_steps: np.ndarray  # (N,) the step of each recorded iterate (0, r, 2r, ..., steps)
    trajectories: np.ndarray  # (2, N, p) float32: [S_RUN] empirical, [H_RUN] reference
    curves: dict[str, np.ndarray]  # name -> (N,) values at record_steps
    final: dict[str, float]  # final metrics of both runs (train/…, val/…, reference/…)
    grad_norms: np.ndarray  # (2, N, m) per-example gradient norms of the clipped loss
    model: nn.Module  # the S-run's final model, on the CPU
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def per_example_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy (classification) or squared error (regression); out (..., k), y (...)."""
    if task == "classification":
        logp = torch.log_softmax(out, dim=-1)
        return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (out.squeeze(-1) - y) ** 2


def per_example_error(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """0-1 error (classification) or the squared error itself (regression)."""
    if task == "classification":
        return (out.argmax(-1) != y).float()
    return per_example_loss(out, y, task)


# ---------------------------------------------------------------------------------------------
# The two ways of stepping two runs at once
# ---------------------------------------------------------------------------------------------


class StackedTwin:
    """A built-in model (Linear/ReLU stack) held twice as stacked weights (2, out, in)."""

    def __init__(self, model: nn.Module):
        layers = linear_layers(model)
        self.weights = [_stack2(layer.weight) for layer in layers]
        self.biases = [_stack2(layer.bias.unsqueeze(0)) for layer in layers]  # (2, 1, out)

    @property
    def params(self) -> list[torch.Tensor]:
        # Interleaved like nn.Sequential's named_parameters, so flat vectors match the module's.
        return [p for pair in zip(self.weights, self.biases) for p in pair]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (2, b, d) → outputs (2, b, k)."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i > 0:
                h = torch.relu(h)
            h = torch.baddbmm(b, h, w.transpose(1, 2))
        return h

    def flat(self) -> torch.Tensor:
        """(2, p) the current iterate of both runs."""
        return torch.cat([p.detach().reshape(2, -1) for p in self.params], dim=1)


class SequentialTwin:
    """Any ``nn.Module`` held twice; each run's forward is its own call."""

    def __init__(self, model: nn.Module):
        self.models = [model, copy.deepcopy(model)]

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for m in self.models for p in m.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x[r]) for r, m in enumerate(self.models)])

    def flat(self) -> torch.Tensor:
        return torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in self.models])


def _stack2(t: torch.Tensor) -> torch.Tensor:
    return t.detach().unsqueeze(0).repeat(2, *([1] * t.dim())).clone().requires_grad_(True)


def make_twin(model: nn.Module, spec: ModelSpec) -> StackedTwin | SequentialTwin:
    return StackedTwin(model) if spec.is_builtin else SequentialTwin(model)


# ---------------------------------------------------------------------------------------------
# Shared randomness
# ---------------------------------------------------------------------------------------------


def minibatch_positions(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Positions of each step's minibatch: reshuffled epochs, incomplete last batch dropped.

    The same positions index S in the S-run and H (modulo |H|) in the H-run.
    """
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    step = 0
    while step < steps:
        order = rng.permutation(n)
        for i in range(min(per_epoch, steps - step)):
            yield order[i * batch_size : (i + 1) * batch_size]
        step += per_epoch


def initial_model(spec: ModelSpec, seed: int) -> nn.Module:
    """The shared initialisation: the model as torch builds it under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _tensors(split: Split, task: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(split.x, device=device)
    y = torch.as_tensor(split.y, device=device)
    return x, (y.long() if task == "classification" else y.float())


def resolve_device(requested: str) -> torch.device:
    """CUDA when the study asks for it (or for "auto") and one is present; the CPU otherwise."""
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def train_twin(data: Dataset, spec: ModelSpec, settings: TrainSettings) -> TwinRun:
    """Run SGD on S and on H in lock step, recording both trajectories every r steps and the last.

    Raises :class:`DivergedError` when a loss or weight turns non-finite or a run's loss exceeds
    ``divergence_factor`` times its initial training loss.
    """
    device = resolve_device(settings.device)
    started = time.perf_counter()
    model = initial_model(spec, settings.seed).to(device)
    twin = make_twin(model, spec)
    xs, ys = _tensors(data.train, data.task, device)
    xh, yh = _tensors(data.reference, data.task, device)
    xv, yv = _tensors(data.val, data.task, device)
    n_s, n_h = len(ys), len(yh)

    recorder = _Recorder(twin, data.task, (xs, ys), (xh, yh), (xv, yv))
    recorder.record(0, interval_loss=None)
    limit = settings.divergence_factor * recorder.initial_losses
    velocity = [torch.zeros_like(p) for p in twin.params] if settings.momentum else None
    interval_loss = torch.zeros(2, device=device)
    positions = minibatch_positions(n_s, settings.batch_size, settings.steps, settings.seed)
    for step, pos in enumerate(positions, start=1):
        idx_s = torch.as_tensor(pos, device=device)
        idx_h = idx_s % n_h
        xb = torch.stack([xs[idx_s], xh[idx_h]])  # (2, b, d)
        yb = torch.stack([ys[idx_s], yh[idx_h]])  # (2, b)
        run_loss = per_example_loss(twin.forward(xb), yb, data.task).mean(dim=1)  # (2,)
        grads = torch.autograd.grad(run_loss.sum(), twin.params)
        _sgd_update(twin.params, grads, settings, velocity)
        interval_loss += run_loss.detach()
        if step % settings.record_every == 0 or step == settings.steps:
            done_since = step - recorder.steps[-1]
            recorder.record(step, interval_loss=interval_loss / done_since)
            _check_divergence(recorder, limit, step)
            interval_loss.zero_()
    trained = time.perf_counter()

    trajectories = np.stack(recorder.iterates, axis=1)  # (2, N, p)
    final_model = load_flat_parameters(initial_model(spec, settings.seed), torch.as_tensor(trajectories[S_RUN, -1]))
    grad_norms = clipped_gradient_norms(
        final_model, trajectories, data, settings.loss_clip, settings.lipschitz_subsample, settings.seed
    )
    return TwinRun(
        record_steps=np.asarray(recorder.steps),
        trajectories=trajectories,
        curves=recorder.curves(),
        final=recorder.final_metrics(settings.loss_clip),
        grad_norms=grad_norms,
        model=final_model,
        seconds={"training": trained - started, "lipschitz": time.perf_counter() - trained},
    )


def _sgd_update(params, grads, settings: TrainSettings, velocity) -> None:
    """Plain SGD (w ← w − η g); weight decay and momentum, when asked, as in torch.optim.SGD."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            if settings.weight_decay:
                g = g + settings.weight_decay * p
            if velocity is not None:
                velocity[i].mul_(settings.momentum).add_(g)
                g = velocity[i]
            p.sub_(settings.learning_rate * g)


def _check_divergence(recorder: _Recorder, limit: torch.Tensor, step: int) -> None:
    latest = recorder.train_loss[-1]
    for run, name in ((S_RUN, "empirical"), (H_RUN, "reference")):
        loss = float(latest[run])
        if not math.isfinite(loss):
            raise DivergedError(f"{name} run's training loss is {loss}", step)
        if loss > float(limit[run]):
            raise DivergedError(
                f"{name} run's training loss {loss:.4g} exceeds {float(limit[run]):.4g} "
                "(divergence_factor × initial loss)",
                step,
            )
        if not np.isfinite(recorder.iterates[-1][run]).all():
            raise DivergedError(f"{name} run's weights are not finite", step)


class _Recorder:
    """Keeps iterates and curves at the recorded steps."""

    def __init__(self, twin, task, train, reference, val):
        self.twin, self.task = twin, task
        self.train, self.reference, self.val = train, reference, val
        self.steps: list[int] = []
        self.iterates: list[np.ndarray] = []  # each (2, p)
        self.train_loss: list[np.ndarray] = []  # each (2,): minibatch loss over the last interval
        self.val_loss: list[np.ndarray] = []  # each (2,): full validation loss

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses and errors of both runs on one split: (2, n) each."""
        with torch.no_grad():
            out = self.twin.forward(x.unsqueeze(0).expand(2, *x.shape))
            yy = y.unsqueeze(0).expand(2, *y.shape)
            return per_example_loss(out, yy, self.task), per_example_error(out, yy, self.task)

    def record(self, step: int, interval_loss: torch.Tensor | None) -> None:
        """At step 0 there is no interval yet: the full loss on each run's own data stands in."""
        if interval_loss is None:
            interval_loss = torch.stack(
                [self.evaluate(*self.train)[0][S_RUN].mean(), self.evaluate(*self.reference)[0][H_RUN].mean()]
            )
            self.initial_losses = interval_loss.clamp_min(1e-3)
        self.steps.append(step)
        self.iterates.append(self.twin.flat().float().cpu().numpy())
        self.train_loss.append(interval_loss.detach().cpu().numpy())
        self.val_loss.append(self.evaluate(*self.val)[0].mean(dim=1).cpu().numpy())

    def curves(self) -> dict[str, np.ndarray]:
        train, val = np.stack(self.train_loss), np.stack(self.val_loss)
        return {
            "train/minibatch_loss": train[:, S_RUN],
            "reference/minibatch_loss": train[:, H_RUN],
            "val/loss": val[:, S_RUN],
            "reference/val_loss": val[:, H_RUN],
        }

    def final_metrics(self, loss_clip: float) -> dict[str, float]:
        loss_s, err_s = self.evaluate(*self.train)
        loss_h, err_h = self.evaluate(*self.reference)
        loss_v, err_v = self.evaluate(*self.val)
        metrics = {
            "train/loss": loss_s[S_RUN].mean(),
            "train/error": err_s[S_RUN].mean(),
            "train/loss_clipped": loss_s[S_RUN].clamp(max=loss_clip).mean(),
            "val/loss": loss_v[S_RUN].mean(),
            "val/error": err_v[S_RUN].mean(),
            "val/loss_clipped": loss_v[S_RUN].clamp(max=loss_clip).mean(),
            "reference/loss": loss_h[H_RUN].mean(),
            "reference/error": err_h[H_RUN].mean(),
            "reference/val_loss": loss_v[H_RUN].mean(),
        }
        return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Per-example gradients for the Lipschitz estimate
# ---------------------------------------------------------------------------------------------


def lipschitz_subsample(data: Dataset, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed subsample of S ∪ H of size m (half from each), the same for every trial of a study."""
    rng = np.random.default_rng([seed, 0x11])
    parts = []
    for split, k in ((data.train, (m + 1) // 2), (data.reference, m // 2)):
        idx = rng.choice(len(split.y), size=min(k, len(split.y)), replace=False)
        parts.append((split.x[idx], split.y[idx]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def clipped_gradient_norms(
    model: nn.Module, trajectories: np.ndarray, data: Dataset, loss_clip: float, m: int, seed: int
) -> np.ndarray:
    """‖∇_w ℓ_B(w, z)‖ for every recorded iterate w of both runs and every z of the subsample.

    ℓ_B = min(ℓ, B) has zero gradient where ℓ ≥ B. Returns (2, N, m).
    """
    model = copy.deepcopy(model).cpu()
    x_np, y_np = lipschitz_subsample(data, m, seed)
    x = torch.as_tensor(x_np)
    y = torch.as_tensor(y_np).long() if data.task == "classification" else torch.as_tensor(y_np).float()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (xi.unsqueeze(0),))
        return per_example_loss(out, yi.unsqueeze(0), data.task)[0]

    per_example_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    runs, n_points, _ = trajectories.shape
    norms = np.zeros((runs, n_points, len(y)), dtype=np.float64)
    for r in range(runs):
        for k in range(n_points):
            chunks = torch.as_tensor(trajectories[r, k]).split(sizes)
            params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
            grads = per_example_grad(params, x, y)
            sq = sum(g.reshape(len(y), -1).pow(2).sum(dim=1) for g in grads.values())
            with torch.no_grad():
                inside = per_example_loss(functional_call(model, params, (x,)), y, data.task) < loss_clip
            norms[r, k] = (sq.sqrt() * inside).detach().numpy()
    return norms
