"""fallocate, every mode, driven in-process and checked byte for byte against a bytes
model, with the page cache in every state around and inside the range; every errno
rule; ENOSPC; faults; and a Hypothesis state machine mixing it all.  Each test ends
with the cache and allocator checks (and, through the ``fs`` fixture, fsck)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from fusefs.errors import FsError
from fusefs.extents import MAX_FILE_BLOCKS
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.fsck import fsck
from fusefs.io.fallocate import (
    FALLOC_FL_COLLAPSE_RANGE as COLLAPSE,
)
from fusefs.io.fallocate import (
    FALLOC_FL_INSERT_RANGE as INSERT,
)
from fusefs.io.fallocate import (
    FALLOC_FL_KEEP_SIZE as KEEP,
)
from fusefs.io.fallocate import (
    FALLOC_FL_PUNCH_HOLE as PUNCH,
)
from fusefs.io.fallocate import (
    FALLOC_FL_ZERO_RANGE as ZERO,
)
from fusefs.io.fallocate import SUPPORTED_MODES
from fusefs.namespace import ROOT_INO

from .conftest import assert_fsck_clean

BS = 4096
UID, GID = os.getuid(), os.getgid()
MAX_SIZE = MAX_FILE_BLOCKS * BS

T = TypeVar("T")


# the model:


def model_fallocate(data: bytearray, mode: int, offset: int, length: int) -> None:
    """What fallocate does to a file's bytes (the request is known to be valid)."""
    end = offset + length
    if mode & COLLAPSE:
        del data[offset:end]
    elif mode & INSERT:
        data[offset:offset] = bytes(length)
    elif mode & (PUNCH | ZERO):
        stop = min(end, len(data))
        if offset < stop:
            data[offset:stop] = bytes(stop - offset)
    if not mode & (KEEP | COLLAPSE | INSERT) and end > len(data):
        data.extend(bytes(end - len(data)))


def expected_errno(size: int, mode: int, offset: int, length: int) -> int | None:
    """The errno fallocate(2) gives on a regular file of ``size`` bytes, or None."""
    if offset < 0 or length <= 0:
        return errno.EINVAL
    if mode & ~SUPPORTED_MODES or (mode & PUNCH and mode & ZERO):
        return errno.EOPNOTSUPP
    if mode & PUNCH and not mode & KEEP:
        return errno.EOPNOTSUPP
    if (mode & COLLAPSE and mode != COLLAPSE) or (mode & INSERT and mode != INSERT):
        return errno.EINVAL
    if offset + length > MAX_SIZE:
        return errno.EFBIG
    if mode & (COLLAPSE | INSERT) and (offset % BS or length % BS):
        return errno.EINVAL
    if mode & COLLAPSE and offset + length >= size:
        return errno.EINVAL
    if mode & INSERT and size + length > MAX_SIZE:
        return errno.EFBIG
    if mode & INSERT and offset >= size:
        return errno.EINVAL
    return None


def pattern(n: int, seed: int = 0) -> bytes:
    """Bytes that differ from block to block and from byte to byte (no zeros)."""
    return bytes((i * 7 + seed + i // BS * 13) % 251 + 1 for i in range(n))


# helpers:


async def make_file(fs: Filesystem, name: bytes = b"f") -> tuple[int, int]:
    fh, attr = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, UID, GID)
    return attr.ino, fh


async def contents(fs: Filesystem, fh: int) -> bytes:
    size = fs._file(fh).inode.size
    return await fs.read(fh, 0, size + BS)


def check(fs: Filesystem) -> None:
    fs.cache.check()
    fs.alloc.check()


async def errno_of(work: Awaitable[object]) -> int | None:
    """The errno ``work`` fails with, or None."""
    try:
        await work
    except FsError as e:
        return e.code
    return None


async def assert_errno(code: int, work: Awaitable[object]) -> None:
    with pytest.raises(FsError) as e:
        await work
    assert e.value.code == code, f"{errno.errorcode[e.value.code]}: {e.value}"


async def prepare(fs: Filesystem, fh: int, data: bytes, state: str) -> None:
    """Write ``data`` and leave the cache in ``state``:

    cold   written back, nothing cached
    clean  written back, every page cached and clean
    dirty  nothing written back: every page dirty, reserved over holes
    mixed  written back; then some pages re-dirtied, some dropped, some clean
    """
    await fs.write(fh, 0, data)
    if state == "dirty":
        return
    await fs.fsync(fh, False)
    await fs.drop_caches()
    if state == "cold":
        return
    await fs.read(fh, 0, len(data))  # every page, clean
    if state == "mixed":
        mapping = fs.cache.mapping(fs._file(fh).inode)
        for index in list(mapping.pages)[::3]:
            fs.cache.drop_range(mapping, index, index + 1, discard_dirty=False)
        for pos in range(BS // 2, len(data), 2 * BS):
            await fs.write(fh, pos, b"\xaa" * 10)


async def apply_checked(
    fs: Filesystem, fh: int, model: bytearray, mode: int, offset: int, length: int
) -> None:
    ino = fs._file(fh).inode.ino
    await fs.fallocate(ino, mode, offset, length)
    model_fallocate(model, mode, offset, length)
    assert (await fs.getattr(ino)).size == len(model)
    got = await contents(fs, fh)
    assert got == bytes(model), first_difference(got, model)
    check(fs)


def first_difference(got: bytes, want: bytes | bytearray) -> str:
    if len(got) != len(want):
        return f"size {len(got)} != {len(want)}"
    i = next(i for i in range(len(got)) if got[i] != want[i])
    return f"first difference at byte {i} (block {i // BS}): {got[i]} != {want[i]}"


async def settle_and_compare(fs: Filesystem, fh: int, model: bytearray) -> None:
    """Compare again from the device: after write back + drop, and after a commit."""
    await fs.fsync(fh, False)
    await fs.drop_caches()
    got = await contents(fs, fh)
    assert got == bytes(model), first_difference(got, model)
    check(fs)


# every mode against the model:

SIZE = 10 * BS + 1000  # ten full blocks and a partial one

RANGES = {
    "first-block": (0, BS),
    "inside-one-block": (100, 50),
    "across-a-boundary": (BS - 10, 20),
    "unaligned-span": (BS + 5, 3 * BS),
    "aligned-span": (2 * BS, 3 * BS),
    "head-partial-tail-aligned": (BS + 100, 3 * BS - 100),
    "to-eof": (3 * BS + 7, SIZE - 3 * BS - 7),
    "across-eof": (SIZE - 10, 2 * BS),
    "past-eof": (SIZE + BS, BS + 3),
    "whole-file-and-more": (0, 16 * BS),
}

ZEROING_MODES = {
    "alloc": 0,
    "keep_size": KEEP,
    "punch": PUNCH | KEEP,
    "zero": ZERO,
    "zero+keep_size": ZERO | KEEP,
}


@pytest.mark.parametrize("state", ["cold", "clean", "dirty", "mixed"])
@pytest.mark.parametrize("mode_name", list(ZEROING_MODES))
async def test_modes_match_the_model(fs: Filesystem, mode_name: str, state: str) -> None:
    mode = ZEROING_MODES[mode_name]
    for i, (offset, length) in enumerate(RANGES.values()):
        _, fh = await make_file(fs, f"f{i}".encode())
        data = pattern(SIZE, seed=i)
        await prepare(fs, fh, data, state)
        model = bytearray(await contents(fs, fh))
        await apply_checked(fs, fh, model, mode, offset, length)
        await settle_and_compare(fs, fh, model)
        await fs.release(fh)
        await fs.unlink(ROOT_INO, f"f{i}".encode())
    check(fs)


COLLAPSE_RANGES = [(0, BS), (BS, 2 * BS), (4 * BS, 4 * BS), (0, 10 * BS), (9 * BS, BS)]
INSERT_RANGES = [(0, BS), (BS, 3 * BS), (9 * BS, BS), (10 * BS, 2 * BS), (5 * BS, 300 * BS)]


@pytest.mark.parametrize("state", ["cold", "clean", "dirty", "mixed"])
@pytest.mark.parametrize(
    ("mode", "ranges"),
    [(COLLAPSE, COLLAPSE_RANGES), (INSERT, INSERT_RANGES)],
    ids=["collapse", "insert"],
)
async def test_collapse_and_insert_match_the_model(
    fs: Filesystem, mode: int, ranges: list[tuple[int, int]], state: str
) -> None:
    for i, (offset, length) in enumerate(ranges):
        _, fh = await make_file(fs, f"f{i}".encode())
        await prepare(fs, fh, pattern(SIZE, seed=i), state)
        model = bytearray(await contents(fs, fh))
        await apply_checked(fs, fh, model, mode, offset, length)
        # And back: insert what was collapsed, collapse what was inserted.
        await apply_checked(fs, fh, model, COLLAPSE + INSERT - mode, offset, length)
        await settle_and_compare(fs, fh, model)
        await fs.release(fh)


async def test_collapse_insert_repeatedly_with_a_sparse_file(fs: Filesystem) -> None:
    _, fh = await make_file(fs)
    model = bytearray()
    # Runs of data with holes between, some of it cached, some dirty.
    for block in (0, 1, 2, 5, 9, 10, 11, 40, 41, 300):
        data = pattern(BS, seed=block)
        await fs.write(fh, block * BS, data)
        if len(model) < (block + 1) * BS:
            model.extend(bytes((block + 1) * BS - len(model)))
        model[block * BS : (block + 1) * BS] = data
        if block % 3 == 0:
            await fs.fsync(fh, False)
    for mode, offset, length in [
        (COLLAPSE, 3 * BS, 2 * BS),
        (INSERT, 0, BS),
        (COLLAPSE, 30 * BS, 100 * BS),
        (INSERT, 7 * BS, 17 * BS),
        (COLLAPSE, 0, 2 * BS),
        (INSERT, 100 * BS, 512 * BS),
        (COLLAPSE, 50 * BS, 512 * BS),
    ]:
        await apply_checked(fs, fh, model, mode, offset, length)
    await settle_and_compare(fs, fh, model)


async def test_pages_around_the_range_survive(fs: Filesystem) -> None:
    """Cached pages outside the range stay cached (and dirty ones dirty) for the
    in-place modes; collapse/insert drop from the offset on, nothing before it."""
    ino, fh = await make_file(fs)
    await fs.write(fh, 0, pattern(8 * BS))
    await fs.fsync(fh, False)
    await fs.write(fh, 0, b"D" * BS)  # page 0 dirty
    await fs.read(fh, BS, 7 * BS)  # pages 1-7 clean
    mapping = fs.cache.mapping(fs.ns.get(ino))
    await fs.fallocate(ino, PUNCH | KEEP, 3 * BS, 2 * BS)
    assert sorted(mapping.pages) == [0, 1, 2, 5, 6, 7]
    assert mapping.pages[0].dirty
    await fs.fallocate(ino, COLLAPSE, 2 * BS, BS)
    assert sorted(mapping.pages) == [0, 1]
    assert mapping.pages[0].dirty
    assert (await fs.read(fh, 0, BS)) == b"D" * BS
    check(fs)


# unwritten extents:


async def test_preallocated_blocks_read_as_zeros_and_become_written(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    inode = fs.ns.get(ino)
    emap = inode.extents
    assert emap is not None
    await fs.write(fh, 0, b"x" * 100)
    before = fs.alloc.statistics().allocated
    await fs.fallocate(ino, KEEP, 0, 8 * BS)
    assert inode.size == 100
    assert fs.alloc.statistics().allocated == before + 8  # block 0 written back, 1-7 new
    exts = list(emap.extents())
    assert exts[0].start == 0
    assert not exts[0].unwritten
    assert all(e.unwritten for e in exts[1:])
    assert sum(e.length for e in exts) == 8
    assert (await fs.getattr(ino)).blocks == 8 * BS // 512
    # Reading past EOF gives nothing; growing the file exposes zeros.
    await fs.truncate(inode, 8 * BS)
    assert await contents(fs, fh) == b"x" * 100 + bytes(8 * BS - 100)
    # A partial write into an unwritten block: zeros around it; the block is written.
    await fs.write(fh, 3 * BS + 10, b"hello")
    await fs.fsync(fh, False)
    assert not emap.lookup(3).unwritten
    assert emap.lookup(4).unwritten
    assert emap.lookup(2).unwritten
    await fs.drop_caches()
    block = await fs.read(fh, 3 * BS, BS)
    assert block == bytes(10) + b"hello" + bytes(BS - 15)
    # Direct reads see zeros in unwritten blocks too.
    dfh = await fs.open(ino, os.O_RDONLY | os.O_DIRECT)
    assert await fs.read(dfh, 4 * BS, BS) == bytes(BS)
    await fs.release(dfh)
    # No new space was needed for the write.
    assert fs.alloc.statistics().allocated == before + 8
    check(fs)


async def test_zero_range_converts_written_blocks_in_place(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    emap = fs.ns.get(ino).extents
    assert emap is not None
    await fs.write(fh, 0, pattern(6 * BS))
    await fs.fsync(fh, False)
    pblks = [emap.pblk_of(i) for i in range(6)]
    allocated = fs.alloc.statistics().allocated
    await fs.fallocate(ino, ZERO, BS, 4 * BS)
    assert [emap.pblk_of(i) for i in range(6)] == pblks  # same blocks, now unwritten
    assert [emap.lookup(i).unwritten for i in range(6)] == [False] + [True] * 4 + [False]
    assert fs.alloc.statistics().allocated == allocated
    want = bytearray(pattern(6 * BS))
    want[BS : 5 * BS] = bytes(4 * BS)
    assert await contents(fs, fh) == want
    check(fs)


async def test_zero_range_preallocates_holes_including_partial_edges(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    emap = fs.ns.get(ino).extents
    assert emap is not None
    await fs.fallocate(ino, ZERO, BS + 100, 2 * BS)  # touches blocks 1, 2, 3
    assert fs.ns.get(ino).size == 3 * BS + 100
    assert [emap.pblk_of(i) is not None for i in range(5)] == [False, True, True, True, False]
    assert await contents(fs, fh) == bytes(3 * BS + 100)
    check(fs)


async def test_punch_frees_blocks_after_the_commit(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    emap = fs.ns.get(ino).extents
    assert emap is not None
    await fs.write(fh, 0, pattern(8 * BS))
    await fs.fsync(fh, False)
    punched = [emap.pblk_of(i) for i in range(1, 5)]
    st0 = fs.alloc.statistics()
    await fs.fallocate(ino, PUNCH | KEEP, BS, 4 * BS + 10)  # blocks 1-4, 10 bytes of 5
    st1 = fs.alloc.statistics()
    assert st1.allocated == st0.allocated - 4
    assert st1.deferred == st0.deferred + 4
    assert [emap.pblk_of(i) is None for i in range(8)] == [False] + [True] * 4 + [False] * 3
    assert (await fs.getattr(ino)).blocks == 4 * BS // 512
    # Not reusable before the commit that unmaps them is durable; free after it.
    assert not any(fs.alloc.is_free(p) for p in punched if p is not None)
    await fs.commit()
    assert all(fs.alloc.is_free(p) for p in punched if p is not None)
    check(fs)


async def test_sizes_times_and_kernel_invalidation(fs: Filesystem) -> None:
    calls: list[tuple[int, bool]] = []
    fs.invalidate_hook = lambda ino, attr_only: calls.append((ino, attr_only))
    ino, fh = await make_file(fs)
    await fs.write(fh, 0, pattern(4 * BS))
    cases = [
        (0, 0, 5 * BS + 1, 5 * BS + 1),
        (KEEP, 0, 9 * BS, 5 * BS + 1),
        (PUNCH | KEEP, 0, 20 * BS, 5 * BS + 1),
        (ZERO | KEEP, BS, 20 * BS, 5 * BS + 1),
        (ZERO, BS, 6 * BS, 7 * BS),
        (INSERT, 0, 2 * BS, 9 * BS),
        (COLLAPSE, BS, 3 * BS, 6 * BS),
    ]
    for mode, offset, length, size in cases:
        before = await fs.getattr(ino)
        await trio.sleep(0.001)
        calls.clear()
        await fs.fallocate(ino, mode, offset, length)
        after = await fs.getattr(ino)
        assert after.size == size, (mode, offset, length)
        assert after.mtime_ns > before.mtime_ns
        assert after.ctime_ns > before.ctime_ns
        assert calls == [(ino, False)]
    check(fs)


# errors:


async def test_errno_rules(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    data = pattern(4 * BS + 10)
    await fs.write(fh, 0, data)
    bad: list[tuple[int, int, int, int]] = [
        (errno.EINVAL, 0, 0, 0),
        (errno.EINVAL, 0, 0, -1),
        (errno.EINVAL, 0, -1, BS),
        (errno.EINVAL, PUNCH | KEEP, -BS, BS),
        (errno.EOPNOTSUPP, 0x40, 0, BS),
        (errno.EOPNOTSUPP, 0x80 | KEEP, 0, BS),
        (errno.EOPNOTSUPP, PUNCH, 0, BS),
        (errno.EOPNOTSUPP, PUNCH | ZERO | KEEP, 0, BS),
        (errno.EOPNOTSUPP, PUNCH | COLLAPSE, 0, BS),
        (errno.EINVAL, COLLAPSE | KEEP, 0, BS),
        (errno.EINVAL, COLLAPSE | INSERT, 0, BS),
        (errno.EINVAL, INSERT | KEEP, 0, BS),
        (errno.EINVAL, ZERO | COLLAPSE, 0, BS),
        (errno.EFBIG, 0, MAX_SIZE - BS, BS + 1),
        (errno.EFBIG, PUNCH | KEEP, MAX_SIZE, 1),
        (errno.EFBIG, COLLAPSE, MAX_SIZE, BS),
        (errno.EINVAL, COLLAPSE, 100, BS),
        (errno.EINVAL, COLLAPSE, 0, BS + 1),
        (errno.EINVAL, COLLAPSE, 0, 5 * BS),  # reaches past EOF
        (errno.EINVAL, COLLAPSE, 4 * BS, BS),  # ends exactly... past EOF (size 4*BS+10)
        (errno.EINVAL, INSERT, 100, BS),
        (errno.EINVAL, INSERT, 0, 100),
        (errno.EINVAL, INSERT, 5 * BS, BS),  # at or past EOF
        (errno.EFBIG, INSERT, 0, MAX_SIZE - 4 * BS),  # size + length past the maximum
    ]
    for code, mode, offset, length in bad:
        assert expected_errno(4 * BS + 10, mode, offset, length) == code, (mode, offset, length)
        with pytest.raises(FsError) as e:
            await fs.fallocate(ino, mode, offset, length)
        assert e.value.code == code, (hex(mode), offset, length, str(e.value))
    # Collapse up to exactly EOF is refused too (offset + length == size).
    await fs.truncate(fs.ns.get(ino), 4 * BS)
    await assert_errno(errno.EINVAL, fs.fallocate(ino, COLLAPSE, 2 * BS, 2 * BS))
    await assert_errno(errno.EINVAL, fs.fallocate(ino, INSERT, 4 * BS, BS))
    assert await contents(fs, fh) == data[: 4 * BS]
    # Not a regular file.
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)
    await assert_errno(errno.EISDIR, fs.fallocate(d.ino, 0, 0, BS))
    link = await fs.symlink(ROOT_INO, b"l", b"f", UID, GID)
    await assert_errno(errno.ENODEV, fs.fallocate(link.ino, 0, 0, BS))
    fifo = await fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, UID, GID)
    await assert_errno(errno.ESPIPE, fs.fallocate(fifo.ino, 0, 0, BS))
    chardev = await fs.mknod(ROOT_INO, b"c", stat.S_IFCHR | 0o644, os.makedev(1, 3), UID, GID)
    await assert_errno(errno.ENODEV, fs.fallocate(chardev.ino, 0, 0, BS))
    await assert_errno(errno.ENOENT, fs.fallocate(12345, 0, 0, BS))
    # Mode checks come before the file type (as vfs_fallocate).
    await assert_errno(errno.EOPNOTSUPP, fs.fallocate(d.ino, PUNCH, 0, BS))
    await fs.release(fh)
    check(fs)


async def test_read_only_filesystem(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    ino, fh = await make_file(fs)
    await fs.write(fh, 0, b"data")
    await fs.release(fh)
    await fs.unmount()
    fs = await Filesystem.mount(image, MountOptions(read_only=True, commit_interval=3600))
    try:
        for mode in (0, KEEP, PUNCH | KEEP, ZERO, COLLAPSE, INSERT):
            await assert_errno(errno.EROFS, fs.fallocate(ino, mode, 0, BS))
    finally:
        await fs.unmount()
    assert_fsck_clean(image)


async def test_enospc_is_all_or_nothing(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    mkfs(image, 1 << 20)  # 256 blocks
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    try:
        ino, fh = await make_file(fs)
        await fs.write(fh, 0, pattern(8 * BS))
        await fs.fsync(fh, False)
        free = fs.alloc.statistics().free
        model = bytearray(pattern(8 * BS))
        for mode in (0, KEEP, ZERO, ZERO | KEEP):
            await assert_errno(errno.ENOSPC, fs.fallocate(ino, mode, 0, (free + 9) * BS))
            assert fs.alloc.statistics().free == free
            assert fs.ns.get(ino).size == len(model)
            assert await contents(fs, fh) == model
            check(fs)
        # Exactly what is free fits; then nothing more does.
        await apply_checked(fs, fh, model, KEEP, 8 * BS, free * BS)
        assert fs.alloc.statistics().free == 0
        await assert_errno(errno.ENOSPC, fs.fallocate(ino, 0, (8 + free) * BS, 1))
        # On a full filesystem, zeroing allocated blocks needs no space, and
        # neither do punch, collapse and insert.
        await apply_checked(fs, fh, model, ZERO, 100, 6 * BS)
        await apply_checked(fs, fh, model, PUNCH | KEEP, BS, 2 * BS)
        await apply_checked(fs, fh, model, COLLAPSE, 0, BS)
        await apply_checked(fs, fh, model, INSERT, 0, 3 * BS)
        # A write into the preallocated range needs no new space either.
        await fs.write(fh, 20 * BS, b"z" * BS)
        await fs.fsync(fh, False)
        await fs.release(fh)
        check(fs)
    finally:
        await fs.unmount()
    assert_fsck_clean(image)


async def test_failed_writeback_fails_the_operation_and_loses_nothing(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    model = bytearray(pattern(6 * BS))
    await fs.write(fh, 0, bytes(model))
    await fs.fsync(fh, False)
    await fs.write(fh, 3 * BS, b"N" * 10)  # a dirty page after the offset
    model[3 * BS : 3 * BS + 10] = b"N" * 10
    REGISTRY.control("name blockdev_write oneshot")
    await assert_errno(errno.EIO, fs.fallocate(ino, COLLAPSE, BS, BS))
    assert await contents(fs, fh) == model
    check(fs)
    with pytest.raises(FsError):
        await fs.fsync(fh, False)  # the writeback error is reported to fsync too
    await apply_checked(fs, fh, model, COLLAPSE, BS, BS)
    await settle_and_compare(fs, fh, model)


async def test_collapse_keeps_a_page_dirtied_again_during_writeback(fs: Filesystem) -> None:
    """Background writeback of page 3 holds its window open after the device
    write; a write dirties page 3 again.  The collapse's write-back-and-drop
    must write the page again before dropping it, not drop the newer data."""
    ino, fh = await make_file(fs)
    model = bytearray(pattern(6 * BS))
    await fs.write(fh, 0, bytes(model))
    await fs.fsync(fh, False)
    mapping = fs.cache.mappings[ino]
    await fs.write(fh, 3 * BS, b"A" * BS)
    REGISTRY.control("name writeback_before_map oneshot delay 100")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.sync_data)
        await trio.testing.wait_all_tasks_blocked()
        assert mapping.nr_writeback == 1
        await fs.write(fh, 3 * BS, b"B" * BS)  # dirty again, still under writeback
        model[3 * BS : 4 * BS] = b"B" * BS
        await fs.fallocate(ino, COLLAPSE, BS, BS)
        del model[BS : 2 * BS]
    assert REGISTRY.site("writeback_before_map").fired == 1
    assert await contents(fs, fh) == model
    check(fs)
    await settle_and_compare(fs, fh, model)


async def test_device_and_memory_faults_leave_a_consistent_file(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    model = bytearray(pattern(6 * BS))
    await fs.write(fh, 0, bytes(model))
    await fs.fsync(fh, False)
    allocated = fs.alloc.statistics().allocated
    for command, code in [
        ("name fallocate_zero_block oneshot", errno.ENOMEM),
        ("name blockdev_read oneshot", errno.EIO),
        ("name blockdev_write oneshot", errno.EIO),
    ]:
        REGISTRY.control(command)
        # Zero range over a hole (needs new blocks) and a partial written block.
        await assert_errno(code, fs.fallocate(ino, ZERO, 5 * BS + 10, 4 * BS))
        assert fs.alloc.statistics().allocated == allocated  # the new blocks went back
        assert await contents(fs, fh) == model
        check(fs)
        REGISTRY.reset()
    await apply_checked(fs, fh, model, ZERO, 5 * BS + 10, 4 * BS)
    await settle_and_compare(fs, fh, model)


async def test_fault_sites_are_listed_before_they_run() -> None:
    sites = {s.name: s for s in REGISTRY.sites()}
    assert sites["fallocate_before_change"].cls == "race"
    assert sites["fallocate_zero_block"].cls.startswith("memory")
    assert sites["fallocate_before_change"].file.endswith("io/fallocate.py")


# locks:


async def test_fallocate_waits_for_add_holders_and_blocks_new_ones(fs: Filesystem) -> None:
    ino, fh = await make_file(fs)
    await fs.write(fh, 0, pattern(4 * BS))
    mapping = fs.cache.mapping(fs.ns.get(ino))
    done = trio.Event()

    async def punch() -> None:
        await fs.fallocate(ino, PUNCH | KEEP, 0, BS)
        done.set()

    async with trio.open_nursery() as nursery:
        await mapping.lock.add_get()  # a reader inside its fill-and-insert
        nursery.start_soon(punch)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert mapping.lock.statistics().block_waiting == 1
        assert not mapping.lock.add_tryget()  # readahead gives way to the waiter
        mapping.lock.add_put()
    assert done.is_set()
    assert (await fs.read(fh, 0, BS)) == bytes(BS)
    check(fs)


async def test_race_window_with_the_lock_on_keeps_the_cache_right(fs: Filesystem) -> None:
    """A buffered read held between reading the blocks and inserting them, while
    a punch runs: the punch waits for it and drops what it inserted."""
    ino, fh = await make_file(fs)
    await fs.write(fh, 0, pattern(4 * BS))
    await fs.fsync(fh, False)
    await fs.drop_caches()
    REGISTRY.control("name buffered_read_before_insert delay 50 times 1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.read, fh, BS, BS)
        while REGISTRY.site("buffered_read_before_insert").fired == 0:  # noqa: ASYNC110
            await trio.sleep(0.001)
        await fs.fallocate(ino, PUNCH | KEEP, BS, BS)
    assert await fs.read(fh, BS, BS) == bytes(BS)
    check(fs)


# the model-based test:


class Portal:
    """A trio loop in a thread, for a synchronous Hypothesis state machine; background
    tasks (the filesystem's flusher and readahead) run in its nursery between steps."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        ready.wait()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def start(self, fn: Callable[..., Awaitable[object]]) -> None:
        """``nursery.start(fn)`` in the loop's nursery: runs until cancelled."""
        assert self._nursery is not None
        self.run(self._nursery.start, fn)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()


@pytest.fixture
def portal() -> Iterator[Portal]:
    p = Portal()
    yield p
    p.close()


MODES = [0, KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP, COLLAPSE, INSERT, PUNCH, COLLAPSE | KEEP]
MAX_MODEL_SIZE = 40 * BS


def byte_positions(max_blocks: int) -> st.SearchStrategy[int]:
    """Offsets and lengths: mostly block-aligned, sometimes a few bytes off."""
    return st.builds(
        lambda blocks, skew: max(0, blocks * BS + skew),
        st.integers(0, max_blocks),
        st.sampled_from([0, 0, 0, 1, -1, 100, BS // 2]),
    )


class FallocateMachine(RuleBasedStateMachine):
    """Random writes, truncates, fallocates, reads, fsyncs, cache drops and commits
    against a bytes model; a second file reuses the blocks the first one frees.

    The test sets ``portal`` and ``image`` on a subclass."""

    portal: ClassVar[Portal]
    image: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        mkfs(self.image, 4 << 20, force=True)
        self.fs: Filesystem = self.portal.run(
            Filesystem.mount, self.image, MountOptions(commit_interval=3600)
        )
        self.portal.start(self.fs.run)  # the flusher; readahead
        self.model = bytearray()
        self.ino = 0
        self.fh = self.dfh = self.other = 0
        self.other_size = 0

    @initialize(size=st.integers(1, 20 * BS), seed=st.integers(0, 250))
    def create(self, size: int, seed: int) -> None:
        async def go() -> None:
            fh, attr = await self.fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
            self.ino, self.fh = attr.ino, fh
            self.dfh = await self.fs.open(attr.ino, os.O_RDWR | os.O_DIRECT)
            self.other, _ = await self.fs.create(ROOT_INO, b"o", 0o644, os.O_RDWR, UID, GID)

        self.portal.run(go)
        self._write(0, pattern(size, seed))

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.portal.run(fn, *args)

    @rule(offset=byte_positions(30), length=st.integers(1, 3 * BS), seed=st.integers(0, 250))
    def write(self, offset: int, length: int, seed: int) -> None:
        self._write(offset, pattern(length, seed))

    def _write(self, offset: int, data: bytes) -> None:
        self.call(self.fs.write, self.fh, offset, data)
        self._model_write(offset, data)

    def _model_write(self, offset: int, data: bytes) -> None:
        if offset > len(self.model):
            self.model.extend(bytes(offset - len(self.model)))
        self.model[offset : offset + len(data)] = data

    @rule(block=st.integers(0, 30), blocks=st.integers(1, 3), seed=st.integers(0, 250))
    def direct_write(self, block: int, blocks: int, seed: int) -> None:
        data = pattern(blocks * BS, seed)
        self.call(self.fs.write, self.dfh, block * BS, data)
        self._model_write(block * BS, data)

    @rule(size=byte_positions(30))
    def truncate(self, size: int) -> None:
        self.call(self.fs.truncate, self.fs.ns.get(self.ino), size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        want = expected_errno(len(self.model), mode, offset, length)
        if want is None and len(self.model) + length > MAX_MODEL_SIZE and mode & INSERT:
            return  # keep the file small
        got = self.call(errno_of, self.fs.fallocate(self.ino, mode, offset, length))
        assert got == want, f"got {errno.errorcode.get(got or 0)}, wanted {want}"
        event(f"fallocate {mode:#x}: {errno.errorcode[got] if got else 'ok'}")
        if got is None:
            model_fallocate(self.model, mode, offset, length)

    @rule(mode=st.sampled_from(MODES), data=st.data())
    def fallocate(self, mode: int, data: st.DataObject) -> None:
        """Any mode, valid or not, anywhere in the file or past it."""
        offset = data.draw(byte_positions(len(self.model) // BS + 2), label="offset")
        length = data.draw(byte_positions(6), label="length")
        self._fallocate(mode, offset, length)

    @rule(mode=st.sampled_from([0, KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP]), data=st.data())
    def fallocate_in_place(self, mode: int, data: st.DataObject) -> None:
        offset = data.draw(byte_positions(len(self.model) // BS + 1), label="offset")
        length = data.draw(st.integers(1, 5 * BS), label="length")
        self._fallocate(mode, offset, length)

    @rule(mode=st.sampled_from([COLLAPSE, INSERT]), data=st.data())
    def fallocate_shift(self, mode: int, data: st.DataObject) -> None:
        """Collapse or insert, aligned and inside the file (mostly valid)."""
        blocks = len(self.model) // BS
        offset = data.draw(st.integers(0, max(0, blocks - 1)), label="block") * BS
        length = data.draw(st.integers(1, 4), label="blocks") * BS
        self._fallocate(mode, offset, length)

    @rule(
        mode=st.sampled_from([KEEP, PUNCH | KEEP, ZERO, COLLAPSE, INSERT]),
        data=st.data(),
        readers=st.lists(
            st.tuples(byte_positions(24), st.integers(1, 6 * BS)), min_size=1, max_size=4
        ),
        cold=st.booleans(),
    )
    def fallocate_while_reading(
        self, mode: int, data: st.DataObject, readers: list[tuple[int, int]], cold: bool
    ) -> None:
        """Readers (and their readahead) run at the same time as the fallocate: each
        read sees the file wholly before or wholly after it, and the cache stays right."""
        blocks = len(self.model) // BS
        if mode & (COLLAPSE | INSERT):
            offset = data.draw(st.integers(0, max(0, blocks - 1)), label="block") * BS
            length = data.draw(st.integers(1, 3), label="blocks") * BS
        else:
            offset = data.draw(byte_positions(blocks + 1), label="offset")
            length = data.draw(st.integers(1, 5 * BS), label="length")
        want = expected_errno(len(self.model), mode, offset, length)
        if want is not None:
            return
        if cold:
            self.call(self.fs.drop_caches)
        before = bytes(self.model)
        model_fallocate(self.model, mode, offset, length)
        after = bytes(self.model)
        got: dict[int, bytes] = {}

        async def go() -> None:
            async def read(i: int, pos: int, n: int) -> None:
                got[i] = await self.fs.read(self.fh, pos, n)

            async with trio.open_nursery() as nursery:
                for i, (pos, n) in enumerate(readers):
                    nursery.start_soon(read, i, pos, n)
                nursery.start_soon(self.fs.fallocate, self.ino, mode, offset, length)

        self.call(go)
        for i, (pos, n) in enumerate(readers):
            assert got[i] in (before[pos : pos + n], after[pos : pos + n]), f"reader {i}"
        event(f"fallocate {mode:#x} while reading: ok")

    @rule(offset=byte_positions(40), length=st.integers(1, 4 * BS))
    def read(self, offset: int, length: int) -> None:
        got = self.call(self.fs.read, self.fh, offset, length)
        assert got == bytes(self.model[offset : offset + length])

    @rule()
    def read_all(self) -> None:
        got = self.call(self.fs.read, self.fh, 0, len(self.model) + BS)
        assert got == bytes(self.model), first_difference(got, self.model)

    @rule()
    def fsync(self) -> None:
        self.call(self.fs.fsync, self.fh, False)

    @rule()
    def drop_caches(self) -> None:
        self.call(self.fs.drop_caches)

    @rule(blocks=st.integers(1, 8))
    def write_other(self, blocks: int) -> None:
        """Commit (frees become reusable), then take blocks for another file."""
        self.call(self.fs.commit)
        self.call(self.fs.write, self.other, self.other_size, b"\xee" * (blocks * BS))
        self.call(self.fs.fsync, self.other, False)
        self.other_size += blocks * BS

    @invariant()
    def consistent(self) -> None:
        if self.ino:
            assert self.fs.ns.get(self.ino).size == len(self.model)
        check(self.fs)

    def teardown(self) -> None:
        async def finish() -> None:
            got = await self.fs.read(self.fh, 0, len(self.model) + BS)
            assert got == bytes(self.model), first_difference(got, self.model)
            await self.fs.fsync(self.fh, False)
            await self.fs.drop_caches()
            got = await self.fs.read(self.fh, 0, len(self.model) + BS)
            assert got == bytes(self.model), first_difference(got, self.model)
            other = await self.fs.read(self.other, 0, self.other_size + BS)
            assert other == b"\xee" * self.other_size

        try:
            if self.ino:
                self.portal.run(finish)
        finally:
            # Stops the background tasks too, even after a failed step.
            try:
                self.portal.run(self.fs.unmount)
            finally:
                if not self.fs.dev.closed:
                    self.fs.dev.close()
        result = fsck(self.image)
        assert result.exit_code == 0, "\n".join(result.messages)


def test_model_based_random_operations(portal: Portal, tmp_path: Path) -> None:
    class Machine(FallocateMachine):
        pass

    Machine.portal = portal
    Machine.image = tmp_path / "model.img"
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=120,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
