"""The ``hf`` extra's packages: imported with an error that says how to install them when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(package: str, needed_by: str) -> ModuleType:
    """``import package``, or an ``ImportError`` saying that ``needed_by`` needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f'{needed_by} needs {package}, part of the hf extra: pip install "titans_compose[hf]" (in a source '
            f'checkout: pip install -e ".[hf]") ({exc})'
        ) from exc
