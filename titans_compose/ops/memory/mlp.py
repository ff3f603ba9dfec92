"""The memory network M at fixed weights: forward, and the hand-written backward that gives every layer's input
``a_l`` and output error ``delta_l`` (memory-math.md section 2: G_l = delta_l a_l^T for any depth and loss).

Shapes: weights W_l are [N, out, in]; token batches are [N, n, features]. Nothing here depends on the inner update
rule; both memory paths and the tests use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.precision import accumulation_dtype, autocast_off


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


def finish_backward(grad: Tensor, z_last: Tensor, cfg: MemoryConfig) -> tuple[Tensor, Tensor | None]:
    """d loss / d z_last and, with the residual, the part that reaches the input x, given d loss / d out."""
    g_z = grad
    if cfg.output_norm:
        _, mean, rstd = layer_norm(z_last, cfg.ln_eps)
        g_z = layer_norm_backward(grad, z_last, mean, rstd)
    return g_z, grad if cfg.residual else None


def forward(weights: tuple[Tensor, ...] | list[Tensor], x: Tensor, cfg: MemoryConfig) -> Tensor:
    """M(x) with the given weights, in x's dtype. Computed in float32 (float64 for float64 inputs) with autocast
    off, as the memory's arithmetic always is (:mod:`~titans_compose.ops.memory.precision`): MAC's read of the
    segment-start weights runs here outside the scan."""
    acc = accumulation_dtype(x, *weights)
    with autocast_off(x.device.type):
        h = x.to(acc)
        for i, w in enumerate(weights):
            z = h @ w.to(acc).transpose(-1, -2)
            h = cfg.activation.fn(z) if i < len(weights) - 1 else z
        return finish(h, x.to(acc), cfg)[0].to(x.dtype)


def output_error(z_last: Tensor, k: Tensor, v: Tensor, cfg: MemoryConfig) -> Tensor:
    """The loss gradient with respect to the last linear layer's output ``z_last`` (through the optional
    LayerNorm; the residual adds ``k``): the last layer's error delta_L."""
    out, ln_cache = finish(z_last, k, cfg)
    err = cfg.loss.grad(out - v, cfg.loss_params)
    return layer_norm_backward(err, *ln_cache) if ln_cache is not None else err


def output_error_vjp(
    grad: Tensor, z_last: Tensor, k: Tensor, v: Tensor, cfg: MemoryConfig
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``grad`` (d outer / d delta_L) pulled back through :func:`output_error` to (z_last, k, v); the k part is
    None without the residual (k then reaches delta_L through nothing else).

    In closed form where the loss has ``grad2``. With u = ``grad``, err = out - v, g = loss'(err) and the gain-free
    LayerNorm's Jacobian J = r (I - 1 1^T / n - x x^T / n) (x the normalised z, r = 1/std, J symmetric, delta_L =
    J g): d/d err = loss''(err) * J u, which reaches v with a minus sign, k through the residual and z through J;
    and J's own dependence on z adds -(r / n) (r (u.g - sum(u) sum(g) / n - (u.x)(g.x) / n) x + (g.x) J u
    + (u.x) delta_L). Without ``grad2`` autograd differentiates :func:`output_error` (slower, same result)."""
    if cfg.loss.grad2 is None:
        return _output_error_autograd_vjp(grad, z_last, k, v, cfg)
    if not cfg.output_norm:
        err = (z_last + k if cfg.residual else z_last) - v
        g_err = grad * cfg.loss.grad2(err, cfg.loss_params)
        return g_err, g_err if cfg.residual else None, -g_err
    x, mean, rstd = layer_norm(z_last, cfg.ln_eps)
    err = (x + k if cfg.residual else x) - v
    g = cfg.loss.grad(err, cfg.loss_params)
    delta = layer_norm_backward(g, z_last, mean, rstd)
    pulled = layer_norm_backward(grad, z_last, mean, rstd)  # J u
    g_err = pulled * cfg.loss.grad2(err, cfg.loss_params)
    n = z_last.shape[-1]
    g_x, u_x = (g * x).sum(-1, keepdim=True), (grad * x).sum(-1, keepdim=True)
    inner = (grad * g).sum(-1, keepdim=True) - grad.sum(-1, keepdim=True) * g.sum(-1, keepdim=True) / n - u_x * g_x / n
    own = (rstd * inner) * x + g_x * pulled + u_x * delta
    g_z = layer_norm_backward(g_err, z_last, mean, rstd) - (rstd / n) * own
    return g_z, g_err if cfg.residual else None, -g_err


def _output_error_autograd_vjp(
    grad: Tensor, z_last: Tensor, k: Tensor, v: Tensor, cfg: MemoryConfig
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`output_error_vjp` by autograd on the elementwise head (for a loss without ``grad2``); zeros where
    the output is piecewise constant in an input."""
    with torch.enable_grad():
        z, k_, v_ = (t.detach().requires_grad_() for t in (z_last, k, v))
        out = output_error(z, k_, v_, cfg)
        if not out.requires_grad:
            return torch.zeros_like(z_last), None, torch.zeros_like(v)
        g_z, g_k, g_v = torch.autograd.grad(out, (z, k_, v_), grad, allow_unused=True)
    zero = torch.zeros_like
    return zero(z_last) if g_z is None else g_z, g_k, zero(v) if g_v is None else g_v


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
