"""Whether the memory stayed finite, checked once per call, and where it stopped being finite.

The spec admits inner rules whose recurrence diverges (a matrix memory with momentum 0.9 and theta 0.3 grows
geometrically until it overflows). Callers fold each call's memory output and final state into one 0-d flag
(:func:`finite_flag`, no host synchronisation) and read the flags once per forward; only when one fails do they look
for the first token whose weights are not finite (:func:`first_nonfinite_token`, which runs the call again, and
the sequential reference over the chunk that diverged) and raise :class:`MemoryDivergedError`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from titans_compose.ops.memory.chunked import chunked_memory
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.precision import accumulation_dtype, autocast_off, cast, state_as
from titans_compose.ops.memory.reference import reference_memory
from titans_compose.ops.memory.state import MemoryState

HINT = (
    "the inner update diverged: lower update.lr (max_lr or init) or the momentum, set update.grad_clip, or turn on "
    "memory.output_norm (docs/stability.md gives the stable region)"
)


class MemoryDivergedError(FloatingPointError):
    """A memory layer's state or output is not finite. ``layer`` names the layer, ``token`` is the first token whose
    memory weights (or inputs) are not finite, counted as ``where`` says (None: no token's weights are, but the
    call's output or final state is not), and ``cause`` says which."""

    def __init__(self, layer: str, token: int | None, where: str, cause: str) -> None:
        self.layer, self.token, self.where, self.cause = layer, token, where, cause
        at = "in this call" if token is None else f"from token {token} {where}"
        super().__init__(
            f"memory layer {layer}: {cause} {at}" + ("" if cause.startswith("its inputs") else f"; {HINT}")
        )


def finite_flag(y: Tensor, state: MemoryState) -> Tensor:
    """A 0-d bool tensor: whether the memory output ``y`` and the weights and momentum of ``state`` are all finite
    (one reduction per tensor and no host synchronisation, so flags of many layers can be read at once)."""
    flags = [torch.isfinite(t).all() for t in (y, *state.weights, *(state.momentum or ()))]
    return torch.stack(flags).all()


def first_nonfinite_token(
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    state: MemoryState,
    cfg: MemoryConfig,
) -> tuple[int | None, str]:
    """The first token of a call (``chunked_memory``'s inputs) whose inputs or memory weights W_t are not finite,
    and which of the two (None if no W_t is non-finite).

    Reading a zero query, M_{W}(0) is finite exactly while W is (a finite matrix times zero is zero; inf times zero
    is NaN), whatever the size of the finite weights. The chunked path read with zero queries at the chunk-start
    weights finds the first chunk whose end state is not finite; the sequential reference, which forms every W_t,
    then finds the token inside that chunk."""
    per_token = [t.isfinite().all(-1) for t in (k, v)]
    per_token += [t.isfinite() for t in (theta, log_eta, log_keep) if t is not None]
    first_input = _first(~torch.stack([f.all(0) for f in per_token]).all(0))
    acc = accumulation_dtype(k, *state.weights)  # rerun as the scan ran: float32 state and arithmetic
    k, v, theta, log_eta, log_keep = series = tuple(cast(t, acc) for t in (k, v, theta, log_eta, log_keep))
    state = state_as(state, acc)
    b, p, length = cfg.chunk_size, state.pending_len, k.shape[1]
    cfg = dataclasses.replace(cfg, checkpoint=False)
    with torch.no_grad(), autocast_off(k.device.type):
        starts, end = chunked_memory(
            torch.zeros_like(k), *series, state, dataclasses.replace(cfg, retrieval="per_chunk")
        )
        bad_start = _first(~starts.isfinite().all(-1).all(0))  # a chunk start: the previous chunk diverged
        if bad_start is not None:
            chunk = (bad_start + p) // b - 1
        elif not all(t.isfinite().all() for t in (*end.weights, *(end.momentum or ()))):
            chunk = (length + p) // b - 1  # the call's last full chunk
        else:
            chunk = (length + p - 1) // b  # the unfinished last chunk
        if chunk < 0:
            return 0, "the memory state this call continues is not finite"
        lo, hi = max(chunk * b - p, 0), min((chunk + 1) * b - p, length)
        chunk_state = state
        if lo:
            _, chunk_state = chunked_memory(k[:, :lo], *(None if t is None else t[:, :lo] for t in series), state, cfg)
        part = [None if t is None else t[:, lo:hi] for t in series]
        y, _ = reference_memory(
            torch.zeros_like(part[0]), *part, chunk_state, dataclasses.replace(cfg, retrieval="after")
        )
    bad = _first(~y.isfinite().all(-1).all(0))
    first_weights = None if bad is None else lo + bad
    if first_input is not None and (first_weights is None or first_input <= first_weights):
        return first_input, "its inputs (keys, values or gates) are not finite"
    if first_weights is not None:
        return first_weights, "the memory weights are not finite"
    return None, "the memory output or state is not finite"


def _first(mask: Tensor) -> int | None:
    """The index of the first True in a 1-d mask, or None."""
    hits = mask.nonzero()
    return int(hits[0, 0]) if hits.numel() else None
