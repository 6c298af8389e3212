"""Readahead: per open file, sequential detection and asynchronous prefetch.

Locks: the mapping's pagecache lock, ADD side, taken with `add_tryget` — readahead
is speculative, so it gives up rather than wait when a BLOCK holder holds or
waits for the lock (truncate, fallocate, direct write are never delayed by it).
No inode lock.

State per open file (`ReadaheadState`): where the last read ended, the current
window and how far prefetching has been started.  A read that starts in the page
where the previous one ended, or in the next, is sequential (FUSE hands a 1 MiB
``read()`` over as 1 MiB - 16 bytes and then 16 bytes, so byte-contiguous reads
share a page): the window doubles (from 4 pages, or twice the read, up to
512 = 2 MiB at 4 KiB).  Prefetching runs ahead of the reader asynchronously, as the
kernel's async readahead does: once what is prefetched ahead of the read is
less than three quarters of the window, the next stretch up to a full window
ahead is started by a background task, so the device sees few, large reads,
always some in flight, and the reader finds its pages in (or on their way: a
read that reaches pages whose prefetch is still in flight waits for it instead
of reading them again).  A stream's prefetches read the image one after the
other in file order (`ReadaheadState.serial`): reads of the image in flight
together and out of order look random to the host's own readahead, which then
stops reading ahead of them.  A random read resets the window.

Pages brought in by readahead are flagged; the first read of one counts as
*used*, dropping or evicting one unread counts as *wasted*.

The ``readahead_before_insert`` race site sits between reading the blocks and
inserting the pages (races 1 and 4 of DESIGN §3).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from fusefs.errors import FsError

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem, Handle
    from fusefs.pagecache import Fill, Mapping

log = logging.getLogger(__name__)

_NO_LOCK: Final = contextlib.nullcontext()

MIN_WINDOW = 4
MAX_WINDOW = 512
FILL_PAGES = 256  # pages one prefetch read brings in: 1 MiB at 4 KiB


@dataclass
class ReadaheadState:
    next_index: int = -1  # where a sequential read would start
    window: int = 0
    inflight_end: int = 0  # prefetch in flight up to here (exclusive)
    # The stream's prefetches read the device one after the other, in the
    # order they were started (see `prefetch`).
    serial: trio.Lock = field(default_factory=trio.Lock)


def on_read(fs: Filesystem, handle: Handle, mapping: Mapping, first: int, last: int) -> None:
    """Called after a buffered read of pages [first, last]; may start a prefetch."""
    ra = handle.readahead
    if not fs.readahead_enabled:
        return
    if ra.next_index - 1 == first == last:
        return  # within the page the last read ended in: nothing new
    if first not in (ra.next_index, ra.next_index - 1) and not (first == 0 and ra.next_index == -1):
        # A seek: start over (a prefetch still in flight finishes on its own).
        ra.next_index = last + 1
        ra.window = 0
        ra.inflight_end = 0
        return
    ra.next_index = last + 1
    # Doubles each sequential read, starting from twice the read's own size
    # (the kernel's initial window for a large read).
    ra.window = min(MAX_WINDOW, max(MIN_WINDOW, ra.window * 2, 2 * (last + 1 - first)))
    ahead = ra.inflight_end - (last + 1)
    if ahead >= ra.window * 3 // 4:
        return  # enough in flight ahead of the reader
    start = max(last + 1, ra.inflight_end)
    eof_pages = -(-handle.inode.size // fs.block_size)
    stop = min(last + 1 + ra.window, eof_pages)
    # Skip what is cached already at the front of the window.
    while start < stop and (page := mapping.pages.get(start)) is not None:
        start = page.end
    if start >= stop:
        return
    ra.inflight_end = stop
    fs.spawn(prefetch(fs, mapping, start, stop, ra.serial))


async def prefetch(
    fs: Filesystem, mapping: Mapping, start: int, stop: int, serial: trio.Lock | None = None
) -> None:
    """Fill the missing pages of [start, stop) if the ADD side can be had now.

    ``serial``: the stream's lock, taken (in the order the prefetches were
    started: trio's locks are fair) around the device reads, after the pieces
    are registered -- so that a reader waits for them rather than reading them
    itself, and the image file sees one sequential reader.
    """
    cache = fs.cache
    if cache.mappings.get(mapping.inode.ino) is not mapping:
        # Retired while this task waited to start (the file was closed and its
        # pages evicted): nobody reads through it any more.
        cache.counters["readahead_abandoned"] += stop - start
        return
    if not mapping.lock.add_tryget():
        cache.counters["readahead_abandoned"] += stop - start
        return
    cache.readahead_inflight += 1
    fills: list[Fill] = []
    try:
        # Register every piece first, so a reader that gets ahead of this task
        # waits for the piece instead of reading it again.
        index = start
        while index < stop:
            page = mapping.pages.get(index)
            if page is not None:
                index = page.end
                continue
            if mapping.fill_at(index) is not None:
                index += 1
                continue
            # Up to the next cached page or fill in flight, at most FILL_PAGES.
            end = min(index + FILL_PAGES, stop)
            end = mapping.pages.first_present(index, mapping.next_fill(index, end))
            fills.append(mapping.start_fill(index, end))
            index = end
        # The pieces go down one after the other, in file order: reads of
        # one image file in flight together and out of order look random to
        # the host's own readahead, which then stops reading ahead (a cold
        # sequential read ran at 0.32 GB/s that way, 1.3 GB/s in order).
        async with serial if serial is not None else _NO_LOCK:
            for fill in fills:
                await _fill_piece(fs, mapping, fill)
    finally:
        for fill in fills:
            mapping.end_fill(fill)  # the ones not reached (failure, cancellation)
        cache.readahead_inflight -= 1
        mapping.lock.add_put()


async def _fill_piece(fs: Filesystem, mapping: Mapping, fill: Fill) -> None:
    from fusefs.io.buffered import fill_pages

    try:
        await fill_pages(
            fs, mapping, fill.first, fill.end - fill.first, readahead_pages=True, fill=fill
        )
    except FsError as e:
        # Speculative: a failed prefetch only costs the read that needs the page.
        log.debug("readahead of inode %d failed: %s", mapping.inode.ino, e)
