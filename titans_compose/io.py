"""File input and output that a damaged or hostile file cannot subvert.

Output is crash-safe: write to a temporary file in the target's directory, then rename over the target. A process
killed while writing leaves its temporary (``.<name>.<random>.tmp``) behind; :func:`temporaries` finds them, so the
next run in that directory can remove them. Input of a file the program did not write (a spec, a manifest, weights)
is bounded: only a regular file is read, and at most a stated number of bytes, so a path that is a device, a pipe or
a symlink to one neither hangs nor fills memory.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from titans_compose.errors import Diagnostic, SpecError


class UnreadableFile(OSError):
    """A file :func:`read_bounded` refuses: not a regular file, or larger than the limit. The message names it."""


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


def atomic_write(path: str | os.PathLike[str], data: str | bytes | Iterable[bytes], *, private: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one, never a part.
    ``data`` may be an iterable of byte strings, written as they come (output larger than memory; an exception
    raised by the iterable leaves the old file). The file gets the permissions a plain ``open()`` would give,
    without group and other write with ``private``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (str, bytes)):
        data = [data.encode("utf-8") if isinstance(data, str) else data]
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        # mkstemp makes 0600 files; give what a plain open() would
        os.fchmod(fd, _default_mode() & ~(0o022 if private else 0))
        with os.fdopen(fd, "wb") as handle:
            for payload in data:
                handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:  # name the target
            exc.filename = str(target)
        raise


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], what: str) -> int:
    """A read-only descriptor of the regular file ``path`` (``what`` it is names it in errors). Raises
    :class:`UnreadableFile` if ``path`` (or what a symlink there points to) is a device, pipe, directory or socket;
    other ``OSError``\\ s (a missing file) pass through. The file is opened without blocking, so a FIFO cannot hang
    the open, and checked on the descriptor, so nothing swapped in after a check is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except ValueError:  # a NUL byte in the path: no file can have that name
        raise UnreadableFile(f"{str(path)!r} is not a valid path (it holds a NUL byte)") from None
    try:
        check_regular(path, os.fstat(fd).st_mode, what)
    except UnreadableFile:
        os.close(fd)
        raise
    return fd


def check_regular(path: str | os.PathLike[str], mode: int, what: str) -> None:
    """Raise :class:`UnreadableFile` naming ``path`` and its kind unless ``mode`` (its ``st_mode``) is a regular
    file's. Check before opening where the open itself could fail or block (a socket cannot be opened at all)."""
    if not stat.S_ISREG(mode):
        raise UnreadableFile(f"{path} is {_kind(mode)}, not a regular file: refusing to read it as the {what}")


def read_prefix(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from the start of the open file ``fd``, read in pieces of at most 1 MiB."""
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bounded(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path`` (``what`` it is, e.g. "manifest", names it in errors), at most
    ``limit`` of them. Raises :class:`UnreadableFile` if ``path`` is not a regular file (:func:`open_regular`) or
    holds more than ``limit`` bytes. The size is not taken on trust (``st_size`` is 0 for devices and wrong for some
    virtual files): the file is read to at most ``limit + 1`` bytes."""
    fd = open_regular(path, what)
    try:
        data = read_prefix(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnreadableFile(f"{path} holds more than {limit:,} bytes: refusing to read it as the {what}")
    return data


def default_dir(folder: str, name: str) -> Path:
    """The default output directory ``folder/name`` (``build/<spec name>``, ``runs/...``, ``sweeps/...``).

    Raises :class:`~titans_compose.errors.SpecError` (TC208) unless ``name`` is one plain path component, so that
    no name (``..``, ``a/../../x``, an absolute path) can put a default output outside ``folder``."""
    target = os.path.normpath(os.path.join(folder, name))
    if not name or os.path.dirname(target) != os.path.normpath(folder):
        raise SpecError(
            [
                Diagnostic(
                    "TC208",
                    f"{name!r} cannot name a folder inside {folder}/",
                    "name",
                    hint="give a `name:` of letters, digits, '.', '_' and '-', or choose the output directory with -o",
                )
            ]
        )
    return Path(target)
