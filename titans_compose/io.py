"""Crash-safe file output: write to a temporary file in the target's directory, then rename over the target.

A process killed while writing leaves its temporary (``.<name>.<random>.tmp``) behind; :func:`temporaries` finds
them, so the next run in that directory can remove them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _default_mode() -> int:
    """0666 less the process umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: the suffix of :func:`atomic_write`'s temporaries, which are named ``.<target name>.<random><TEMP_SUFFIX>``
TEMP_SUFFIX = ".tmp"


def temporaries(directory: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> list[Path]:
    """:func:`atomic_write`'s temporaries in ``directory`` (of targets named ``names``; any target without), sorted.
    Only a writer killed mid-write leaves one for long: call this where no other process writes (under a lock)."""
    found = []
    for path in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        if names is None or any(path.name.startswith(f".{name}.") for name in names):
            found.append(path)
    return sorted(found)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        os.fchmod(fd, _default_mode())  # mkstemp makes 0600 files; give what a plain open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: name the target
            exc.filename = str(target)
        raise
