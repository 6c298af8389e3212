"""Readahead: per open file, sequential detection and asynchronous prefetch.

Locks: the mapping's pagecache lock, ADD side, taken with `add_tryget` — readahead
is speculative, so it gives up rather than wait when a BLOCK holder holds or
waits for the lock (truncate, fallocate, direct write are never delayed by it).
No inode lock.

State per open file (`ReadaheadState`): where the last read ended and the
current window.  A read that starts where the previous one ended is sequential:
the window doubles (from 4 pages up to 256 = 1 MiB at 4 KiB) and the pages
after the read, up to the window, are prefetched by a background task, unless
they are cached already or a prefetch is still in flight there.  A random read
resets the window.

Pages brought in by readahead are flagged; the first read of one counts as
*used*, dropping or evicting one unread counts as *wasted*.

The ``readahead_before_insert`` race site sits between reading the blocks and
inserting the pages (races 1 and 4 of DESIGN §3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusefs.errors import FsError

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem, Handle
    from fusefs.pagecache import Mapping

log = logging.getLogger(__name__)

MIN_WINDOW = 4
MAX_WINDOW = 256


@dataclass
class ReadaheadState:
    next_index: int = -1  # where a sequential read would start
    window: int = 0
    inflight_end: int = 0  # prefetch in flight up to here (exclusive)


def on_read(fs: Filesystem, handle: Handle, mapping: Mapping, first: int, last: int) -> None:
    """Called after a buffered read of pages [first, last]; may start a prefetch."""
    ra = handle.readahead
    if not fs.readahead_enabled:
        return
    if first != ra.next_index and not (first == 0 and ra.next_index == -1):
        # A seek: start over (a prefetch still in flight finishes on its own).
        ra.next_index = last + 1
        ra.window = 0
        ra.inflight_end = 0
        return
    ra.next_index = last + 1
    ra.window = min(MAX_WINDOW, max(MIN_WINDOW, ra.window * 2))
    start = max(last + 1, ra.inflight_end)
    eof_pages = -(-handle.inode.size // fs.block_size)
    stop = min(last + 1 + ra.window, eof_pages)
    if start >= stop:
        return
    # Skip what is cached already at the front of the window.
    while start < stop and start in mapping.pages:
        start += 1
    if start >= stop:
        return
    ra.inflight_end = stop
    fs.spawn(prefetch(fs, mapping, start, stop))


async def prefetch(fs: Filesystem, mapping: Mapping, start: int, stop: int) -> None:
    """Fill the missing pages of [start, stop) if the ADD side can be had now."""
    from fusefs.io.buffered import fill_pages

    cache = fs.cache
    if not mapping.lock.add_tryget():
        cache.counters["readahead_abandoned"] += stop - start
        return
    cache.readahead_inflight += 1
    try:
        index = start
        while index < stop:
            if index in mapping.pages:
                index += 1
                continue
            end = index + 1
            while end < stop and end not in mapping.pages:
                end += 1
            await fill_pages(fs, mapping, index, end - index, readahead_pages=True)
            index = end
    except FsError as e:
        # Speculative: a failed prefetch only costs the read that needs the page.
        log.debug("readahead of inode %d failed: %s", mapping.inode.ino, e)
    finally:
        cache.readahead_inflight -= 1
        mapping.lock.add_put()
