"""Registers every built-in entry, explicitly, in one place.

The rules, memory models and attention kinds live in this package. Built-ins defined on a higher layer register
themselves: :data:`BUILTIN_PROVIDERS` names their registering functions as ``module:function``, like a plug-in's
entry point, and :func:`register_builtins` imports each when it fills a registry, so this module imports nothing
above the registry (the block kinds are defined with their lowering in :mod:`titans_compose.graph.blocks`).
"""

from __future__ import annotations

import importlib

from titans_compose.registry.core import Registry
from titans_compose.registry.rules import ACTIVATIONS, LOSSES, OPTIMIZERS, RETENTIONS
from titans_compose.registry.structures import ATTENTION_KINDS, MEMORY_MODELS

#: ``module:function(registry)`` of the built-ins that higher layers define and register themselves.
BUILTIN_PROVIDERS: tuple[str, ...] = ("titans_compose.graph.blocks:register_block_kinds",)


def register_builtins(registry: Registry) -> None:
    """Add the built-in memory models, losses, retention rules, optimisers, activations and attention kinds to
    ``registry``, then those of :data:`BUILTIN_PROVIDERS` (the block kinds)."""
    for name, (loss, params, doc) in LOSSES.items():
        registry.register("loss", name, loss, params=params, description=doc)
    for kind, table in (
        ("memory", MEMORY_MODELS),
        ("activation", ACTIVATIONS),
        ("retention", RETENTIONS),
        ("optimizer", OPTIMIZERS),
        ("attention", ATTENTION_KINDS),
    ):
        for name, (obj, doc) in table.items():
            registry.register(kind, name, obj, description=doc)
    for target in BUILTIN_PROVIDERS:
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(registry)
