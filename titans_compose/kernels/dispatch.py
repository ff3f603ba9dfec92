"""Which implementation runs the memory, and why.

``TITANS_COMPOSE_BACKEND=reference|chunked`` forces one (the kernel generator adds ``triton``); otherwise the
chunked dual form runs everywhere. The choice and its reason are recorded, on the graph by the ``backend`` pass and
on each ``NeuralMemory``, so a build report can show them. Choosing imports nothing heavy; the implementation is
imported when it is first called.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

#: backend name -> (module, function) implementing the memory scan contract of ``chunked_memory``.
BACKENDS: dict[str, tuple[str, str]] = {
    "chunked": ("titans_compose.kernels.chunked", "chunked_memory"),
    "reference": ("titans_compose.kernels.reference", "reference_memory"),
}
ENV_VAR = "TITANS_COMPOSE_BACKEND"


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str

    @property
    def fn(self) -> Callable:
        module, attr = BACKENDS[self.name]
        return getattr(importlib.import_module(module), attr)


def choose_backend(requested: str | None = None) -> BackendChoice:
    """The backend to run: ``requested`` (e.g. from a test or the build API), else the environment, else chunked."""
    if requested is None and os.environ.get(ENV_VAR):
        requested = os.environ[ENV_VAR]
        source = f"forced by {ENV_VAR}={requested}"
    else:
        source = f"requested: {requested}"
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown memory backend {requested!r}; available: {', '.join(sorted(BACKENDS))}")
        return BackendChoice(requested, source)
    return BackendChoice(
        "chunked",
        "chunked dual form (parallel within chunks): the PyTorch fast path; no generated kernel in this build",
    )
