"""One full chunk (the key path at the chunk-start weights, the read, the chunk-end fold) as a single autograd node
with a hand-written backward. The read's forward and backward are in :mod:`chunk_read`.

Forward (memory-math.md sections 2-3): a_1 = k, z_l = a_l W_l^T, a_{l+1} = act(z_l); delta_L = the loss gradient at
the output (through LayerNorm / residual); m_l = delta_{l+1} W_{l+1}, delta_l = m_l * act'(z_l); then

    W'_l = keep W_l + carry S_l - (c * delta_l)^T a_l,      S'_l = decay S_l - (e * delta_l)^T a_l

with the last-row gate coefficients keep = A_b, carry = B_b, decay = D_b, c = C_{b,.}, e = E_{b,.}. The node also
returns every a_l and delta_l (which the per-token read, inside the node, takes) and the read's output.

Plain autograd differentiates this through the double backward of the hand-written key-path backward: dozens of
broadcast multiplies and reductions per chunk. The backward below walks the same graph in reverse by hand:

0. the read (:func:`chunk_read.read_backward`), whose gradients with respect to a_l, delta_l, the chunk-start state
   and theta join those the outputs received;
1. the fold: gS_l = carry gW'_l + decay gS'_l; g keep / carry / decay are inner products with W_l, S_l; with
   P_l = a_l gW'_l^T and Q_l = a_l gS'_l^T: g delta_l -= c P_l + e Q_l, g c = -sum(delta_l P_l), g e likewise,
   and g a_l -= (c delta_l) gW'_l + (e delta_l) gS'_l;
   with ``grad_clip``, c and e carry the per-token factor s_t = min(1, max_norm / ||g_t||), ||g_t||^2 =
   sum_l ||delta_l||^2 ||a_l||^2, whose derivative adds to g delta_l and g a_l where the clip acts;
2. the error recursion, first layer up: g m_l = act'(z_l) g delta_l, g z_l += m_l act''(z_l) g delta_l (the
   forward saves act'(z_l) and m_l act''(z_l), not z_l and m_l), g delta_{l+1} += g m_l W_{l+1}^T,
   g W_{l+1} += delta_{l+1}^T g m_l;
3. the output error delta_L(z_L, k, v): :func:`mlp.output_error_vjp`, in closed form through the loss's second
   derivative and the LayerNorm;
4. the key-path forward, last layer down: g W_l += g z_l^T a_l, g a_l += g z_l W_l, g z_{l-1} += act'(.) g a_l.

Every matmul is a batched matmul of the chunk's [N, b, features] blocks. A rule without a second derivative
(``grad2``) gets its second-order term from autograd on its elementwise backward alone, so any activation or loss
whose elementwise backward is differentiable works. The backward is first order
(``once_differentiable``): training through the memory needs no more; a double backward of the outer loss
runs through the plain autograd path of :mod:`chunked` (``create_graph`` callers can force it with
``TITANS_COMPOSE_CHUNK_BACKWARD=autograd``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from titans_compose.ops.memory import chunk_read, mlp
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.precision import autocast_off

ENV_VAR = "TITANS_COMPOSE_CHUNK_BACKWARD"


def supported(cfg: MemoryConfig) -> bool:
    """Whether the hand-written backward applies: always, unless the plain autograd path is asked for."""
    return os.environ.get(ENV_VAR, "manual") != "autograd"


def clip_floor(max_norm: float, dtype: torch.dtype) -> float:
    """max_norm^2, kept within ``dtype``'s normal range: a squared gradient norm below it leaves the clip factor at 1
    (up to the range limit: below the smallest normal number the factor is max_norm / sqrt(tiny))."""
    info = torch.finfo(dtype)
    return min(max(max_norm**2, info.tiny), info.max)


def clip_factor(sq: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / sqrt(sq)) per token from the squared gradient norm ``sq``, computed from ``sq`` clamped below
    at :func:`clip_floor`, where the factor is 1 anyway: a zero gradient (a zero key, or a value the memory already
    returns) never takes 1/sqrt(0), whose infinite derivative times the clamp's zero is NaN under autograd."""
    return (max_norm * sq.clamp_min(clip_floor(max_norm, sq.dtype)).rsqrt()).clamp(max=1.0)


def clip_scale(inputs: list[Tensor], deltas: list[Tensor], max_norm: float) -> tuple[Tensor, Tensor]:
    """Per-token factor min(1, max_norm / ||g_t||) with ||g_t||^2 = sum_l ||delta_l||^2 ||a_l||^2 (the token's
    gradient over all layers), and ||g_t||^2 itself."""
    sq = sum(d.square().sum(-1) * a.square().sum(-1) for a, d in zip(inputs, deltas, strict=True))
    return clip_factor(sq, max_norm), sq


def _col(x: Tensor) -> Tensor:
    return x.view(-1, 1, 1)


def _minus_outer(base: Tensor, x: Tensor, rows: Tensor, y: Tensor) -> Tensor:
    """``base - (rows * x)^T y`` for per-token factors ``rows`` [N, b], which scale whichever of x, y is smaller."""
    if x.shape[-1] <= y.shape[-1]:
        return torch.baddbmm(base, (x * rows.unsqueeze(-1)).transpose(1, 2), y, alpha=-1)
    return torch.baddbmm(base, x.transpose(1, 2), y * rows.unsqueeze(-1), alpha=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row inner product of two [N, m, n] tensors."""
    return (a * b).sum((1, 2))


def fold(
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    inputs: list[Tensor],
    deltas: list[Tensor],
    c: Tensor,
    e: Tensor | None,
    keep: Tensor | None,
    carry: Tensor | None,
    decay: Tensor | None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
    """The chunk-end state: W'_l = keep W_l + carry S_l - (c delta_l)^T a_l, S'_l = decay S_l - (e delta_l)^T a_l
    (keep / carry / decay [N] and c / e [N, b]: the last rows of the gate tables; None where a gate is off)."""
    new_w, new_s = [], []
    for i, w in enumerate(weights):
        base = w if keep is None else w * _col(keep)
        if momentum is not None:
            base = torch.addcmul(base, momentum[i], _col(carry))
        new_w.append(_minus_outer(base, deltas[i], c, inputs[i]))
        if momentum is not None:
            new_s.append(_minus_outer(momentum[i] * _col(decay), deltas[i], e, inputs[i]))
    return tuple(new_w), None if momentum is None else tuple(new_s)


def scaled(c: Tensor, e: Tensor | None, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The last-row coefficients c, e with the per-token clip factor applied (unchanged without a clip)."""
    if scale is None:
        return c, e
    return c * scale, None if e is None else e * scale


def _scaled_rows_times(x: Tensor, rows: Tensor, y: Tensor) -> Tensor:
    """``(rows * x) y`` for per-token factors ``rows`` [N, b, 1], scaling whichever of x and the product is
    smaller."""
    if x.shape[-1] <= y.shape[-1]:
        return torch.bmm(x * rows, y)
    return torch.bmm(x, y) * rows


def _zeros_for_none(grads: tuple[Tensor | None, ...], like: tuple[Tensor, ...]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


class _ChunkWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, layers, q, fp_read, a_read, b_read, theta, k, v, c, e, keep, carry, decay, *state):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        weights, momentum = state[:layers], state[layers:] or None
        act, saving = cfg.activation, any(ctx.needs_input_grad)
        inputs, pre = [k], []
        h = k
        for i, w in enumerate(weights):
            z = torch.bmm(h, w.transpose(1, 2))
            pre.append(z)
            if i < layers - 1:
                h = act.fn(z)
                inputs.append(h)
        deltas = [mlp.output_error(pre[-1], k, v, cfg)]
        slopes, curvatures = [], []  # act'(z_l) and m_l act''(z_l): all the backward needs of z_l and m_l
        for i in range(layers - 2, -1, -1):
            m = torch.bmm(deltas[0], weights[i + 1])
            if saving:
                slope = act.derivative(pre[i])
                slopes.insert(0, slope)
                curvatures.insert(0, act.curvature(m, pre[i]))
                deltas.insert(0, m * slope)
            else:
                deltas.insert(0, act.backward(m, pre[i]))
        scale = sq = None
        if cfg.grad_clip is not None:
            scale, sq = clip_scale(inputs, deltas, cfg.grad_clip)
        y, read_saved = None, ()
        if q is not None:
            gates = _token_gates(fp_read, a_read, b_read, theta, scale)
            y, read_saved = chunk_read.read_forward(weights, momentum, q, inputs, deltas, gates, cfg, saving)
        new_w, new_s = fold(weights, momentum, inputs, deltas, *scaled(c, e, scale), keep, carry, decay)
        ctx.cfg, ctx.layers, ctx.has_keep, ctx.has_momentum = cfg, layers, keep is not None, momentum is not None
        ctx.reads = q is not None
        ctx.device_type = k.device.type
        if saving:
            ctx.save_for_backward(
                k, v, c, e, keep, carry, decay, scale, sq, pre[-1], theta, fp_read, a_read, b_read, *weights,
                *(momentum or ()), *slopes, *curvatures, *inputs[1:], *deltas, *read_saved,
            )  # fmt: skip
        outputs = (*new_w, *(new_s or ()), *inputs[1:], *deltas, *(() if scale is None else (scale,)))
        return outputs if y is None else (*outputs, y)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        # a backward called under autocast would run these products in its low dtype: the state's gradients
        # stay in the forward's dtype (ops/memory/precision.py)
        with autocast_off(ctx.device_type):
            return _ChunkWrite._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        cfg, n = ctx.cfg, ctx.layers
        has_m = ctx.has_momentum
        saved = list(ctx.saved_tensors)
        k, v, c_raw, e_raw, keep, carry, decay, scale, sq, z_last, theta, fp_read, a_read, b_read = saved[:14]
        c, e = scaled(c_raw, e_raw, scale)  # what the fold used
        rest = saved[14:]
        weights, rest = rest[:n], rest[n:]
        momentum, rest = (rest[:n], rest[n:]) if has_m else (None, rest)
        slopes, rest = rest[: n - 1], rest[n - 1 :]
        curvatures, rest = rest[: n - 1], rest[n - 1 :]
        inputs, rest = [k, *rest[: n - 1]], rest[n - 1 :]
        deltas, read_saved = rest[:n], rest[n:]
        # outputs nobody used come as None (grads are not materialised): the chunk-end state is always used
        # except at the end of a sequence, the a_l and delta_l only by a per-token read
        g_new_w, grads = _zeros_for_none(grads[:n], weights), grads[n:]
        g_new_s, grads = (_zeros_for_none(grads[:n], momentum), grads[n:]) if has_m else (None, grads)
        g_inputs_ext, g_deltas = list(grads[: n - 1]), list(grads[n - 1 : 2 * n - 1])
        g_scale_out = grads[2 * n - 1] if scale is not None else None

        # 0. the read (its gradients join those of the outputs it reads: a_l, delta_l, the start state, theta)
        read = g_fp = g_theta = None
        if ctx.reads and grads[-1] is not None:
            gates = _token_gates(fp_read, a_read, b_read, theta, scale)
            read = chunk_read.read_backward(grads[-1], weights, momentum, inputs, deltas, gates, read_saved, cfg)
            if gates is not None:
                g_deltas = [_plus(g, r) for g, r in zip(g_deltas, read.deltas, strict=True)]
                g_inputs_ext = [_plus(g, r) for g, r in zip(g_inputs_ext, read.inputs[1:], strict=True)]
                theta_read = theta if scale is None else theta * scale
                g_fp = read.C * theta_read.unsqueeze(-2)
                g_theta = (read.C * fp_read).sum(-2)
                if scale is not None:
                    g_scale_out = _plus(g_scale_out, g_theta * theta)
                    g_theta = g_theta * scale

        # 1. the fold
        neg_c, neg_e = -c.unsqueeze(-1), None if e is None else -e.unsqueeze(-1)
        g_w = [g if keep is None else g * _col(keep) for g in g_new_w]
        if read is not None:
            g_w = [g + r for g, r in zip(g_w, read.weights, strict=True)]
        g_s = g_keep = g_carry = g_decay = None
        if ctx.has_keep:
            g_keep = sum(_dot(w, g) for w, g in zip(weights, g_new_w, strict=True))
        if has_m:
            g_s = [torch.addcmul(gs * _col(decay), gw, _col(carry)) for gw, gs in zip(g_new_w, g_new_s, strict=True)]
            if read is not None and read.momentum is not None:
                g_s = [g + r for g, r in zip(g_s, read.momentum, strict=True)]
            g_carry = sum(_dot(s, g) for s, g in zip(momentum, g_new_w, strict=True))
            g_decay = sum(_dot(s, g) for s, g in zip(momentum, g_new_s, strict=True))
        g_c = torch.zeros_like(c)
        g_e = None if e is None else torch.zeros_like(e)
        g_inputs = []
        for i in range(n):
            a, d = inputs[i], deltas[i]
            p = torch.bmm(a, g_new_w[i].transpose(1, 2))
            g_c -= (d * p).sum(-1)
            g_deltas[i] = p * neg_c if g_deltas[i] is None else torch.addcmul(g_deltas[i], p, neg_c)
            g_a = _scaled_rows_times(d, neg_c, g_new_w[i])
            if has_m:
                q = torch.bmm(a, g_new_s[i].transpose(1, 2))
                g_e -= (d * q).sum(-1)
                g_deltas[i] = torch.addcmul(g_deltas[i], q, neg_e)
                g_a += _scaled_rows_times(d, neg_e, g_new_s[i])
            g_inputs.append(g_a if i == 0 or g_inputs_ext[i - 1] is None else g_a + g_inputs_ext[i - 1])

        # 1b. the clip: the fold took c s and e s with s = min(1, max_norm / sqrt(sq)) per token
        if scale is not None:
            g_scale = g_c * c_raw + (0.0 if e_raw is None else g_e * e_raw)
            if g_scale_out is not None:
                g_scale = g_scale + g_scale_out
            g_c, g_e = g_c * scale, None if e_raw is None else g_e * scale
            # ds/d(sq) = -s / (2 sq) where the clip acts (sq above the floor: never sq = 0); d(sq)/d delta_l =
            # 2 ||a_l||^2 delta_l, and likewise for a_l
            floor = clip_floor(cfg.grad_clip, sq.dtype)
            coef = torch.where(sq >= floor, -g_scale * scale / sq.clamp_min(floor), 0.0).unsqueeze(-1)
            for i in range(n):
                a, d = inputs[i], deltas[i]
                g_deltas[i] = torch.addcmul(g_deltas[i], d, coef * a.square().sum(-1, keepdim=True))
                g_inputs[i] = torch.addcmul(g_inputs[i], a, coef * d.square().sum(-1, keepdim=True))

        # 2. the error recursion delta_l = m_l act'(z_l), first layer up
        g_pre: list[Tensor | None] = [None] * n
        for i in range(n - 1):
            g_m = g_deltas[i] * slopes[i]
            g_pre[i] = g_deltas[i] * curvatures[i]
            g_deltas[i + 1] = torch.baddbmm(g_deltas[i + 1], g_m, weights[i + 1].transpose(1, 2))
            g_w[i + 1] = torch.baddbmm(g_w[i + 1], deltas[i + 1].transpose(1, 2), g_m)

        # 3. the output error delta_L(z_L, k, v)
        g_pre[-1], g_k_residual, g_v = mlp.output_error_vjp(g_deltas[-1], z_last, k, v, cfg)

        # 4. the key-path forward, last layer down
        for i in range(n - 1, -1, -1):
            g_z = g_pre[i]
            g_w[i] = torch.baddbmm(g_w[i], g_z.transpose(1, 2), inputs[i])
            g_inputs[i] = torch.baddbmm(g_inputs[i], g_z, weights[i])
            if i > 0:
                g_pre[i - 1] = torch.addcmul(g_pre[i - 1], g_inputs[i], slopes[i - 1])
        g_k = _plus(g_inputs[0], g_k_residual)
        if read is not None and read.inputs is not None:
            g_k = g_k + read.inputs[0]
        g_q = None if read is None else read.q
        g_a_read, g_b_read = (None, None) if read is None else (read.A, read.B)
        return (
            None, None, g_q, g_fp, g_a_read, g_b_read, g_theta, g_k, g_v, g_c, g_e, g_keep, g_carry, g_decay, *g_w,
            *(g_s or ()),
        )  # fmt: skip


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b where None stands for zero."""
    if a is None:
        return b
    return a if b is None else a + b


def _token_gates(
    fp_read: Tensor | None, a_read: Tensor | None, b_read: Tensor | None, theta: Tensor | None, scale: Tensor | None
) -> chunk_read.TokenGates | None:
    """The per-token read's gate rows, C built from theta scaled by the clip factor; None for ``per_chunk``."""
    if fp_read is None:
        return None
    return chunk_read.TokenGates.build(fp_read, a_read, b_read, theta if scale is None else theta * scale)


@dataclass(frozen=True)
class ReadGates:
    """The per-token read's gate rows from the chunk's :class:`chunked.GateTables` (``*_read``) and its theta."""

    FP: Tensor
    A: Tensor | None
    B: Tensor | None
    theta: Tensor


@dataclass(frozen=True)
class ChunkWrite:
    """What :func:`chunk_write` returns: every layer's input a_l and error delta_l, the chunk-end state, the
    per-token clip factor (None without ``grad_clip``) and the read (None unless asked)."""

    inputs: list[Tensor]
    deltas: list[Tensor]
    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] | None
    scale: Tensor | None
    read: Tensor | None


def chunk_write(
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    k: Tensor,
    v: Tensor,
    c: Tensor,
    e: Tensor | None,
    keep: Tensor | None,
    carry: Tensor | None,
    decay: Tensor | None,
    cfg: MemoryConfig,
    q: Tensor | None = None,
    read_gates: ReadGates | None = None,
) -> ChunkWrite:
    """Key path and fold of one full chunk; with ``q`` also the chunk's read, whose backward then joins this
    node's (:mod:`chunk_read`): at the chunk-start weights without ``read_gates`` (``per_chunk``), else per token."""
    n = len(weights)
    g = read_gates
    gate_args = (None, None, None, None) if g is None else (g.FP, g.A, g.B, g.theta)
    out = _ChunkWrite.apply(cfg, n, q, *gate_args, k, v, c, e, keep, carry, decay, *weights, *(momentum or ()))
    new_w, out = out[:n], out[n:]
    new_s, out = (out[:n], out[n:]) if momentum is not None else (None, out)
    scale = out[2 * n - 1] if cfg.grad_clip is not None else None
    inputs, deltas = [k, *out[: n - 1]], list(out[n - 1 : 2 * n - 1])
    read = out[-1] if q is not None else None
    return ChunkWrite(inputs, deltas, tuple(new_w), None if new_s is None else tuple(new_s), scale, read)
