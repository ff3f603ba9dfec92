"""Built-in memory models and attention kinds: the structural parts a block is made of.

A memory model says which inner weight matrices the memory trains at test time (their shapes give the state
that the graph IR carries between chunks); an attention kind says which keys a query may see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MemoryModel:
    """``layer_shapes(memory_spec)`` -> [(out_features, in_features), ...] of the inner linear layers, first
    layer first. Only these matrices are updated by the inner loop (memory-math.md section 1.2)."""

    layer_shapes: Callable[[Any], list[tuple[int, int]]]


def mlp_hidden(memory: Any) -> int:
    """Hidden width of the memory MLP: ``round(expansion * head_dim)``, at least 1."""
    return max(1, round(memory.expansion * memory.head_dim))


def _mlp_layer_shapes(memory: Any) -> list[tuple[int, int]]:
    d = memory.head_dim
    if memory.depth == 1:
        return [(d, d)]
    h = mlp_hidden(memory)
    return [(h, d)] + [(h, h)] * (memory.depth - 2) + [(d, h)]


@dataclass(frozen=True)
class AttentionKind:
    """``windowed``: queries see only the last ``window`` positions (plus persistent tokens)."""

    windowed: bool


MEMORY_MODELS: dict[str, tuple[MemoryModel, str]] = {
    "mlp": (
        MemoryModel(_mlp_layer_shapes),
        "an MLP of `depth` linear layers (depth 1 is a matrix memory), hidden width expansion * head_dim",
    ),
}

ATTENTION_KINDS: dict[str, tuple[AttentionKind, str]] = {
    "sliding_window": (AttentionKind(windowed=True), "causal attention over the last `window` tokens"),
    "full": (AttentionKind(windowed=False), "causal attention over the whole sequence (quadratic)"),
}
