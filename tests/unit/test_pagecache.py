"""The page cache driven through the real core: counters, LRU, dirty limits,
reservations, readahead and writeback.

Every test mounts a real image in-process (the ``fs`` fixture, or a small cache
or a small image mounted here) and ends with ``fs.cache.check()`` (counts, LRU
membership, one reserved block per reserved page) and ``fs.alloc.check()``, then
fsck in teardown.  Tests that need the flusher or readahead run ``fs.run`` in a
nursery (`running`); without it nothing happens in the background, so device
and cache counters can be compared exactly.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.io.readahead import MAX_WINDOW
from fusefs.io.writeback import MAX_RUN_PAGES, writeback_range
from fusefs.namespace import ROOT_INO
from fusefs.pagecache import ALLOCATED, MAX_PAGE_BLOCKS, RESERVED, Mapping, PageCache

from .conftest import assert_fsck_clean

UID, GID = os.getuid(), os.getgid()
BS = 4096
MiB = 1 << 20


# helpers:


def check(fs: Filesystem) -> None:
    """The consistency check that ends every step: the cache's and the
    allocator's own, plus race 6's invariant — a dirty page over a hole holds
    a reservation (writeback in flight may have used it already)."""
    fs.cache.check()
    fs.alloc.check()
    for m in fs.cache.mappings.values():
        emap = m.inode.extents
        assert emap is not None
        for page in m.pages.values():
            for index in range(page.index, page.end):
                if (
                    page.is_dirty(index)
                    and not page.under_writeback(index)
                    and emap.pblk_of(index) is None
                ):
                    assert page.space_at(index) == RESERVED, (
                        f"{page!r}: block {index} over a hole without a reservation"
                    )


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def create(fs: Filesystem, name: bytes) -> tuple[int, int]:
    """A new empty file, open read-write: (fh, ino)."""
    fh, attr = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, UID, GID)
    return fh, attr.ino


async def write_synced(fs: Filesystem, fh: int, offset: int, data: bytes, chunk: int) -> None:
    """Write in chunks and write back after each, so that no write is throttled
    (there is no flusher without `running`)."""
    for pos in range(0, len(data), chunk):
        piece = data[pos : pos + chunk]
        assert await fs.write(fh, offset + pos, piece) == len(piece)
        await fs.sync_data()


def mapping_of(fs: Filesystem, ino: int) -> Mapping:
    """The inode's mapping, made if it has none (an idle inode's is retired)."""
    return fs.cache.mapping(fs.ns.get(ino))


def resident(fs: Filesystem, ino: int) -> set[int]:
    return set(mapping_of(fs, ino).pages.keys())


def flagged(cache: PageCache) -> int:
    """Resident pages brought in by readahead and not read yet."""
    return sum(p.nblocks for m in cache.mappings.values() for p in m.pages.values() if p.readahead)


def assert_readahead_accounted(cache: PageCache) -> None:
    """Every page readahead issued was used, wasted, or is still waiting to be read."""
    st = cache.statistics()
    assert st.readahead_issued == st.readahead_used + st.readahead_wasted + flagged(cache), st


@asynccontextmanager
async def running(fs: Filesystem) -> AsyncIterator[trio.Nursery]:
    """``fs.run`` in the background (flusher, readahead); unmounted on the way out."""
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        try:
            yield nursery
            # Let the flusher go idle first: cancelled in the middle of a run it
            # leaks that run's blocks (see test_unmount_during_background_writeback).
            await fs.sync_data()
        finally:
            with trio.fail_after(30):
                await fs.unmount()


async def readahead_settled(mapping: Mapping) -> None:
    """Wait until no prefetch is in flight on ``mapping``.

    A prefetch runs as its own task and holds ADD (``add_tryget``) while it reads
    the device in a worker thread.  Let every spawned prefetch start, then wait
    for their ADD holds to drain the way truncate would: by taking BLOCK.
    """
    await wait_all_tasks_blocked()
    with trio.fail_after(10):
        async with mapping.lock.block():
            pass


@pytest.fixture
async def small_fs(image: Path) -> AsyncIterator[Filesystem]:
    """A core with a 1 MiB cache: 256 pages, dirty limit 128."""
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600, cache_size=MiB))
    assert (fs.cache.max_pages, fs.cache.dirty_limit) == (256, 128)
    yield fs
    if not fs.dev.closed:
        await fs.unmount()
    assert_fsck_clean(image)


# hits and misses:


async def test_hits_and_misses_are_counted_exactly(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    data = pattern(8 * BS, 1)
    assert await fs.write(fh, 0, data) == len(data)
    await fs.drop_caches()
    check(fs)
    assert resident(fs, ino) == set()
    base = fs.cache.statistics()
    reads = fs.dev.statistics().reads

    assert await fs.read(fh, 0, 8 * BS) == data
    st = fs.cache.statistics()
    assert (st.hits - base.hits, st.misses - base.misses) == (0, 8)
    assert fs.dev.statistics().reads == reads + 1
    check(fs)

    assert await fs.read(fh, 0, 8 * BS) == data  # 8 cached pages: 8 touched
    assert await fs.read(fh, 2 * BS, 3 * BS) == data[2 * BS : 5 * BS]  # 3 more
    assert await fs.read(fh, 100, BS) == data[100 : 100 + BS]  # straddles 2 pages
    st = fs.cache.statistics()
    assert (st.hits - base.hits, st.misses - base.misses) == (8 + 3 + 2, 8)
    assert fs.dev.statistics().reads == reads + 1  # hits read nothing
    # Past EOF: nothing touched.
    assert await fs.read(fh, 8 * BS, BS) == b""
    assert fs.cache.statistics().hits == st.hits
    check(fs)
    await fs.release(fh)


async def test_a_miss_run_is_one_device_read_per_physical_run(fs: Filesystem) -> None:
    """File a: blocks 0-3, (b takes the next blocks), 4-7, a hole at 8-11, 12-15."""
    fa, a = await create(fs, b"a")
    fb, _ = await create(fs, b"b")
    data = bytearray(pattern(16 * BS, 2))
    data[8 * BS : 12 * BS] = bytes(4 * BS)
    for lblk in (0, 4, 12):
        await fs.write(fa, lblk * BS, bytes(data[lblk * BS : (lblk + 4) * BS]))
        await fs.sync_data()
        if lblk == 0:
            await fs.write(fb, 0, pattern(4 * BS, 3))
            await fs.sync_data()
    emap = fs.ns.inodes[a].extents
    assert emap is not None
    extents = list(emap.extents(0, 16))
    runs = [e for e in extents if e.pblk is not None]
    assert sum(e.length for e in runs) == 12
    assert len(runs) >= 3  # not contiguous: b sits between blocks 3 and 4
    await fs.drop_caches()
    check(fs)
    reads = fs.dev.statistics().reads
    misses = fs.cache.statistics().misses

    assert await fs.read(fa, 0, 16 * BS) == data
    assert fs.dev.statistics().reads == reads + len(runs)  # the hole reads nothing
    assert fs.cache.statistics().misses == misses + 16
    assert resident(fs, a) == set(range(16))
    check(fs)
    await fs.release(fa)
    await fs.release(fb)


# LRU and the memory limit:


async def test_lru_evicts_least_recently_used_clean_pages(small_fs: Filesystem) -> None:
    fs = small_fs
    fh, ino = await create(fs, b"f")
    data = pattern(300 * BS, 4)
    await write_synced(fs, fh, 0, data, 60 * BS)
    await fs.drop_caches()
    check(fs)
    assert fs.cache.nr_pages == 0
    evictions = fs.cache.statistics().evictions

    # Blocks 0-199 in pages of 64, 64, 64 and 8 blocks (the largest aligned
    # pieces of the fill).
    assert await fs.read(fh, 0, 200 * BS) == data[: 200 * BS]
    m = mapping_of(fs, ino)
    assert [(p.index, p.nblocks) for p in m.pages.values()] == [
        (0, 64),
        (64, 64),
        (128, 64),
        (192, 8),
    ]
    assert await fs.read(fh, 0, 50 * BS) == data[: 50 * BS]  # page 0-63 young again
    assert await fs.read(fh, 200 * BS, 100 * BS) == data[200 * BS :]  # 44 blocks must go
    check(fs)
    st = fs.cache.statistics()
    # Eviction takes whole pages, oldest first: 64-127, the oldest, is enough.
    assert st.evictions - evictions == 64
    assert resident(fs, ino) == set(range(64)) | set(range(128, 300))
    # The cache's memory use against cache_size: never over.
    assert (st.pages, st.memory_bytes, st.limit_bytes) == (236, 236 * BS, MiB)

    # A read larger than the whole cache stays within it too.
    assert await fs.read(fh, 0, 300 * BS) == data
    st = fs.cache.statistics()
    assert st.memory_bytes <= st.limit_bytes, f"cache uses {st.memory_bytes} of {st.limit_bytes}"
    check(fs)
    await fs.release(fh)


async def test_dirty_and_writeback_pages_are_never_evicted(small_fs: Filesystem) -> None:
    fs = small_fs
    fy, y = await create(fs, b"clean")
    ydata = pattern(300 * BS, 5)
    await write_synced(fs, fy, 0, ydata, 100 * BS)
    await fs.drop_caches()
    fx, x = await create(fs, b"dirty")
    xdata = pattern(100 * BS, 6)
    assert await fs.write(fx, 0, xdata) == len(xdata)  # 100 dirty pages, under the limit
    check(fs)

    # Reading 300 clean pages through a cache with room for 156 of them.
    assert await fs.read(fy, 0, 300 * BS) == ydata
    check(fs)
    mx = mapping_of(fs, x)
    assert resident(fs, x) == set(range(100))
    assert mx.nr_dirty == 100
    st = fs.cache.statistics()
    assert st.memory_bytes <= st.limit_bytes
    # y keeps its newest blocks, as many as fit in whole pages (room: 156).
    kept = resident(fs, y)
    assert kept == set(range(300 - len(kept), 300))
    assert 156 - MAX_PAGE_BLOCKS < len(kept) <= 156

    # Now hold x's pages under writeback (the window before the extent map is
    # updated) and read y again.
    REGISTRY.control("name writeback_before_map delay 300")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.sync_data)
        # Writeback marks the pages before its first await (the device write).
        await wait_all_tasks_blocked()
        assert fs.cache.nr_writeback == 100
        assert await fs.read(fy, 0, 300 * BS) == ydata
        check(fs)
        assert resident(fs, x) == set(range(100))
        assert all(p.writeback for p in mx.pages.values())
        assert fs.cache.nr_writeback == 100
    check(fs)
    assert mx.nr_dirty == mx.nr_writeback == 0
    assert fs.cache.statistics().memory_bytes <= MiB
    assert await fs.read(fx, 0, 100 * BS) == xdata
    check(fs)
    await fs.release(fx)
    await fs.release(fy)


async def test_a_write_larger_than_the_cache_loses_nothing(small_fs: Filesystem) -> None:
    """127 dirty pages pass the throttle (limit 128), then one write dirties 256
    more: the cache goes over its limit with dirty pages only — it must not evict
    the page a write is about to dirty — and shrinks back once they are clean."""
    fs = small_fs
    fh, ino = await create(fs, b"f")
    data = pattern(383 * BS, 7)
    assert await fs.write(fh, 0, data[: 127 * BS]) == 127 * BS
    assert await fs.write(fh, 127 * BS, data[127 * BS :]) == 256 * BS
    check(fs)
    assert resident(fs, ino) == set(range(383))
    assert fs.cache.nr_dirty == fs.cache.nr_reserved == 383
    await fs.sync_data()
    check(fs)
    st = fs.cache.statistics()
    assert st.dirty == 0
    assert st.memory_bytes <= st.limit_bytes, f"cache uses {st.memory_bytes} of {st.limit_bytes}"
    await fs.drop_caches()
    assert await fs.read(fh, 0, 383 * BS) == data
    check(fs)
    await fs.release(fh)


# dirty accounting and throttling:


async def test_writes_beyond_the_dirty_limit_wait_for_writeback(small_fs: Filesystem) -> None:
    fs = small_fs
    cache = fs.cache
    per_write = 16  # pages
    data = pattern(768 * BS, 8)
    most = 0
    # Slow writeback down so that the writer outpaces it.
    REGISTRY.control("name writeback_before_map delay 20")
    async with running(fs):
        fh, _ = await create(fs, b"f")
        for pos in range(0, len(data), per_write * BS):
            assert await fs.write(fh, pos, data[pos : pos + per_write * BS]) == per_write * BS
            most = max(most, cache.nr_dirty)
            check(fs)
        st = cache.statistics()
        assert st.throttled > 0
        assert st.writeback_pages > 0  # the flusher ran
        # A throttled write waits until the count is under the limit, then adds
        # its own pages.
        assert most <= cache.dirty_limit - 1 + per_write, (most, cache.dirty_limit)
        await fs.fsync(fh, False)
        check(fs)
        assert cache.nr_dirty == 0
        assert cache.statistics().writeback_unreserved == 0
        REGISTRY.control("name writeback_before_map disable")
        await fs.drop_caches()
        assert await fs.read(fh, 0, len(data)) == data
        check(fs)
        await fs.release(fh)


# reservations:


async def test_a_write_into_a_hole_reserves_one_block_per_page(fs: Filesystem) -> None:
    cache = fs.cache
    reserved_before = fs.alloc.statistics().reserved
    allocated_before = fs.alloc.statistics().allocated
    fh, ino = await create(fs, b"f")
    data = pattern(5 * BS, 9)
    assert await fs.write(fh, 0, data) == len(data)
    m = mapping_of(fs, ino)
    assert cache.nr_reserved == m.nr_reserved == cache.reservation.remaining == 5
    assert fs.alloc.statistics().reserved == reserved_before + 5
    assert all(m.pages[i].space_at(i) == RESERVED for i in range(5))
    assert (await fs.getattr(ino)).blocks == 5 * BS // 512  # counted like delalloc
    # Writing the same pages again takes nothing more.
    assert await fs.write(fh, BS, data[BS : 3 * BS]) == 2 * BS
    assert cache.reservation.remaining == cache.nr_reserved == 5
    check(fs)

    await fs.sync_data()  # writeback consumes the reservation
    check(fs)
    assert cache.reservation.remaining == cache.nr_reserved == m.nr_reserved == 0
    assert all(m.pages[i].space_at(i) == ALLOCATED for i in range(5))
    emap = fs.ns.inodes[ino].extents
    assert emap is not None
    assert emap.mapped_blocks() == 5
    st = fs.alloc.statistics()
    assert st.reserved == reserved_before
    assert st.allocated == allocated_before + 5
    # Overwriting allocated blocks reserves nothing.
    assert await fs.write(fh, 0, data[::-1]) == len(data)
    assert cache.nr_reserved == 0
    assert cache.nr_dirty == 5
    check(fs)
    await fs.release(fh)


async def test_truncate_and_unlink_release_reservations(fs: Filesystem) -> None:
    cache = fs.cache
    reserved_before = fs.alloc.statistics().reserved
    fh, ino = await create(fs, b"f")
    assert await fs.write(fh, 0, pattern(8 * BS, 10)) == 8 * BS
    assert cache.reservation.remaining == cache.nr_reserved == 8
    check(fs)

    # Pages 4-7 dropped; 3 keeps EOF, its tail zeroed and written back (the
    # device block gets the zeros through the page, see truncate).
    await fs.setattr(ino, size=3 * BS + 100)
    check(fs)
    assert resident(fs, ino) == {0, 1, 2, 3}
    assert not mapping_of(fs, ino).pages[3].is_dirty(3)
    assert cache.reservation.remaining == cache.nr_reserved == 3
    assert fs.alloc.statistics().reserved == reserved_before + 3

    await fs.unlink(ROOT_INO, b"f")  # still open: the data stays
    assert cache.nr_reserved == 3
    check(fs)
    await fs.release(fh)  # last reference: dirty pages discarded
    check(fs)
    assert ino not in cache.mappings
    assert cache.reservation.remaining == cache.nr_reserved == cache.nr_dirty == 0
    assert fs.alloc.statistics().reserved == reserved_before


async def test_a_whole_page_stretch_over_mixed_pages(fs: Filesystem) -> None:
    """One write over eight whole pages: 0-3 mapped and cached clean, 4 a
    cached hole already dirty and reserved, 5 mapped and not cached, 6-7
    holes not cached.  Every page gets the new bytes, exactly the holes not
    yet reserved take a reservation (taken page by page when the bulk request
    fails), and the accounting stays exact."""
    fh, ino = await create(fs, b"f")
    old = pattern(8 * BS, 30)
    await fs.write(fh, 0, old[: 4 * BS])
    await fs.write(fh, 5 * BS, old[5 * BS : 6 * BS])
    await fs.fsync(fh, False)
    m = mapping_of(fs, ino)
    fs.cache.drop_range(m, 5, 6, discard_dirty=False)  # 5: mapped, not cached
    await fs.write(fh, 4 * BS + 10, b"ab")  # 4: a dirty, reserved hole page
    assert m.pages[4].space_at(4) == RESERVED
    assert fs.cache.nr_reserved == 1
    new = pattern(8 * BS, 31)
    REGISTRY.control("name alloc_reserve oneshot")  # the bulk reservation fails once
    assert await fs.write(fh, 0, new) == 8 * BS
    assert REGISTRY.site("alloc_reserve").fired == 1
    assert [m.pages[i].space_at(i) for i in range(8)] == [ALLOCATED] * 4 + [RESERVED] + [
        ALLOCATED
    ] + [RESERVED] * 2
    assert fs.cache.nr_reserved == 3
    assert all(m.pages[i].is_dirty(i) for i in range(8))
    check(fs)
    assert await fs.read(fh, 0, 8 * BS) == new
    await fs.fsync(fh, False)
    await fs.drop_caches()
    assert await fs.read(fh, 0, 8 * BS) == new
    check(fs)
    await fs.release(fh)


async def test_whole_page_writes_read_nothing_partial_ones_read_their_block(
    fs: Filesystem,
) -> None:
    """Over blocks on disk and not cached: a write of one whole page, or of a
    stretch of them, reads nothing; a partial page reads its block first."""
    fh, _ = await create(fs, b"f")
    old = pattern(8 * BS, 32)
    await fs.write(fh, 0, old)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    reads = fs.dev.statistics().reads
    assert await fs.write(fh, 2 * BS, b"w" * BS) == BS  # one whole page
    assert await fs.write(fh, 4 * BS, b"s" * 3 * BS) == 3 * BS  # a stretch
    assert fs.dev.statistics().reads == reads
    assert await fs.write(fh, 7 * BS + 5, b"p") == 1  # part of a page: read-modify-write
    assert fs.dev.statistics().reads == reads + 1
    want = bytearray(old)
    want[2 * BS : 3 * BS] = b"w" * BS
    want[4 * BS : 7 * BS] = b"s" * 3 * BS
    want[7 * BS + 5] = ord("p")
    assert await fs.read(fh, 0, 8 * BS) == want
    check(fs)
    await fs.release(fh)


async def test_enospc_comes_from_write_never_from_writeback(tiny_fs: Filesystem) -> None:
    fs = tiny_fs
    free = fs.alloc.statistics().free
    fh, ino = await create(fs, b"f")
    data = pattern(2 * MiB, 11)  # more than the image
    done = await fs.write(fh, 0, data)
    assert 0 < done < len(data)
    assert done % BS == 0
    assert done // BS == free  # every free block promised to a page
    check(fs)
    with pytest.raises(FsError) as e:
        await fs.write(fh, done, data[done:])
    assert e.value.code == errno.ENOSPC
    fg, _ = await create(fs, b"g")
    with pytest.raises(FsError) as e:
        await fs.write(fg, 0, b"x")
    assert e.value.code == errno.ENOSPC
    check(fs)

    await fs.fsync(fh, False)  # writeback allocates from the reservation: no error
    st = fs.cache.statistics()
    assert (st.writeback_errors, st.writeback_unreserved, st.dirty) == (0, 0, 0)
    check(fs)
    await fs.drop_caches()
    assert (await fs.getattr(ino)).size == done
    assert await fs.read(fh, 0, len(data)) == data[:done]  # every acknowledged byte
    check(fs)
    await fs.release(fh)
    await fs.release(fg)


# readahead:


async def test_sequential_reads_grow_the_readahead_window(fs: Filesystem) -> None:
    """A file eight times the largest window, read in 128 KiB requests with
    each prefetch let finish: the window grows, prefetching stays between half
    a window and a window ahead, and every prefetched page is read."""
    chunk = 32  # pages per read
    npages = 8 * MAX_WINDOW
    data = pattern(npages * BS, 12)
    async with running(fs):
        fw, ino = await create(fs, b"big")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        m = mapping_of(fs, ino)
        base = fs.cache.statistics()
        ahead: list[int] = []  # how far past each read the prefetched pages reach
        for first in range(0, npages, chunk):
            got = await fs.read(fh, first * BS, chunk * BS)
            assert got == data[first * BS : (first + chunk) * BS]
            await readahead_settled(m)
            check(fs)
            reach = max(m.pages.keys()) + 1 - (first + chunk)
            if first + chunk + MAX_WINDOW <= npages:
                ahead.append(reach)
        st = fs.cache.statistics()
        issued = st.readahead_issued - base.readahead_issued
        used = st.readahead_used - base.readahead_used
        assert issued > 0.9 * npages
        # The window doubles up to its maximum; from then on the next stretch
        # starts once less than half a window is left ahead of the reader.
        assert ahead[0] == 2 * chunk  # the first window: twice the first read
        full = ahead.index(MAX_WINDOW)
        assert ahead[: full + 1] == sorted(ahead[: full + 1])
        assert all(MAX_WINDOW // 2 <= reach <= MAX_WINDOW for reach in ahead[full:])
        assert min(ahead[full:]) < MAX_WINDOW  # asynchronous: not topped up on every read
        # Every page readahead brought in was read: the hit rate is 100 %.
        assert used == issued
        assert st.readahead_wasted == base.readahead_wasted
        assert st.hits - base.hits + st.misses - base.misses == npages
        assert st.misses - base.misses < npages // 10
        assert_readahead_accounted(fs.cache)
        await fs.release(fh)


async def test_unpaced_sequential_reads_account_every_prefetched_page(fs: Filesystem) -> None:
    """The same file read back to back: reads and prefetches overlap, yet every
    issued page is counted once, as used or wasted."""
    npages = 2048
    data = pattern(npages * BS, 13)
    async with running(fs):
        fw, ino = await create(fs, b"big")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        base = fs.cache.statistics()
        for first in range(0, npages, 32):
            assert await fs.read(fh, first * BS, 32 * BS) == data[first * BS : (first + 32) * BS]
        await readahead_settled(mapping_of(fs, ino))
        check(fs)
        st = fs.cache.statistics()
        issued = st.readahead_issued - base.readahead_issued
        used = st.readahead_used - base.readahead_used
        assert issued > 0
        assert used >= 0.8 * issued, (used, issued)
        assert_readahead_accounted(fs.cache)
        await fs.release(fh)


async def test_random_reads_issue_little_readahead(fs: Filesystem) -> None:
    npages = 1024
    data = pattern(npages * BS, 14)
    async with running(fs):
        fw, ino = await create(fs, b"big")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        base = fs.cache.statistics()
        rng = random.Random(15)
        indexes = rng.sample(range(1, npages), 64)
        for index in indexes:
            assert await fs.read(fh, index * BS, BS) == data[index * BS : (index + 1) * BS]
        await readahead_settled(mapping_of(fs, ino))
        st = fs.cache.statistics()
        consecutive = sum(b == a + 1 for a, b in itertools.pairwise(indexes))
        assert st.readahead_issued - base.readahead_issued <= 4 * consecutive
        assert st.misses - base.misses >= 64 - consecutive
        check(fs)
        await fs.release(fh)


async def test_prefetched_pages_dropped_unread_are_wasted(fs: Filesystem) -> None:
    npages = 512
    data = pattern(npages * BS, 16)
    async with running(fs):
        fw, ino = await create(fs, b"big")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        m = mapping_of(fs, ino)
        base = fs.cache.statistics()
        for first in range(0, 4 * 32, 32):
            await fs.read(fh, first * BS, 32 * BS)
            await readahead_settled(m)
        unread = flagged(fs.cache)
        assert unread > 0
        st = fs.cache.statistics()
        assert st.readahead_wasted == base.readahead_wasted
        await fs.drop_caches()
        st = fs.cache.statistics()
        assert st.readahead_wasted - base.readahead_wasted == unread
        assert flagged(fs.cache) == 0
        assert_readahead_accounted(fs.cache)
        check(fs)
        await fs.release(fh)


async def test_reads_split_inside_a_page_stay_sequential(fs: Filesystem) -> None:
    """FUSE hands a 1 MiB read() over as 1 MiB - 16 bytes, then 16 bytes: the
    second starts inside the page the first ended in.  That is still a
    sequential stream: readahead keeps growing and brings in nearly every page."""
    npages = 4 * MAX_WINDOW
    data = pattern(npages * BS, 21)
    async with running(fs):
        fw, ino = await create(fs, b"f")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        base = fs.cache.statistics()
        for offset in range(0, npages * BS, MiB):
            got = await fs.read(fh, offset, MiB - 16)
            got += await fs.read(fh, offset + MiB - 16, 16)
            assert got == data[offset : offset + MiB]
            await readahead_settled(mapping_of(fs, ino))
        st = fs.cache.statistics()
        assert st.readahead_issued - base.readahead_issued > 0.7 * npages
        assert (
            st.readahead_used - base.readahead_used == st.readahead_issued - base.readahead_issued
        )
        assert st.misses - base.misses < 0.3 * npages
        check(fs)
        await fs.release(fh)


async def test_a_read_waits_for_the_prefetch_in_flight(fs: Filesystem) -> None:
    """The prefetch of pages 32-95 (twice the first read) holds its window open
    before inserting; the next read, of 32-63, reaches those pages meanwhile and
    waits for the prefetch instead of reading the blocks again: only the first
    read's 32 misses, every block read from the device once, nothing wasted."""
    data = pattern(128 * BS, 17)
    async with running(fs):
        fw, ino = await create(fs, b"f")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        base = fs.cache.statistics()
        reads = fs.dev.statistics().bytes_read
        REGISTRY.control("name readahead_before_insert oneshot delay 200")
        assert await fs.read(fh, 0, 32 * BS) == data[: 32 * BS]  # prefetch 32-95 starts
        await wait_all_tasks_blocked()
        assert await fs.read(fh, 32 * BS, 32 * BS) == data[32 * BS : 64 * BS]
        assert REGISTRY.site("readahead_before_insert").fired == 1
        await readahead_settled(mapping_of(fs, ino))
        st = fs.cache.statistics()
        assert st.misses - base.misses == 32
        assert st.readahead_used - base.readahead_used >= 32
        assert st.readahead_wasted == base.readahead_wasted
        # Each block came from the device once: the first read's, and what
        # the two prefetches brought in.
        prefetched = st.readahead_issued - base.readahead_issued
        assert fs.dev.statistics().bytes_read - reads == (32 + prefetched) * BS
        assert_readahead_accounted(fs.cache)
        check(fs)
        await fs.release(fh)


async def test_a_prefetch_that_loses_to_a_write_is_wasted(fs: Filesystem) -> None:
    """The prefetch of pages 32-35 holds its window open before inserting; a
    write of page 33 puts a new page there meanwhile.  The prefetched copy is
    dropped unread (wasted, not lost from the accounting) and the write wins."""
    data = pattern(128 * BS, 19)
    new = pattern(BS, 20)
    async with running(fs):
        fw, ino = await create(fs, b"f")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        base = fs.cache.statistics()
        REGISTRY.control("name readahead_before_insert oneshot delay 200")
        assert await fs.read(fh, 0, 32 * BS) == data[: 32 * BS]  # prefetch 32-35 starts
        await wait_all_tasks_blocked()
        assert await fs.write(fw, 33 * BS, new) == BS
        await readahead_settled(mapping_of(fs, ino))
        st = fs.cache.statistics()
        assert st.readahead_wasted - base.readahead_wasted == 1
        assert (
            await fs.read(fh, 32 * BS, 3 * BS)
            == data[32 * BS : 33 * BS] + new + data[34 * BS : 35 * BS]
        )
        assert_readahead_accounted(fs.cache)
        check(fs)
        await fs.release(fh)
        await fs.release(fw)


async def test_a_prefetched_page_a_write_takes_over_is_used(fs: Filesystem) -> None:
    """The prefetch of pages 32-35 is inside its window when a partial write of
    page 33 needs the block's old bytes: the write waits for the prefetch
    instead of reading the block again, then modifies the prefetched page: it
    is used, not left flagged to be counted wasted, and the data is the
    prefetched block with the write on top."""
    data = pattern(128 * BS, 18)
    async with running(fs):
        fw, ino = await create(fs, b"f")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        m = mapping_of(fs, ino)
        base = fs.cache.statistics()
        REGISTRY.control("name readahead_before_insert oneshot delay 50")
        assert await fs.read(fh, 0, 32 * BS) == data[: 32 * BS]
        await wait_all_tasks_blocked()  # the prefetch of 32-35 is in its window
        assert 33 not in m.pages
        fills = REGISTRY.site("buffered_read_before_insert").hits
        assert await fs.write(fw, 33 * BS + 100, b"xyz") == 3
        assert REGISTRY.site("buffered_read_before_insert").hits == fills  # no fill of its own
        await readahead_settled(m)
        st = fs.cache.statistics()
        assert st.readahead_issued - base.readahead_issued >= 4
        assert not m.pages[33].readahead
        # Nothing has read 32-35 yet: the one use is the write's (of the whole
        # prefetched page holding 33), and the prefetched copy was not thrown away.
        assert st.readahead_used - base.readahead_used == m.pages[33].nblocks
        assert st.readahead_wasted == base.readahead_wasted
        want = bytearray(data[32 * BS : 36 * BS])
        want[BS + 100 : BS + 103] = b"xyz"
        assert await fs.read(fh, 32 * BS, 4 * BS) == want
        assert_readahead_accounted(fs.cache)
        check(fs)
        await fs.release(fh)
        await fs.release(fw)


async def test_readahead_gives_up_while_block_is_held(fs: Filesystem) -> None:
    data = pattern(128 * BS, 19)
    async with running(fs):
        fw, ino = await create(fs, b"f")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        m = mapping_of(fs, ino)
        base = fs.cache.statistics()
        failures = m.lock.statistics().tryget_failures
        assert await fs.read(fh, 0, 32 * BS) == data[: 32 * BS]
        # The read spawned a prefetch of 32-95 (twice the read) that has not
        # run yet; nothing yields between the read's return and BLOCK being
        # taken here.
        async with m.lock.block():
            await wait_all_tasks_blocked()
            st = fs.cache.statistics()
            assert st.readahead_abandoned - base.readahead_abandoned == 64
            assert st.readahead_issued == base.readahead_issued
            assert m.lock.statistics().tryget_failures == failures + 1
        assert resident(fs, ino) == set(range(32))
        check(fs)
        await fs.release(fh)


async def test_readahead_gives_way_to_a_block_waiter(fs: Filesystem) -> None:
    """ADD is held and a BLOCK waiter queued (a truncate waiting for readers):
    readahead must not add itself to the readers that truncate waits for."""
    data = pattern(128 * BS, 20)
    async with running(fs):
        fw, ino = await create(fs, b"f")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        m = mapping_of(fs, ino)
        base = fs.cache.statistics()
        let_go = trio.Event()

        async def blocker() -> None:
            async with m.lock.block():
                await let_go.wait()

        async with trio.open_nursery() as nursery:
            await m.lock.add_get()  # a reader holding ADD
            nursery.start_soon(blocker)
            await wait_all_tasks_blocked()
            assert m.lock.statistics().block_waiting == 1
            # Our read nests inside our ADD hold: it does not queue behind BLOCK.
            assert await fs.read(fh, 0, 32 * BS) == data[: 32 * BS]
            await wait_all_tasks_blocked()
            st = fs.cache.statistics()
            assert st.readahead_abandoned - base.readahead_abandoned == 64
            assert st.readahead_issued == base.readahead_issued
            m.lock.add_put()
            await wait_all_tasks_blocked()
            assert m.lock.statistics().block_holders == 1
            let_go.set()
        assert_readahead_accounted(fs.cache)
        check(fs)
        await fs.release(fh)


async def test_readahead_restarts_after_a_seek_back(fs: Filesystem) -> None:
    npages = 512
    data = pattern(npages * BS, 21)
    async with running(fs):
        fw, ino = await create(fs, b"big")
        await write_synced(fs, fw, 0, data, MiB)
        await fs.release(fw)
        await fs.drop_caches()
        fh = await fs.open(ino, os.O_RDONLY)
        m = mapping_of(fs, ino)
        for attempt in range(2):  # two passes over the file on one handle
            await fs.drop_caches()
            base = fs.cache.statistics()
            for first in range(0, npages, 32):
                await fs.read(fh, first * BS, 32 * BS)
                await readahead_settled(m)
            issued = fs.cache.statistics().readahead_issued - base.readahead_issued
            assert issued > npages // 2, f"no readahead on pass {attempt + 1}"
        await fs.release(fh)


# writeback:


async def test_writeback_merges_adjacent_pages_into_runs(fs: Filesystem) -> None:
    fh, _ = await create(fs, b"f")
    data = pattern(40 * BS, 22)
    for first, count in ((0, 10), (20, 5), (30, 1)):  # three runs
        pos = first * BS
        assert await fs.write(fh, pos, data[pos : pos + count * BS]) == count * BS
    base = fs.cache.statistics()
    writes = fs.dev.statistics().writes
    await fs.sync_data()
    check(fs)
    st = fs.cache.statistics()
    assert st.writeback_runs - base.writeback_runs == 3
    assert st.writeback_pages - base.writeback_pages == 16
    assert fs.dev.statistics().writes - writes == 3  # one device write per run

    # More than a run's worth of contiguous pages: split at MAX_RUN_PAGES.
    big = pattern((MAX_RUN_PAGES + 44) * BS, 23)
    gh, _ = await create(fs, b"g")
    assert await fs.write(gh, 0, big) == len(big)
    base = fs.cache.statistics()
    writes = fs.dev.statistics().writes
    await fs.sync_data()
    st = fs.cache.statistics()
    assert st.writeback_runs - base.writeback_runs == 2
    assert st.writeback_pages - base.writeback_pages == MAX_RUN_PAGES + 44
    assert fs.dev.statistics().writes - writes == 2

    # Rewriting allocated, contiguous blocks: one run, written in place.
    assert await fs.write(fh, 0, data[::-1][: 10 * BS]) == 10 * BS
    base = fs.cache.statistics()
    writes = fs.dev.statistics().writes
    await fs.sync_data()
    assert fs.cache.statistics().writeback_runs - base.writeback_runs == 1
    assert fs.dev.statistics().writes - writes == 1
    check(fs)
    await fs.release(fh)
    await fs.release(gh)


@pytest.mark.parametrize("over_holes", [False, True], ids=["in-place", "over-holes"])
async def test_writeback_error_keeps_pages_dirty_and_fsync_reports_it_once(
    fs: Filesystem, over_holes: bool
) -> None:
    cache = fs.cache
    fh, ino = await create(fs, b"f")
    old = pattern(4 * BS, 24)
    new = pattern(4 * BS, 25)
    if not over_holes:
        assert await fs.write(fh, 0, old) == len(old)
        await fs.fsync(fh, False)
    assert await fs.write(fh, 0, new) == len(new)
    m = mapping_of(fs, ino)
    reserved = 0 if not over_holes else 4
    assert cache.nr_reserved == reserved
    base = cache.statistics()

    REGISTRY.control("name blockdev_write oneshot")
    await fs.sync_data()  # background writeback fails: nobody to tell yet
    check(fs)
    st = cache.statistics()
    assert st.writeback_errors - base.writeback_errors == 1
    assert m.nr_dirty == 4
    assert all(p.dirty and not p.writeback for p in m.pages.values())
    # Pages over holes got their reservation back: writeback can still not fail
    # with ENOSPC.
    assert cache.nr_reserved == cache.reservation.remaining == reserved
    emap = fs.ns.inodes[ino].extents
    assert emap is not None
    assert emap.mapped_blocks() == (0 if over_holes else 4)

    with pytest.raises(FsError) as e:
        await fs.fsync(fh, False)  # writes the pages again, reports the old error
    assert e.value.code == errno.EIO
    check(fs)
    assert m.nr_dirty == 0
    await fs.fsync(fh, False)  # reported once: the retry succeeded
    assert cache.nr_reserved == cache.reservation.remaining == 0
    await fs.drop_caches()
    assert await fs.read(fh, 0, 4 * BS) == new
    check(fs)
    await fs.release(fh)


async def test_fsync_writes_a_page_dirtied_again_during_writeback(
    fs: Filesystem, image: Path
) -> None:
    """Background writeback of page 0 holds its window open after the device
    write; a write dirties the page again meanwhile; an fsync must not take the
    page for written because it is under writeback: it waits for that
    writeback and writes the page again, so the second write is durable."""
    fh, ino = await create(fs, b"f")
    first, second = pattern(BS, 40), pattern(BS, 41)
    assert await fs.write(fh, 0, first) == BS
    m = mapping_of(fs, ino)
    REGISTRY.control("name writeback_before_map oneshot delay 100")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(writeback_range, fs, m, wait=False))
        await wait_all_tasks_blocked()
        assert m.pages[0].writeback
        assert await fs.write(fh, 0, second) == BS  # dirty again, still under writeback
        assert m.nr_dirty == 1
        await fs.fsync(fh, False)
        assert m.nr_dirty == 0
    assert REGISTRY.site("writeback_before_map").fired == 1
    check(fs)
    await fs.release(fh)
    await fs.unmount()
    fs2 = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    fh2 = await fs2.open(ino, os.O_RDONLY)
    assert await fs2.read(fh2, 0, BS) == second
    await fs2.release(fh2)
    await fs2.unmount()


async def test_unlink_while_pages_are_under_writeback(fs: Filesystem) -> None:
    allocated = fs.alloc.statistics().allocated
    fh, ino = await create(fs, b"f")
    assert await fs.write(fh, 0, pattern(10 * BS, 26)) == 10 * BS
    await fs.release(fh)
    REGISTRY.control("name writeback_before_map delay 200")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.sync_data)
        await wait_all_tasks_blocked()
        assert fs.cache.nr_writeback == 10
        await fs.unlink(ROOT_INO, b"f")
    check(fs)
    assert ino not in fs.cache.mappings
    assert fs.cache.nr_pages == 0
    await fs.commit()
    assert fs.alloc.statistics().allocated == allocated


async def test_unmount_during_background_writeback(small_fs: Filesystem, image: Path) -> None:
    fs = small_fs
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        fh, ino = await create(fs, b"f")
        REGISTRY.control("name writeback_before_map delay 500")
        data = pattern(100 * BS, 27)
        assert await fs.write(fh, 0, data) == len(data)  # over the background limit
        await wait_all_tasks_blocked()
        assert fs.cache.nr_writeback == 100  # the flusher is inside its run
        await fs.release(fh)
        with trio.fail_after(30):
            await fs.unmount()  # cancels the flusher inside its run
    st = fs.cache.statistics()
    allocated = fs.alloc.statistics().allocated
    again = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    try:
        # Rebuilt from the checkpoint: what is mapped, plus the checkpoint itself.
        assert allocated == again.alloc.statistics().allocated, "blocks leaked"
        assert await read_back(again, ino, len(data)) == data
    finally:
        await again.unmount()
    assert st.writeback_unreserved == 0
    assert st.dirty == 0


async def read_back(fs: Filesystem, ino: int, size: int) -> bytes:
    fh = await fs.open(ino, os.O_RDONLY)
    try:
        return await fs.read(fh, 0, size)
    finally:
        await fs.release(fh)


async def test_fill_does_not_insert_data_older_than_an_evicted_write(fs: Filesystem) -> None:
    """Both sides hold ADD, so the lock does not order them: a read fills a
    page while a write to it is written back and evicted.  The fill must not
    then insert the older data it read."""
    fh, _ = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    await fs.write(fh, 0, b"o" * BS)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    REGISTRY.control("name buffered_read_before_insert delay 300 times 1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.read, fh, 0, BS)
        with trio.fail_after(10):
            while REGISTRY.site("buffered_read_before_insert").fired == 0:  # noqa: ASYNC110
                await trio.sleep(0.001)
        await fs.write(fh, 0, b"N" * BS)  # the fill is in flight: no page yet
        await fs.fsync(fh, False)
        await fs.drop_caches()  # written back and evicted before the fill inserts
    assert await fs.read(fh, 0, BS) == b"N" * BS
    assert fs.cache.counters["fill_stale"] == 1
    fs.cache.check()
    await fs.release(fh)
