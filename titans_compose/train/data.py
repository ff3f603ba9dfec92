"""Offline byte-level training data: a text corpus as bytes (vocabulary 256) and a random-window batch sampler.

The default corpus is the Python standard library's own ``.py`` files, present on every machine that runs Python,
so training works with no download. Any text file or directory can be used instead. Files are split into training
and validation by a hash of their path relative to the corpus root, so the split does not depend on which other
files exist, on the order of the directory listing, or on the machine. Only regular files are read, and only as
many bytes as the cap asks for: a FIFO, device or socket in a folder is skipped (and named), and one given as the
corpus itself is refused, since reading it could block or never end.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from titans_compose.io import UnreadableFile, check_regular, open_regular, read_prefix

#: bytes read from the start of a file to decide whether it is text
SNIFF_BYTES = 4096
#: directories never read: installed packages and byte-code caches
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """A corpus could not be read or holds no usable text; the message names the path."""


@dataclass(frozen=True)
class Batch:
    """Token ids ``tokens`` [B, T] and, optionally, ``loss_mask`` [B, T]: which tokens are next-token targets.

    ``loss_mask[:, t]`` says whether predicting ``tokens[:, t]`` (from the logits at ``t - 1``) counts in the loss;
    column 0 is never a target. ``None`` means every token from position 1 on. ``cu_seqlens`` (keyword only): the
    document boundaries of packed documents over the rows laid end to end (0, ..., B * T; every row start is one),
    which reset the model's state (:mod:`~titans_compose.train.tokens`); None: each row is one stream.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split by file: ``train`` and ``val`` are uint8 tensors; ``files`` counts (train, val) files;
    ``skipped`` names the entries that were not read because they are not regular files."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    files: tuple[int, int]
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: the source and the size of each split."""
        return (
            f"{self.source}: {self.files[0]} train files ({self.train.numel():,} bytes), "
            f"{self.files[1]} validation files ({self.val.numel():,} bytes)"
        )


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (e.g. a base seed, a stream name and a step): distinct streams never overlap."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative: str, val_percent: float) -> bool:
    """Whether the file at ``relative`` (a POSIX path under the corpus root) belongs to the validation split."""
    bucket = int.from_bytes(hashlib.sha256(relative.encode("utf-8")).digest()[:4], "little") % 10_000
    return bucket < val_percent * 100


def _corpus_files(root: Path, suffix: str) -> list[Path]:
    """Files under ``root`` ending in ``suffix``, sorted by relative path. Hidden directories (``.git``) and
    installed packages (``site-packages``, ``dist-packages``: not part of the standard library) are skipped."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        found += [Path(folder, name) for name in names if name.endswith(suffix)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path, limit: int) -> bytes | None:
    """At most ``limit`` bytes of the file if it looks like text (no NUL byte at its start), else ``None``;
    unreadable files are None. Raises :class:`~titans_compose.io.UnreadableFile` for anything but a regular file
    (:func:`~titans_compose.io.open_regular`: a FIFO cannot hang the open)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    check_regular(path, mode, "text data")  # before the open: a socket cannot be opened, and would pass unnamed
    try:
        fd = open_regular(path, "text data")
    except UnreadableFile:
        raise
    except OSError:
        return None
    try:
        data = read_prefix(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if b"\0" in data[:SNIFF_BYTES] or not data.strip() else data


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int = 8_000_000,
    val_percent: float = 5.0,
) -> Corpus:
    """Read a byte corpus and split it by file.

    ``path`` is a text file, a directory (every text file under it, sorted by relative path; hidden directories
    skipped), or ``None`` for the standard library's ``.py`` files (without installed packages). Reading stops once
    ``max_bytes`` are collected, and no file is read past what is still wanted, so loading is fast and bounded;
    the cut is deterministic. Entries that are not regular files (FIFOs, devices, sockets) are skipped and listed
    in the corpus's ``skipped``. A file lands in validation when a
    hash of its relative path says so (``val_percent`` of files). A single file, or a directory whose hash puts
    nothing on one side, is split by bytes instead: the last ``val_percent`` of the text is the validation part.
    Raises :class:`DataError` if there is no text, or if ``path`` itself is neither a regular file nor a directory.
    """
    if max_bytes < 2:
        raise DataError(f"max_bytes must be at least 2, got {max_bytes}")
    root = stdlib_dir() if path is None else Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    files = [root] if not root.is_dir() else _corpus_files(root, ".py" if path is None else "")
    source = "python stdlib" if path is None else str(root)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    skipped: list[str] = []
    total = 0
    for file in files:
        try:
            data = _read_text(file, max_bytes - total)
        except UnreadableFile as exc:
            if file == root:
                raise DataError(f"{exc}: give a text file or a directory") from None
            skipped.append(str(exc))
            continue
        if data is None:
            continue
        relative = file.name if file == root else file.relative_to(root).as_posix()
        side = is_validation(relative, val_percent)
        parts[side].append(data)
        counts[side] += 1
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise DataError(f"{root}: no text found (no readable file without NUL bytes)")
    train, val = b"\n".join(parts[False]), b"\n".join(parts[True])
    if not train or not val:
        text = train or val
        cut = max(1, min(len(text) - 1, round(len(text) * (1 - val_percent / 100))))
        train, val = text[:cut], text[cut:]
    return Corpus(_bytes_tensor(train), _bytes_tensor(val), source, (counts[False], counts[True]), tuple(skipped))


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a long tensor of token ids (vocabulary 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    """The text of a 1-D tensor of byte token ids (invalid UTF-8 replaced)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def random_windows(
    data: torch.Tensor, batch: int, length: int, gen: torch.Generator, rows: slice = slice(None)
) -> torch.Tensor:
    """``batch`` windows of ``length`` consecutive bytes of ``data`` at random offsets, as a long tensor [B, length];
    with ``rows``, only those rows of them are read (the offsets are drawn for all ``batch``, so they are the same)."""
    if data.numel() < length:
        raise DataError(f"the text has {data.numel():,} bytes, fewer than one window of {length}")
    starts = torch.randint(data.numel() - length + 1, (batch, 1), generator=gen)[rows]
    return data[starts + torch.arange(length)].long()


class RowSampler(ABC):
    """A batch source that reads any range of a step's rows alone: ``sampler(step, rows)`` is ``rows`` of
    ``sampler(step)``, the step's whole batch of ``batch`` rows, so each training process reads only its own
    (:func:`~titans_compose.train.distributed.step_batches`)."""

    batch: int

    @abstractmethod
    def __call__(self, step: int, rows: slice = slice(None)) -> Batch:
        """Rows ``rows`` of step ``step``'s batch."""


class WindowSampler(RowSampler):
    """Language-modelling batches: random windows of a byte tensor, each step's batch a function of (seed, step).

    Deriving every batch from the step, not from a running generator, makes resumed training see exactly the
    batches an uninterrupted run sees, with no sampler state to save.
    """

    def __init__(self, data: torch.Tensor, batch: int, seq_len: int, seed: int = 0, stream: str = "train") -> None:
        if batch < 1 or seq_len < 2:
            raise DataError(f"need batch >= 1 and seq_len >= 2, got batch {batch}, seq_len {seq_len}")
        if data.numel() < seq_len:
            raise DataError(f"the {stream} text has {data.numel():,} bytes, fewer than one window of {seq_len}")
        self.data, self.batch, self.seq_len, self.seed, self.stream = data, batch, seq_len, seed, stream

    def __call__(self, step: int, rows: slice = slice(None)) -> Batch:
        gen = generator(self.seed, self.stream, step)
        return Batch(random_windows(self.data, self.batch, self.seq_len, gen, rows))
