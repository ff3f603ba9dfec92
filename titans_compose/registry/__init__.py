"""The plug-in registry: one generic :class:`Registry` for every pluggable part, the built-ins, and plug-ins."""

from __future__ import annotations

import os
from collections.abc import Iterable

from titans_compose.errors import Diagnostic
from titans_compose.registry.core import KINDS, Entry, Registry, RuleParams
from titans_compose.registry.plugins import ENTRY_POINT_GROUP, load_entry_point_plugins, load_plugins

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "Entry",
    "Registry",
    "RuleParams",
    "default_registry",
    "new_registry",
]

_DEFAULT: Registry | None = None
_DEFAULT_PROBLEMS: list[Diagnostic] = []
_LOADED_TARGETS: set[str] = set()


def new_registry() -> Registry:
    """A registry holding only the built-ins."""
    from titans_compose.registry.builtins import register_builtins

    registry = Registry()
    register_builtins(registry)
    return registry


def default_registry(plugins: Iterable[str] = (), *, debug: bool = False) -> tuple[Registry, list[Diagnostic]]:
    """The process-wide registry: built-ins, installed entry-point plug-ins (unless the environment sets
    ``TITANS_COMPOSE_NO_ENTRY_POINTS=1``) and the given ``--plugin`` targets, each loaded once.

    Returns the registry and the diagnostics of every plug-in that failed to load.
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = new_registry()
        if os.environ.get("TITANS_COMPOSE_NO_ENTRY_POINTS") != "1":
            _DEFAULT_PROBLEMS.extend(load_entry_point_plugins(_DEFAULT, debug=debug))
    problems = list(_DEFAULT_PROBLEMS)
    for target in plugins:
        if target in _LOADED_TARGETS:
            continue
        failed = load_plugins(_DEFAULT, [target], debug=debug)
        if failed:
            problems.extend(failed)
        else:
            _LOADED_TARGETS.add(target)
    return _DEFAULT, problems


def reset_default_registry() -> None:
    """Forget the process-wide registry and its plug-ins; the next :func:`default_registry` call rebuilds it."""
    global _DEFAULT
    _DEFAULT = None
    _DEFAULT_PROBLEMS.clear()
    _LOADED_TARGETS.clear()
