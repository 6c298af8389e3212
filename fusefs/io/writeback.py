"""Writeback: dirty pages to the device, blocks allocated for reserved pages.

Locks: none (DESIGN §3).  Writeback marks the pages it writes *under writeback*
and BLOCK holders wait for that (`wait_writeback`) before they drop pages or
change the mapping in their range; that is what lets writeback run without the
inode lock and without the pagecache lock.

One run of contiguous dirty pages is written at a time:

1. the pages are marked under writeback (no longer dirty; a write that comes
   in meanwhile dirties them again) and their contents are copied;
2. the extent map is consulted: pages over mapped blocks are written in place
   (an unwritten extent becomes written); pages over holes get blocks
   allocated — from the cache's reservation for ``RESERVED`` pages, so this
   cannot fail with ENOSPC;
3. only after the device write are new blocks mapped (data before metadata).

A page over a hole that is *not* reserved is the state of race 6 in DESIGN §3:
the cache believed the block allocated, the block was punched, and the write
that dirtied the page took no reservation.  Writeback then has to allocate
without a reservation; it counts that in ``writeback_unreserved`` and, if the
filesystem is full, fails with ENOSPC — data the write() call already
acknowledged is lost.  The pagecache add lock keeps that state from arising.

A failed run leaves its pages dirty and records the error on the mapping, so
the next fsync of the file reports it (and later ones do not).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import trio

from fusefs.alloc import Run
from fusefs.errors import FsError, NoSpace
from fusefs.faults import race_fault
from fusefs.pagecache import (
    ALLOCATED,
    DIRTY_EXPIRE_SECONDS,
    RESERVED,
    UNALLOCATED,
    Mapping,
    Page,
)

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem

log = logging.getLogger(__name__)

MAX_RUN_PAGES = 256  # 1 MiB at 4 KiB pages: one device write
THROTTLE_BATCH = 1024  # pages a throttled writer writes back per round


def _dirty_runs(mapping: Mapping, first: int, end: int) -> list[list[Page]]:
    """The dirty pages of [first, end) not under writeback, in contiguous runs."""
    runs: list[list[Page]] = []
    for page in mapping.range(first, end):
        if not page.dirty or page.writeback:
            continue
        if runs and runs[-1][-1].index + 1 == page.index and len(runs[-1]) < MAX_RUN_PAGES:
            runs[-1].append(page)
        else:
            runs.append([page])
    return runs


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
    stop = end if end is not None else 1 << 62
    budget = max_pages if max_pages is not None else 1 << 62
    for run in _dirty_runs(mapping, first, stop):
        if budget <= 0:
            break
        budget -= len(run)
        while run:
            # While earlier runs were written, pages of this one may have been
            # dropped, or taken by another writeback (an fsync, a direct
            # read's): what is left may have gaps, and _write_run needs
            # contiguous pages, so write it piece by piece.
            run = [p for p in run if p.dirty and not p.writeback and mapping.get(p.index) is p]
            n = 1
            while n < len(run) and run[n].index == run[n - 1].index + 1:
                n += 1
            if run:
                await _write_run(fs, mapping, run[:n])
            run = run[n:]
    if wait:
        await wait_writeback(mapping, first, stop)


async def wait_writeback(mapping: Mapping, first: int, end: int | None) -> None:
    """Wait until no page of [first, end) is under writeback."""
    stop = end if end is not None else 1 << 62
    while mapping.nr_writeback and any(p.writeback for p in mapping.range(first, stop)):
        await mapping.writeback_done.wait()


async def _write_run(fs: Filesystem, mapping: Mapping, run: list[Page]) -> None:
    # Caller passes contiguous pages (index, index + 1, ...), dirty, not under writeback.
    cache = fs.cache
    bs = fs.block_size
    inode = mapping.inode
    emap = inode.extents
    assert emap is not None
    for page in run:
        cache.start_writeback(page)
    data = b"".join(page.data for page in run)
    first = run[0].index
    count = len(run)
    cache.counters["writeback_runs"] += 1
    new_runs: list[Run] = []
    failed = True
    try:
        await race_fault("writeback_before_lookup")
        # Which blocks are mapped now?  Holes need blocks.
        holes = [p for p in run if emap.pblk_of(p.index) is None]
        reserved = [p for p in holes if p.space == RESERVED]
        unreserved = len(holes) - len(reserved)
        if unreserved:
            cache.counters["writeback_unreserved"] += unreserved
            log.error(
                "writeback: inode %d: %d page(s) over holes without a reservation",
                inode.ino,
                unreserved,
            )
        if holes:
            hint = _hint(fs, inode.ino, first)
            if reserved:
                new_runs += fs.alloc.allocate(
                    len(reserved), reservation=cache.reservation, hint=hint
                )
                for p in reserved:
                    cache.allocated(p)  # the reservation was consumed by allocate
            if unreserved:
                new_runs += fs.alloc.allocate(unreserved, hint=hint)
        placements = _place(holes, new_runs)
        # Mapped blocks in place; new blocks where the holes were.
        for ext in emap.extents(first, first + count):
            assert ext.pblk is not None
            pos = (ext.start - first) * bs
            await fs.dev.write(ext.pblk, data[pos : pos + ext.length * bs])
        for lblk, pblk, n in placements:
            pos = (lblk - first) * bs
            await fs.dev.write(pblk, data[pos : pos + n * bs])
        await race_fault("writeback_before_map")
        for lblk, pblk, n in placements:
            emap.map(lblk, pblk, n)
        emap.mark_written(first, count)
        for p in run:
            p.space = ALLOCATED
        failed = False
        cache.counters["writeback_pages"] += count
        if placements:
            fs.mark_changed()
    except BaseException as e:
        # Undo what the run did to the allocator and the reservations, whether
        # it failed or was cancelled (unmount stops the flusher mid-run).
        for pblk, n in new_runs:
            fs.alloc.free_now(pblk, n)
        # Pages whose reservation the run consumed take one again; if there is
        # no space left they stay unreserved (and dirty).
        for p in run:
            if p.space == ALLOCATED and emap.pblk_of(p.index) is None:
                p.space = UNALLOCATED
                with contextlib.suppress(FsError):
                    cache.reserve(p)
        if not isinstance(e, FsError):
            raise
        cache.counters["writeback_errors"] += 1
        if mapping.error is None:
            mapping.error = e
        if isinstance(e, NoSpace):
            log.error("writeback: inode %d: ENOSPC, %d page(s) stay dirty", inode.ino, count)
        else:
            log.error("writeback: inode %d blocks %d+%d: %s", inode.ino, first, count, e)
    finally:
        for page in run:
            cache.end_writeback(page, failed=failed)


def _hint(fs: Filesystem, ino: int, lblk: int) -> int | None:
    inode = fs.ns.inodes.get(ino)
    if inode is None or inode.extents is None or lblk == 0:
        return None
    prev = inode.extents.pblk_of(lblk - 1)
    return None if prev is None else prev + 1


def _place(holes: list[Page], runs: list[Run]) -> list[tuple[int, int, int]]:
    """Lay physical runs over the hole pages (sorted): (lblk, pblk, n) pieces."""
    out: list[tuple[int, int, int]] = []
    it = iter(runs)
    rp, rn = 0, 0
    for page in holes:
        if rn == 0:
            rp, rn = next(it)
        if out and out[-1][0] + out[-1][2] == page.index and out[-1][1] + out[-1][2] == rp:
            lblk, pblk, n = out[-1]
            out[-1] = (lblk, pblk, n + 1)
        else:
            out.append((page.index, rp, 1))
        rp += 1
        rn -= 1
    return out


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
            await writeback_range(fs, mapping, wait=False, max_pages=THROTTLE_BATCH)
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
            if not pressure and not any(
                p.dirty and p.dirtied_at <= deadline for p in mapping.pages.values()
            ):
                continue
            try:
                await writeback_range(fs, mapping, wait=False)
            except FsError as e:  # recorded on the mapping already
                log.debug("flusher: %s", e)


# helpers for BLOCK holders:


async def write_and_drop(fs: Filesystem, mapping: Mapping, first: int, end: int | None) -> None:
    """Write back, wait for, and drop the pages of [first, end); the data stays.

    Caller must hold the mapping's BLOCK side: nothing can add a page to the
    range between the drop and the caller's change to the mapping.
    """
    await writeback_range(fs, mapping, first, end, wait=True)
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
