"""titans_compose: a compiler-style framework for Titans neural long-term memory models.

Specs (YAML) are validated, lowered to a checked graph IR, and compiled into PyTorch modules. Importing the
package is light: torch is only imported by the parts that build modules.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from titans_compose.errors import Diagnostic, Location, SpecError
from titans_compose.registry import Registry, RuleParams
from titans_compose.spec import LoadedSpec, load_spec

try:
    __version__ = version("titans_compose")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "Diagnostic",
    "LoadedSpec",
    "Location",
    "Registry",
    "RuleParams",
    "SpecError",
    "__version__",
    "build",
    "load",
    "load_build",
    "load_spec",
]

#: names imported on first use: they import torch, which ``import titans_compose`` must not. (The module is not
#: called ``build``: importing it would set ``titans_compose.build`` to the module, hiding the function.)
_LAZY = {"build": "titans_compose.builder", "load_build": "titans_compose.builder", "load": "titans_compose.export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'titans_compose' has no attribute {name!r}")
