"""The memory state carried between calls: weights and momentum at the start of the current chunk, and the tokens
of the chunk that is not finished yet.

Inside a chunk every gradient is taken at the chunk-start weights (memory-math.md sections 1.3 and 6), so a chunk that a
call ends in the middle of cannot be folded into the weights yet: its tokens wait in ``pending`` and the next call
continues the same chunk. This makes a sequence processed in pieces (down to one token at a time) compute exactly
what one call computes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Pending:
    """Keys, values and gates of the unfinished chunk's tokens; [N, p, d], [N, p, d] and [N, p] each.
    ``log_eta`` / ``log_keep`` are None when momentum / forgetting is off."""

    k: Tensor
    v: Tensor
    theta: Tensor
    log_eta: Tensor | None
    log_keep: Tensor | None

    def __len__(self) -> int:
        return self.k.shape[1]


@dataclass(frozen=True)
class MemoryState:
    """Per (batch x head) row N: inner weights W_l [N, out, in], momentum S_l (None without momentum), pending."""

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] | None
    pending: Pending | None = None

    @staticmethod
    def initial(weights: tuple[Tensor, ...] | list[Tensor], momentum: bool) -> MemoryState:
        """The state before any token: the given initial weights M_0 and zero momentum S_0."""
        weights = tuple(weights)
        return MemoryState(weights, tuple(torch.zeros_like(w) for w in weights) if momentum else None, None)

    @property
    def pending_len(self) -> int:
        return 0 if self.pending is None else len(self.pending)

    def with_pending_gates(self, **series: Tensor) -> MemoryState:
        """The same state with the named gate series of the pending tokens (``theta``, ``log_eta``, ``log_keep``)
        replaced: a per-chunk gate is recomputed once more tokens of its chunk are known."""
        return replace(self, pending=replace(self.pending, **series))

    def detach(self) -> MemoryState:
        """The same state cut from the autograd graph (for truncated backpropagation through time)."""

        def cut(ts: tuple[Tensor, ...] | None) -> tuple[Tensor, ...] | None:
            return None if ts is None else tuple(t.detach() for t in ts)

        pending = self.pending
        if pending is not None:
            pending = Pending(
                *(
                    None if t is None else t.detach()
                    for t in (pending.k, pending.v, pending.theta, pending.log_eta, pending.log_keep)
                )
            )
        return replace(self, weights=cut(self.weights), momentum=cut(self.momentum), pending=pending)


Series = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


def resume(
    state: MemoryState, k: Tensor, v: Tensor, theta: Tensor, log_eta: Tensor | None, log_keep: Tensor | None
) -> Series:
    """The write inputs of a call with the unfinished chunk's tokens put in front, so that the call continues
    that chunk; checks that gates and state agree on momentum."""
    if (log_eta is None) != (state.momentum is None):
        raise ValueError("momentum gates and momentum state must be given together")
    if state.pending is None:
        return k, v, theta, log_eta, log_keep
    pend = state.pending

    def cat(old: Tensor | None, new: Tensor | None) -> Tensor | None:
        return None if new is None else torch.cat([old, new], 1)

    return (
        cat(pend.k, k),
        cat(pend.v, v),
        cat(pend.theta, theta),
        cat(pend.log_eta, log_eta),
        cat(pend.log_keep, log_keep),
    )


def with_read_rows(q: Tensor, pending: int) -> Tensor:
    """The queries with ``pending`` placeholder rows in front: the unfinished chunk's tokens, put back in front of
    the keys by :func:`resume`, were read by an earlier call, so their outputs are computed again and dropped."""
    if not pending:
        return q
    return torch.cat([q.new_zeros(q.shape[0], pending, q.shape[2]), q], 1)
