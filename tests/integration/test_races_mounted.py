"""Races 1-3 of DESIGN §3 through a real mount, with real syscalls.

The window is held open inside the daemon by a race site with a delay (set
through ``.fusefs/dynamic_fault``); a thread blocks in ``pread`` inside it while
the test runs the conflicting operation (collapse, punch, O_DIRECT write).  The
lock is switched through ``.fusefs/pagecache_lock``.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator

import pytest

from .conftest import FuseMount

BS = 4096
WINDOW_MS = 1000


def stamp(block: int) -> bytes:
    line = f"block {block:06d} ".encode()
    return (line * (BS // len(line) + 1))[:BS]


def control(mnt: FuseMount, name: str, text: str) -> None:
    fd = os.open(mnt.path(".fusefs", name), os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def site_fired(mnt: FuseMount, site: str) -> int:
    with open(mnt.path(".fusefs", "dynamic_fault")) as f:
        for line in f:
            if f" name:{site} " in line:
                return int(line.rsplit("fired:", 1)[1])
    raise AssertionError(f"no site {site}")


def stat_value(mnt: FuseMount, key: str) -> int:
    with open(mnt.path(".fusefs", "stats")) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.strip() == key:
                return int(v)
    raise AssertionError(f"no stat {key}")


def wait_until(cond: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def stamped(mnt: FuseMount) -> Iterator[int]:
    """A file of 16 stamped blocks, on disk and out of the cache; yields an fd."""
    fd = os.open(mnt.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"".join(stamp(i) for i in range(16)))
    os.fsync(fd)
    control(mnt, "drop_caches", "1")
    try:
        yield fd
    finally:
        os.close(fd)
        control(mnt, "dynamic_fault", "reset")


def in_window(mnt: FuseMount, site: str, fd: int, offset: int) -> threading.Thread:
    """Start a thread whose pread of one block is held inside ``site``'s window."""
    control(mnt, "dynamic_fault", f"name {site} delay {WINDOW_MS} times 1")
    reader = threading.Thread(target=os.pread, args=(fd, BS, offset))
    reader.start()
    wait_until(lambda: site_fired(mnt, site) >= 1, f"{site} to fire")
    return reader


@pytest.mark.parametrize("lock", ["off", "on"])
def test_race1_readahead_vs_collapse(mnt: FuseMount, stamped: int, lock: str) -> None:
    control(mnt, "pagecache_lock", lock)
    control(mnt, "dynamic_fault", f"name readahead_before_insert delay {WINDOW_MS} times 1")
    os.pread(stamped, BS, 0)  # sequential from 0: readahead of blocks 1-4 starts
    wait_until(lambda: site_fired(mnt, "readahead_before_insert") >= 1, "readahead")
    control(mnt, "fallocate", f"path=f mode=collapse offset={2 * BS} length={2 * BS}")
    wait_until(lambda: stat_value(mnt, "readahead_issued") >= 4, "readahead to insert")
    got = os.pread(stamped, BS, 2 * BS)
    if lock == "off":
        assert got == stamp(2), "the stale readahead page should have survived the collapse"
    else:
        assert got == stamp(4)
    assert os.fstat(stamped).st_size == 14 * BS


@pytest.mark.parametrize("lock", ["off", "on"])
def test_race2_read_vs_punch(mnt: FuseMount, stamped: int, lock: str) -> None:
    control(mnt, "pagecache_lock", lock)
    reader = in_window(mnt, "buffered_read_before_insert", stamped, 2 * BS)
    control(mnt, "fallocate", f"path=f mode=punch offset={2 * BS} length={BS}")
    reader.join()
    got = os.pread(stamped, BS, 2 * BS)
    if lock == "off":
        assert got == stamp(2), "the read should have inserted the punched data"
    else:
        assert got == bytes(BS)


@pytest.mark.parametrize("lock", ["off", "on"])
def test_race3_read_vs_direct_write(mnt: FuseMount, stamped: int, lock: str) -> None:
    control(mnt, "pagecache_lock", lock)
    dfd = os.open(mnt.path("f"), os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BS)  # page-aligned, as O_DIRECT wants
        buf.write(b"\xd1" * BS)
        reader = in_window(mnt, "buffered_read_before_insert", stamped, BS)
        assert os.pwrite(dfd, buf, BS) == BS
        reader.join()
    finally:
        os.close(dfd)
    got = os.pread(stamped, BS, BS)
    if lock == "off":
        assert got == stamp(1), "the read should have inserted the overwritten data"
    else:
        assert got == b"\xd1" * BS
