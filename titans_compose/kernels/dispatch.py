"""Which implementation runs the memory, and why.

``TITANS_COMPOSE_BACKEND=reference|chunked`` forces one (the kernel generator adds ``triton``); otherwise the
chunked dual form runs everywhere. The choice and its reason are recorded so a build report can show them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from titans_compose.kernels.chunked import chunked_memory
from titans_compose.kernels.reference import reference_memory

BACKENDS: dict[str, Callable] = {"chunked": chunked_memory, "reference": reference_memory}
ENV_VAR = "TITANS_COMPOSE_BACKEND"


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str

    @property
    def fn(self) -> Callable:
        return BACKENDS[self.name]


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
