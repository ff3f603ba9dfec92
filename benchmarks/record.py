"""What every benchmark script does after printing its table: append a dated section to benchmarks/RESULTS.md with
the command that reproduces it."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_section(title: str, script: str, body: str, argv: list[str] | None = None) -> None:
    """Append ``## title (today)``, ``Command: python benchmarks/<script> <argv>`` and ``body`` (which ends with the
    table) to RESULTS.md. ``script`` is the calling file's ``__file__``; ``argv`` defaults to ``sys.argv[1:]``."""
    command = f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:] if argv is None else argv)
    section = f"\n## {title} ({dt.date.today().isoformat()})\n\nCommand: `{command}`  \n{body}\n"
    with RESULTS.open("a") as handle:
        handle.write(section)
    print(f"appended to {RESULTS}")
