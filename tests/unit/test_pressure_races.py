"""Acknowledged writes against pages being removed: eviction, drop_caches and
the writeback they trigger, with exact interleavings.

These are the races that need *another* task's pressure on the cache: the
pagecache add lock does not order them (a writer and a reader both hold ADD;
writeback and eviction take no lock), so each test forces its interleaving
with a race site, a writeback held open, or a cache already full, and fails
on the code before the fix it pins (docs/concurrency.md, "Who removes pages").
Every test ends with the cache's accounting check and, in teardown, fsck.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.io.writeback import writeback_range
from fusefs.namespace import ROOT_INO

from .conftest import assert_fsck_clean

BS = 4096
MiB = 1 << 20
UID, GID = os.getuid(), os.getgid()


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def create(fs: Filesystem, name: bytes) -> tuple[int, int]:
    fh, attr = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, UID, GID)
    return fh, attr.ino


@pytest.fixture
async def small_fs(image: Path) -> AsyncIterator[Filesystem]:
    """A core with a 1 MiB cache (256 pages)."""
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600, cache_size=MiB))
    yield fs
    if not fs.dev.closed:
        await fs.unmount()
    assert_fsck_clean(image)


async def until_fired(site: str) -> None:
    with trio.fail_after(10):
        while REGISTRY.site(site).fired == 0:  # noqa: ASYNC110
            await trio.sleep(0.001)


async def on_disk(fs: Filesystem, fh: int, offset: int, size: int) -> bytes:
    """What the file holds once nothing of it is cached (read through a fill)."""
    await fs.drop_caches()
    return await fs.read(fh, offset, size)


async def test_partial_write_into_a_cache_full_of_writeback_keeps_its_page(
    small_fs: Filesystem,
) -> None:
    """The cache is full and every page but the one being filled is under
    writeback: a partial write's read-modify-write fill inserts its page over
    the limit, and the eviction that makes room must not take that page (the
    write would go into a page no longer in the cache and be lost)."""
    fs = small_fs
    old = pattern(BS, 1)
    fb, _ = await create(fs, b"b")
    await fs.write(fb, 0, old)
    await fs.fsync(fb, False)
    await fs.drop_caches()  # b's block is mapped and not cached

    cache = fs.cache
    fa, ino_a = await create(fs, b"a")
    assert await fs.write(fa, 0, pattern(cache.max_pages * BS, 2)) == cache.max_pages * BS
    assert cache.nr_pages == cache.max_pages
    REGISTRY.control("name writeback_before_map delay 300 times 1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writeback_range, fs, cache.mappings[ino_a])
        await until_fired("writeback_before_map")  # every page of a under writeback
        assert not cache.lru
        assert cache.nr_dirty == 0  # nothing throttles the write below
        assert await fs.write(fb, 100, b"new") == 3
        cache.check()
    want = old[:100] + b"new" + old[103:]
    assert await fs.read(fb, 0, BS) == want
    assert await on_disk(fs, fb, 0, BS) == want
    cache.check()
    for fh in (fa, fb):
        await fs.release(fh)


async def test_page_evicted_between_fill_and_write_is_read_again(fs: Filesystem) -> None:
    """drop_caches runs while a partial write holds its filled page, clean,
    before dirtying it (the ``buffered_write_after_fill`` window): the write
    must land in a resident page, not the evicted one."""
    old = pattern(2 * BS, 3)
    fh, _ = await create(fs, b"f")
    await fs.write(fh, 0, old)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    REGISTRY.control("name buffered_write_after_fill delay 200 times 1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.write, fh, BS + 10, b"xyz")
        await until_fired("buffered_write_after_fill")
        assert await fs.drop_caches() >= 1  # the filled page goes
    want = old[: BS + 10] + b"xyz" + old[BS + 13 :]
    assert await fs.read(fh, 0, 2 * BS) == want
    assert await on_disk(fs, fh, 0, 2 * BS) == want
    fs.cache.check()
    await fs.release(fh)


async def test_truncate_into_a_dirty_page_keeps_its_head_against_writeback(
    fs: Filesystem,
) -> None:
    """Truncate into a page dirtied by a write, while drop_caches writes it
    back: the EOF block must end with the write's head and zeros, never with
    the block's older head (a read-modify-write of the device block that
    writeback overtakes writes the old head back)."""
    old = pattern(3 * BS, 4)
    new = pattern(BS, 5)
    fh, ino = await create(fs, b"f")
    await fs.write(fh, 0, old)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    assert await fs.write(fh, 2 * BS, new) == BS  # page 2 dirty, block 2 mapped
    size = 2 * BS + 100
    REGISTRY.control("name truncate_zero_tail delay 200 times 1")
    inode = fs.ns.get(ino)
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def truncate() -> None:
            await fs.truncate(inode, size)
            done.set()

        nursery.start_soon(truncate)
        with trio.fail_after(10):
            while not done.is_set() and REGISTRY.site("truncate_zero_tail").fired == 0:  # noqa: ASYNC110
                await trio.sleep(0.001)
        await fs.drop_caches()  # inside the window, if there is one
    want = old[: 2 * BS] + new[:100]
    assert await fs.read(fh, 0, 3 * BS) == want
    assert await on_disk(fs, fh, 0, 3 * BS) == want
    # The block's tail is zero: growing the file shows zeros, not old bytes.
    await fs.truncate(inode, 3 * BS)
    assert await on_disk(fs, fh, 0, 3 * BS) == want + bytes(BS - 100)
    fs.cache.check()
    await fs.release(fh)


async def test_truncate_zeroes_a_clean_eof_block_in_place(fs: Filesystem) -> None:
    """The other branch: the EOF page is clean (or not cached), so nothing can
    write the block back meanwhile and the device block is zeroed in place."""
    old = pattern(2 * BS, 6)
    fh, ino = await create(fs, b"f")
    await fs.write(fh, 0, old)
    await fs.fsync(fh, False)
    inode = fs.ns.get(ino)
    REGISTRY.control("name truncate_zero_tail times 1")
    await fs.truncate(inode, BS + 7)
    assert REGISTRY.site("truncate_zero_tail").fired == 1
    await fs.truncate(inode, 2 * BS)
    assert await on_disk(fs, fh, 0, 2 * BS) == old[: BS + 7] + bytes(BS - 7)
    fs.cache.check()
    await fs.release(fh)


async def test_unlink_waits_for_a_prefetch_in_flight(fs: Filesystem) -> None:
    """The last close of an unlinked file while readahead still fills its
    pages: the prefetch must not insert into the forgotten mapping (the pages
    would stay counted in the cache forever)."""
    data = pattern(64 * BS, 7)
    fw, ino = await create(fs, b"f")
    await fs.write(fw, 0, data)
    await fs.fsync(fw, False)
    await fs.release(fw)
    await fs.drop_caches()
    fh = await fs.open(ino, os.O_RDONLY)
    REGISTRY.control("name readahead_before_insert delay 200 times 1")
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        assert await fs.read(fh, 0, 8 * BS) == data[: 8 * BS]  # starts a prefetch
        await until_fired("readahead_before_insert")
        await fs.unlink(ROOT_INO, b"f")
        await fs.release(fh)  # frees the inode while the prefetch is in its window
        assert ino not in fs.cache.mappings
        await trio.sleep(0.3)
        fs.cache.check()
        assert fs.cache.nr_pages == sum(len(m.pages) for m in fs.cache.mappings.values())
        nursery.cancel_scope.cancel()


async def test_direct_write_keeps_dirty_pages_it_could_not_write_back(fs: Filesystem) -> None:
    """A direct write writes back and drops the cached pages of its range; when
    that writeback fails, the direct write fails with the error and the dirty
    pages stay (they were once dropped unwritten, and the buffered data lost
    if the direct write then failed too)."""
    fh, ino = await create(fs, b"f")
    await fs.write(fh, 0, b"b" * BS)  # dirty, over a hole
    dfh = await fs.open(ino, os.O_RDWR | os.O_DIRECT)
    REGISTRY.control("name blockdev_write enable")
    with pytest.raises(FsError) as e:
        await fs.write(dfh, 0, b"d" * BS)
    assert e.value.code == errno.EIO
    REGISTRY.control("name blockdev_write disable")
    assert fs.cache.mappings[ino].pages[0].dirty
    assert await fs.read(fh, 0, BS) == b"b" * BS
    with pytest.raises(FsError):
        await fs.fsync(fh, False)  # the writeback error, reported once
    await fs.fsync(fh, False)
    assert await on_disk(fs, fh, 0, BS) == b"b" * BS
    assert await fs.write(dfh, 0, b"d" * BS) == BS  # and now it goes through
    assert await on_disk(fs, fh, 0, BS) == b"d" * BS
    fs.cache.check()
    for h in (fh, dfh):
        await fs.release(h)
