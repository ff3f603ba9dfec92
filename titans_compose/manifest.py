"""Verifiable directories (builds, exported artifacts): files written atomically, then ``manifest.json`` with the
format, its version, the versions of the software that wrote them and the sha256 of every file, written last, so a
directory with a manifest is complete and any later change to a file is detected and named."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from titans_compose.io import atomic_write

MANIFEST = "manifest.json"


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
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
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


def read_verified(
    root: Path, fmt: str, format_version: int, names: list[str], *, what: str, remedy: str, error: type[Exception]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest of ``root`` and the bytes of ``names``, each checked against its sha256 there. Raises ``error``
    naming the file if the manifest is missing or of another format version, or a file is unlisted, missing or
    changed; ``what`` names the directory's kind ("build") and ``remedy`` says how to get a good one."""
    manifest = read_manifest(root, fmt)
    if manifest is None:
        raise error(f"{root} is not a titans-compose {what}: no readable {MANIFEST}")
    if manifest.get("format_version") != format_version:
        raise error(
            f"{root / MANIFEST}: {what} format version {manifest.get('format_version')!r}; this titans-compose "
            f"reads version {format_version}: {remedy}"
        )
    listed = manifest.get("files", {})
    data: dict[str, bytes] = {}
    for name in names:
        if name not in listed:
            raise error(f"{root / MANIFEST} does not list {name}: the manifest is incomplete")
        try:
            data[name] = (root / name).read_bytes()
        except FileNotFoundError:
            raise error(f"{root / name} is missing: the {what} is incomplete") from None
        if sha256(data[name]) != listed[name].get("sha256"):
            raise error(f"{root / name} does not match its sha256 in {MANIFEST}: it changed after it was written")
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
    listed = {name.split("/")[0] for name in manifest.get("files", {})}
    foreign = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in listed)
    if foreign:
        raise error(
            f"{path} is an earlier {what} but also holds {', '.join(foreign)}, which the {what} did not write: "
            "refusing to replace it (move those files or choose another output directory)"
        )
