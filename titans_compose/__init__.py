"""titans_compose: a compiler-style framework for Titans neural long-term memory models.

Specs (YAML) are validated, lowered to a checked graph IR, and compiled into PyTorch modules. Importing the
package is light: torch is only imported by the parts that build modules.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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
    "load_spec",
]
