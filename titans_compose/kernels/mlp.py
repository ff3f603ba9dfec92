"""The memory network M at fixed weights: forward, and the hand-written backward that gives every layer's input
``a_l`` and output error ``delta_l`` (memory-math.md section 2: G_l = delta_l a_l^T for any depth and loss).

Shapes: weights W_l are [N, out, in]; token batches are [N, n, features]. Nothing here depends on the inner update
rule; both memory paths and the tests use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans_compose.kernels.config import MemoryConfig


def layer_norm(z: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gain-free LayerNorm over the last axis (aten's fused kernel); returns (normalised, mean, 1/std)."""
    return torch.ops.aten.native_layer_norm(z, [z.shape[-1]], None, None, eps)


def layer_norm_backward(grad: Tensor, z: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """d loss / d z for ``LN(z)`` given d loss / d LN(z): aten's fused backward, whose own derivative (used when
    the outer loop trains through the inner update) accounts for the mean and std depending on z."""
    return torch.ops.aten.native_layer_norm_backward(
        grad, z, [z.shape[-1]], mean, rstd, None, None, [True, False, False]
    )[0]


def finish(z_last: Tensor, x: Tensor, cfg: MemoryConfig) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The output transform after the last layer: optional LayerNorm, optional residual x + f(x). The cache holds
    what the LayerNorm backward needs."""
    cache = None
    out = z_last
    if cfg.output_norm:
        out, mean, rstd = layer_norm(z_last, cfg.ln_eps)
        cache = (z_last, mean, rstd)
    if cfg.residual:
        out = out + x
    return out, cache


def forward(weights: tuple[Tensor, ...] | list[Tensor], x: Tensor, cfg: MemoryConfig) -> Tensor:
    """M(x) with the given weights."""
    h = x
    for i, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        h = cfg.activation.fn(z) if i < len(weights) - 1 else z
    return finish(h, x, cfg)[0]


def output_error(z_last: Tensor, k: Tensor, v: Tensor, cfg: MemoryConfig) -> Tensor:
    """The loss gradient with respect to the last linear layer's output ``z_last`` (through the optional
    LayerNorm; the residual adds ``k``): the last layer's error delta_L."""
    out, ln_cache = finish(z_last, k, cfg)
    err = cfg.loss.grad(out - v, cfg.loss_params)
    return layer_norm_backward(err, *ln_cache) if ln_cache is not None else err


def key_path(
    weights: tuple[Tensor, ...] | list[Tensor], k: Tensor, v: Tensor, cfg: MemoryConfig
) -> tuple[list[Tensor], list[Tensor]]:
    """Forward M on keys and back-propagate the loss against values, by hand.

    Returns the inputs ``a_l`` [N, n, in_l] and output errors ``delta_l`` [N, n, out_l] of every layer, so that
    the per-token gradient of layer l is ``delta_l[t] a_l[t]^T``.
    """
    inputs, pre = [k], []
    h = k
    last = len(weights) - 1
    for i, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        pre.append(z)
        if i < last:
            h = cfg.activation.fn(z)
            inputs.append(h)
    delta = output_error(pre[-1], k, v, cfg)
    deltas = [delta]
    for i in range(last - 1, -1, -1):
        delta = cfg.activation.backward(delta @ weights[i + 1], pre[i])
        deltas.append(delta)
    deltas.reverse()
    return inputs, deltas
