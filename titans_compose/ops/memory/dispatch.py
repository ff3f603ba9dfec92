"""Which implementation runs the memory, and why.

``TITANS_COMPOSE_BACKEND=reference|chunked|triton`` (or ``auto``, the default) forces one. Automatically, each call
picks from its inputs: CUDA tensors run the generated Triton kernel when the configuration is supported, and the
chunked dual form otherwise (with the generator's reason); CPU tensors run the chunked dual form. ``triton`` forced
on CPU tensors runs the kernel in Triton's interpreter, which must be switched on before triton is imported
(``TRITON_INTERPRET=1`` in the environment).

The device is known only when the memory runs, so the choice is made in two steps: :func:`choose_backend` reads
what was asked for (recorded on the graph by the ``backend`` pass), and each memory layer's :class:`MemoryBackend`
resolves it per call, keeping the backend it last ran and why in ``choice``, the kernel file and whether it was
generated now or taken from the cache, and the backward path, so a build report can show them. Choosing imports
nothing heavy; an implementation is imported when it is first called.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from titans_compose.ops.memory.codegen.key import KernelKey
    from titans_compose.ops.memory.config import MemoryConfig

#: backend name -> (module, function) implementing the memory op (contract: :mod:`titans_compose.ops.memory`).
BACKENDS: dict[str, tuple[str, str]] = {
    "chunked": ("titans_compose.ops.memory.chunked", "chunked_memory"),
    "reference": ("titans_compose.ops.memory.reference", "reference_memory"),
    "triton": ("titans_compose.ops.memory.codegen.runtime", "triton_memory"),
}
#: Resolved per call from the inputs' device (see the module docstring).
AUTO = "auto"
ENV_VAR = "TITANS_COMPOSE_BACKEND"
INTERPRET_VAR = "TRITON_INTERPRET"
AUTO_REASON = (
    "chosen at each call: the generated Triton kernel for CUDA tensors when the configuration is supported, "
    "else the chunked PyTorch path"
)


@dataclass(frozen=True)
class BackendChoice:
    """A backend and why it runs; ``kernel`` is the generated source a ``triton`` choice runs."""

    name: str
    reason: str
    kernel: Path | None = None

    @property
    def fn(self) -> Callable:
        if self.name not in BACKENDS:
            raise ValueError(f"backend {self.name!r} is resolved per call: run it through MemoryBackend")
        module, attr = BACKENDS[self.name]
        return getattr(importlib.import_module(module), attr)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run on this machine (no GPU and no Triton interpreter, or numpy missing): a problem of
    the user's environment, which the command line reports as such."""


def choose_backend(requested: str | None = None) -> BackendChoice:
    """What was asked for: ``requested`` (e.g. from a test or the build API), else the environment, else ``auto``.
    A concrete backend runs as asked; ``auto`` is resolved per call by :class:`MemoryBackend`."""
    if requested is None and os.environ.get(ENV_VAR):
        requested = os.environ[ENV_VAR]
        source = f"forced by {ENV_VAR}={requested}"
    else:
        source = f"requested: {requested}"
    if requested is None or requested == AUTO:
        return BackendChoice(AUTO, AUTO_REASON)
    if requested not in BACKENDS:
        names = ", ".join([*sorted(BACKENDS), AUTO])
        raise ValueError(f"unknown memory backend {requested!r}; available: {names}")
    return BackendChoice(requested, source)


@contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """``TITANS_COMPOSE_BACKEND=name`` while the block runs, so models built inside it record that backend on their
    graphs (the way a user forces one), and the variable as it was (set or not) afterwards."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = before


class MemoryBackend:
    """One memory layer's backend: callable with the ``chunked_memory`` contract, resolving ``auto`` or ``triton``
    from each call's inputs (memoised per device, dtype and kernel key). ``choice`` is the backend of the last call
    with its reason (before the first call, what was asked for)."""

    def __init__(self, requested: str | None = None, reason: str | None = None) -> None:
        planned = choose_backend(requested)
        self.planned = planned if not reason else replace(planned, reason=reason)
        self.choice = self.planned
        self._resolved: dict[tuple[str, str, KernelKey | str], BackendChoice] = {}

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        theta: Tensor,
        log_eta: Tensor | None,
        log_keep: Tensor | None,
        state: Any,
        cfg: MemoryConfig,
    ) -> Any:
        if q.shape[1] == 0:  # no tokens: no backend runs, and the state is unchanged
            return q[:, :0], state
        from titans_compose.ops.memory.precision import (
            accumulation_dtype,
            autocast_off,
            cast,
            kernel_input_dtype,
            state_as,
        )

        # the state, the gates and the scan's arithmetic in float32 (or float64) whatever the activations' dtype;
        # the kernels read q, k, v in the activations' dtype, autocast's under autocast (ops/memory/precision.py)
        low = kernel_input_dtype(q)
        self.choice = self.resolve(q if low == q.dtype else q.new_empty(0, dtype=low), cfg)
        acc = accumulation_dtype(q, *state.weights)
        series = low if self.choice.name == "triton" else acc
        q_in, k, v = (t.to(series) for t in (q, k, v))
        theta, log_eta, log_keep = (cast(t, acc) for t in (theta, log_eta, log_keep))
        with autocast_off(q.device.type):
            y, new = self.choice.fn(q_in, k, v, theta, log_eta, log_keep, state_as(state, acc, series), cfg)
        return y.to(q.dtype), new

    def resolve(self, q: Tensor, cfg: MemoryConfig) -> BackendChoice:
        """The backend for inputs like ``q`` and configuration ``cfg``."""
        if self.planned.name not in (AUTO, "triton"):
            return self.planned
        from titans_compose.ops.memory.codegen.key import kernel_key
        from titans_compose.ops.memory.codegen.support import dtype_name, unsupported_reason

        device, dtype = q.device.type, dtype_name(q.dtype)
        why_not = unsupported_reason(cfg, dtype)
        key = None if why_not else kernel_key(cfg, dtype)
        memo = (device, dtype, key or why_not)
        if memo not in self._resolved:
            self._resolved[memo] = self._decide(device, key, why_not)
        return self._resolved[memo]

    def _decide(self, device: str, key: KernelKey | None, why_not: str | None) -> BackendChoice:
        """The backend for ``device`` tensors, given the kernel key (None with the reason the kernel cannot run)."""
        from titans_compose.ops.memory.codegen import cache, emit

        forced = self.planned.name == "triton"
        if not forced and device != "cuda":
            if why_not is None:
                later = (
                    f"would run the generated kernel; {ENV_VAR}=triton with {INTERPRET_VAR}=1 runs the kernel in "
                    "Triton's interpreter"
                )
            else:
                later = f"would run chunked too ({why_not})"
            reason = f"{device} tensors run the chunked PyTorch path; on CUDA this layer {later}"
            return BackendChoice("chunked", reason)
        source = self.planned.reason if forced else f"{device} tensors"
        if key is None:
            return BackendChoice("chunked", f"{source}, but the generated kernel does not apply: {why_not}")
        if device != "cuda":
            _check_interpreter(device)
        loaded = cache.load(key, emit.generate)
        origin = "taken from the cache" if loaded.hit else "generated now"
        note = f"kernel {loaded.path.name} {origin}; backward: generated Triton"
        return BackendChoice("triton", f"{source}; {note}", loaded.path)


def _check_interpreter(device: str) -> None:
    """Raise unless a forced Triton kernel can run on ``device`` tensors (not CUDA): CPU under the interpreter."""
    if device != "cpu":
        raise BackendUnavailable(
            f"{ENV_VAR}=triton: generated kernels run on CUDA tensors, or on CPU tensors under {INTERPRET_VAR}=1; "
            f"got {device} tensors"
        )
    if os.environ.get(INTERPRET_VAR) != "1":
        raise BackendUnavailable(
            f"{ENV_VAR}=triton on CPU tensors needs Triton's interpreter: set {INTERPRET_VAR}=1 in the environment "
            "before Python starts (or move the model to a CUDA device)"
        )
    if importlib.util.find_spec("numpy") is None:
        raise BackendUnavailable(
            f"{ENV_VAR}=triton on CPU tensors: Triton's interpreter needs numpy, which is not installed "
            '(pip install numpy, or pip install -e ".[interpret]")'
        )
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.cdiv, JITFunction):  # triton decorates its own library when it is first imported
        raise BackendUnavailable(
            f"{ENV_VAR}=triton on CPU tensors: {INTERPRET_VAR}=1 was set after triton was imported, so triton's own "
            f"functions were built for the GPU; set {INTERPRET_VAR}=1 in the environment before Python starts"
        )
