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

from titans_compose.ops.memory import chunk_read, chunk_write, mlp
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.state import MemoryState, Pending, resume, with_read_rows
from titans_compose.registry.rules import RETENTIONS


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


def coefficients(theta: Tensor, log_eta: Tensor | None, log_keep: Tensor | None) -> Coefficients:
    """A, B, C, D, E of memory-math.md section 3.1 from the gates of one chunk ([..., b] each), spelled out for
    inspection and for checking the :class:`GateTables` the hot path uses against the formulas."""
    t = GateTables.build(log_eta, log_keep, theta.shape, theta.dtype, theta.device, "after")
    ones = torch.ones_like(theta)
    return Coefficients(
        ones if t.A is None else t.A,
        t.FP * theta.unsqueeze(-2),
        t.B,
        t.eta_prod,
        None if t.P is None else t.P * theta.unsqueeze(-2),
    )


@dataclass(frozen=True)
class GateTables:
    """What a chunk needs from its gates alone (no state, no theta), built for all chunks at once.

    ``FP[t, i] = sum_{i<=j<=t} F[t, j] P[j, i]`` with ``F = exp(segsum(log keep))`` and ``P = exp(segsum(log eta))``
    (just F without momentum), so that ``C = FP * theta[i]``. ``*_read`` are the rows the queries read: the same
    rows for "after", shifted by one for "before" (row 0 = the chunk-start state). Fields are None where a gate is
    off (no forget: A = 1; no momentum: no B, D, P).
    """

    A: Tensor | None
    FP: Tensor
    B: Tensor | None
    eta_prod: Tensor | None
    P: Tensor | None
    A_read: Tensor | None
    FP_read: Tensor
    B_read: Tensor | None

    @staticmethod
    def build(
        log_eta: Tensor | None,
        log_keep: Tensor | None,
        shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        retrieval: str,
    ) -> GateTables:
        b = shape[-1]
        F = (segsum(log_keep) if log_keep is not None else _tril_zeros(b, dtype, device).expand(*shape, b)).exp()
        A = None if log_keep is None else log_keep.cumsum(-1).exp()
        B = eta_prod = P = None
        FP = F
        if log_eta is not None:
            P = segsum(log_eta).exp()
            eta_prod = log_eta.cumsum(-1).exp()
            FP = F @ P
            B = (F @ eta_prod.unsqueeze(-1)).squeeze(-1)
        A_read, FP_read, B_read = A, FP, B
        if retrieval == "before":
            A_read = _shift(A, 1.0, -1)
            B_read = _shift(B, 0.0, -1)
            FP_read = _shift(FP, 0.0, -2)
        return GateTables(A, FP, B, eta_prod, P, A_read, FP_read, B_read)

    def unbind(self, dim: int) -> list[GateTables]:
        """Split tables built for [N, chunks, b] gates into one per chunk (one autograd node, not one slice
        per chunk)."""
        fields = [None if f is None else f.unbind(dim) for f in self.__dict__.values()]
        count = len(next(f for f in fields if f is not None))
        return [GateTables(*(None if f is None else f[i] for f in fields)) for i in range(count)]


def _tril_zeros(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0 on and below the diagonal, -inf above (segsum of an all-zero series)."""
    return torch.zeros(b, b, dtype=dtype, device=device).masked_fill(
        ~torch.ones(b, b, dtype=torch.bool, device=device).tril(), float("-inf")
    )


def _shift(x: Tensor | None, first: float, axis: int) -> Tensor | None:
    """Entries moved down by one along the token ``axis`` (-1 for per-token vectors, -2 for the rows of a
    matrix); the first becomes ``first``."""
    if x is None:
        return None
    axis = x.dim() + axis
    pad = torch.full_like(x.narrow(axis, 0, 1), first)
    return torch.cat([pad, x.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)


@dataclass(frozen=True)
class LastRow:
    """What a full chunk's fold takes from its gates alone (memory-math.md section 3.3, row t = b): c = C_{b,.} and
    e = E_{b,.} [..., b], keep = A_b, carry = B_b, decay = D_b [...] (None where a gate is off)."""

    c: Tensor
    e: Tensor | None
    keep: Tensor | None
    carry: Tensor | None
    decay: Tensor | None

    @staticmethod
    def build(theta: Tensor, log_eta: Tensor | None, log_keep: Tensor | None) -> LastRow:
        """From [..., b] gates. Only P = exp(segsum(log eta)) is a b x b table; F's last row is a suffix sum (all
        ones without forgetting: W_b keeps every S_j whole)."""
        keep = None if log_keep is None else log_keep.sum(-1).exp()
        if log_eta is None:
            return LastRow(theta if log_keep is None else _suffix_sum(log_keep).exp() * theta, None, keep, None, None)
        f_last = torch.ones_like(theta) if log_keep is None else _suffix_sum(log_keep).exp()  # F[b, j]
        p_last = _suffix_sum(log_eta).exp()  # P[b, i]
        eta_prod = log_eta.cumsum(-1).exp()
        fp_last = (f_last.unsqueeze(-2) @ segsum(log_eta).exp()).squeeze(-2)
        carry = (f_last * eta_prod).sum(-1)
        return LastRow(fp_last * theta, p_last * theta, keep, carry, eta_prod[..., -1])

    @staticmethod
    def from_tables(tables: GateTables, theta: Tensor) -> LastRow:
        """The same rows read off gate tables a per-token read has built anyway (no second b x b table)."""
        if tables.P is None:
            e = carry = decay = None
        else:
            e, carry, decay = tables.P[..., -1, :] * theta, tables.B[..., -1], tables.eta_prod[..., -1]
        keep = None if tables.A is None else tables.A[..., -1]
        return LastRow(tables.FP[..., -1, :] * theta, e, keep, carry, decay)

    def unbind(self, dim: int) -> list[LastRow]:
        """One per chunk from rows built for [N, chunks, b] gates (one autograd node per field, not per chunk)."""
        fields = [None if f is None else f.unbind(dim) for f in self.__dict__.values()]
        return [LastRow(*(None if f is None else f[i] for f in fields)) for i in range(len(fields[0]))]


def _suffix_sum(x: Tensor) -> Tensor:
    """``out[..., j] = sum_{i > j} x[..., i]``: each entry summed from its own terms (no difference of totals)."""
    after = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], -1)
    return after.flip(-1).cumsum(-1).flip(-1)


def _chunk(
    cfg: MemoryConfig,
    weights: tuple[Tensor, ...],
    momentum: tuple[Tensor, ...] | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    tables: GateTables | None,
    last: LastRow | None,
):
    """One chunk: its retrieved values and, for a full chunk (``last`` given), the chunk-end state. A full chunk's
    write and read run as one node with a hand-written backward where :func:`chunk_write.supported` says so; the
    last, partial chunk runs on autograd. ``tables`` are the read's (None for ``per_chunk``)."""
    if last is not None and chunk_write.supported(cfg):
        rows = (last.c, last.e, last.keep, last.carry, last.decay)
        gates = None
        if tables is not None:
            gates = chunk_write.ReadGates(tables.FP_read, tables.A_read, tables.B_read, theta)
        write = chunk_write.chunk_write(weights, momentum, k, v, *rows, cfg, q=q, read_gates=gates)
        return write.read, write.weights, write.momentum
    inputs, deltas = mlp.key_path(weights, k, v, cfg)
    scale = None
    if cfg.grad_clip is not None:
        scale = chunk_write.clip_scale(inputs, deltas, cfg.grad_clip)[0]
        theta = theta * scale
    gates = None if tables is None else chunk_read.TokenGates.build(tables.FP_read, tables.A_read, tables.B_read, theta)
    y = chunk_read.read_forward(weights, momentum, q, inputs, deltas, gates, cfg, saving=False)[0]
    if last is None:
        return y, weights, momentum
    c, e = chunk_write.scaled(last.c, last.e, scale)
    new_weights, new_momentum = chunk_write.fold(
        weights, momentum, inputs, deltas, c, e, last.keep, last.carry, last.decay
    )
    return y, new_weights, new_momentum


def _gates(
    log_eta: Tensor | None, log_keep: Tensor | None, theta: Tensor, b: int, retrieval: str
) -> tuple[list[GateTables | None], list[LastRow | None]]:
    """Per chunk: the read's gate tables (None for ``per_chunk``, which reads the chunk-start weights) and the
    fold's last row (None for the last, partial chunk, which folds nothing). Full chunks are built in one batched
    computation, the partial one alone."""
    n, total = theta.shape
    full = total // b * b
    count = full // b + (total > full)

    def part(x: Tensor | None, start: int, end: int, shape: tuple[int, ...]) -> Tensor | None:
        return None if x is None else x[:, start:end].reshape(shape)

    tables: list[GateTables | None] = [None] * count
    rows: list[LastRow | None] = [None] * count
    if full:
        shape = (n, full // b, b)
        gates = part(log_eta, 0, full, shape), part(log_keep, 0, full, shape)
        theta_full = theta[:, :full].reshape(shape)
        if retrieval == "per_chunk":
            rows[: full // b] = LastRow.build(theta_full, *gates).unbind(1)
        else:
            built = GateTables.build(*gates, torch.Size(shape), theta.dtype, theta.device, retrieval)
            tables[: full // b] = built.unbind(1)
            rows[: full // b] = LastRow.from_tables(built, theta_full).unbind(1)
    if total > full and retrieval != "per_chunk":
        shape = (n, total - full)
        gates = part(log_eta, full, total, shape), part(log_keep, full, total, shape)
        tables[-1] = GateTables.build(*gates, torch.Size(shape), theta.dtype, theta.device, retrieval)
    return tables, rows


def log_factor(cfg: MemoryConfig, log_keep: Tensor | None) -> Tensor | None:
    """The log of the factor the retention rule keeps of the weights per token, from the forget gate's
    log(1 - alpha): the gate's own value for the built-in decay (exact, even as alpha -> 1), else the rule's
    ``log_keep(alpha)`` (what the sequential reference's ``keep(W, alpha)`` multiplies by)."""
    if log_keep is None or cfg.retention in (None, RETENTIONS["decay"][0]):
        return log_keep
    return cfg.retention.log_keep(-torch.expm1(log_keep))


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
    """The memory op (contract: :mod:`titans_compose.ops.memory`) in the chunked dual form: one autograd node per
    chunk write and read. The retention rule turns ``log_keep`` into the weights' decay (:func:`log_factor`)."""
    if q.shape[1] == 0:  # nothing to read or write: an unfinished chunk waits for more tokens
        return q[:, :0], state
    p = state.pending_len
    k, v, theta, log_eta, log_keep = resume(state, k, v, theta, log_eta, log_keep)
    q = with_read_rows(q, p)
    b = cfg.chunk_size
    weights, momentum = state.weights, state.momentum
    outputs = []
    pending = None

    def split(x: Tensor | None) -> list[Tensor | None]:
        # one split for the whole sequence: slicing chunk by chunk would make autograd scatter each chunk's
        # gradient into a zero tensor of the full length (quadratic in the sequence length)
        return [None] * len(keys) if x is None else list(x.split(b, dim=1))

    keys = k.split(b, dim=1)
    tables, rows = _gates(log_eta, log_factor(cfg, log_keep), theta, b, cfg.retrieval)
    series = zip(split(q), keys, split(v), split(theta), split(log_eta), split(log_keep), tables, rows, strict=True)
    for q_c, k_c, v_c, theta_c, log_eta_c, log_keep_c, tables_c, last in series:
        args = (weights, momentum, q_c, k_c, v_c, theta_c, tables_c, last)
        if cfg.checkpoint and torch.is_grad_enabled():
            y, weights, momentum = checkpoint(_chunk, cfg, *args, use_reentrant=False)
        else:
            y, weights, momentum = _chunk(cfg, *args)
        outputs.append(y)
        if last is None:
            pending = Pending(k_c, v_c, theta_c, log_eta_c, log_keep_c)
    y = torch.cat(outputs, 1)[:, p:] if outputs else q[:, p:]
    return y, MemoryState(weights, momentum, pending)
