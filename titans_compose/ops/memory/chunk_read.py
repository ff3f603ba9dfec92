"""A chunk's read: forward, and the hand-written backward the chunk-write node (:mod:`chunk_write`) uses for full
chunks. The last, partial chunk (and the plain autograd path) runs the same forward under autograd.

``per_chunk`` retrieval reads every query at the chunk-start weights, M(W^0; q). ``after`` / ``before`` read every
query through its own token's weights without forming them (memory-math.md section 3.4), layer by layer:

    z_l = diag(A) h_l W_l^T + diag(B) h_l S_l^T - (C o X_l) delta_l,   X_l = h_l a_l^T,   C = FP o theta_i,

with h_0 = q, h_{l+1} = act(z_l), the key path's inputs a_l and errors delta_l, and the read's gate rows A, B, FP
(shifted by one token for ``before``). The backward walks it in reverse: with g_m = g_z delta_l^T,

    g W_l = (A g_z)^T h_l,  g S_l = (B g_z)^T h_l,  g A = rowsum(g_z o h_l W_l^T),  g B likewise,
    g delta_l = -(C o X_l)^T g_z,  g C -= g_m o X_l,  g h_l = (A g_z) W_l + (B g_z) S_l - (g_m o C) a_l,
    g a_l = -(g_m o C)^T h_l,  g z_{l-1} = act'(z_{l-1}) g h_l.

Doing this by hand inside the write node spares autograd's per-op nodes, gradient sums and sign flips (about a
third of the ``after`` read's time at chunk 64); the tests compare it with plain autograd through the same forward,
and that forward with the sequential reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from titans_compose.ops.memory import mlp
from titans_compose.ops.memory.config import MemoryConfig


@dataclass(frozen=True)
class TokenGates:
    """The per-token read's gate rows: A, B [N, b] (None where forgetting / momentum is off), FP [N, b, b], and
    C = FP o theta (theta already scaled by the clip factor)."""

    A: Tensor | None
    B: Tensor | None
    FP: Tensor
    C: Tensor

    @staticmethod
    def build(fp: Tensor, a: Tensor | None, b: Tensor | None, theta: Tensor) -> TokenGates:
        """From the gate tables' read rows and theta (scaled by the clip factor where there is one)."""
        return TokenGates(a, b, fp, fp * theta.unsqueeze(-2))


@dataclass(frozen=True)
class ReadGrads:
    """Gradients of one read: queries, weights and momentum, the key path's inputs a_l (a_0 = k) and errors
    delta_l (None for ``per_chunk``), and the gate rows' (None where absent)."""

    q: Tensor
    weights: list[Tensor]
    momentum: list[Tensor] | None
    inputs: list[Tensor] | None
    deltas: list[Tensor] | None
    A: Tensor | None
    B: Tensor | None
    C: Tensor | None


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)


def read_forward(
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    q: Tensor,
    inputs: list[Tensor],
    deltas: list[Tensor],
    gates: TokenGates | None,
    cfg: MemoryConfig,
    saving: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The retrieved values [N, b, d] and what :func:`read_backward` needs (empty unless ``saving``).
    ``gates`` None reads at the chunk-start weights (``per_chunk``)."""
    last = len(weights) - 1
    hidden, slopes, products, plain, carried = [q], [], [], [], []
    h = q
    for i, w in enumerate(weights):
        z = torch.bmm(h, w.transpose(1, 2))
        if gates is not None:
            if gates.A is not None:
                plain.append(z)
                z = z * _col(gates.A)
            if momentum is not None:
                through_s = torch.bmm(h, momentum[i].transpose(1, 2))
                carried.append(through_s)
                z = torch.addcmul(z, through_s, _col(gates.B))
            x = torch.bmm(h, inputs[i].transpose(1, 2))
            products.append(x)
            z = torch.baddbmm(z, gates.C * x, deltas[i], alpha=-1)
        if i < last:
            if saving:
                slopes.append(cfg.activation.derivative(z))
            h = cfg.activation.fn(z)
            hidden.append(h)
    y = mlp.finish(z, q, cfg)[0]
    return y, ((*hidden, *slopes, z, *products, *plain, *carried) if saving else ())


def read_backward(
    g_y: Tensor,
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    inputs: list[Tensor],
    deltas: list[Tensor],
    gates: TokenGates | None,
    saved: list[Tensor],
    cfg: MemoryConfig,
) -> ReadGrads:
    """Every gradient of :func:`read_forward`'s output given ``g_y`` (module docstring)."""
    n = len(weights)
    hidden, slopes, z_last, rest = saved[:n], saved[n : 2 * n - 1], saved[2 * n - 1], saved[2 * n :]
    token = gates is not None
    products, rest = (rest[:n], rest[n:]) if token else ([], rest)
    plain, rest = (rest[:n], rest[n:]) if token and gates.A is not None else ([], rest)
    carried = rest if token and momentum is not None else []
    g_w, g_s = [None] * n, [None] * n if token and momentum is not None else None
    g_inputs, g_deltas = ([None] * n, [None] * n) if token else (None, None)
    g_a = g_b = g_c = None
    g_z, g_q_residual = mlp.finish_backward(g_y, z_last, cfg)
    for i in range(n - 1, -1, -1):
        h = hidden[i]
        g_za = g_z if not token or gates.A is None else g_z * _col(gates.A)
        g_w[i] = torch.bmm(g_za.transpose(1, 2), h)
        g_h = torch.bmm(g_za, weights[i])
        if token:
            if gates.A is not None:
                term = (g_z * plain[i]).sum(-1)
                g_a = term if g_a is None else g_a + term
            if momentum is not None:
                g_zb = g_z * _col(gates.B)
                g_s[i] = torch.bmm(g_zb.transpose(1, 2), h)
                g_h = torch.baddbmm(g_h, g_zb, momentum[i])
                term = (g_z * carried[i]).sum(-1)
                g_b = term if g_b is None else g_b + term
            g_m = torch.bmm(g_z, deltas[i].transpose(1, 2))
            g_deltas[i] = torch.bmm((gates.C * products[i]).transpose(1, 2), g_z).neg_()
            g_c = -(g_m * products[i]) if g_c is None else torch.addcmul(g_c, g_m, products[i], value=-1)
            g_x = g_m * gates.C  # minus the gradient of X_l
            g_h = torch.baddbmm(g_h, g_x, inputs[i], alpha=-1)
            g_inputs[i] = torch.bmm(g_x.transpose(1, 2), h).neg_()
        g_z = g_h * slopes[i - 1] if i > 0 else g_h
    g_q = g_z if g_q_residual is None else g_z + g_q_residual
    return ReadGrads(g_q, g_w, g_s, g_inputs, g_deltas, g_a, g_b, g_c)
