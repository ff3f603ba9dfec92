"""Tokenised corpora: a flat file of token ids (``.bin``, the layout nanoGPT-style pipelines write with numpy's
``tofile``: uint16 or uint32, native little-endian, no header) described by a JSON sidecar ``<file>.json``.

The raw file has no header, so its dtype cannot be read off it: the sidecar says it, with the vocabulary size, the
tokenizer it came from and the separator id that starts each document (or null). Both files are written
atomically. Reading maps the file with ``numpy.memmap``: a batch touches only its windows' pages, so a corpus
larger than memory trains. The validation split is the file's held-out tail (the last ``val_percent``): a window
never straddles the cut.

Packed documents: with a separator, each separator token starts a new document (it ends the previous one as its
last target, and the next document is predicted from a fresh model state that has seen only the separator). A
batch carries the document boundaries as ``cu_seqlens`` over its rows laid end to end (rows are boundaries too),
which :meth:`~titans_compose.nn.model.TitansLM.forward` takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from titans_compose.io import atomic_write
from titans_compose.train.data import Batch, DataError, RowSampler, generator

FORMAT = "titans_compose.tokens"
#: the dtypes a token file may have, by name
DTYPES = ("uint16", "uint32")


def numpy_module() -> Any:
    """numpy, or a :class:`DataError` saying how to install it (token files are read with ``numpy.memmap``)."""
    try:
        import numpy
    except ImportError:
        raise DataError('reading token files needs numpy: pip install numpy (or pip install -e ".[data]")') from None
    return numpy


def sidecar(path: str | os.PathLike[str]) -> Path:
    """The sidecar of the token file ``path``: ``<path>.json``."""
    return Path(f"{path}.json")


def dtype_for(vocab_size: int) -> str:
    """The smallest dtype that holds every id of a vocabulary of ``vocab_size``."""
    if not 1 <= vocab_size <= 2**32:
        raise DataError(f"a vocabulary of {vocab_size} tokens does not fit a token file (1 to 2^32 ids)")
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclass(frozen=True)
class TokenFile:
    """A token file mapped into memory: ``ids`` (a read-only numpy memmap), its sidecar's fields."""

    path: Path
    ids: Any
    vocab_size: int
    tokenizer: str | None
    separator: int | None

    def __len__(self) -> int:
        return len(self.ids)

    def max_id(self) -> int:
        """The largest id in the file (one streaming pass over it)."""
        step = 1 << 24
        return max(int(self.ids[i : i + step].max()) for i in range(0, len(self.ids), step))


def write_tokens(
    path: str | os.PathLike[str],
    ids: Any,
    *,
    vocab_size: int,
    tokenizer: str | None = None,
    separator: int | None = None,
) -> TokenFile:
    """Write ``ids`` as a token file and its sidecar (each atomically, the sidecar last) and return it opened.
    ``ids``: a 1-D integer array, or an iterator of them (e.g. one per document), written as they come, so a corpus
    larger than memory streams to disk. Raises :class:`DataError` for ids outside the vocabulary."""
    np = numpy_module()
    dtype = dtype_for(vocab_size)
    stored = np.dtype(f"<u{np.dtype(dtype).itemsize}")  # little-endian, what numpy's tofile writes on x86 and ARM
    if separator is not None and not 0 <= separator < vocab_size:
        raise DataError(f"{path}: the separator id {separator} lies outside the vocabulary of {vocab_size}")
    count = 0

    def encoded(parts: Iterable[Any]) -> Iterator[bytes]:
        nonlocal count
        for part in parts:
            part = np.asarray(part)
            if part.ndim != 1 or (part.size and (int(part.min()) < 0 or int(part.max()) >= vocab_size)):
                raise DataError(f"{path}: token ids must be flat arrays of ids in [0, {vocab_size})")
            count += part.size
            yield part.astype(stored).tobytes()

    atomic_write(path, encoded(ids if isinstance(ids, Iterator) else [ids]))
    meta = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "tokens": count,
        "tokenizer": tokenizer,
        "separator": separator,
    }
    atomic_write(sidecar(path), json.dumps(meta, indent=1) + "\n")
    return open_tokens(path)


def open_tokens(path: str | os.PathLike[str]) -> TokenFile:
    """Map the token file ``path`` with its sidecar; a :class:`DataError` names what is missing or inconsistent."""
    np = numpy_module()
    path, meta_path = Path(path), sidecar(path)
    if not path.is_file():
        raise DataError(f"{path}: no such token file")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: its sidecar {meta_path} is missing: it records the dtype, vocab_size and separator "
            "(titans-compose data tokenize writes both)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: not a readable JSON sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f'{meta_path}: not a token file sidecar (no "format": "{FORMAT}")')
    dtype, vocab, separator = meta.get("dtype"), meta.get("vocab_size"), meta.get("separator")
    if dtype not in DTYPES:
        raise DataError(f"{meta_path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(vocab, int) or vocab < 1:
        raise DataError(f"{meta_path}: vocab_size must be a positive integer, got {vocab!r}")
    if separator is not None and (not isinstance(separator, int) or not 0 <= separator < vocab):
        raise DataError(f"{meta_path}: separator must be null or an id below vocab_size {vocab}, got {separator!r}")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize or size // itemsize != meta.get("tokens", size // itemsize):
        raise DataError(
            f"{path}: {size} bytes do not hold the {meta.get('tokens')} {dtype} tokens its sidecar records "
            "(truncated or not written with this sidecar)"
        )
    ids = np.memmap(path, dtype=f"<u{itemsize}", mode="r") if size else np.zeros(0, dtype=f"<u{itemsize}")
    return TokenFile(path, ids, vocab, meta.get("tokenizer"), separator)


def check_token_vocabulary(vocab_size: int, top: int, path: str | os.PathLike[str]) -> None:
    """Raise ValueError unless a model with ``vocab_size`` tokens takes every id of the token file (up to ``top``:
    its sidecar's vocabulary or its largest id)."""
    if vocab_size <= top:
        raise ValueError(
            f"model.vocab_size is {vocab_size}, but the token file {path} holds ids up to {top} (its tokenizer's "
            f"vocabulary): set model.vocab_size to at least {top + 1} (--set model.vocab_size={top + 1})"
        )


def document_bounds(tokens: torch.Tensor, separator: int | None) -> torch.Tensor | None:
    """``cu_seqlens`` of a batch [B, T] laid end to end: 0, every row start, every separator position (each starts
    a document) and B * T; None without a separator."""
    if separator is None:
        return None
    rows, length = tokens.shape
    starts = (tokens == separator).flatten().nonzero().flatten()
    cuts = torch.cat([torch.arange(0, rows * length + 1, length), starts])
    return cuts.unique(sorted=True)


class TokenSampler(RowSampler):
    """Random windows of ``seq_len`` ids from ``ids[start:end]`` of a token file, each step's batch a function of
    (seed, stream, step); with ``separator`` the batch carries its document boundaries (:func:`document_bounds`)."""

    def __init__(
        self,
        tokens: TokenFile,
        start: int,
        end: int,
        batch: int,
        seq_len: int,
        *,
        seed: int = 0,
        stream: str = "train",
        separator: int | None = None,
    ) -> None:
        if end - start < seq_len:
            raise DataError(
                f"{tokens.path}: the {stream} part has {end - start:,} tokens, fewer than one window of {seq_len}"
            )
        self.tokens, self.start, self.end = tokens, start, end
        self.batch, self.seq_len, self.seed, self.stream, self.separator = batch, seq_len, seed, stream, separator

    def __call__(self, step: int, rows: slice = slice(None)) -> Batch:
        np = numpy_module()
        gen = generator(self.seed, self.stream, step)
        offsets = (
            torch.randint(self.end - self.start - self.seq_len + 1, (self.batch,), generator=gen)[rows] + self.start
        )
        rows = [np.asarray(self.tokens.ids[o : o + self.seq_len], dtype=np.int64) for o in offsets.tolist()]
        tokens = torch.from_numpy(np.stack(rows))
        return Batch(tokens, cu_seqlens=document_bounds(tokens, self.separator))


def split_samplers(
    tokens: TokenFile, batch: int, seq_len: int, *, seed: int, val_percent: float, separator: int | None
) -> tuple[TokenSampler, TokenSampler]:
    """Training and validation samplers: the validation part is the last ``val_percent`` of the file (at least one
    window), the training part everything before it."""
    total = len(tokens)
    cut = min(total - seq_len, round(total * (1 - val_percent / 100)))
    if cut < seq_len:
        raise DataError(
            f"{tokens.path}: {total:,} tokens cannot give a training part and a validation tail of one "
            f"{seq_len}-token window each"
        )
    train = TokenSampler(tokens, 0, cut, batch, seq_len, seed=seed, stream="train", separator=separator)
    return train, TokenSampler(tokens, cut, total, batch, seq_len, seed=seed, stream="val", separator=separator)
