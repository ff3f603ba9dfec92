"""Old import paths of moved packages, kept working with a DeprecationWarning.

``titans_compose.kernels`` and ``titans_compose.codegen`` became ``titans_compose.ops.memory`` and
``titans_compose.ops.memory.codegen``. Plug-ins, notebooks and exported artifacts written against the old paths keep
importing: each old package makes every submodule of its new home importable under the old name as the same module
object, so ``isinstance`` checks and monkeypatches see one class and one function.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from types import ModuleType


def alias_package(old: str, new: str) -> ModuleType:
    """Make ``old`` and each ``old.<sub>`` the modules ``new`` and ``new.<sub>`` (recursively); warn once."""
    warnings.warn(
        f"{old} moved to {new}; the old path will be removed in a future release", DeprecationWarning, stacklevel=3
    )
    target = importlib.import_module(new)
    sys.modules[old] = target
    for info in pkgutil.walk_packages(target.__path__, prefix=f"{new}."):
        module = importlib.import_module(info.name)
        sys.modules[old + info.name[len(new) :]] = module
    return target
