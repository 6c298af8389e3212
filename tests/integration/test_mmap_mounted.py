"""Private mappings of fusefs files through a real mount.

Files are opened ``direct_io`` (DESIGN §2), so the kernel refuses ``MAP_SHARED``
with ENODEV (tests/integration/test_mount.py) and serves ``MAP_PRIVATE`` page
faults from its own page cache, filled by reads that reach fusefs like any
other.  Shown here: the faults arrive as reads (``.fusefs/stats``), a mapping
that is already faulted in is served by the kernel without asking fusefs again,
and a new mapping starts from an invalidated cache; and a punch -- through
fallocate(2) or ``.fusefs/fallocate`` -- with other threads faulting the same
pages all along leaves no stale page: the mapping shows zeros as soon as the
punch returns (docs/fallocate.md, "Private mappings").
"""

from __future__ import annotations

import mmap
import os
import threading

import pytest

from fusefs.cli import fallocate_fd

from .conftest import FuseMount, control_write, stats
from .test_mount import write_file

pytestmark = pytest.mark.mount

BS = 4096
FLAGS = {"punch": 0x03, "zero,keep_size": 0x11}


def counters(m: FuseMount) -> tuple[int, int]:
    st = stats(m.mountpoint)
    return int(st["reads"]), int(st["bytes_read"])


def test_private_mapping_faults_reach_fusefs_as_reads(shared_mount: FuseMount, work: str) -> None:
    path = os.path.join(work, "f")
    data = bytes((i // BS) % 251 + 1 for i in range(64 * BS))
    write_file(path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        reads, nbytes = counters(shared_mount)
        with mmap.mmap(fd, len(data), mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            assert m[:] == data  # every page faulted in
            reads1, nbytes1 = counters(shared_mount)
            assert reads1 > reads
            assert nbytes1 - nbytes >= len(data)
            # Faulted in: the kernel's page cache serves the mapping now.
            assert m[:] == data
            assert counters(shared_mount) == (reads1, nbytes1)
        # Every new mapping of a direct_io file starts from an invalidated cache
        # (fuse_file_mmap), so its faults reach fusefs again.
        with mmap.mmap(fd, len(data), mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            assert m[:] == data
            reads2, nbytes2 = counters(shared_mount)
            assert reads2 > reads1
            assert nbytes2 - nbytes1 >= len(data)
    finally:
        os.close(fd)


class Faulter:
    """A thread faulting the first pages of a private mapping over and over:
    ``MADV_DONTNEED`` drops its page table entries, and each access faults again
    -- from the kernel's page cache, or through a read to fusefs once the cache
    was invalidated."""

    def __init__(self, m: mmap.mmap, pages: int) -> None:
        self.m = m
        self.pages = pages
        self.faults = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="faulter", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.m.madvise(mmap.MADV_DONTNEED)
            for page in range(self.pages):
                self.m[page * BS]
            self.faults += self.pages

    def __enter__(self) -> Faulter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def zero_out(route: str, mode: str, root: str, fd: int, rel: str, offset: int, length: int) -> None:
    if route == "kernel":
        fallocate_fd(fd, FLAGS[mode], offset, length)
    else:
        control_write(root, "fallocate", f"path={rel} mode={mode} offset={offset} length={length}")


@pytest.mark.parametrize("racing", [False, True], ids=["alone", "racing-faults"])
@pytest.mark.parametrize("mode", ["punch", "zero,keep_size"])
@pytest.mark.parametrize("route", ["kernel", "control"])
def test_no_stale_page_in_a_private_mapping_after_punch_or_zero(
    shared_mount: FuseMount, work: str, route: str, mode: str, racing: bool
) -> None:
    """Each round: a mapping faulted in, then a punch (or zero range) of its
    middle pages, with a thread faulting them throughout when racing; as soon
    as the call returns the mapping must show zeros there, and a new mapping
    and pread too.  Before the control file waited for its invalidation, 133
    of 200 rounds (17 of 200 racing) still showed the old bytes of a punch
    through ``.fusefs/fallocate``."""
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    rel = os.path.relpath(path, root)
    stale = []
    faults = 0
    reads_before, _ = counters(shared_mount)
    for round_ in range(40):
        write_file(path, b"A" * 4 * BS)
        fd = os.open(path, os.O_RDWR)
        try:
            with mmap.mmap(fd, 4 * BS, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
                assert m[BS] == ord("A")
                if racing:
                    with Faulter(m, 4) as faulter:
                        zero_out(route, mode, root, fd, rel, BS, 2 * BS)
                        seen = m[BS : 3 * BS]
                    faults += faulter.faults
                else:
                    zero_out(route, mode, root, fd, rel, BS, 2 * BS)
                    seen = m[BS : 3 * BS]
                if seen != bytes(2 * BS):
                    stale.append(round_)
                assert m[:BS] == b"A" * BS
                assert m[3 * BS :] == b"A" * BS
            with mmap.mmap(fd, 4 * BS, mmap.MAP_PRIVATE, mmap.PROT_READ) as fresh:
                assert fresh[BS : 3 * BS] == bytes(2 * BS)
            assert os.pread(fd, 2 * BS, BS) == bytes(2 * BS)
        finally:
            os.close(fd)
    assert stale == [], f"stale pages right after the punch in rounds {stale}"
    if racing:
        assert faults > 0
        # Some of the faults went to fusefs (after each round's invalidation).
        assert counters(shared_mount)[0] > reads_before
