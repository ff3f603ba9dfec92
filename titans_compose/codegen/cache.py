"""The on-disk cache of generated kernel sources, and importing them.

``@triton.jit`` needs its function in a real file, so each generated module is written to
``<cache dir>/<slug>-<digest>.py`` and imported by path. Writes are atomic (temp file, then rename) and the source
is a deterministic function of the key, so concurrent builds that generate the same key race harmlessly: the last
rename wins with identical bytes. The directory is ``$TITANS_COMPOSE_CACHE`` if set, else
``$XDG_CACHE_HOME/titans_compose/kernels`` (``~/.cache/...``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from titans_compose.codegen.key import KernelKey
from titans_compose.io import atomic_write

ENV_VAR = "TITANS_COMPOSE_CACHE"
_MODULE_PREFIX = "titans_compose_generated"


def cache_dir() -> Path:
    """Where generated sources live (not created here)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "titans_compose" / "kernels"


def source_path(key: KernelKey) -> Path:
    return cache_dir() / f"{key.slug()}-{key.digest()}.py"


@dataclass(frozen=True)
class Loaded:
    """A generated module and whether its source came from the cache (``hit``) or was generated now."""

    module: ModuleType
    path: Path
    hit: bool


def load(key: KernelKey, generate: Callable[[KernelKey], str]) -> Loaded:
    """The generated module for ``key``: imported once per process, from the cache file when present, else from
    ``generate(key)`` written atomically to the cache first."""
    path = source_path(key)
    name = f"{_MODULE_PREFIX}_{key.digest()}"
    if name in sys.modules:
        return Loaded(sys.modules[name], path, True)
    hit = path.is_file()
    if not hit:
        atomic_write(path, generate(key))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import generated kernel source {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return Loaded(module, path, hit)
