"""Verifiable directories (builds, exported artifacts): files written atomically, then ``manifest.json`` with the
format, its version, the versions of the software that wrote them and the sha256 and size of every file, written
last, so a directory with a manifest is complete and any later change to a file is detected and named.

Reading one trusts nothing in it: the manifest is read bounded and checked against the format's schema
(:class:`Header` and its subclasses), every file in the directory must be listed, and every listed file is read
bounded by its recorded size and checked against its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from titans_compose.io import UnreadableFile, atomic_write, read_bounded

MANIFEST = "manifest.json"
#: the most a manifest may hold: it lists a handful of files
MANIFEST_LIMIT = 1 << 20
#: how many schema problems a refusal names
_SHOWN = 3

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Header(BaseModel):
    """The fields every manifest has, typed strictly (JSON ``true`` is no integer); other fields are allowed."""

    model_config = ConfigDict(strict=True, extra="allow")

    class File(BaseModel):
        model_config = ConfigDict(strict=True)
        sha256: Sha256
        bytes: Annotated[int, Field(ge=0)]

    format: str
    format_version: int
    versions: dict[str, str | None]
    files: dict[str, File]


class Plugin(BaseModel):
    """A plug-in a model was made with: a ``--plugin`` file by its name and sha256, a module by its name, or an
    installed entry-point plug-in by its entry-point name."""

    model_config = ConfigDict(strict=True)
    kind: Literal["file", "module", "entry_point"]
    name: str
    sha256: Sha256 | None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The versions a manifest records: titans_compose, torch, triton and Python."""
    import torch

    return {
        "titans_compose": package_version("titans_compose"),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
    }


def read_manifest(path: Path, fmt: str) -> dict[str, Any] | None:
    """The manifest of format ``fmt`` in directory ``path``, or None if there is none or it is not one."""
    try:
        manifest = json.loads(read_bounded(path / MANIFEST, MANIFEST_LIMIT, "manifest"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == fmt else None


def write_with_manifest(path: Path, files: dict[str, bytes], header: dict[str, Any]) -> None:
    """Write ``files`` (name -> bytes, names may hold ``/``) into ``path`` atomically, then the manifest: ``header``
    plus the sha256 and size of every file. An earlier manifest is removed first, so until the new one is written
    the directory is visibly incomplete."""
    (path / MANIFEST).unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write(path / name, data)
    manifest = {**header, "files": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()}}
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _problems(exc: ValidationError) -> str:
    """A schema failure in one line: the first few fields and what is wrong with each."""
    errors = exc.errors()
    shown = [f"{'.'.join(map(str, e['loc'])) or 'the manifest'}: {e['msg'].lower()}" for e in errors[:_SHOWN]]
    more = f" (and {len(errors) - _SHOWN} more)" if len(errors) > _SHOWN else ""
    return "; ".join(shown) + more


_UNSAFE = re.compile(r"[\\\x00-\x1f]")


def _safe_name(name: str) -> bool:
    """Whether a listed name is a plain relative path inside the directory (no ``..``, no absolute path)."""
    parts = name.split("/")
    return name != MANIFEST and not _UNSAFE.search(name) and all(part not in ("", ".", "..") for part in parts)


def _present(root: Path) -> set[str]:
    """Every file, link or other non-directory entry under ``root`` (not following links), as a ``/`` path."""
    found = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        links = [d for d in dirs if (Path(folder) / d).is_symlink()]  # not walked into: count them as entries
        found.update((here / name).as_posix() for name in (*files, *links))
    return found


def read_verified(
    root: Path,
    schema: type[Header],
    fmt: str,
    format_version: int,
    required: list[str],
    *,
    what: str,
    remedy: str,
    error: type[Exception],
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest of ``root`` and the bytes of every file it lists, each read at most to its recorded size and
    checked against its sha256. Raises ``error`` naming the file if the manifest is missing, unreadable, of
    another format or format version, or does not fit ``schema``; if a ``required`` file is unlisted, a listed one
    is missing, changed or not a regular file, or the directory holds a file the manifest does not list. ``what``
    names the directory's kind ("build") and ``remedy`` says how to get a good one."""
    where = root / MANIFEST
    try:
        manifest = json.loads(read_bounded(where, MANIFEST_LIMIT, f"{what}'s manifest"))
    except FileNotFoundError:
        raise error(f"{root} is not a titans-compose {what}: it has no {MANIFEST}") from None
    except UnreadableFile as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"{where} cannot be read: {exc}") from None
    except ValueError as exc:
        raise error(f"{where} is not JSON ({exc}): {remedy}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise error(f"{where} is not the manifest of a titans-compose {what} (format {found!r}, not {fmt!r})")
    if manifest.get("format_version") != format_version or type(manifest["format_version"]) is not int:
        raise error(
            f"{where}: {what} format version {manifest.get('format_version')!r}; this titans-compose "
            f"reads version {format_version}: {remedy}"
        )
    try:
        schema.model_validate(manifest)
    except ValidationError as exc:
        raise error(f"{where} is malformed: {_problems(exc)}; {remedy}") from None
    listed: dict[str, dict[str, Any]] = manifest["files"]
    unsafe = sorted(name for name in listed if not _safe_name(name))
    if unsafe:
        raise error(f"{where} lists {unsafe[0]!r}, which is not a file name inside {root}: {remedy}")
    unlisted = sorted(_present(root) - set(listed) - {MANIFEST})
    if unlisted:
        raise error(
            f"{root} holds {', '.join(unlisted[:_SHOWN])}{' …' * (len(unlisted) > _SHOWN)}, which {MANIFEST} does "
            f"not list: it was added, or the manifest changed, after the {what} was written; refusing to load it"
        )
    for name in required:
        if name not in listed:
            raise error(f"{where} does not list {name}: the manifest is incomplete")
    data: dict[str, bytes] = {}
    for name, entry in listed.items():
        changed = f"{root / name} does not match its sha256 in {MANIFEST}: it changed after it was written"
        try:
            data[name] = read_bounded(root / name, entry["bytes"], f"{name} listed in {MANIFEST}")
        except FileNotFoundError:
            raise error(f"{root / name} is missing: the {what} is incomplete") from None
        except UnreadableFile as exc:
            if not (root / name).is_file():
                raise error(f"{exc}: it is not the file the {what} was written with") from None
            raise error(f"{changed} (it holds more than the {entry['bytes']:,} bytes listed)") from None
        except OSError as exc:
            raise error(f"{root / name} cannot be read: {exc}") from None
        if sha256(data[name]) != entry["sha256"]:
            raise error(changed)
    return manifest, data


def check_output_dir(
    path: Path, fmt: str, what: str, error: type[Exception], names: tuple[str, ...], protected: Path | None = None
) -> None:
    """Refuse to write a ``what`` onto a file, over ``protected`` (the spec it is made from) when it is one of its
    files ``names``, or into a non-empty directory that is not exactly an earlier one (a manifest of format ``fmt``
    and only the files it lists)."""
    if path.exists() and not path.is_dir():
        raise error(f"{path} is a file, not a directory: choose another output directory")
    if protected is not None and protected.resolve() in {(path / name).resolve() for name in (*names, MANIFEST)}:
        raise error(
            f"writing the {what} of {protected} into {path} would overwrite the spec itself: choose another "
            "output directory"
        )
    if not path.is_dir() or not any(path.iterdir()):
        return
    manifest = read_manifest(path, fmt)
    if manifest is None:
        raise error(
            f"{path} is not empty and holds no {MANIFEST} of a titans-compose {what}: refusing to write into it "
            "(choose an empty or new directory)"
        )
    files = manifest.get("files")
    listed = {name.split("/")[0] for name in files} if isinstance(files, dict) else set()
    foreign = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in listed)
    if foreign:
        raise error(
            f"{path} is an earlier {what} but also holds {', '.join(foreign)}, which the {what} did not write: "
            "refusing to replace it (move those files or choose another output directory)"
        )
