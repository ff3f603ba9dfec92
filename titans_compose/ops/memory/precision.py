"""The memory op's dtypes under mixed precision: which tensors keep full precision, and the casts at its edges.

The memory state is a running sum: every token adds ``-theta_t * grad_t`` to the weights W_l and the momentum
S_l. In bfloat16 (8 significand bits, a relative step of 2^-8 = 0.4%) an update much smaller than the weights is
rounded away, and the error of each fold feeds every later token, so the state, its momentum, the inner gradient
and the gate tables (exponentials of log-space sums) are kept in float32 whatever dtype the activations have
(float64 stays float64, for the tests). Under ``torch.autocast`` the scan therefore runs with autocast switched
off: the chunked path and the reference take q, k, v and the gates in float32; the generated kernels take q, k, v
in the activations' dtype, autocast's own when it is on (bfloat16 / float16 halve their reads; the kernels convert
every load to float32 and accumulate in float32), and the gates and state in float32. The retrieved values come
back in the dtype of ``q``, so the layers after the memory see the dtype they would have seen; the state handed to
the next call stays in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from titans_compose.ops.memory.state import MemoryState, Pending


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the state and the scan's arithmetic use for these inputs: float64 if any is float64, else
    float32 (bfloat16 and float16 inputs included)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def kernel_input_dtype(q: Tensor) -> torch.dtype:
    """The dtype the generated kernels read q, k, v in: autocast's dtype when autocast is on for q's device and q is
    float32 (the activations autocast would have produced), else q's own."""
    device = q.device.type
    if q.dtype == torch.float32 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return q.dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (None stays None; a tensor already in ``dtype`` is returned as is)."""
    return None if t is None else t.to(dtype)


def state_as(state: MemoryState, dtype: torch.dtype, series_dtype: torch.dtype | None = None) -> MemoryState:
    """``state`` with its weights, momentum and pending gates in ``dtype`` and its pending keys and values in
    ``series_dtype`` (default ``dtype``): what the scan continues from."""
    series_dtype = dtype if series_dtype is None else series_dtype
    pending = state.pending
    if pending is not None:
        pending = Pending(
            cast(pending.k, series_dtype),
            cast(pending.v, series_dtype),
            cast(pending.theta, dtype),
            cast(pending.log_eta, dtype),
            cast(pending.log_keep, dtype),
        )
    momentum = None if state.momentum is None else tuple(s.to(dtype) for s in state.momentum)
    return MemoryState(tuple(w.to(dtype) for w in state.weights), momentum, pending)


@contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast switched off for ``device_type`` (a device without autocast support: nothing to switch off), so
    the scan's products run in the dtype of their inputs, in its forward and in a backward called under autocast."""
    if not torch.amp.is_autocast_available(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
