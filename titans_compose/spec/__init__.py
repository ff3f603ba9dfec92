"""The spec language: loading (with ``extends`` and ``--set``), validation and the JSON schema."""

from __future__ import annotations

import os
from collections.abc import Sequence

from titans_compose.registry import Registry, default_registry
from titans_compose.spec.loader import Override, load_document, resolve_blocks
from titans_compose.spec.validate import LoadedSpec, validate_document

__all__ = ["LoadedSpec", "load_spec"]


def load_spec(
    path: str | os.PathLike[str],
    overrides: Sequence[Override] = (),
    *,
    registry: Registry | None = None,
) -> LoadedSpec:
    """Load, inherit, override, resolve and validate a spec file.

    Raises :class:`titans_compose.errors.SpecError` with every problem found. ``registry`` defaults to the
    process-wide one (built-ins and installed plug-ins).
    """
    if registry is None:
        registry, _ = default_registry()
    doc = load_document(path, overrides)
    sections = {e.name: e.obj.sections for e in registry.entries("block")}
    return validate_document(resolve_blocks(doc, sections), registry, str(path))
