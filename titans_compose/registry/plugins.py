"""Plug-in loading: from the entry-point group ``titans_compose.plugins`` and from ``--plugin module_or_file.py``.

A plug-in is a module (or a callable) with ``register(registry)``. Each plug-in registers inside a registry
transaction, so a plug-in that fails half-way leaves nothing behind; its failure is returned as a TC501 diagnostic
naming it, and the built-ins and the other plug-ins stay usable. A plug-in that raises ``SystemExit`` (calls
``sys.exit``) or another ``BaseException`` on import or registration fails the same way, so it cannot end the
command; only ``KeyboardInterrupt`` (the user's Ctrl-C) passes through.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from titans_compose.errors import Diagnostic, SpecError
from titans_compose.imports import import_file
from titans_compose.registry.core import Registry

ENTRY_POINT_GROUP = "titans_compose.plugins"


def _register_fn(obj: Any, label: str) -> Callable[[Registry], Any]:
    fn = getattr(obj, "register", obj)
    if not callable(fn):
        raise TypeError(f"{label} has no register(registry) function")
    return fn


def _failure(label: str, exc: BaseException) -> Diagnostic:
    if isinstance(exc, SpecError):
        detail = "; ".join(d.message for d in exc.diagnostics)
    elif isinstance(exc, SystemExit):
        detail = f"it called sys.exit({exc.code!r})"
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return Diagnostic(
        "TC501",
        f"plug-in {label} failed to load: {detail}",
        hint="the built-ins and other plug-ins are still available; run with --debug for the traceback",
    )


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return import_file(path, f"titans_compose_plugin_{path.stem}_{digest}")


def load_plugin(registry: Registry, target: str, *, debug: bool = False) -> Diagnostic | None:
    """Load one ``--plugin`` target: a ``.py`` file or an importable module name. Returns a diagnostic on failure."""
    path = Path(target)
    label = f"'{target}'"
    try:
        with registry.transaction(f"plugin {target}"):
            if target.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {target}")
                module = _import_file(path)
            else:
                module = importlib.import_module(target)
            _register_fn(module, label)(registry)
    except BaseException as exc:
        if debug or isinstance(exc, KeyboardInterrupt):
            raise
        return _failure(label, exc)
    return None


def load_entry_point_plugins(registry: Registry, *, debug: bool = False) -> list[Diagnostic]:
    """Load every plug-in advertised under :data:`ENTRY_POINT_GROUP` by installed distributions."""
    problems = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        label = f"'{ep.name}' ({ep.value})"
        try:
            with registry.transaction(f"plugin {ep.name}"):
                _register_fn(ep.load(), label)(registry)
        except BaseException as exc:
            if debug or isinstance(exc, KeyboardInterrupt):
                raise
            problems.append(_failure(label, exc))
    return problems


def load_plugins(registry: Registry, targets: Iterable[str] = (), *, debug: bool = False) -> list[Diagnostic]:
    """Load ``--plugin`` targets in order; returns a diagnostic per failure."""
    problems = [load_plugin(registry, t, debug=debug) for t in targets]
    return [p for p in problems if p is not None]
