"""The structural settings a memory computation depends on, resolved from the spec and the registry.

Both memory paths (the sequential reference and the chunked dual form) take a :class:`MemoryConfig`; the kernel
generator will key its generated code on the same fields.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

from titans_compose.registry.rules import Activation, Loss, Optimizer, Retention

RETRIEVALS = ("after", "before", "per_chunk")


class MemoryShape:
    """``depth`` and ``head_dim`` of anything with the memory MLP's ``layer_shapes`` ((out, in) per layer)."""

    layer_shapes: tuple[tuple[int, int], ...]

    @property
    def depth(self) -> int:
        return len(self.layer_shapes)

    @property
    def head_dim(self) -> int:
        return self.layer_shapes[0][1]


@dataclass(frozen=True)
class MemoryConfig(MemoryShape):
    """One memory head's computation (memory-math.md sections 1 and 3).

    ``layer_shapes`` are the (out, in) shapes of the inner linear layers, first layer first. ``loss_params`` is the
    loss entry's params model instance (or None). ``ln_eps`` is used when ``output_norm`` is on. ``names`` holds the
    registry names of the activation and the loss, and ``gates`` the granularity of the (lr, momentum, forget)
    gates; the kernel generator keys its code on them (a config made by hand may leave them empty).
    """

    layer_shapes: tuple[tuple[int, int], ...]
    activation: Activation
    loss: Loss
    loss_params: Any = None
    residual: bool = False
    output_norm: bool = False
    ln_eps: float = 1e-5
    momentum: bool = True
    forget: bool = True
    chunk_size: int = 16
    retrieval: str = "after"
    grad_clip: float | None = None
    retention: Retention | None = None
    optimizer: Optimizer | None = None
    checkpoint: bool = False
    names: tuple[str, str] | None = None
    gates: tuple[str, str, str] = ("per_token", "per_token", "per_token")

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if not self.layer_shapes or self.layer_shapes[0][1] != self.layer_shapes[-1][0]:
            raise ValueError(f"the memory must map head_dim to head_dim, got layers {self.layer_shapes}")


def __getattr__(name: str) -> Any:
    """``memory_config`` moved to :mod:`titans_compose.ops.memory.op` (next to the op that writes every config);
    this name still finds it. Looked up by name: the op module imports this one."""
    if name == "memory_config":
        warnings.warn(
            "titans_compose.ops.memory.config.memory_config moved to titans_compose.ops.memory.op.memory_config",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("titans_compose.ops.memory.op").memory_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
