"""Back-propagation by hand through a chain of ``nn.Linear`` and unit-wise layers (the built-in MLP and
linear models, a user's Sequential of them), for the certificate's many small gradient passes.

The posterior fit takes a hundred and fifty small steps (a draw of the weights, a forward and a
backward pass on a minibatch of S), the analytic bounds two full gradients at each of some forty
iterates, the tail index sixty-four minibatch gradients at each of three; at the quick-start's sizes
autograd's graph building and engine cost more than the arithmetic (the fit's gradient at batch 128:
0.72 ms by autograd, 0.34 ms here). The chain rule written out is two matrix products a layer, and
since each row's δ is its own, one backward pass of all rows gives every minibatch's gradient. Equal
to autograd to float rounding (tests/test_backprop.py), not bit for bit: the sums run in another order.
"""

from __future__ import annotations

import torch
from torch import nn

#: Unit-wise layers whose derivative is written below: δ before the layer from δ after it and its output h.
_BACKWARD = {
    nn.ReLU: lambda delta, h: torch.ops.aten.threshold_backward(delta, h, 0),  # δ where h > 0, else 0
    nn.Tanh: lambda delta, h: delta * (1.0 - h * h),
    nn.Sigmoid: lambda delta, h: delta * h * (1.0 - h),
}


def supports(chain: list) -> bool:
    """Whether every unit-wise layer of ``chain`` has its derivative written here (else: autograd)."""
    return all(isinstance(layer, tuple) or type(layer) in (*_BACKWARD, nn.Identity) for layer in chain)


def forward(chain: list, params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(rows, k) outputs, by the same calls the modules make, and what :func:`backward` needs: each
    layer's input (Linear) or output."""
    h, saved = x, []
    for layer in chain:
        if isinstance(layer, tuple):
            saved.append(h)
            weight, bias = layer
            h = torch.nn.functional.linear(h, params[weight], params[bias] if bias else None)
        else:
            h = layer(h)
            saved.append(h)
    return h, saved


def deltas(chain: list, params: dict[str, torch.Tensor], saved: list, grad_out: torch.Tensor):
    """Yield ``(i, δ)`` for each Linear ``chain[i]``, last first: δ (rows, out) the derivative of
    ``Σ grad_out · outputs`` w.r.t. that layer's outputs, row by row (a row's δ depends on its row only)."""
    delta = grad_out
    first_linear = next(i for i, layer in enumerate(chain) if isinstance(layer, tuple))
    for i in range(len(chain) - 1, first_linear - 1, -1):  # nothing before the first Linear has weights
        layer = chain[i]
        if isinstance(layer, tuple):
            yield i, delta
            if i > first_linear:
                delta = delta @ params[layer[0]]
        elif type(layer) is not nn.Identity:
            delta = _BACKWARD[type(layer)](delta, saved[i])


def backward(
    chain: list, params: dict[str, torch.Tensor], saved: list, grad_out: torch.Tensor, grads: dict
) -> None:
    """Write ∂/∂θ of ``Σ grad_out · outputs`` into ``grads`` (name → tensor of the parameter's shape,
    e.g. views of one flat vector), from :func:`forward`'s ``saved``."""
    for i, delta in deltas(chain, params, saved, grad_out):
        weight, bias = chain[i]
        torch.mm(delta.t(), saved[i], out=grads[weight])
        if bias:
            torch.sum(delta, dim=0, out=grads[bias])


def subset_gradients(
    chain: list, names: list[str], params: dict, saved: list, grad_out: torch.Tensor, subsets: torch.Tensor
) -> torch.Tensor:
    """(m, p) the gradient of ``Σ_{i ∈ subset} grad_out_i · outputs_i`` for each row of ``subsets``
    (m, b) row indices, flat in ``names``' order: from one backward pass of all rows, since each row's δ
    is its own, a subset's weight gradient is ``δ_Bᵀ a_B`` (one batched product for all m subsets)."""
    pieces = {}
    for i, delta in deltas(chain, params, saved, grad_out):
        weight, bias = chain[i]
        picked = delta[subsets]  # (m, b, out)
        pieces[weight] = torch.bmm(picked.transpose(1, 2), saved[i][subsets]).flatten(1)
        if bias:
            pieces[bias] = picked.sum(dim=1)
    return torch.cat([pieces[name] for name in names], dim=1)
