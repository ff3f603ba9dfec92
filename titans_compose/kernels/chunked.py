"""The chunked parallel ("dual") form of the neural memory: parallel inside a chunk, sequential across chunks.

Per chunk (memory-math.md section 3): run the memory on the keys at the chunk-start weights W^0 and back-propagate
by hand to get every layer's inputs a_l and errors delta_l; build the gate coefficients A, B, C, D, E from
log-space segment sums (never a ratio of cumulative products); read every query through masked b x b products
without forming per-token weights; and fold the chunk into the state:

    W_l^b = A_b W_l^0 + B_b S_l^0 - sum_i C_{b,i} delta_{l,i} a_{l,i}^T,   S_l^b = D_b S_l^0 - sum_i E_{b,i} ...

Everything is differentiable by autograd (the errors delta are built from differentiable ops, so second-order
terms through the activation are included). The sequential reference in :mod:`reference` is the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from titans_compose.kernels import mlp
from titans_compose.kernels.config import MemoryConfig
from titans_compose.kernels.state import MemoryState, Pending


def segsum(x: Tensor) -> Tensor:
    """``out[..., t, j] = sum_{j < i <= t} x[..., i]`` for j <= t, and -inf above the diagonal.

    Summing the masked entries directly (instead of subtracting two cumulative sums) keeps the exponent exact
    when the cumulative sums are large.
    """
    n = x.shape[-1]
    strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    acc = x.unsqueeze(-1).expand(*x.shape, n).masked_fill(~strict, 0.0).cumsum(-2)
    return acc.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))


@dataclass(frozen=True)
class Coefficients:
    """Gate coefficients of one chunk; rows are tokens t, columns tokens i. B, D, E are None without momentum."""

    A: Tensor  # [N, b]      decay of W^0
    C: Tensor  # [N, b, b]   weight of token i's gradient in W_t
    B: Tensor | None  # [N, b]      how S^0 enters W_t
    D: Tensor | None  # [N, b]      decay of S^0
    E: Tensor | None  # [N, b, b]   weight of token i's gradient in S_t

    def shifted(self) -> Coefficients:
        """Row t holds row t-1 (row 0: the chunk-start state A=1, B=0, C=0): for "before" retrieval."""

        def shift(x: Tensor | None, first: float) -> Tensor | None:
            if x is None:
                return None
            pad = torch.full_like(x[:, :1], first)
            return torch.cat([pad, x[:, :-1]], dim=1)

        return Coefficients(shift(self.A, 1.0), shift(self.C, 0.0), shift(self.B, 0.0), None, None)


def coefficients(theta: Tensor, log_eta: Tensor | None, log_keep: Tensor | None) -> Coefficients:
    """A, B, C, D, E of memory-math.md section 3 from the gates of one chunk ([N, b] each)."""
    if log_keep is None:
        log_keep = torch.zeros_like(theta)
    A = log_keep.cumsum(-1).exp()
    F = segsum(log_keep).exp()  # F[t, j] = prod_{j < i <= t} (1 - alpha_i)
    if log_eta is None:
        return Coefficients(A, F * theta.unsqueeze(-2), None, None, None)
    P = segsum(log_eta).exp()  # P[j, i] = prod_{i < m <= j} eta_m
    eta_prod = log_eta.cumsum(-1).exp()  # D_t = prod_{m <= t} eta_m
    C = (F @ P) * theta.unsqueeze(-2)
    B = (F @ eta_prod.unsqueeze(-1)).squeeze(-1)
    return Coefficients(A, C, B, eta_prod, P * theta.unsqueeze(-2))


def clip_scale(inputs: list[Tensor], deltas: list[Tensor], max_norm: float) -> Tensor:
    """Per-token factor min(1, max_norm / ||g_t||) with ||g_t||^2 = sum_l ||delta_l||^2 ||a_l||^2."""
    sq = sum(d.square().sum(-1) * a.square().sum(-1) for a, d in zip(inputs, deltas, strict=True))
    return (max_norm * (sq + torch.finfo(sq.dtype).tiny).rsqrt()).clamp(max=1.0)


def _read(
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    q: Tensor,
    coef: Coefficients,
    inputs: list[Tensor],
    deltas: list[Tensor],
    cfg: MemoryConfig,
) -> Tensor:
    """Every query through its own token's weights W_t, as masked b x b products (no per-token weights)."""
    h = q
    last = len(weights) - 1
    for i, w in enumerate(weights):
        z = coef.A.unsqueeze(-1) * (h @ w.transpose(-1, -2))
        if momentum is not None:
            z = z + coef.B.unsqueeze(-1) * (h @ momentum[i].transpose(-1, -2))
        z = z - (coef.C * (h @ inputs[i].transpose(-1, -2))) @ deltas[i]
        h = cfg.activation.fn(z) if i < last else z
    return mlp.finish(h, q, cfg)[0]


def _fold(
    state: tuple[Tensor, ...],
    row: Tensor,
    inputs: list[Tensor],
    deltas: list[Tensor],
    scale: Tensor,
    extra: tuple[Tensor, ...] | None = None,
    extra_scale: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``scale * X^0 (+ extra_scale * Y^0) - sum_i row_i delta_i a_i^T`` for every layer."""
    out = []
    for i, x0 in enumerate(state):
        update = (deltas[i] * row.unsqueeze(-1)).transpose(-1, -2) @ inputs[i]
        new = scale[:, None, None] * x0 - update
        if extra is not None:
            new = new + extra_scale[:, None, None] * extra[i]
        out.append(new)
    return tuple(out)


def _chunk(
    cfg: MemoryConfig,
    commit: bool,
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
):
    inputs, deltas = mlp.key_path(weights, k, v, cfg)
    if cfg.grad_clip is not None:
        theta = theta * clip_scale(inputs, deltas, cfg.grad_clip)
    coef = coefficients(theta, log_eta, log_keep)
    if cfg.retrieval == "per_chunk":
        y = mlp.forward(weights, q, cfg)
    else:
        read_coef = coef.shifted() if cfg.retrieval == "before" else coef
        y = _read(weights, momentum, q, read_coef, inputs, deltas, cfg)
    if not commit:
        return y, weights, momentum
    new_weights = _fold(
        weights, coef.C[:, -1], inputs, deltas, coef.A[:, -1], momentum, None if momentum is None else coef.B[:, -1]
    )
    new_momentum = None
    if momentum is not None:
        new_momentum = _fold(momentum, coef.E[:, -1], inputs, deltas, coef.D[:, -1])
    return y, new_weights, new_momentum


def chunked_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    state: MemoryState,
    cfg: MemoryConfig,
) -> tuple[Tensor, MemoryState]:
    """Run the memory over a sequence: returns the retrieved values [N, T, d] and the state after it.

    ``q, k, v``: [N, T, d]; ``theta``: inner learning rates [N, T]; ``log_eta``: log momentum decay (None
    without momentum); ``log_keep``: log(1 - alpha) (None without forgetting). Tokens continue the chunk left
    unfinished in ``state``; a chunk this call leaves unfinished is returned as pending.
    """
    if (log_eta is None) != (state.momentum is None):
        raise ValueError("momentum gates and momentum state must be given together")
    p = state.pending_len
    if p:
        pend = state.pending
        k, v = torch.cat([pend.k, k], 1), torch.cat([pend.v, v], 1)
        theta = torch.cat([pend.theta, theta], 1)
        log_eta = None if log_eta is None else torch.cat([pend.log_eta, log_eta], 1)
        log_keep = None if log_keep is None else torch.cat([pend.log_keep, log_keep], 1)
        q = torch.cat([q.new_zeros(q.shape[0], p, q.shape[2]), q], 1)
    total, b = k.shape[1], cfg.chunk_size
    weights, momentum = state.weights, state.momentum
    outputs = []
    pending = None
    for start in range(0, total, b):
        end = min(start + b, total)
        commit = end - start == b
        sl = slice(start, end)
        args = (
            weights,
            momentum,
            q[:, sl],
            k[:, sl],
            v[:, sl],
            theta[:, sl],
            None if log_eta is None else log_eta[:, sl],
            None if log_keep is None else log_keep[:, sl],
        )
        if cfg.checkpoint and torch.is_grad_enabled():
            y, weights, momentum = checkpoint(_chunk, cfg, commit, *args, use_reentrant=False)
        else:
            y, weights, momentum = _chunk(cfg, commit, *args)
        outputs.append(y)
        if not commit:
            pending = Pending(k[:, sl], v[:, sl], theta[:, sl], args[6], args[7])
    y = torch.cat(outputs, 1)[:, p:] if outputs else q[:, p:]
    return y, MemoryState(weights, momentum, pending)
