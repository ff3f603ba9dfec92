"""Context parallelism's exchange: a sequence split over ranks becomes a share of the heads over the whole
sequence, and back.

Each rank of a context group holds a contiguous piece of every row's tokens. Work done token by token (embedding,
norms, projections, MLPs) runs on those pieces as they are. A sequence mixer whose heads are independent (the
memory's convolution, gates and scan; the attention's scores) cannot: it needs every token. Around it, one
all-to-all sends each rank's tokens of head group j to rank j, so that rank j holds all the tokens of its heads
(:func:`to_heads`); the inverse all-to-all returns each head group's results to the ranks that hold the tokens
(:func:`to_sequence`). Both are autograd functions whose backward pass is the other exchange, so gradients flow
back the way the values came. The pieces may differ in length (a piece of a MAC segment, MAL's persistent prefix on
the first rank): a :class:`Spread` says how many tokens each rank holds.

``torch.distributed.all_to_all_single`` does the exchange; gloo (CPU) and nccl (CUDA) both implement it, with
uneven splits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ContextGroup:
    """The ranks one sequence is split over: this process is ``rank`` of ``size`` in ``group`` (a
    torch.distributed process group). Rank i holds the i-th of ``size`` equal, contiguous pieces of every row's
    tokens, and the i-th of ``size`` equal, contiguous groups of every sequence mixer's heads."""

    group: Any
    rank: int
    size: int

    def heads(self, total: int, what: str) -> slice:
        """This rank's heads among ``total`` (``what``: the mixer, named in the error). Raises ValueError if they
        do not split evenly over the ranks."""
        if total % self.size:
            raise ValueError(f"{what} has {total} heads, which do not split over {self.size} context-parallel ranks")
        share = total // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def all_finite(self, flags: Tensor) -> Tensor:
        """``flags`` (bools, one per check) and-ed over the ranks: whether each check holds on every rank."""
        values = flags.to(torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=self.group)
        return values.bool()

    def gather(self, piece: Tensor) -> Tensor:
        """Every rank's ``piece`` [B, n, ...] (equal shapes) laid end to end along the sequence: [B, size * n, ...]
        on every rank (no gradient)."""
        pieces = [torch.empty_like(piece) for _ in range(self.size)]
        dist.all_gather(pieces, piece.contiguous(), group=self.group)
        return torch.cat(pieces, 1)

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (no gradient)."""
        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return value


@dataclass(frozen=True)
class Spread:
    """How one piece of the stream lies over the ranks of ``context``: rank i holds ``lengths[i]`` of its tokens,
    and the piece is their concatenation in rank order, starting at stream position ``start``."""

    context: ContextGroup
    lengths: tuple[int, ...]
    start: int

    def with_prefix(self, tokens: int) -> Spread:
        """The spread of a sequence that carries ``tokens`` more before the stream's first token (MAL's persistent
        tokens): the first rank holds them, and only a piece that starts the stream has them."""
        if not tokens or self.start:
            return self
        return replace(self, lengths=(self.lengths[0] + tokens, *self.lengths[1:]))


def _scatter_heads(x: Tensor, spread: Spread) -> Tensor:
    """[B, n_rank, H, c] -> [B, n, H / size, c]: the all-to-all of :func:`to_heads`."""
    ctx, lengths = spread.context, spread.lengths
    batch, mine, heads, width = x.shape
    if mine != lengths[ctx.rank] or heads % ctx.size:
        raise ValueError(
            f"context rank {ctx.rank} holds {mine} tokens of {heads} heads; the spread gives it {lengths[ctx.rank]} "
            f"tokens and the heads must split over {ctx.size} ranks"
        )
    share = heads // ctx.size
    send = x.unflatten(2, (ctx.size, share)).movedim(2, 0).contiguous()  # [size, B, n_rank, share, c]
    sizes = [batch * n * share * width for n in lengths]
    received = x.new_empty(sum(sizes))
    dist.all_to_all_single(received, send.view(-1), sizes, [send[0].numel()] * ctx.size, group=ctx.group)
    parts = [part.view(batch, n, share, width) for part, n in zip(received.split(sizes), lengths, strict=True)]
    return torch.cat(parts, 1)


def _gather_heads(y: Tensor, spread: Spread) -> Tensor:
    """[B, n, H / size, c] -> [B, n_rank, H, c]: the all-to-all of :func:`to_sequence`."""
    ctx, lengths = spread.context, spread.lengths
    batch, total, share, width = y.shape
    if total != sum(lengths):
        raise ValueError(f"context rank {ctx.rank} holds {total} tokens of its heads; the spread has {sum(lengths)}")
    mine = lengths[ctx.rank]
    send = torch.cat([part.reshape(-1) for part in y.split(list(lengths), 1)])
    per_rank = batch * mine * share * width
    received = y.new_empty(ctx.size * per_rank)
    sizes = [batch * n * share * width for n in lengths]
    dist.all_to_all_single(received, send, [per_rank] * ctx.size, sizes, group=ctx.group)
    received = received.view(ctx.size, batch, mine, share, width).movedim(0, 2)  # [B, n_rank, size, share, c]
    return received.reshape(batch, mine, ctx.size * share, width)


class _Exchange(torch.autograd.Function):
    """One of the two exchanges (``there``), whose backward pass is the other (``back``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, spread: Spread, there: Callable, back: Callable) -> Tensor:
        ctx.spread, ctx.back = spread, back
        return there(x, spread)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return ctx.back(grad.contiguous(), ctx.spread), None, None, None


def to_heads(tensors: Sequence[Tensor], spread: Spread) -> list[Tensor]:
    """This rank's tokens of every head, each of ``tensors`` [B, n_rank, H, c_i], as every token of this rank's heads,
    [B, n, H / size, c_i] (n = the spread's total). Tensors of one dtype travel in one all-to-all."""
    out: list[Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        widths = [tensors[i].shape[-1] for i in index]
        packed = _Exchange.apply(torch.cat([tensors[i] for i in index], -1), spread, _scatter_heads, _gather_heads)
        for i, part in zip(index, packed.split(widths, -1), strict=True):
            out[i] = part
    return out  # type: ignore[return-value]


def to_sequence(y: Tensor, spread: Spread) -> Tensor:
    """The inverse of :func:`to_heads`: every token of this rank's heads, [B, n, H / size, c], as this rank's tokens
    of every head, [B, n_rank, H, c]."""
    return _Exchange.apply(y, spread, _gather_heads, _scatter_heads)
