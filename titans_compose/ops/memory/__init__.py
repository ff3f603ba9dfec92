"""The Titans memory op: a per-head scan that reads a small MLP memory and trains it on each token as it goes.

Contents (one module per job): :mod:`op` (``MemoryOp``: everything one memory layer needs, from which its modules
are built), :mod:`reference` (token by token, the oracle), :mod:`chunked` with
:mod:`chunk_write` / :mod:`chunk_read` (the chunked dual form in PyTorch, the CPU path), :mod:`codegen` (the Triton
kernels generated per configuration), :mod:`dispatch` (which of them runs, and why), :mod:`config` (what the scan
depends on), :mod:`state` (what one call hands the next), :mod:`mlp` (the memory MLP), :mod:`precision`
(the dtypes under mixed precision), :mod:`finite` (divergence checks) and :mod:`flops`.

The contract every backend implements (``reference_memory``, ``chunked_memory``, ``triton_memory``):

``(q, k, v, theta, log_eta, log_keep, state, cfg) -> (y, state')``

- ``q, k, v``: [N, T, d] with N = batch x heads rows and d = ``cfg.head_dim``; float32 or float64 (the kernels also
  take bfloat16 / float16 inputs and accumulate in float32). Through :func:`memory_scan` (a
  :class:`~titans_compose.ops.memory.dispatch.MemoryBackend`) any floating dtype, under autocast or not: the state,
  the gates and the arithmetic are float32 (float64 for float64 inputs) and ``y`` comes back in q's dtype
  (:mod:`~titans_compose.ops.memory.precision`, docs/precision.md).
- ``theta``: [N, T] inner learning rate per token (>= 0); ``log_eta``: [N, T] log momentum decay, None when the
  config has no momentum; ``log_keep``: [N, T] log(1 - alpha) of the forget gate, None without forgetting.
- ``state``: :class:`~titans_compose.ops.memory.state.MemoryState`: per row the weights W_l, the momentum S_l and
  the pending tokens of an unfinished chunk (the call continues that chunk).
- ``cfg``: :class:`~titans_compose.ops.memory.config.MemoryConfig`.
- ``y``: [N, T, d] the retrieved values (``cfg.retrieval``: after, before or per chunk); ``state'``: the state
  after the last token, with a trailing unfinished chunk as pending. T = 0 gives an empty ``y`` and ``state``.
- Gradients reach q, k, v, the gates and the initial state on every backend.

Backends: ``reference`` and ``chunked`` run on any device and dtype; ``triton`` runs CUDA tensors (CPU tensors in
Triton's interpreter) for the configurations :func:`~titans_compose.ops.memory.codegen.support.unsupported_reason`
accepts. :func:`memory_scan` picks one as :mod:`dispatch` describes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from titans_compose.ops.memory.config import MemoryConfig
    from titans_compose.ops.memory.state import MemoryState


def memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    state: MemoryState,
    cfg: MemoryConfig,
    *,
    backend: str | None = None,
) -> tuple[Tensor, MemoryState]:
    """Run the memory op over ``q, k, v`` continuing ``state`` (the contract above) on ``backend`` (reference,
    chunked, triton or auto; None: ``$TITANS_COMPOSE_BACKEND``, else auto). Modules that call it repeatedly keep a
    :class:`~titans_compose.ops.memory.dispatch.MemoryBackend`, which memoises the choice and reports it."""
    from titans_compose.ops.memory.dispatch import MemoryBackend

    return MemoryBackend(backend)(q, k, v, theta, log_eta, log_keep, state, cfg)
