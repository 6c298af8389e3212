"""Pages of several blocks (fusefs.pagecache): how big they are made, per-block
dirty, writeback and space state inside them, and splits when a range drop
cuts through one."""

from __future__ import annotations

import errno
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem
from fusefs.io.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from fusefs.pagecache import ALLOCATED, MAX_PAGE_BLOCKS, RESERVED, pieces

from .test_pagecache import BS, check, create, mapping_of, pattern, readahead_settled, running


@asynccontextmanager
async def fsync_held_at_map(fs: Filesystem, fh: int) -> AsyncIterator[None]:
    """An fsync of ``fh`` in the background, its writeback held after the
    device write (``writeback_before_map``) while the body runs."""
    REGISTRY.control("name writeback_before_map delay 200 times 1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.fsync, fh, False)
        await wait_all_tasks_blocked()
        yield


async def assert_reads_back(fs: Filesystem, fh: int, data: bytes | bytearray) -> None:
    """Written back and dropped, the file reads ``data``; the cache's accounting holds."""
    await fs.fsync(fh, False)
    await fs.drop_caches()
    assert await fs.read(fh, 0, len(data)) == data
    check(fs)


def layout(fs: Filesystem, ino: int) -> list[tuple[int, int]]:
    """(first block, blocks) of each cached page of the file, in order."""
    return [(p.index, p.nblocks) for p in mapping_of(fs, ino).pages.values()]


@given(
    st.integers(0, 1 << 20),
    st.integers(0, 600),
    st.sampled_from([1, 2, 8, 64, 256]),
)
def test_pieces_are_aligned_powers_of_two_covering_the_range(
    first: int, count: int, limit: int
) -> None:
    out = pieces(first, count, limit)
    pos = first
    for start, n in out:
        assert start == pos
        assert n & (n - 1) == 0
        assert n <= limit
        assert start % n == 0
        pos += n
    assert pos == first + count
    # As large as the alignment allows: a piece never doubles within the range.
    for start, n in out:
        twice = 2 * n
        assert (
            twice > limit
            or start % twice
            or start + twice > first + count
            or (
                # its buddy half lies before the range start
                start - n < first
            )
        )


async def test_a_stream_makes_large_pages_and_ragged_ends_small_ones(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    data = pattern(130 * BS + 100, 1)
    assert await fs.write(fh, 0, data) == len(data)
    assert layout(fs, ino) == [(0, 64), (64, 64), (128, 2), (130, 1)]
    m = mapping_of(fs, ino)
    assert m.nr_dirty == m.nr_reserved == 131
    check(fs)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    # A read from block 3 fills the stretch in the largest aligned pieces.
    assert await fs.read(fh, 3 * BS, 70 * BS) == data[3 * BS : 73 * BS]
    assert layout(fs, ino) == [(3, 1), (4, 4), (8, 8), (16, 16), (32, 32), (64, 8), (72, 1)]
    check(fs)
    await fs.release(fh)


async def test_small_writes_keep_one_block_pages(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    for i in range(8):
        assert await fs.write(fh, i * BS, b"x" * BS) == BS
    assert layout(fs, ino) == [(i, 1) for i in range(8)]
    await fs.release(fh)


async def test_writeback_writes_only_the_dirty_blocks_of_a_page(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    data = bytearray(pattern(64 * BS, 2))
    await fs.write(fh, 0, bytes(data))
    await fs.fsync(fh, False)
    assert layout(fs, ino) == [(0, 64)]
    page = mapping_of(fs, ino).pages[0]
    before = fs.cache.statistics()
    assert await fs.write(fh, 5 * BS + 10, b"abc") == 3
    assert await fs.write(fh, 9 * BS, b"d" * BS) == BS
    data[5 * BS + 10 : 5 * BS + 13] = b"abc"
    data[9 * BS : 10 * BS] = b"d" * BS
    assert page.dirty == (1 << 5) | (1 << 9)
    assert fs.cache.nr_dirty == 2
    check(fs)
    await fs.fsync(fh, False)
    after = fs.cache.statistics()
    # Two runs of one block each: nothing else of the page went to the device.
    assert after.writeback_pages - before.writeback_pages == 2
    assert after.writeback_runs - before.writeback_runs == 2
    assert page.dirty == 0
    await assert_reads_back(fs, fh, data)
    await fs.release(fh)


async def test_a_write_during_writeback_redirties_only_its_block(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    data = bytearray(pattern(64 * BS, 3))
    await fs.write(fh, 0, bytes(data))
    page = mapping_of(fs, ino).pages[0]
    async with fsync_held_at_map(fs, fh):
        assert page.writeback == (1 << 64) - 1
        old = page.data
        assert await fs.write(fh, 3 * BS, b"n" * BS) == BS
        # The device write in flight holds the old buffer, which stays as it
        # was: the write went into a copy (copy on write, no torn snapshot).
        assert page.data is not old
        assert old == data
        data[3 * BS : 4 * BS] = b"n" * BS
        assert page.data == data
        assert page.dirty == 1 << 3
        check(fs)
    # fsync waited for the first writeback, then wrote the block again.
    assert page.dirty == page.writeback == 0
    await assert_reads_back(fs, fh, data)
    await fs.release(fh)


async def test_a_write_beside_the_blocks_under_writeback_does_not_copy(fs: Filesystem) -> None:
    """Only a write into a block under writeback copies the page's buffer:
    another block's bytes are no device write's."""
    fh, ino = await create(fs, b"f")
    data = bytearray(pattern(64 * BS, 13))
    await fs.write(fh, 0, bytes(data))
    await fs.fsync(fh, False)
    page = mapping_of(fs, ino).pages[0]
    assert await fs.write(fh, 5 * BS, b"a" * BS) == BS
    async with fsync_held_at_map(fs, fh):
        assert page.writeback == 1 << 5
        buffer = page.data
        assert await fs.write(fh, 9 * BS, b"b" * BS) == BS
        assert page.data is buffer
    data[5 * BS : 6 * BS] = b"a" * BS
    data[9 * BS : 10 * BS] = b"b" * BS
    await assert_reads_back(fs, fh, data)
    await fs.release(fh)


async def test_truncate_into_a_dirty_page_keeps_the_blocks_before_it(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    data = pattern(64 * BS, 4)
    await fs.write(fh, 0, data)
    m = mapping_of(fs, ino)
    assert layout(fs, ino) == [(0, 64)]
    size = 10 * BS + 100
    await fs.truncate(fs.ns.get(ino), size)
    # The part before the cut, in aligned pieces, still dirty and reserved;
    # the block holding EOF was written back with its tail zeroed.
    assert layout(fs, ino) == [(0, 8), (8, 2), (10, 1)]
    assert m.nr_dirty == m.nr_reserved == fs.cache.reservation.remaining == 10
    assert all(m.pages[i].space_at(i) == RESERVED for i in range(10))
    assert m.pages[10].space_at(10) == ALLOCATED
    assert not m.pages[10].dirty
    assert fs.cache.statistics().splits == 1
    await assert_reads_back(fs, fh, data[:size])
    # The tail of block 10 past EOF reads as zeros once the file grows again.
    await fs.truncate(fs.ns.get(ino), 11 * BS)
    assert await fs.read(fh, 0, 11 * BS) == data[:size] + bytes(BS - 100)
    check(fs)
    await fs.release(fh)


async def test_punching_a_hole_in_a_clean_page_splits_it(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"f")
    data = pattern(64 * BS, 5)
    await fs.write(fh, 0, data)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    assert await fs.read(fh, 0, 64 * BS) == data
    assert layout(fs, ino) == [(0, 64)]
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    await fs.fallocate(ino, mode, 20 * BS, 10 * BS)
    assert layout(fs, ino) == [(0, 16), (16, 4), (30, 2), (32, 32)]
    want = data[: 20 * BS] + bytes(10 * BS) + data[30 * BS :]
    assert await fs.read(fh, 0, 64 * BS) == want
    await assert_reads_back(fs, fh, want)
    await fs.release(fh)


async def test_a_split_that_cannot_allocate_changes_nothing(fs: Filesystem) -> None:
    """The memory fault site ``pagecache_split``: the copies are made before
    anything is dropped, so truncate fails with ENOMEM and the file, its pages
    and the cache's accounting are as they were."""
    fh, ino = await create(fs, b"f")
    data = pattern(64 * BS, 6)
    await fs.write(fh, 0, data)  # dirty, reserved
    inode = fs.ns.get(ino)
    REGISTRY.control("name pagecache_split oneshot")
    with pytest.raises(FsError) as e:
        await fs.truncate(inode, 10 * BS)
    assert e.value.code == errno.ENOMEM
    assert REGISTRY.site("pagecache_split").fired == 1
    assert inode.size == 64 * BS
    assert layout(fs, ino) == [(0, 64)]
    assert fs.cache.nr_dirty == fs.cache.nr_reserved == 64
    check(fs)
    assert await fs.read(fh, 0, 64 * BS) == data
    await fs.truncate(inode, 10 * BS)  # the site is spent: now it goes through
    assert await fs.read(fh, 0, 64 * BS) == data[: 10 * BS]
    check(fs)
    await fs.release(fh)


async def test_a_stale_block_is_cut_out_of_a_large_fill(fs: Filesystem) -> None:
    """A 64-block fill is in flight when a write to block 5 is written back
    and evicted: the fill inserts every block but that one (whose newer data
    the device has), as one-block pages."""
    fh, ino = await create(fs, b"f")
    old = pattern(64 * BS, 7)
    await fs.write(fh, 0, old)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    REGISTRY.control("name buffered_read_before_insert delay 300 times 1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.read, fh, 0, 64 * BS)
        with trio.fail_after(10):
            while REGISTRY.site("buffered_read_before_insert").fired == 0:  # noqa: ASYNC110
                await trio.sleep(0.001)
        await fs.write(fh, 5 * BS, b"N" * BS)
        await fs.fsync(fh, False)
        await fs.drop_caches()
    assert fs.cache.counters["fill_stale"] == 1
    assert 5 not in mapping_of(fs, ino).pages
    assert len(mapping_of(fs, ino).pages) == 63
    want = old[: 5 * BS] + b"N" * BS + old[6 * BS :]
    assert await fs.read(fh, 0, 64 * BS) == want
    check(fs)
    await fs.release(fh)


def test_the_largest_page_fits_a_page_index_chunk() -> None:
    """Aligned pages of at most a chunk never straddle two chunks of the index."""
    from fusefs.pageindex import CHUNK

    assert CHUNK % MAX_PAGE_BLOCKS == 0


async def test_a_streams_prefetches_read_the_image_in_file_order(fs: Filesystem) -> None:
    """A sequential reader's prefetches go to the device one at a time, in
    the order they were started: every device read starts where the one
    before it ended (the file is laid out in one stretch), none overlaps
    another in time."""
    fh, ino = await create(fs, b"f")
    data = pattern(4 << 20, 9)
    await fs.write(fh, 0, data)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    reads: list[tuple[int, int]] = []
    inflight = 0
    overlapped = False
    real = fs.dev.read_into

    async def recorded(pblk: int, buffers: Sequence[bytearray | memoryview]) -> None:
        nonlocal inflight, overlapped
        inflight += 1
        overlapped |= inflight > 1
        try:
            await real(pblk, buffers)
        finally:
            inflight -= 1
        reads.append((pblk, sum(len(b) for b in buffers) // BS))

    fs.dev.read_into = recorded  # type: ignore[method-assign]
    async with running(fs):
        for pos in range(0, len(data), 1 << 20):
            assert await fs.read(fh, pos, 1 << 20) == data[pos : pos + (1 << 20)]
            await wait_all_tasks_blocked()
        await readahead_settled(mapping_of(fs, ino))
        assert len(reads) == 4  # 1 MiB each: the first read's own, then prefetches
        assert not overlapped
        for (pblk, n), (after, _) in itertools.pairwise(reads):
            assert after == pblk + n, reads
        await fs.release(fh)
