"""The twin SGD run: the same recursion on S (empirical dynamics) and on H (reference dynamics).

Both runs share everything random — the initialisation and the sequence of minibatch positions — so
the only thing that differs is the data they see (DESIGN.md §2, "Reference dynamics"). The H-run's
trajectory is then independent of S, which is what the bound needs.

Runs are advanced in lock step: every step is one forward and one backward pass over a stacked
batch of shape (2, b, d). Four ways of holding the two runs (``make_twin``):

* :class:`StackedTwin` (built-in MLP and linear model, a user's Linear stack with ReLU, tanh or
  sigmoid between the layers): weights stacked (2, out, in), a batched matrix product per layer and a
  hand-written backward pass, so two runs cost about one;
* :class:`GroupedTwin` (built-in CNN, a user's ``nn.Sequential`` of common layers): a batched matrix
  product per Linear and one grouped convolution (``groups=2``, the two runs' channels side by side)
  per Conv2d, autograd for the backward pass;
* :class:`FuncTwin` (a user's ``nn.Module``): parameters stacked (2, ...), ``torch.func.vmap`` over
  ``functional_call``;
* :class:`SequentialTwin` (a user's ``nn.Module``): two copies, each its own forward in the same loop.

For a user's model :func:`choose_twin` times a few steps of each kind that can step it
(``StackedTwin``, ``GroupedTwin``, ``FuncTwin``, ``SequentialTwin``) on the trial's first minibatch
and keeps the fastest (vmap is not always faster than two modules: small layers pay its dispatch);
images are laid out channels-last (CPU pooling is several times faster there); the choice is
recorded with the run
(``TwinRun.twin``). All four compute the same SGD steps up to float rounding (tests/test_training.py,
tests/test_lockstep.py).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.errors import DivergedError
from hsgd_tune.progress import steps_done
from hsgd_tune.train.models import (
    ModelSpec,
    build_model,
    count_parameters,
    linear_layers,
    load_flat_parameters,
)
from hsgd_tune.train.sketch import SignSketch

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
    noise_alpha: float = 2.0  # injected α-stable noise σ η^{1/α} ξ_k, shared by both runs (noise.py)
    noise_sigma: float = 0.0  # 0: plain SGD
    sketch_above: int = 200_000  # record JL sketches of the iterates above this many parameters
    sketch_dim: int = 2048

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
    n_parameters: int = 0  # p, the model's parameter count
    sketch_dim: int = 0  # k when ``trajectories`` are JL sketches (2, N, k) of the iterates, else 0
    last_iterates: np.ndarray | None = None  # (2, p) the final weights of both runs, never sketched
    twin: str = ""  # how both runs were stepped: "stacked", "grouped", "vmap" or "sequential"


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


#: Activations :class:`StackedTwin` differentiates by hand: the function, and its derivative written
#: with its output a (ReLU: sign(a), as a ≥ 0; tanh: 1 − a²; sigmoid: a(1 − a)).
_HAND_DIFFERENTIATED: dict[type, tuple[Callable, Callable]] = {
    nn.ReLU: (torch.relu, torch.sign),
    nn.Tanh: (torch.tanh, lambda a: 1.0 - a * a),
    nn.Sigmoid: (torch.sigmoid, lambda a: a * (1.0 - a)),
}


def hand_differentiable(model: nn.Module) -> list[type] | None:
    """The activations between the Linear layers of ``model`` when :class:`StackedTwin` can step it
    (an ``nn.Sequential`` Linear, then (activation, Linear)*, every Linear biased, every activation
    one of ``_HAND_DIFFERENTIATED``), else None."""
    if not isinstance(model, nn.Sequential) or len(model) % 2 == 0:
        return None
    linears, activations = list(model)[::2], list(model)[1::2]
    if not all(type(layer) is nn.Linear and layer.bias is not None for layer in linears):
        return None
    if not all(type(act) in _HAND_DIFFERENTIATED for act in activations):
        return None
    return [type(act) for act in activations]


class StackedTwin:
    """A Linear stack (the built-in MLP and linear model, or a user's Sequential of biased Linear
    layers with ReLU, tanh or sigmoid between them: :func:`hand_differentiable`) held twice as
    stacked weights (2, out, in).

    :meth:`loss_and_gradients` backpropagates by hand: per layer, one batched matrix product for the
    weight gradients and one for the gradient flowing down, times the activation's derivative. Without
    autograd's graph a step of both runs costs about one ``nn.Module`` + ``torch.optim.SGD`` step
    (benchmarks/overhead.py).
    """

    name = "stacked"

    def __init__(self, model: nn.Module):
        kinds = hand_differentiable(model)
        if kinds is None:
            raise ValueError("StackedTwin steps Linear stacks with ReLU, tanh or sigmoid between them")
        self.activations = [_HAND_DIFFERENTIATED[kind] for kind in kinds]
        layers = linear_layers(model)
        self.weights = [_stack2(layer.weight) for layer in layers]
        self.biases = [_stack2(layer.bias.unsqueeze(0)) for layer in layers]  # (2, 1, out)

    @property
    def params(self) -> list[torch.Tensor]:
        # Interleaved like nn.Sequential's named_parameters, so flat vectors match the module's.
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (2, b, d) → outputs (2, b, k)."""
        return self._forward(x)[0]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs (2, b, k) and each layer's input (2, b, in)."""
        h, inputs = x, []
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i > 0:
                h = self.activations[i - 1][0](h)
            inputs.append(h)
            h = torch.baddbmm(b, h, w.transpose(1, 2))
        return h, inputs

    def loss_and_gradients(
        self, x: torch.Tensor, y: torch.Tensor, task: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(2,) mean minibatch loss of each run, and its gradient for each tensor of :attr:`params`.

        For z = a Wᵀ + b with upstream gradient δ = ∂L/∂z: ∂L/∂W = δᵀ a, ∂L/∂b = Σ_rows δ, and
        ∂L/∂a = δ W, times the activation's derivative below it, written with a = f(z_prev): below a
        ReLU, sign(a) is the 0/1 mask where a is 0, as a ≥ 0 (and several times cheaper than a
        comparison); below tanh, 1 − a².
        """
        out, inputs = self._forward(x)
        loss, delta = _loss_and_output_gradient(out, y, task)
        grads: list[torch.Tensor] = []
        for i in range(len(self.weights) - 1, -1, -1):
            grads += [delta.sum(dim=1, keepdim=True), torch.bmm(delta.transpose(1, 2), inputs[i])]
            if i > 0:
                delta = torch.bmm(delta, self.weights[i]).mul_(self.activations[i - 1][1](inputs[i]))
        return loss, grads[::-1]  # W0, b0, W1, b1, ... like params

    def flat(self) -> torch.Tensor:
        """(2, p) the current iterate of both runs."""
        return torch.cat([p.reshape(2, -1) for p in self.params], dim=1)


def _loss_and_output_gradient(
    out: torch.Tensor, y: torch.Tensor, task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (2, b, k), y (2, b) → (2,) mean loss per run, and its gradient with respect to out."""
    batch = out.shape[1]
    if task == "classification":
        logp = torch.log_softmax(out, dim=-1)
        target = y.unsqueeze(-1)
        loss = -logp.gather(-1, target).squeeze(-1).mean(dim=1)
        # ∂(−log softmax_y)/∂out = softmax − onehot(y)
        delta = logp.exp_().scatter_add_(-1, target, torch.full_like(target, -1.0, dtype=out.dtype))
        return loss, delta.div_(batch)
    residual = out.squeeze(-1) - y
    return residual.pow(2).mean(dim=1), (residual * (2.0 / batch)).unsqueeze(-1)


#: Parameter-free layers that act on each value on its own: they apply to both runs' activations
#: side by side unchanged, in either layout.
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)
#: Pooling acts on each channel of each example on its own: as is on images (b, 2c, h, w).
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def grouping_plan(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """How :class:`GroupedTwin` steps ``model``, layer by layer, or None when it cannot.

    It can for an ``nn.Sequential`` without buffers of Linear, Conv2d (groups=1, zero padding),
    Flatten/Unflatten at dim 1, elementwise activations (``_ELEMENTWISE``) and 2-d pooling, with
    Linear layers on rows (2, b, f) and Conv2d and pooling layers on images (b, 2c, h, w).
    """
    if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
        return None
    plan, layout = [], "rows"
    for layer in model:
        if isinstance(layer, nn.Linear) and layout == "rows":
            step = "linear"
        elif isinstance(layer, nn.Conv2d) and layout == "image":
            if type(layer) is not nn.Conv2d or layer.groups != 1 or layer.padding_mode != "zeros":
                return None
            step = "conv"
        elif type(layer) in _ELEMENTWISE or (type(layer) in _POOLS and layout == "image"):
            step = "per-example"
        elif type(layer) is nn.Unflatten and layer.dim == 1 and layout == "rows":
            if len(layer.unflattened_size) != 3:
                return None
            step, layout = "unflatten", "image"
        elif type(layer) is nn.Flatten and (layer.start_dim, layer.end_dim) == (1, -1):
            step, layout = ("flatten" if layout == "image" else "per-example"), "rows"
        else:
            return None
        plan.append((step, layer))
    return plan if layout == "rows" else None


class _AutogradTwin:
    """Both runs through one forward pass of stacked (2, ...) parameters (:attr:`params`); the summed
    loss of the two runs separates, so autograd's gradient of it is each run's own."""

    params: list[torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_gradients(
        self, x: torch.Tensor, y: torch.Tensor, task: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(2,) mean minibatch loss of each run, and its gradient for each tensor of :attr:`params`."""
        with torch.enable_grad():
            loss = per_example_loss(self.forward(x), y, task).mean(dim=1)
            return loss.detach(), list(torch.autograd.grad(loss.sum(), self.params))

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(2, -1) for p in self.params], dim=1)


class GroupedTwin(_AutogradTwin):
    """A model of :func:`grouping_plan`'s layers (the built-in CNN, a user's Sequential) held twice:
    each parameter stacked (2, ...), each Linear of both runs one batched matrix product, each
    convolution one grouped convolution over both runs' channels side by side
    (:func:`stacked_forward` with M = 2).

    Images of both runs are laid out (b, 2c, h, w): group r of every convolution (``groups=2``) sees
    run r's channels only, so the pass computes both runs exactly as two separate modules would.
    Autograd's graph is built from the stacked leaves; the summed loss of the two runs separates, so
    its gradient is each run's own.
    """

    name = "grouped"

    def __init__(self, model: nn.Module, plan: list[tuple[str, nn.Module]]):
        self.plan = plan
        stacked = stack_plan_parameters(plan, [_stack2(p) for p in model.parameters()])
        self.stacked = [[p.clone().requires_grad_(True) for p in layer] for layer in stacked]  # leaves

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for layer in self.stacked for p in layer]  # the order of model.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (2, b, d) → outputs (2, b, k)."""
        return stacked_forward(self.plan, self.stacked, x)


def stack_plan_parameters(
    plan: list[tuple[str, nn.Module]], stacked: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Per layer of ``plan``, its parameters stacked (M, ...), from ``stacked``: the model's
    parameters in ``model.parameters()`` order, each (M, *shape) (views are kept: a gradient with
    respect to what they view flows through). A Linear's bias becomes (M, 1, out)."""
    it = iter(stacked)
    layers: list[list[torch.Tensor]] = []
    for step, layer in plan:
        if step not in ("linear", "conv"):
            layers.append([])
            continue
        params = [next(it)] + ([] if layer.bias is None else [next(it)])
        if step == "linear" and len(params) > 1:
            params[1] = params[1].unsqueeze(1)  # (M, 1, out)
        layers.append(params)
    return layers


def stacked_forward(
    plan: list[tuple[str, nn.Module]],
    stacked: list[list[torch.Tensor]],
    x: torch.Tensor,
    taps: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """M models of one :func:`grouping_plan` at once, layer ``i``'s parameters ``stacked[i]`` (M, ...)
    (:func:`stack_plan_parameters`): x (M, b, d), each model its own rows, or (b, d) shared by all
    → outputs (M, b, k).

    Rows are (M, b, f): a Linear is one batched matrix product. Images are (b, M·c, h, w), model r's
    channels the r-th group, in channels-last memory (CPU pooling is several times faster on it,
    and the convolution keeps it); a convolution is one ``groups=M`` convolution. Shared rows stay
    shared until the first layer with parameters: a Linear then computes all M models from them in
    one matrix product; for a Conv2d the shared images are repeated into M groups (unambiguously
    channels-last, even with one input channel, which the convolution would not keep). A ReLU
    followed by MaxPool2d is evaluated after it (same values and gradients).

    ``taps``, when given, receives (layer, input, output) for every Linear and Conv2d, in the layout
    above, for per-example gradients (:func:`plan_gradient_norms`).
    """
    m = next(p.shape[0] for params in stacked for p in params)
    h, b = x, x.shape[-2]
    shared = x.dim() == 2  # (b, d) rows, or (b, c, h, w) images, common to the M models
    swapped = False
    for i, ((step, layer), params) in enumerate(zip(plan, stacked, strict=True)):
        if swapped:  # this ReLU was applied after the max-pooling that follows it
            swapped = False
            h = torch.relu(h)
            continue
        if _relu_then_max_pool(plan, i):
            # max_pool(relu(z)) = relu(max_pool(z)) exactly, and so is the gradient: ReLU is
            # monotone, so a window whose maximum is positive has the same first maximum either
            # way, and any other window passes no gradient (ReLU's is 0 at 0). ReLU then acts on
            # a tensor the pooling has made several times smaller.
            h, swapped = plan[i + 1][1](h), True
            continue
        if step == "linear":
            w, a = params[0].transpose(1, 2), h  # (M, in, out)
            if shared:  # (b, in) @ (M, in, out): one product for the M models
                h = torch.matmul(h, w) if len(params) == 1 else torch.matmul(h, w) + params[1]
            else:
                h = torch.baddbmm(params[1], h, w) if len(params) > 1 else torch.bmm(h, w)
            shared = False
            if taps is not None:
                taps.append((layer, a, h))
        elif step == "conv":  # weight (M, out, in, k, k) → (M·out, in, k, k), model-major
            bias = params[1].flatten() if len(params) > 1 else None
            if shared:  # (b, c, h, w) → (b, M·c, h, w): unambiguously channels-last, even for c = 1
                h = h.unsqueeze(1).expand(-1, m, *h.shape[1:]).flatten(1, 2)
                h = h.contiguous(memory_format=torch.channels_last)
            w, a = params[0].flatten(0, 1), h
            h = F.conv2d(h, w, bias, layer.stride, layer.padding, layer.dilation, m)
            shared = False
            if taps is not None:
                taps.append((layer, a, h))
        elif step == "unflatten":  # (M, b, c·h·w) → (b, M·c, h, w), or shared (b, c·h·w) → (b, c, h, w)
            c, *hw = layer.unflattened_size
            if not shared:
                h = h.reshape(m, b, c, *hw).transpose(0, 1)
            h = h.reshape(b, -1, *hw)
            h = h.contiguous(memory_format=torch.channels_last)
        elif step == "flatten":  # (b, M·c, h, w) → (M, b, c·h·w), each model's in Flatten's order
            h = h.contiguous()
            h = h.reshape(b, -1) if shared else h.reshape(b, m, -1).transpose(0, 1)
        elif not isinstance(layer, nn.Flatten):  # Flatten on rows: they are flat already
            h = layer(h)
    return h.expand(m, *h.shape) if shared else h


def _relu_then_max_pool(plan: list[tuple[str, nn.Module]], i: int) -> bool:
    return (
        type(plan[i][1]) is nn.ReLU
        and i + 1 < len(plan)
        and type(plan[i + 1][1]) is nn.MaxPool2d
        and not plan[i + 1][1].return_indices
    )


class FuncTwin(_AutogradTwin):
    """Any ``nn.Module`` without buffers, its parameters stacked (2, ...) and both runs one
    ``vmap(functional_call)`` pass; autograd's backward gives each run its own gradient."""

    name = "vmap"

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.stacked = [_stack2(p).requires_grad_(True) for p in model.parameters()]
        self._forward = vmap(self._forward_one)

    def _forward_one(self, params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))

    @property
    def params(self) -> list[torch.Tensor]:
        return self.stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(tuple(self.stacked), x)


class SequentialTwin(_AutogradTwin):
    """Any ``nn.Module`` held twice; each run's forward is its own call."""

    name = "sequential"

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
    return t.detach().unsqueeze(0).repeat(2, *([1] * t.dim())).clone()


Twin = StackedTwin | GroupedTwin | FuncTwin | SequentialTwin


def make_twin(
    model: nn.Module, spec: ModelSpec, probe: tuple[torch.Tensor, torch.Tensor, str] | None = None
) -> Twin:
    """The twin for ``model``: the MLP stacked, the CNN grouped; a user's model the fastest of the
    kinds that can step it, timed on ``probe`` (a first minibatch (2, b, d), (2, b) and the task), or
    :class:`SequentialTwin` without one."""
    if spec.is_builtin:
        return StackedTwin(model)
    if spec.kind == "cnn":
        return GroupedTwin(model, grouping_plan(model))
    if probe is None:
        return SequentialTwin(model)
    return choose_twin(model, probe)


#: Per process: (model structure, batch shape, device, threads) → the kind choose_twin measured fastest.
_CHOSEN: dict[tuple, str] = {}


def _candidates(model: nn.Module) -> dict[str, Callable[[nn.Module], Twin]]:
    kinds: dict[str, Callable[[nn.Module], Twin]] = {}
    if hand_differentiable(model) is not None:
        kinds[StackedTwin.name] = StackedTwin
    if grouping_plan(model) is not None:
        kinds[GroupedTwin.name] = lambda m: GroupedTwin(m, grouping_plan(m))
    if not any(True for _ in model.buffers()):  # vmap cannot update running statistics in place
        kinds[FuncTwin.name] = FuncTwin
    kinds[SequentialTwin.name] = SequentialTwin
    return kinds


def choose_twin(model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor, str], repeats: int = 5) -> Twin:
    """Time ``repeats`` forward + backward passes of each kind of twin that can step ``model``
    (:class:`StackedTwin` for Linear stacks it differentiates by hand, :class:`GroupedTwin` for
    Sequentials of common layers, :class:`FuncTwin` without buffers,
    :class:`SequentialTwin` always) on the probe minibatch, interleaved, after one warm-up each (which
    also drops a kind that fails, e.g. vmap on dropout), and return the fastest (min over repeats),
    built on ``model``. The choice is remembered per process for the same model structure, batch
    shape, device and thread count, so a study times each batch size once."""
    x, _, _ = probe
    key = (repr(model), tuple(x.shape), str(x.device), torch.get_num_threads())
    kinds = _candidates(model)
    if key not in _CHOSEN:
        _CHOSEN[key] = _time_twins(model, kinds, probe, repeats)
    return kinds[_CHOSEN[key]](model)


def _time_twins(
    model: nn.Module, kinds: dict, probe: tuple[torch.Tensor, torch.Tensor, str], repeats: int
) -> str:
    x, y, task = probe
    timed = {}
    for name, make in kinds.items():
        twin = make(copy.deepcopy(model))
        try:
            twin.loss_and_gradients(x, y, task)  # warm-up (and: can this kind step the model at all?)
        except Exception:  # noqa: BLE001 - a kind that fails here is not a candidate
            if name == SequentialTwin.name:
                raise
            continue
        timed[name] = (twin, [])
    for _ in range(repeats):
        for twin, times in timed.values():
            started = time.perf_counter()
            twin.loss_and_gradients(x, y, task)
            _synchronize(x.device)
            times.append(time.perf_counter() - started)
    return min(timed, key=lambda name: min(timed[name][1]))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Shared randomness
# ---------------------------------------------------------------------------------------------


def minibatch_positions(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Positions of each step's minibatch: reshuffled epochs, incomplete last batch dropped.

    The same positions index S in the S-run and H (modulo |H|) in the H-run.
    """
    if not 1 <= batch_size <= n:  # otherwise an epoch holds no batch and this would loop forever
        raise ValueError(f"batch_size must be between 1 and the {n} training examples, got {batch_size}")
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


def _paired(train: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(2, n_S, ...): row i of S next to row i mod |H| of H, so one index picks both minibatches."""
    n = len(train)
    return torch.stack([train, reference[torch.arange(n, device=reference.device) % len(reference)]])


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
    xs, ys = _tensors(data.train, data.task, device)
    xh, yh = _tensors(data.reference, data.task, device)
    xv, yv = _tensors(data.val, data.task, device)
    x_pairs, y_pairs = _paired(xs, xh), _paired(ys, yh)
    positions = minibatch_positions(len(ys), settings.batch_size, settings.steps, settings.seed)
    first = torch.as_tensor(next(positions), device=device)
    probe = (x_pairs.index_select(1, first), y_pairs.index_select(1, first), data.task)
    twin = make_twin(model, spec, probe)

    store = _iterate_store(spec, data, settings)
    recorder = _Recorder(twin, data.task, (xs, ys), (xh, yh), (xv, yv), store=store)
    recorder.record(0, interval_loss=None)
    limit = settings.divergence_factor * recorder.initial_losses
    velocity = [torch.zeros_like(p) for p in twin.params] if settings.momentum else None
    interval_loss = torch.zeros(2, device=device)
    noise = _levy_noise(settings, device)
    n_weights = int(twin.flat().shape[1])
    # One no_grad context for the loop, not one per step (its set-up costs as much as a small op);
    # autograd twins switch gradients on inside loss_and_gradients.
    with torch.no_grad():
        for step, pos in enumerate(itertools.chain([first], positions), start=1):
            idx = torch.as_tensor(pos, device=device)
            xb, yb = x_pairs.index_select(1, idx), y_pairs.index_select(1, idx)  # (2, b, d), (2, b)
            run_loss, grads = twin.loss_and_gradients(xb, yb, data.task)  # (2,) and one per tensor
            _sgd_update(twin.params, grads, settings, velocity)
            if noise is not None:
                _add_shared(twin, noise.increment(step, n_weights))
            interval_loss += run_loss
            if step % settings.record_every == 0 or step == settings.steps:
                done_since = step - recorder.steps[-1]
                recorder.record(step, interval_loss=interval_loss / done_since)
                _check_divergence(recorder, limit, step)
                interval_loss.zero_()
                steps_done(step, settings.steps)  # the step bar under the trial bar (progress.py)
    trained = time.perf_counter()

    in_loop = sum(store.seconds.values())  # chunks already flushed during training
    final_model = initial_model(spec, settings.seed)
    load_flat_parameters(final_model, torch.from_numpy(store.latest[S_RUN]))  # the last S-run iterate
    trajectories, grad_norms = store.finish()  # (2, N, p or k), (2, N, m)
    seconds = {"training": trained - started - in_loop, "lipschitz": store.seconds["lipschitz"]}
    if store.sketch is not None:
        seconds["sketch"] = store.seconds["sketch"]
    return TwinRun(
        record_steps=np.asarray(recorder.steps),
        trajectories=trajectories,
        curves=recorder.curves(),
        final=recorder.final_metrics(settings.loss_clip),
        grad_norms=grad_norms,
        model=final_model,
        seconds=seconds,
        n_parameters=store.n_parameters,
        sketch_dim=store.sketch.dim if store.sketch is not None else 0,
        last_iterates=store.latest,
        twin=twin.name,
    )


def _levy_noise(settings: TrainSettings, device: torch.device):
    """The trial's α-stable noise (DESIGN.md §2, heavy-tailed dynamics), or None without it."""
    if not settings.noise_sigma:
        return None
    from hsgd_tune.train.noise import LevyNoise  # scipy.stats only when asked for

    alpha, sigma = settings.noise_alpha, settings.noise_sigma
    return LevyNoise(alpha, sigma, settings.learning_rate, settings.steps, settings.seed, device)


def _add_shared(twin, increment: torch.Tensor) -> None:
    """Add the same (p,) increment to both runs' weights, in flat-vector order (shared noise)."""
    with torch.no_grad():
        if not isinstance(twin, SequentialTwin):  # parameters stacked (2, ...)
            for p, c in zip(twin.params, increment.split([p[0].numel() for p in twin.params]), strict=True):
                p.add_(c.view(p.shape[1:]))
            return
        for model in twin.models:
            params = list(model.parameters())
            for p, c in zip(params, increment.split([p.numel() for p in params]), strict=True):
                p.add_(c.view_as(p))


def _sgd_update(params, grads, settings: TrainSettings, velocity) -> None:
    """Plain SGD (w ← w − η g); weight decay and momentum, when asked, as in torch.optim.SGD.
    Called under ``torch.no_grad()`` (train_twin's loop)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if settings.weight_decay:
            g = g + settings.weight_decay * p
        if velocity is not None:
            velocity[i].mul_(settings.momentum).add_(g)
            g = velocity[i]
        p.add_(g, alpha=-settings.learning_rate)


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
        if not np.isfinite(recorder.store.latest[run]).all():
            raise DivergedError(f"{name} run's weights are not finite", step)


class _Recorder:
    """Keeps iterates and curves at the recorded steps."""

    def __init__(self, twin, task, train, reference, val, store: IterateStore):
        self.twin, self.task = twin, task
        self.train, self.reference, self.val = train, reference, val
        self.store = store  # the iterates, with their gradient norms, maybe sketched
        self.steps: list[int] = []
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
        self.store.add(self.twin.flat())
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

    ℓ_B = min(ℓ, B) has zero gradient where ℓ ≥ B. trajectories (2, N, p) → norms (2, N, m).
    Models of :func:`grouping_plan`'s layers (the built-in MLP and CNN, a user's Sequential of
    common layers) take the closed form for all iterates at once (:func:`plan_gradient_norms`);
    other models ``vmap(grad)`` over the examples, batched over chunks of iterates by a second
    ``vmap``.
    """
    plan = grouping_plan(model)
    if plan is None or not any(True for _ in model.parameters()):
        return batched_gradient_norms(model, trajectories, data, loss_clip, m, seed)
    x_np, y_np = lipschitz_subsample(data, m, seed)
    x = torch.as_tensor(x_np)
    y = torch.as_tensor(y_np).long() if data.task == "classification" else torch.as_tensor(y_np).float()
    iterates = torch.as_tensor(trajectories)
    flat = iterates.reshape(-1, iterates.shape[-1])  # (2N, p): every iterate a model of the stack
    norms = plan_gradient_norms(plan, flat, x, y, data.task, loss_clip)
    return norms.reshape(*iterates.shape[:-1], len(y)).double().numpy()


#: Floats one chunk of :func:`plan_gradient_norms` may hold (weights + activations): 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def plan_gradient_norms(
    plan: list[tuple[str, nn.Module]],
    iterates: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str,
    loss_clip: float,
) -> torch.Tensor:
    """Per-example gradient norms of ℓ_B for M models of one :func:`grouping_plan` (the built-in MLP
    and CNN, a user's Sequential of common layers) at once: iterates (M, p) → (M, m); an iterate is
    the parameters flattened in ``named_parameters`` order.

    Only the layers with parameters have a gradient, and each layer's per-example gradient is a
    product of what the forward pass saw and one backward pass gives (δ = ∂ℓ/∂z, z the layer's
    output; example i of model j only reaches z[j, i], so one backward pass of the summed loss
    holds every δ):

    - Linear z = W a + b: ∂ℓ/∂W = δ aᵀ and ∂ℓ/∂b = δ, so ‖∂ℓ/∂W‖² + ‖∂ℓ/∂b‖² = ‖δ‖²(‖a‖² + 1)
      (without the 1 when unbiased);
    - Conv2d: with U the image's patches (``unfold``: one column per output position q),
      ∂ℓ/∂W = Σ_q δ_q U_qᵀ, a (out × in·k²) product per example, and ∂ℓ/∂b = Σ_q δ_q.

    The M models go in chunks of at most ``_CHUNK_ELEMENTS`` floats."""
    x = x.to(iterates.dtype)
    per_model = _floats_per_model(plan, x[:1]) * len(y) + iterates.shape[1]
    step = max(1, _CHUNK_ELEMENTS // per_model)
    with torch.enable_grad():  # callers may sit under no_grad; the backward pass below needs a graph
        return torch.cat([_plan_chunk(plan, c, x, y, task, loss_clip) for c in iterates.split(step)])


def _plan_chunk(plan, iterates, x, y, task, loss_clip) -> torch.Tensor:
    """:func:`plan_gradient_norms` on one chunk of M models: iterates (M, p) → (M, m)."""
    taps: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    out = stacked_forward(plan, _plan_parameters(plan, iterates.detach().requires_grad_(True)), x, taps)
    loss = per_example_loss(out, y.expand(out.shape[:-1]), task)  # (M, m)
    deltas = torch.autograd.grad(loss.sum(), [z for _, _, z in taps])
    sq = sum(
        _layer_norms_squared(layer, a.detach(), d) for (layer, a, _), d in zip(taps, deltas, strict=True)
    )
    return (sq.sqrt() * (loss.detach() < loss_clip)).detach()


def _plan_parameters(plan, iterates: torch.Tensor) -> list[list[torch.Tensor]]:
    """(M, p) flat iterates → :func:`stack_plan_parameters`' per-layer (M, ...) views."""
    shapes = [p.shape for _, layer in plan for p in layer.parameters(recurse=False)]
    chunks = iterates.split([math.prod(shape) for shape in shapes], dim=1)
    views = [c.reshape(len(iterates), *shape) for c, shape in zip(chunks, shapes, strict=True)]
    return stack_plan_parameters(plan, views)


def _layer_norms_squared(layer: nn.Module, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(M, m) squared norms of one layer's per-example gradients, from its input ``a`` and δ in
    :func:`stacked_forward`'s layout (rows (M, m, f) or shared (m, f); images (m, M·c, h, w))."""
    if isinstance(layer, nn.Linear):
        return delta.pow(2).sum(-1) * (a.pow(2).sum(-1) + float(layer.bias is not None))
    m, n_models = a.shape[0], delta.shape[1] // layer.out_channels
    patches = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    patches = patches.view(m, n_models, -1, patches.shape[-1])  # (m, M, in·k², q), model-major
    delta = delta.reshape(m, n_models, layer.out_channels, -1)  # (m, M, out, q)
    sq = torch.matmul(delta, patches.transpose(-1, -2)).pow(2).sum((-1, -2))
    if layer.bias is not None:
        sq = sq + delta.sum(-1).pow(2).sum(-1)
    return sq.T


def _floats_per_model(plan, x_one: torch.Tensor) -> int:
    """Floats one model and one example hold in :func:`_plan_chunk` (inputs, outputs, their
    gradients and a convolution's patches, three times over for the temporaries), from a probe pass."""
    taps: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    n_params = sum(p.numel() for _, layer in plan for p in layer.parameters(recurse=False))
    with torch.no_grad():
        stacked_forward(plan, _plan_parameters(plan, x_one.new_zeros(1, n_params)), x_one, taps)
    size = 0
    for layer, a, z in taps:
        patches = a.numel() * (math.prod(layer.kernel_size) if isinstance(layer, nn.Conv2d) else 1)
        size += patches + 2 * z.numel()
    return 3 * size


def is_linear_relu_stack(model: nn.Module) -> bool:
    """True for what :func:`build_model` builds: Linear, then (ReLU, Linear)*, every Linear biased."""
    if not isinstance(model, nn.Sequential) or len(model) % 2 == 0:
        return False
    expected = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(len(model))]
    return all(type(layer) is kind for layer, kind in zip(model, expected, strict=True)) and all(
        layer.bias is not None for layer in model[::2]
    )


def _functional_loss(model: nn.Module, data: Dataset, m: int, seed: int):
    """What both per-example gradient-norm paths need: a CPU copy of ``model``, the subsample (x, y)
    of :func:`lipschitz_subsample`, the parameters' names, shapes and sizes (to unflatten an
    iterate), and the loss of one example as a function of the parameters (for ``grad``)."""
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

    return model, x, y, names, shapes, sizes, loss_one


def batched_gradient_norms(
    model: nn.Module, trajectories: np.ndarray, data: Dataset, loss_clip: float, m: int, seed: int
) -> np.ndarray:
    """:func:`clipped_gradient_norms` for any model: ``vmap`` over iterates of ``vmap(grad)`` over
    examples, in chunks of iterates that hold at most ``_CHUNK_ELEMENTS`` per-example gradient floats.
    Equals :func:`_vmap_gradient_norms` (one iterate at a time) to float rounding."""
    model, x, y, names, shapes, sizes, loss_one = _functional_loss(model, data, m, seed)

    def norms_one(flat: torch.Tensor) -> torch.Tensor:  # (p,) one iterate → (m,)
        params = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes, strict=True)}
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        sq = sum(g.reshape(len(y), -1).pow(2).sum(dim=1) for g in grads.values())
        inside = per_example_loss(functional_call(model, params, (x,)), y, data.task) < loss_clip
        return sq.sqrt() * inside

    iterates = torch.as_tensor(trajectories)
    flat = iterates.reshape(-1, iterates.shape[-1])  # (2N, p)
    step = max(1, _CHUNK_ELEMENTS // (3 * len(y) * flat.shape[1]))  # gradients, squares, activations
    with torch.no_grad():
        norms = torch.cat([vmap(norms_one)(chunk) for chunk in flat.split(step)])
    return norms.reshape(*iterates.shape[:-1], len(y)).double().numpy()


def _vmap_gradient_norms(
    model: nn.Module, trajectories: np.ndarray, data: Dataset, loss_clip: float, m: int, seed: int
) -> np.ndarray:
    """The per-iterate ``vmap(grad)`` path of :func:`clipped_gradient_norms`, for any model (the
    reference :func:`batched_gradient_norms` is tested against)."""
    model, x, y, names, shapes, sizes, loss_one = _functional_loss(model, data, m, seed)

    per_example_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    runs, n_points, _ = trajectories.shape
    norms = np.zeros((runs, n_points, len(y)), dtype=np.float64)
    for r in range(runs):
        for k in range(n_points):
            chunks = torch.as_tensor(trajectories[r, k]).split(sizes)
            params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
            grads = per_example_grad(params, x, y)
            sq = sum(g.reshape(len(y), -1).pow(2).sum(dim=1) for g in grads.values())
            with torch.no_grad():
                inside = per_example_loss(functional_call(model, params, (x,)), y, data.task) < loss_clip
            norms[r, k] = (sq.sqrt() * inside).detach().numpy()
    return norms


# ---------------------------------------------------------------------------------------------
# Recorded iterates in bounded memory
# ---------------------------------------------------------------------------------------------

#: Full iterates a store may hold before it computes their gradient norms (and sketches them).
_PENDING_BYTES = 64 << 20


class IterateStore:
    """The recorded iterates of both runs and their per-example gradient norms.

    Full iterates wait until ``chunk`` records have arrived; then their gradient norms are computed
    in one vectorised call, and they are kept as they are or, given a ``sketch``, as JL sketches
    (sketch.py). A sketched model thus never holds more than ``chunk`` full iterates per run.
    """

    def __init__(self, norms: Callable[[np.ndarray], np.ndarray], p: int, sketch: SignSketch | None):
        # norms: (2, c, p) iterates → (2, c, m) gradient norms; sketch: None to keep iterates in full
        self.norms, self.n_parameters, self.sketch = norms, p, sketch
        self.chunk = max(1, _PENDING_BYTES // (2 * 4 * p))  # records of (2, p) float32
        self.latest: np.ndarray | None = None  # (2, p), the last full iterate of both runs
        self.pending: list[np.ndarray] = []  # each (2, p)
        self.kept: list[np.ndarray] = []  # each (2, c, p), or (2, c, k) when sketched
        self.grad_norms: list[np.ndarray] = []  # each (2, c, m)
        self.seconds = {"lipschitz": 0.0, "sketch": 0.0}

    def add(self, iterate: torch.Tensor) -> None:
        """iterate (2, p) of both runs at a recorded step."""
        self.latest = iterate.detach().float().cpu().numpy()
        self.pending.append(self.latest)
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        block = np.stack(self.pending, axis=1)  # (2, c, p)
        self.pending = []
        started = time.perf_counter()
        self.grad_norms.append(self.norms(block))
        normed = time.perf_counter()
        if self.sketch is not None:
            block = self.sketch.apply(torch.from_numpy(block.reshape(-1, self.n_parameters)))
            block = block.numpy().reshape(2, -1, self.sketch.dim)
        self.kept.append(block)
        self.seconds["lipschitz"] += normed - started
        self.seconds["sketch"] += time.perf_counter() - normed

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(2, N, p or k) recorded trajectories and (2, N, m) their gradient norms."""
        self.flush()
        return np.concatenate(self.kept, axis=1), np.concatenate(self.grad_norms, axis=1)


def _iterate_store(spec: ModelSpec, data: Dataset, settings: TrainSettings) -> IterateStore:
    """The store of one twin run; the sketch, seeded from the study seed, is shared by both runs."""
    template = initial_model(spec, settings.seed)  # shapes for the gradient norms, on the CPU
    p = count_parameters(template)
    sketch = SignSketch(p, settings.sketch_dim, settings.seed) if p > settings.sketch_above else None

    def norms(block: np.ndarray) -> np.ndarray:
        return clipped_gradient_norms(
            template, block, data, settings.loss_clip, settings.lipschitz_subsample, settings.seed
        )

    return IterateStore(norms, p, sketch)
