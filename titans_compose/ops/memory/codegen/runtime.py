"""Running the generated kernels: :func:`triton_memory`, the memory op (contract: :mod:`titans_compose.ops.memory`).

The kernels see a packed float32 state per row (every W_l, then every S_l;
:class:`~titans_compose.ops.memory.codegen.emit.Layout`) and full sequences: the unfinished chunk of
``state.pending`` is put in front with differentiable torch ops, and a trailing partial chunk is read by the kernel
but not folded, so it comes back as pending. The launches are the torch.library ops
``titans_compose::memory_forward`` / ``memory_backward`` (triton_op + wrap_triton, with fake implementations) so
that torch.compile can trace them on a GPU; the key travels as its digest string.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.library import triton_op, wrap_triton

from titans_compose.ops.memory.chunked import log_factor
from titans_compose.ops.memory.codegen import cache, emit
from titans_compose.ops.memory.codegen.key import KernelKey, kernel_key
from titans_compose.ops.memory.codegen.support import dtype_name, unsupported_reason
from titans_compose.ops.memory.codegen.tiling import block
from titans_compose.ops.memory.config import MemoryConfig
from titans_compose.ops.memory.precision import autocast_off
from titans_compose.ops.memory.state import MemoryState, Pending, resume, with_read_rows

#: digest -> key of every kernel loaded in this process (the ops receive the digest).
_KEYS: dict[str, KernelKey] = {}


def kernels(key: KernelKey) -> cache.Loaded:
    """The generated module of ``key`` (from the source cache; generated on a miss); take its kernels with
    :meth:`~titans_compose.ops.memory.codegen.cache.Loaded.kernel`, which names the file if one is missing."""
    _KEYS[key.digest()] = key
    return cache.load(key, emit.generate)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised kernel outputs (the tests poison them with NaN to show that the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _gates(log_eta: Tensor | None, log_keep: Tensor | None) -> list[Tensor]:
    return [g for g in (log_eta, log_keep) if g is not None]


def _boundaries(key: KernelKey, length: int) -> int:
    """State slots of a sequence: the initial state and one per complete chunk."""
    return length // key.chunk_size + 1


@triton_op("titans_compose::memory_forward", mutates_args=())
def memory_forward(
    key: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    state0: Tensor,
) -> tuple[Tensor, Tensor]:
    """y [N, T, d] and the boundary states [N, T // chunk + 1, STATE_SIZE] (float32; slot 0 = ``state0``)."""
    kk = _KEYS[key]
    loaded = kernels(kk)
    n, length, _ = q.shape
    slots = _boundaries(kk, length)
    states = _alloc((n, slots, emit.layout(kk).size), torch.float32, q.device)
    states[:, 0] = state0
    y = _alloc(tuple(q.shape), q.dtype, q.device)
    wrap_triton(loaded.kernel("forward_kernel"))[(n,)](
        q, k, v, theta, *_gates(log_eta, log_keep), y, states, length, slots
    )
    return y, states


@memory_forward.register_fake
def _memory_forward_fake(key, q, k, v, theta, log_eta, log_keep, state0):
    kk = _KEYS[key]
    n, length, _ = q.shape
    return q.new_empty(q.shape), state0.new_empty(n, _boundaries(kk, length), emit.layout(kk).size)


@triton_op("titans_compose::memory_backward", mutates_args=())
def memory_backward(
    key: str,
    gy: Tensor,
    gfinal: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    states: Tensor,
) -> list[Tensor]:
    """Gradients [q, k, v, theta, (log_eta), (log_keep), initial state] from those of y and the final state."""
    kk = _KEYS[key]
    loaded = kernels(kk)
    n, length, _ = q.shape
    gates = _gates(log_eta, log_keep)
    grads = [_alloc(tuple(t.shape), t.dtype, t.device) for t in (q, k, v, theta, *gates)]
    gstates = _alloc((n, 2, states.shape[-1]), torch.float32, q.device)
    chunks = -(-length // kk.chunk_size)
    gstates[:, chunks % 2] = gfinal
    # the tiled backward keeps a row's d loss / d z0 [padded chunk, hidden] between two passes
    hidden = kk.layer_shapes[0][0]
    scratch = [_alloc((n, block(kk.chunk_size), hidden), torch.float32, q.device)] if kk.hidden_tile else []
    if chunks:
        wrap_triton(loaded.kernel("backward_kernel"))[(n,)](
            q, k, v, theta, *gates, states, gy, gstates, *grads, *scratch, length, states.shape[1]
        )
    return [*grads, gstates[:, 0].clone()]


@memory_backward.register_fake
def _memory_backward_fake(key, gy, gfinal, q, k, v, theta, log_eta, log_keep, states):
    return [t.new_empty(t.shape) for t in (q, k, v, theta, *_gates(log_eta, log_keep), gfinal)]


def _pack(weights: tuple[Tensor, ...], momentum: tuple[Tensor, ...] | None) -> Tensor:
    """The kernels' state layout: [N, STATE_SIZE] float32, every W_l then every S_l, row-major."""
    parts = [*weights, *(momentum or ())]
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1).float().contiguous()


def _unpack(flat: Tensor, key: KernelKey, dtype: torch.dtype) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
    lay = emit.layout(key)

    def take(offsets: tuple[int, ...]) -> tuple[Tensor, ...]:
        return tuple(
            flat[:, at : at + o * i].reshape(-1, o, i).to(dtype)
            for at, (o, i) in zip(offsets, key.layer_shapes, strict=True)
        )

    return take(lay.weight_offsets), take(lay.momentum_offsets) if key.momentum else None


class _TritonMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, digest, q, k, v, theta, log_eta, log_keep, state0):  # type: ignore[override]
        y, states = torch.ops.titans_compose.memory_forward(digest, q, k, v, theta, log_eta, log_keep, state0)
        ctx.digest = digest
        ctx.save_for_backward(q, k, v, theta, log_eta, log_keep, states)
        return y, states[:, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gfinal):  # type: ignore[override]
        q, k, v, theta, log_eta, log_keep, states = ctx.saved_tensors
        with autocast_off(q.device.type):  # a backward called under autocast: the kernels' dtypes as in forward
            out = torch.ops.titans_compose.memory_backward(
                ctx.digest, gy.contiguous(), gfinal.contiguous(), q, k, v, theta, log_eta, log_keep, states
            )
        gq, gk, gv, gtheta, *rest = out
        glog_eta = rest.pop(0) if log_eta is not None else None
        glog_keep = rest.pop(0) if log_keep is not None else None
        return None, gq, gk, gv, gtheta, glog_eta, glog_keep, rest[0]


def triton_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    state: MemoryState,
    cfg: MemoryConfig,
) -> tuple[Tensor, MemoryState]:
    """The memory op (contract: :mod:`titans_compose.ops.memory`) on the generated kernels: the retrieved values
    [N, T, d] and the state after them (weights in the dtype of ``state.weights``; a trailing unfinished chunk comes
    back as pending). Gradients reach q, k, v, the gates and the initial state; the backward is first order (a
    double backward of the outer loss needs the chunked path). Raises NotImplementedError with
    :func:`~titans_compose.ops.memory.codegen.support.unsupported_reason` for a configuration the kernels do not
    cover."""
    reason = unsupported_reason(cfg, q.dtype)
    if reason is not None:
        raise NotImplementedError(f"the generated kernel cannot run this memory: {reason}")
    key = kernel_key(cfg, dtype_name(q.dtype))
    kernels(key)
    p = state.pending_len
    k, v, theta, log_eta, log_keep = resume(state, k, v, theta, log_eta, log_keep)
    q = with_read_rows(q, p)
    length = k.shape[1]
    if length == 0:
        return q[:, p:], MemoryState(state.weights, state.momentum, None)
    # the kernels decay the weights by the retention rule's per-token factor, as the chunked path does
    decay = log_factor(cfg, log_keep)
    args = [None if t is None else t.contiguous() for t in (q, k, v, theta, log_eta, decay)]
    y, final = _TritonMemory.apply(key.digest(), *args, _pack(state.weights, state.momentum))
    weights, momentum = _unpack(final, key, state.weights[0].dtype)
    full = length // cfg.chunk_size * cfg.chunk_size
    pending = None
    if full < length:
        pending = Pending(*(None if t is None else t[:, full:] for t in (k, v, theta, log_eta, log_keep)))
    return y[:, p:], MemoryState(weights, momentum, pending)
