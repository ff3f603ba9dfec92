"""Importing a Python file by path (plug-in files, generated kernel sources) under a module name of our choosing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_file(path: Path, name: str) -> ModuleType:
    """Import ``path`` as module ``name`` (registered in ``sys.modules`` so that tools such as ``@triton.jit`` can
    find its source); a module of that name already imported is returned as it is. A failed import leaves no
    half-initialised module behind and re-raises the error."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
