"""What every benchmark script does after printing its table: append a dated section to benchmarks/RESULTS.md with
the command that reproduces it, and write its plot when matplotlib is installed (not a dependency)."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_section(title: str, script: str, body: str, argv: list[str] | None = None) -> None:
    """Append ``## title (today)``, ``Command: python benchmarks/<script> <argv>`` and ``body`` (which ends with the
    table) to RESULTS.md. ``script`` is the calling file's ``__file__``; ``argv`` defaults to ``sys.argv[1:]``."""
    command = f"python benchmarks/{Path(script).name} " + shlex.join(sys.argv[1:] if argv is None else argv)
    section = f"\n## {title} ({dt.date.today().isoformat()})\n\nCommand: `{command}`  \n{body}\n"
    with RESULTS.open("a") as handle:
        handle.write(section)
    print(f"appended to {RESULTS}")


def pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path) -> str:
    """Write ``fig`` to ``path`` through a temporary file and a rename (no half-written PNG); says where."""
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return f"plot: {path.relative_to(RESULTS.parent.parent)}"
