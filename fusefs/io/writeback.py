"""Writeback: dirty pages to the device, blocks allocated for reserved pages.

Locks: none (DESIGN §3).  Writeback marks the pages it writes *under writeback*
and BLOCK holders wait for that (`wait_writeback`) before they drop pages or
change the mapping in their range; that is what lets writeback run without the
inode lock and without the pagecache lock.

Dirty pages are written in runs of contiguous pages, each found just before it
is prepared (so a run never has a gap left by a concurrent writeback or drop):

1. the pages are marked under writeback (no longer dirty; a write that comes
   in meanwhile dirties them again) and their contents are copied;
2. the extent map is consulted: pages over mapped blocks are written in place
   (an unwritten extent becomes written); pages over holes get blocks
   allocated — from the cache's reservation for ``RESERVED`` pages, so this
   cannot fail with ENOSPC;
3. the device writes of up to ``BATCH_PAGES`` pages of runs go down in one
   worker-thread call (a random writer's writeback is many one-page runs, and
   a thread round trip costs more than the write);
4. only after its device writes is a run's new blocks mapped (data before
   metadata).

A page over a hole that is *not* reserved is the state of race 6 in DESIGN §3:
the cache believed the block allocated, the block was punched, and the write
that dirtied the page took no reservation.  Writeback then has to allocate
without a reservation; it counts that in ``writeback_unreserved`` and, if the
filesystem is full even after the commit that releases the frees waiting for
one (`fusefs.reclaim`), fails with ENOSPC — data the write() call already
acknowledged is lost.  The pagecache add lock keeps that state from arising.
(A page whose failed writeback could not take its reservation back is
unreserved too: it stays dirty, and its next writeback allocates the same way.)

A failed run leaves its pages dirty and records the error on the mapping, so
the next fsync of the file reports it (and later ones do not).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from fusefs.alloc import Run, place_runs
from fusefs.blockdev import Buffer
from fusefs.errors import FsError, NoSpace
from fusefs.extents import Extent
from fusefs.faults import race_fault
from fusefs.pagecache import DIRTY_EXPIRE_SECONDS, Mapping, Page, ones

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem

log = logging.getLogger(__name__)

MAX_RUN_PAGES = 256  # 1 MiB at 4 KiB pages: one device write
THROTTLE_BATCH = 1024  # pages a throttled writer writes back per round
BATCH_PAGES = 1024  # pages of runs one device call (one worker-thread trip) carries
_END = 1 << 62  # past any page index


def _next_dirty_run(mapping: Mapping, first: int, end: int) -> list[tuple[Page, int]]:
    """The first run of contiguous dirty blocks not under writeback in [first, end),
    at most MAX_RUN_PAGES long, as (page, mask) pieces in block order (no
    await: the run is written straight away)."""
    pages = mapping.pages
    index = first
    while True:  # page by page: a lookup each, gaps skipped in C (first_present)
        page = pages.get(index)
        if page is None:
            index = pages.first_present(index, end)
            if index >= end:
                return []
            continue
        ready = page.dirty & ~page.writeback & page.mask(first, end)
        if ready:
            break
        index = page.end
        if index >= end:
            return []
    run: list[tuple[Page, int]] = []
    left = MAX_RUN_PAGES
    index = page.index + (ready & -ready).bit_length() - 1  # its first such block
    while True:
        rel = index - page.index
        ready = (page.dirty & ~page.writeback & page.mask(index, end)) >> rel
        n = min((ready ^ (ready + 1)).bit_length() - 1, left)  # the ones from rel on
        if n == 0:
            break
        run.append((page, ones(n) << rel))
        left -= n
        index += n
        if index != page.end or not left or index >= end:
            break
        next_page = pages.get(index)
        if next_page is None:
            break
        page = next_page
    return run


def run_first(run: list[tuple[Page, int]]) -> int:
    """The first block of a run of (page, mask) pieces."""
    page, mask = run[0]
    return page.index + (mask & -mask).bit_length() - 1


async def writeback_range(
    fs: Filesystem,
    mapping: Mapping,
    first: int = 0,
    end: int | None = None,
    *,
    wait: bool = True,
    max_pages: int | None = None,
) -> None:
    """Write back the dirty pages of [first, end); with ``wait``, also wait for
    writeback already in flight there, so that on return nothing in the range
    is dirty or under writeback (unless written again meanwhile).  With
    ``max_pages``, stop after about that many pages (throttled writers)."""
    stop = end if end is not None else _END
    budget = max_pages if max_pages is not None else _END
    failures = mapping.wb_failures
    await _write_runs(fs, mapping, first, stop, budget)
    if wait:
        await wait_writeback(mapping, first, stop)
        if mapping.nr_dirty and mapping.wb_failures == failures:
            # A page dirtied again while under writeback was passed over above
            # (its old contents were on their way); now it can go -- else an
            # fsync would return with data written before it still dirty (the
            # kernel's WB_SYNC_ALL waits and writes such pages the same way).
            # Not after a failure here: its pages stay dirty for the caller to see.
            await _write_runs(fs, mapping, first, stop, budget)
            await wait_writeback(mapping, first, stop)


async def _write_runs(
    fs: Filesystem, mapping: Mapping, first: int, stop: int, budget: int
) -> tuple[int, int]:
    """Write the dirty runs of [first, stop) in order, about ``budget`` pages.
    Returns where it stopped (``stop`` when it got there) and the budget left.
    Each run is found just before it is prepared, so pages dropped or taken by
    another writeback meanwhile are never in one; runs go to the device in
    batches of up to BATCH_PAGES pages, one worker-thread call a batch."""
    pos = first
    while budget > 0:
        batch: list[_RunIO] = []
        npages = 0
        exhausted = False
        try:
            while budget > 0 and npages < BATCH_PAGES:
                run = _next_dirty_run(mapping, pos, stop)
                if not run:
                    exhausted = True
                    break
                start = run_first(run)
                count = sum(mask.bit_count() for _, mask in run)
                pos = start + count
                io = _RunIO(run, start, count)
                budget -= count
                npages += count
                batch.append(io)
                await _prepare(fs, mapping, io)
            if batch:
                await _submit(fs, mapping, batch)
        except BaseException:
            # Cancelled (unmount stops the flusher mid-batch): undo every run
            # not finished, leaving its pages dirty.
            for io in batch:
                if not io.finished:
                    _fail(fs, mapping, io, None)
            raise
        if exhausted:
            return stop, budget
    return pos, budget


async def writeback_cyclic(fs: Filesystem, mapping: Mapping, max_pages: int) -> None:
    """Background and throttled writeback: about ``max_pages`` pages from where
    the last such pass on this mapping stopped, wrapping around at the end (the
    kernel's range_cyclic), so that a writer appending to a file does not make
    each pass walk the pages it cleaned before."""
    start = mapping.wb_index
    pos, budget = await _write_runs(fs, mapping, start, _END, max_pages)
    if pos == _END:
        pos = 0
        if start and budget > 0:
            pos, _ = await _write_runs(fs, mapping, 0, start, budget)
            if pos == start:
                pos = 0
    mapping.wb_index = pos


async def wait_writeback(mapping: Mapping, first: int, end: int | None) -> None:
    """Wait until no page holding a block of [first, end) has a block under
    writeback (a page the range cuts through is split by a drop, so it must be
    idle whole)."""
    stop = end if end is not None else _END
    while mapping.writeback_in(first, stop):
        await mapping.writeback_done.wait()


@dataclass(slots=True)
class _RunIO:
    """One run's writeback in flight: its blocks (contiguous, under writeback,
    as (page, mask) pieces), the blocks allocated for its holes and the device
    writes it needs."""

    blocks: list[tuple[Page, int]]
    first: int
    count: int
    new_runs: list[Run] = field(default_factory=list)
    placements: list[tuple[int, int, int]] = field(default_factory=list)
    writes: list[tuple[int, Buffer | list[Buffer]]] = field(default_factory=list)
    finished: bool = False


async def _prepare(fs: Filesystem, mapping: Mapping, io: _RunIO) -> None:
    """Take the run's blocks under writeback, copy them, and allocate blocks for
    its holes; a failure (ENOSPC without a reservation) finishes the run."""
    cache = fs.cache
    bs = fs.block_size
    run = io.blocks
    first, count = io.first, io.count
    emap = mapping.inode.extents
    assert emap is not None
    cache.start_writeback(mapping, run)
    cache.counters["writeback_runs"] += 1
    try:
        await race_fault("writeback_before_lookup")
        # Which blocks are mapped now?  Holes need blocks.
        mapped = list(emap.extents(first, first + count))
        holes = _holes(first, count, mapped)
        reserved: list[tuple[Page, int]] = []
        nreserved = 0
        for page, mask in run:
            got = page.reserved & mask & _mask_of(page, holes)
            if got:
                reserved.append((page, got))
                nreserved += got.bit_count()
        unreserved = sum(n for _, n in holes) - nreserved
        if unreserved:
            cache.counters["writeback_unreserved"] += unreserved
            log.error(
                "writeback: inode %d: %d block(s) over holes without a reservation",
                mapping.inode.ino,
                unreserved,
            )
        if holes:
            hint = _hint(fs, mapping.inode.ino, first)
            if unreserved:
                # First, before anything is taken: on a full filesystem this
                # may wait for a commit (`fusefs.reclaim`).  The run's blocks
                # are under writeback, so no BLOCK holder changes them
                # meanwhile and the holes stay holes.
                io.new_runs += await fs.reclaim.allocate(unreserved, hint=hint)
            if nreserved:
                io.new_runs += fs.alloc.allocate(
                    nreserved, reservation=cache.reservation, hint=hint
                )
                # The reservation was consumed by allocate.
                cache.allocated_blocks(mapping, reserved)
        io.placements = place_runs(holes, io.new_runs)
    except FsError as e:
        _fail(fs, mapping, io, e)
        return
    # Mapped blocks in place; new blocks where the holes were.  The page
    # buffers themselves go to the device: a write into a page under
    # writeback gives the page a new buffer first (`stable_buffer`).
    for ext in mapped:
        assert ext.pblk is not None
        io.writes.append((ext.pblk, _views(run, ext.start, ext.start + ext.length, bs)))
    for lblk, pblk, n in io.placements:
        io.writes.append((pblk, _views(run, lblk, lblk + n, bs)))


def _views(run: list[tuple[Page, int]], first: int, end: int, bs: int) -> list[Buffer]:
    """The bytes of blocks [first, end) of a run, one view per page."""
    return [page.view(first, end, bs) for page, _ in run if page.index < end and first < page.end]


async def _submit(fs: Filesystem, mapping: Mapping, batch: list[_RunIO]) -> None:
    """The batch's device writes in one call, then each run mapped or failed."""
    live = [io for io in batch if not io.finished]
    errors = await fs.dev.write_many([w for io in live for w in io.writes])
    results: list[FsError | None] = []
    i = 0
    for io in live:
        n = len(io.writes)
        results.append(next((e for e in errors[i : i + n] if e is not None), None))
        i += n
    for io, error in zip(live, results, strict=True):
        if error is not None:
            _fail(fs, mapping, io, error)
            continue
        # Data is on the device; the mapping change (metadata) comes after it.
        await race_fault("writeback_before_map")
        _finish(fs, mapping, io)


def _finish(fs: Filesystem, mapping: Mapping, io: _RunIO) -> None:
    emap = mapping.inode.extents
    assert emap is not None
    for lblk, pblk, n in io.placements:
        emap.map(lblk, pblk, n)
    emap.mark_written(io.first, io.count)
    for page, mask in io.blocks:
        page.allocated |= mask
    fs.cache.counters["writeback_pages"] += io.count
    if io.placements:
        fs.mark_changed()
    io.finished = True
    fs.cache.end_writeback(mapping, io.blocks, failed=False)


def _fail(fs: Filesystem, mapping: Mapping, io: _RunIO, error: FsError | None) -> None:
    """Undo what the run did to the allocator and the reservations and leave its
    blocks dirty; ``error`` (None when cancelled) is recorded for fsync."""
    cache = fs.cache
    emap = mapping.inode.extents
    assert emap is not None
    for pblk, n in io.new_runs:
        fs.alloc.free_now(pblk, n)
    # Blocks whose reservation the run consumed take one again; if there is no
    # space left they stay unreserved (and dirty).
    for page, mask in io.blocks:
        for i in range(page.nblocks):
            bit = 1 << i
            if mask & page.allocated & bit and emap.pblk_of(page.index + i) is None:
                page.allocated &= ~bit
                with contextlib.suppress(FsError):
                    cache.reserve(page, bit)
    io.finished = True
    cache.end_writeback(mapping, io.blocks, failed=True)
    if error is None:
        return
    cache.counters["writeback_errors"] += 1
    mapping.wb_failures += 1
    if mapping.error is None:
        mapping.error = error
    ino, first, count = mapping.inode.ino, io.first, io.count
    if isinstance(error, NoSpace):
        log.error("writeback: inode %d: ENOSPC, %d block(s) stay dirty", ino, count)
    else:
        log.error("writeback: inode %d blocks %d+%d: %s", ino, first, count, error)


def _hint(fs: Filesystem, ino: int, lblk: int) -> int | None:
    inode = fs.ns.inodes.get(ino)
    if inode is None or inode.extents is None or lblk == 0:
        return None
    prev = inode.extents.pblk_of(lblk - 1)
    return None if prev is None else prev + 1


def _holes(first: int, count: int, mapped: list[Extent]) -> list[tuple[int, int]]:
    """The (lblk, n) stretches of [first, first + count) outside the ``mapped``
    extents (ascending, clipped to it)."""
    holes: list[tuple[int, int]] = []
    pos = first
    for ext in mapped:
        if ext.start > pos:
            holes.append((pos, ext.start - pos))
        pos = ext.start + ext.length
    if pos < first + count:
        holes.append((pos, first + count - pos))
    return holes


def _mask_of(page: Page, stretches: list[tuple[int, int]]) -> int:
    """The bits of ``page``'s blocks in the (lblk, n) ``stretches``."""
    mask = 0
    for lblk, n in stretches:
        mask |= page.mask(lblk, lblk + n)
    return mask


async def balance_dirty_pages(fs: Filesystem) -> None:
    """Throttle a writer while the dirty limit is exceeded.

    The writer does writeback itself (the oldest dirty mapping first) rather
    than only waiting for the flusher: that bounds dirty memory even when no
    flusher runs, and makes heavy writers pay for their own writeback.
    """
    cache = fs.cache
    if cache.nr_dirty < cache.dirty_limit:
        return
    cache.counters["throttled"] += 1
    while cache.nr_dirty >= cache.dirty_limit:
        cache.kick.set()
        mapping = next(iter(cache.dirty_mappings), None)
        if mapping is None:
            await cache.wait_cleaned()  # everything is under writeback already
            continue
        before = cache.nr_dirty
        try:
            # A bounded share, oldest mapping first: the writer pays for some
            # writeback, not for the whole cache's.
            await writeback_cyclic(fs, mapping, THROTTLE_BATCH)
        except FsError as e:  # recorded on the mapping for fsync
            log.debug("balance_dirty_pages: %s", e)
        if cache.nr_dirty >= before:
            # No progress (the device fails): let the writer through rather
            # than block it forever; the error reaches it through fsync.
            return


async def flusher(fs: Filesystem, *, interval: float = 0.5) -> None:
    """Background writeback until cancelled: pages dirty for longer than
    DIRTY_EXPIRE_SECONDS, or everything while over the background threshold."""
    cache = fs.cache
    while True:
        with trio.move_on_after(interval):
            await cache.kick.wait()
        cache.kick = trio.Event()
        deadline = time.monotonic() - DIRTY_EXPIRE_SECONDS
        for mapping in list(cache.dirty_mappings):
            pressure = cache.nr_dirty >= cache.background_limit
            if not pressure and mapping.dirtied_when > deadline:
                continue
            try:
                await writeback_cyclic(fs, mapping, _END)
            except FsError as e:  # recorded on the mapping already
                log.debug("flusher: %s", e)


# helpers for BLOCK holders:


async def write_and_drop(
    fs: Filesystem, mapping: Mapping, first: int, end: int | None, *, what: str
) -> None:
    """Write back, wait for, and drop the pages of [first, end); the data stays.

    Caller must hold the mapping's BLOCK side: nothing can add a page to the
    range between the drop and the caller's change to the mapping.  A dirty
    page is never dropped unwritten: when writeback of the range fails, this
    raises the writeback's error (naming ``what`` was about to change) before
    anything is dropped, and the dirty pages stay for fsync to report.
    """
    await writeback_range(fs, mapping, first, end, wait=True)
    stop = _END if end is None else end
    if mapping.dirty_in(first, stop):
        error = mapping.error
        code = error.code if isinstance(error, FsError) else errno.EIO
        raise FsError(
            f"{what}: inode {mapping.inode.ino}: writeback before the change failed "
            f"({error}); nothing changed",
            errno=code,
        )
    # Between write back and drop: only an ADD holder could dirty a page here,
    # and with the lock on there is none.
    await race_fault("block_after_writeback")
    await wait_writeback(mapping, first, end)
    fs.cache.drop_range(mapping, first, end, discard_dirty=True)


async def discard(fs: Filesystem, mapping: Mapping, first: int, end: int | None) -> None:
    """Drop the pages of [first, end), dirty ones included, once writeback there is done.

    Caller must hold the mapping's BLOCK side.
    """
    await wait_writeback(mapping, first, end)
    fs.cache.drop_range(mapping, first, end, discard_dirty=True)
