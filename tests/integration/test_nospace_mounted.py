"""ENOSPC only when space is really gone, through a real mount (`fusefs.reclaim`).

A small image mounted with ``commit=3600``, so that no periodic commit can make
the space of an ``rm`` reusable behind the test's back: ``dd`` fills it, ``rm``
removes the file, and at once ``statvfs`` shows the space and a write of that
much succeeds -- through buffered writes, O_DIRECT and fallocate(2).
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import FuseMount, mkfs, stats

pytestmark = pytest.mark.mount

IMAGE_MB = 16
MiB = 1 << 20
PATTERN = bytes(range(256)) * (MiB // 256)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[FuseMount]:
    image = tmp_path / "small.img"
    mkfs(image, f"{IMAGE_MB}M")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = FuseMount(image, mountpoint)
    try:
        m.mount("-o", "commit=3600")
        yield m
    finally:
        m.teardown()


def dd_fill(path: str) -> int:
    """``dd`` until the filesystem is full, then fsync; the bytes it wrote."""
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "conv=fsync"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, done.stderr
    assert "No space left" in done.stderr, done.stderr
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return os.stat(path).st_size


def write_all(path: str, size: int, flags: int = 0) -> None:
    """Write ``size`` bytes of a pattern, from page-aligned memory (O_DIRECT wants it)."""
    buf = mmap.mmap(-1, MiB)
    buf.write(PATTERN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        pos = 0
        while pos < size:
            n = os.write(fd, memoryview(buf)[: min(MiB, size - pos)])
            assert n > 0
            pos += n
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_enospc(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        with pytest.raises(OSError, match="No space left") as e:
            os.write(fd, b"x" * 4096)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_rm_then_write_succeeds_at_once(small: FuseMount) -> None:
    big = small.path("big")
    size = dd_fill(big)
    assert size > (IMAGE_MB - 2) * MiB
    assert os.statvfs(small.mountpoint).f_bavail == 0
    assert_enospc(small.path("probe"))
    os.unlink(small.path("probe"))
    commits = int(stats(small.mountpoint)["commits"])

    os.unlink(big)
    sv = os.statvfs(small.mountpoint)  # before any commit: df shows the space
    assert sv.f_bfree == sv.f_bavail
    assert sv.f_bavail * sv.f_bsize > size - MiB
    assert int(stats(small.mountpoint)["commits"]) == commits

    start = time.monotonic()
    write_all(small.path("again"), sv.f_bavail * sv.f_bsize)  # every block df showed
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"the write took {elapsed:.1f} s"
    st = stats(small.mountpoint)
    assert int(st["nospace_commits"]) == 1
    assert int(st["nospace_retries"]) >= 1
    assert os.statvfs(small.mountpoint).f_bavail == 0
    assert_enospc(small.path("again"))  # and then it is really gone
    with open(small.path("again"), "rb") as f:
        data = f.read(MiB)
    assert data == PATTERN


def test_direct_write_and_fallocate_after_rm(small: FuseMount) -> None:
    big = small.path("big")
    dd_fill(big)
    os.unlink(big)
    half = os.statvfs(small.mountpoint).f_bavail // 2 * 4096
    write_all(small.path("direct"), half, os.O_DIRECT)
    fd = os.open(small.path("prealloc"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, os.statvfs(small.mountpoint).f_bavail * 4096)
    finally:
        os.close(fd)
    assert os.statvfs(small.mountpoint).f_bavail == 0
    assert int(stats(small.mountpoint)["nospace_commits"]) == 1
