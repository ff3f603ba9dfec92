"""Atomic file output: complete contents, no temporary left behind, the usual permissions, and a failed write
leaves the old file intact."""

from __future__ import annotations

import os
import stat

import pytest

from titans_compose import io


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    io.atomic_write(target, "old")
    io.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["out.txt"]


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    io.atomic_write(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_private_drops_group_and_other_write(tmp_path):
    old = os.umask(0o002)
    try:
        io.atomic_write(tmp_path / "shared", "x")
        io.atomic_write(tmp_path / "private", "x", private=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o644


def test_read_bounded_reads_a_regular_file_up_to_the_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    assert io.read_bounded(path, 5, "test file") == b"12345"
    with pytest.raises(io.UnreadableFile, match=f"{path} holds more than 4 bytes: refusing to read it as the test"):
        io.read_bounded(path, 4, "test file")
    with pytest.raises(FileNotFoundError):
        io.read_bounded(tmp_path / "missing", 5, "test file")


def _fifo(path):
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda tmp: "/dev/zero", "a character device"),  # st_size 0, endless: a size check alone is fooled
        (lambda tmp: _fifo(tmp / "pipe"), "a pipe"),  # no writer: a blocking open or read would hang
        (lambda tmp: (tmp / "link").symlink_to("/dev/zero") or tmp / "link", "a character device"),
        (lambda tmp: tmp, "a directory"),
    ],
    ids=["dev-zero", "fifo", "symlink-to-dev-zero", "directory"],
)
def test_read_bounded_refuses_what_is_not_a_regular_file(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(io.UnreadableFile, match=f"^{path} is {kind}, not a regular file: refusing to read it as"):
        io.read_bounded(path, 1 << 30, "manifest")


def test_read_bounded_refuses_a_path_with_a_nul_byte(tmp_path):
    with pytest.raises(io.UnreadableFile, match="NUL byte"):
        io.read_bounded(f"{tmp_path}/a\0b", 10, "spec")
