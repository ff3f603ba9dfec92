"""Output directories held by one run at a time.

A run (``train``, ``sweep``) takes an exclusive advisory lock (``flock``) on a file inside its directory and holds
it for its whole life. A second run into the same directory is refused instead of mixing its files with the first
one's. The operating system releases the lock when the holder ends in any way, a kill included, so a crashed run
never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

#: the lock file inside a locked directory (it stays there; its content is the holder's process id)
LOCK_FILE = ".titans-compose.lock"


@contextlib.contextmanager
def locked(directory: str | os.PathLike[str], what: str, error: type[Exception]) -> Iterator[Path]:
    """Create ``directory`` if needed and hold its lock while the ``with`` block runs; yields the directory.

    Raises ``error`` naming the directory, ``what`` holds it (e.g. "train run") and its process id if another
    process holds the lock."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", errors="replace").strip() or "unknown"
            raise error(
                f"{root} is in use by another titans-compose {what} (process {holder}): wait for it to finish or "
                "choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield root
    finally:
        os.close(fd)  # closing the descriptor releases the lock
