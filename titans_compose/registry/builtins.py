"""Registers every built-in entry, explicitly, in one place."""

from __future__ import annotations

from titans_compose.graph.blocks import BLOCK_KINDS
from titans_compose.registry.core import Registry
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, OPTIMIZERS, RETENTIONS
from titans_compose.registry.structures import ATTENTION_KINDS, MEMORY_MODELS


def register_builtins(registry: Registry) -> None:
    """Add the built-in memory models, losses, retention rules, optimisers, activations, block and attention
    kinds to ``registry``."""
    for name, (loss, params, doc) in LOSSES.items():
        registry.register("loss", name, loss, params=params, description=doc)
    for kind, table in (
        ("memory", MEMORY_MODELS),
        ("activation", ACTIVATIONS),
        ("retention", RETENTIONS),
        ("optimizer", OPTIMIZERS),
        ("attention", ATTENTION_KINDS),
        ("block", BLOCK_KINDS),
    ):
        for name, (obj, doc) in table.items():
            registry.register(kind, name, obj, description=doc)
