"""Acknowledged writes under another process's pressure on the cache, through a
real mount: the interleavings of tests/unit/test_pressure_races.py forced with
race sites set through ``.fusefs/dynamic_fault``, a thread blocked in a syscall
inside the window, and ``drop_caches`` (or a full cache) from outside it.

Each test then reads the file back, again after dropping the cache, and after
a remount: an acknowledged write must be there every time.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable

import pytest

from .conftest import FuseMount, control_read, control_write, stats
from .test_mount import read_file, write_file
from .test_races_mounted import site_fired, wait_until

pytestmark = pytest.mark.mount

BS = 4096


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # reported by join_ok
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def join_ok(t: threading.Thread) -> None:
    t.join(30)
    assert not t.is_alive(), "syscall still blocked after 30 s"
    errors: list[BaseException] = t.errors  # type: ignore[attr-defined]
    if errors:
        raise errors[0]


def drop(mnt: FuseMount) -> None:
    control_write(mnt.mountpoint, "drop_caches", "1")


def arm(mnt: FuseMount, spec: str) -> None:
    control_write(mnt.mountpoint, "dynamic_fault", spec)


def check_everywhere(mnt: FuseMount, name: str, want: bytes) -> None:
    """The file holds ``want`` now, once nothing is cached, and after a remount."""
    assert read_file(mnt.path(name)) == want
    drop(mnt)
    assert read_file(mnt.path(name)) == want
    mnt.remount()
    assert read_file(mnt.path(name)) == want


def test_drop_caches_between_fill_and_write(mnt: FuseMount) -> None:
    old = pattern(2 * BS, 1)
    write_file(mnt.path("f"), old, fsync=True)
    drop(mnt)
    control_write(
        mnt.mountpoint, "dynamic_fault", "name buffered_write_after_fill delay 800 times 1"
    )
    fd = os.open(mnt.path("f"), os.O_WRONLY)
    try:
        t = in_thread(lambda: os.pwrite(fd, b"xyz", BS + 10))
        wait_until(lambda: site_fired(mnt, "buffered_write_after_fill") == 1, "the fill window")
        drop(mnt)  # evicts the filled page while the writer holds it
        join_ok(t)
    finally:
        os.close(fd)
    check_everywhere(mnt, "f", old[: BS + 10] + b"xyz" + old[BS + 13 :])


def test_partial_write_into_a_cache_full_of_writeback(mnt: FuseMount) -> None:
    """A 1 MiB cache, every page of it under writeback (held open at
    ``writeback_before_map``): a partial write's fill goes over the limit and
    must keep its page."""
    mnt.remount("-o", "cache_size=1M")
    old = pattern(BS, 2)
    write_file(mnt.path("b"), old, fsync=True)
    drop(mnt)
    arm(mnt, "name writeback_before_map delay 1500 times 1")
    fd = os.open(mnt.path("a"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, pattern(1 << 20, 3), 0) == 1 << 20  # 256 dirty pages
        wait_until(lambda: site_fired(mnt, "writeback_before_map") == 1, "writeback held open")
        fb = os.open(mnt.path("b"), os.O_WRONLY)
        try:
            assert os.pwrite(fb, b"new", 100) == 3
        finally:
            os.close(fb)
    finally:
        os.close(fd)
    check_everywhere(mnt, "b", old[:100] + b"new" + old[103:])


def test_truncate_into_a_dirty_page_against_drop_caches(mnt: FuseMount) -> None:
    old = pattern(3 * BS, 4)
    new = pattern(BS, 5)
    write_file(mnt.path("f"), old, fsync=True)
    drop(mnt)
    fd = os.open(mnt.path("f"), os.O_RDWR)
    try:
        assert os.pwrite(fd, new, 2 * BS) == BS  # page 2 dirty over a mapped block
        arm(mnt, "name truncate_zero_tail delay 800 times 1")
        t = in_thread(lambda: os.ftruncate(fd, 2 * BS + 100))
        wait_until(
            lambda: not t.is_alive() or site_fired(mnt, "truncate_zero_tail") == 1,
            "the truncate, or its zeroing window",
        )
        drop(mnt)  # writes the dirty page back: inside the window, if there is one
        join_ok(t)
        os.ftruncate(fd, 3 * BS)  # the tail past the old EOF reads as zeros
    finally:
        os.close(fd)
    check_everywhere(mnt, "f", old[: 2 * BS] + new[:100] + bytes(BS - 100))


def test_cache_size_control_shrinks_and_grows_the_cache(mnt: FuseMount) -> None:
    assert control_read(mnt.mountpoint, "cache_size") == f"{64 << 20}\n"
    data = pattern(4 << 20, 6)
    write_file(mnt.path("f"), data, fsync=True)
    assert read_file(mnt.path("f")) == data
    assert int(stats(mnt.mountpoint)["cache_pages"]) >= 1024
    control_write(mnt.mountpoint, "cache_size", "1M")  # clean pages over 1 MiB go at once
    assert control_read(mnt.mountpoint, "cache_size") == f"{1 << 20}\n"
    assert int(stats(mnt.mountpoint)["cache_pages"]) <= 256
    assert read_file(mnt.path("f")) == data  # streams through the small cache
    assert int(stats(mnt.mountpoint)["cache_pages"]) <= 256
    for bad in ("512k", "lots", "-1"):
        with pytest.raises(OSError, match="Invalid argument") as e:
            control_write(mnt.mountpoint, "cache_size", bad)
        assert e.value.errno == errno.EINVAL, bad
    assert control_read(mnt.mountpoint, "cache_size") == f"{1 << 20}\n"
    control_write(mnt.mountpoint, "cache_size", "64M")
    assert read_file(mnt.path("f")) == data
