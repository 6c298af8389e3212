"""The page cache: pages, per-inode mappings, LRU, dirty accounting, reservations.

fusefs keeps its own page cache (the kernel's is bypassed with FUSE
``direct_io``, DESIGN §2).  A `Page` is one block of one file; a `Mapping` is
one inode's pages, indexed by block number in a `PageIndex` (chunked, ordered) so that range
operations (write back, drop) cost the pages in the range, not the file.  Each
mapping carries the inode's `PagecacheLock` — the pagecache add lock, the
kernel's ``mapping->invalidate_lock``.

Only pages whose contents are valid are ever in a mapping: a read fills its
buffers first and inserts afterwards (so there are no locked, not-yet-uptodate
pages to wait on).  That insert, after an ``await``, is exactly where a page
with stale contents could get in while a truncate, punch or shift changes the
mapping underneath: the ADD side held across fill-and-insert, against the BLOCK
side held across drop-and-change, is what keeps them apart.

Per-page state:

* ``dirty`` — newer than the block on disk; not evictable.
* ``writeback`` — being written; BLOCK holders wait for it (`wait_writeback`).
* ``space`` — the state of the page's block: ``UNALLOCATED`` (a hole, nothing
  promised), ``RESERVED`` (a hole, with one block of the cache's reservation
  held for it, so writeback cannot hit ENOSPC), ``ALLOCATED`` (the extent map
  has a block behind it).  The invariant the tests check: the cache's
  reservation holds exactly one block per ``RESERVED`` page.
* ``readahead`` — brought in by readahead and not yet read (used/wasted counts).

Memory: a global limit (``cache_size``) with LRU eviction of clean pages not
under writeback; a dirty limit (half the cache) at which writers wait for
writeback, and a background threshold (a quarter) at which the flusher starts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import trio

from fusefs.alloc import Allocator, Reservation
from fusefs.faults import alloc_pages
from fusefs.locking import PagecacheLock
from fusefs.pageindex import PageIndex

if TYPE_CHECKING:
    from fusefs.inode import Inode

UNALLOCATED: Final = 0
RESERVED: Final = 1
ALLOCATED: Final = 2
SPACE_NAMES: Final = {UNALLOCATED: "unallocated", RESERVED: "reserved", ALLOCATED: "allocated"}

DEFAULT_CACHE_SIZE: Final = 64 << 20
MIN_CACHE_SIZE: Final = 1 << 20
DIRTY_EXPIRE_SECONDS: Final = 2.0


@final
class Page:
    """One block of one file, resident in the cache."""

    __slots__ = (
        "data",
        "dirty",
        "index",
        "mapping",
        "readahead",
        "space",
        "uptodate",
        "writeback",
    )

    def __init__(self, mapping: Mapping, index: int, data: bytearray, space: int) -> None:
        self.mapping = mapping
        self.index = index
        self.data = data
        self.uptodate = True
        self.dirty = False
        self.writeback = False
        self.space = space
        self.readahead = False

    def __repr__(self) -> str:
        flags = [n for n in ("dirty", "writeback", "readahead") if getattr(self, n)]
        return (
            f"<Page ino={self.mapping.inode.ino} index={self.index} "
            f"{SPACE_NAMES[self.space]} {' '.join(flags)}>"
        )


@final
class Fill:
    """A fill in flight over [first, end): blocks being read, pages not yet in.

    A page created in that range after the fill began (by a write) and then
    evicted leaves no trace in the mapping, so the fill would insert data
    older than what the cache already handed out.  Eviction marks such
    indices ``stale`` and the fill does not insert them — the job the kernel
    does by inserting locked pages before the read.
    """

    __slots__ = ("done", "end", "first", "stale")

    def __init__(self, first: int, end: int) -> None:
        self.first = first
        self.end = end
        self.stale: set[int] = set()
        self.done = trio.Event()  # set once its pages are in (or it gave up)


#: The add lock's cumulative counters, kept across retired mappings.
_LOCK_COUNTERS: Final = (
    "add_waits",
    "block_waits",
    "add_wait_seconds",
    "block_wait_seconds",
    "tryget_failures",
)


@final
class Mapping:
    """One inode's pages and its pagecache add lock."""

    def __init__(self, cache: PageCache, inode: Inode, *, lock_enabled: bool = True) -> None:
        self.cache = cache
        self.inode = inode
        self.pages: PageIndex[Page] = PageIndex()
        self.lock = PagecacheLock(enabled=lock_enabled)
        self.nr_dirty = 0
        self.nr_writeback = 0
        self.nr_reserved = 0  # RESERVED pages: counted in st_blocks like delalloc
        # When the mapping last went from clean to dirty (the kernel's
        # inode->dirtied_when): the flusher's age test.
        self.dirtied_when = 0.0
        # Where background and throttled writeback go on from (the kernel's
        # writeback_index): they walk the file cyclically, not from 0 each time.
        self.wb_index = 0
        # Signalled whenever a page of this mapping finishes writeback.
        self.writeback_done = trio.Event()
        self.fills: list[Fill] = []  # fills in flight (see Fill)
        # The first writeback error not yet reported by fsync (errseq-like),
        # and how many runs have failed.
        self.error: Exception | None = None
        self.wb_failures = 0

    def __repr__(self) -> str:
        return (
            f"<Mapping ino={self.inode.ino} pages={len(self.pages)} dirty={self.nr_dirty} "
            f"writeback={self.nr_writeback} lock={self.lock!r}>"
        )

    def get(self, index: int) -> Page | None:
        return self.pages.get(index)

    def fill_at(self, index: int) -> Fill | None:
        """The fill in flight over ``index``, if any."""
        for fill in self.fills:
            if fill.first <= index < fill.end:
                return fill
        return None

    def next_fill(self, index: int, stop: int) -> int:
        """Where the first fill in flight starting in (index, stop) starts, or ``stop``."""
        for fill in self.fills:
            if index < fill.first < stop:
                stop = fill.first
        return stop

    def start_fill(self, first: int, end: int) -> Fill:
        """Register a fill of [first, end) about to begin (see `Fill`)."""
        fill = Fill(first, end)
        self.fills.append(fill)
        return fill

    def end_fill(self, fill: Fill) -> None:
        """The fill is over (its pages are in, or it failed); wake its waiters."""
        if fill in self.fills:
            self.fills.remove(fill)
        fill.done.set()

    def range(self, first: int, end: int) -> Iterator[Page]:
        """The resident pages with first <= index < end, in order."""
        if end <= first:
            return iter(())
        return iter(list(self.pages.values_in(first, end - 1)))


@dataclass(frozen=True, slots=True)
class PageCacheStatistics:
    pages: int
    memory_bytes: int
    limit_bytes: int
    dirty: int
    writeback: int
    reserved_pages: int
    reservation_blocks: int
    hits: int
    misses: int
    readahead_issued: int
    readahead_used: int
    readahead_wasted: int
    readahead_abandoned: int
    evictions: int
    writeback_pages: int
    writeback_runs: int
    writeback_errors: int
    writeback_unreserved: int
    throttled: int


@final
class PageCache:
    """All mappings, the LRU of clean pages, and the dirty/reservation accounting."""

    def __init__(
        self, block_size: int, alloc: Allocator, *, limit_bytes: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.block_size = block_size
        self.alloc = alloc
        self._set_limits(limit_bytes)
        self.lock_enabled = True
        self.mappings: dict[int, Mapping] = {}
        # The wait counters of the add locks of retired mappings (`retire_if_idle`),
        # so that the lock statistics stay cumulative.
        self.retired_lock_totals: dict[str, float] = {}
        self.nr_pages = 0
        self.nr_dirty = 0
        self.nr_writeback = 0
        self.nr_reserved = 0
        # Clean, idle pages in least-recently-used order (dict order).
        self.lru: OrderedDict[Page, None] = OrderedDict()
        # One reservation for every RESERVED page: one block each.
        self.reservation: Reservation = alloc.reserve(0)
        self.dirty_mappings: dict[Mapping, None] = {}
        # Woken when dirty pages become clean (writers throttled on the limit wait on it).
        self._cleaned = trio.Event()
        self.kick = trio.Event()  # wakes the flusher
        self.readahead_inflight = 0
        self.counters = dict.fromkeys(
            (
                "hits",
                "misses",
                "readahead_issued",
                "readahead_used",
                "readahead_wasted",
                "readahead_abandoned",
                "fill_stale",
                "evictions",
                "writeback_pages",
                "writeback_runs",
                "writeback_errors",
                "writeback_unreserved",
                "throttled",
            ),
            0,
        )

    def __repr__(self) -> str:
        return f"<PageCache pages={self.nr_pages}/{self.max_pages} dirty={self.nr_dirty}>"

    def _set_limits(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.max_pages = max(16, limit_bytes // self.block_size)
        self.dirty_limit = max(8, self.max_pages // 2)
        self.background_limit = max(4, self.max_pages // 4)

    def set_limit(self, limit_bytes: int) -> int:
        """Change ``cache_size`` while mounted (``.fusefs/cache_size``): clean
        pages over the new limit are evicted at once, dirty ones as writeback
        cleans them (writers throttle on the new dirty limit).  Returns the
        pages evicted."""
        self._set_limits(limit_bytes)
        if self.nr_dirty >= self.background_limit:
            self.kick.set()
        if self.nr_pages > self.max_pages:
            return self.evict(self.nr_pages - self.max_pages)
        return 0

    def statistics(self) -> PageCacheStatistics:
        c = self.counters
        return PageCacheStatistics(
            pages=self.nr_pages,
            memory_bytes=self.nr_pages * self.block_size,
            limit_bytes=self.limit_bytes,
            dirty=self.nr_dirty,
            writeback=self.nr_writeback,
            reserved_pages=self.nr_reserved,
            reservation_blocks=self.reservation.remaining,
            hits=c["hits"],
            misses=c["misses"],
            readahead_issued=c["readahead_issued"],
            readahead_used=c["readahead_used"],
            readahead_wasted=c["readahead_wasted"],
            readahead_abandoned=c["readahead_abandoned"],
            evictions=c["evictions"],
            writeback_pages=c["writeback_pages"],
            writeback_runs=c["writeback_runs"],
            writeback_errors=c["writeback_errors"],
            writeback_unreserved=c["writeback_unreserved"],
            throttled=c["throttled"],
        )

    # mappings:

    def mapping(self, inode: Inode) -> Mapping:
        m = self.mappings.get(inode.ino)
        if m is None:
            m = Mapping(self, inode, lock_enabled=self.lock_enabled)
            self.mappings[inode.ino] = m
        return m

    def set_lock_enabled(self, enabled: bool) -> None:
        """Switch the pagecache add lock on or off for every inode (demonstration only)."""
        self.lock_enabled = enabled
        for m in self.mappings.values():
            m.lock.enabled = enabled

    def retire_if_idle(self, m: Mapping) -> bool:
        """Forget ``m`` if it holds nothing and nothing can be using it: no
        page, fill or writeback error, its add lock and its inode idle (no open
        handle, inode lock free).  Every path that uses a mapping holds a handle
        or takes the inode lock or the add lock before its first yield, so
        the next one makes a new mapping.  An idle inode then costs no mapping,
        page index or lock (about 2 KiB each)."""
        if (
            m.pages
            or m.nr_dirty
            or m.nr_writeback
            or m.nr_reserved
            or m.fills
            or m.error is not None
            or not m.lock.idle()
            or not m.inode.idle()
            or self.mappings.get(m.inode.ino) is not m
        ):
            return False
        del self.mappings[m.inode.ino]
        self.dirty_mappings.pop(m, None)
        totals = self.retired_lock_totals
        st = m.lock.statistics()
        for key in _LOCK_COUNTERS:
            totals[key] = totals.get(key, 0) + getattr(st, key)
        m.inode.drop_lock_if_idle()
        return True

    def forget_mapping(self, inode: Inode) -> None:
        """The inode is gone: drop every page (dirty ones too) and the mapping."""
        m = self.mappings.pop(inode.ino, None)
        if m is not None:
            self.drop_range(m, 0, None, discard_dirty=True)

    # pages:

    def new_page(self, mapping: Mapping, index: int, space: int) -> Page:
        """A zeroed page, not yet inserted (memory fault site ``pagecache_page``)."""
        return self.new_pages(mapping, index, 1, space)[0]

    def new_pages(
        self, mapping: Mapping, first: int, count: int, space: int, data: memoryview | None = None
    ) -> list[Page]:
        """Pages for [first, first + count), not yet inserted: zeroed, or
        holding ``data`` (``count`` blocks of it).  Each page's allocation is a
        hit of the memory fault site ``pagecache_page``."""
        buffers = alloc_pages("pagecache_page", self.block_size, count, init=data)
        return [Page(mapping, first + i, buf, space) for i, buf in enumerate(buffers)]

    def insert(self, page: Page) -> Page:
        """Insert a filled page unless one is there already; return the resident one.

        Caller must hold the mapping's ADD side (or BLOCK, when it is the one
        changing the range).
        """
        pages = page.mapping.pages
        existing: Page | None = pages.get(page.index)
        if existing is not None:
            # One copy stays.  Keep readahead_issued == used + wasted + pages
            # still flagged: a prefetched copy that loses is dropped unread; a
            # prefetched page that wins goes to a read or write that uses it.
            if page.readahead:
                self.counters["readahead_wasted"] += 1
            elif existing.readahead:
                existing.readahead = False
                self.counters["readahead_used"] += 1
            return existing
        pages[page.index] = page
        self.nr_pages += 1
        # Make room before the new page joins the LRU: when every other page is
        # dirty or under writeback it would be the only candidate, and a write
        # would then dirty a page no longer in the cache.  Over the limit until
        # writeback catches up, then.
        if self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)
        self.lru[page] = None
        return page

    def insert_filled(
        self, mapping: Mapping, pages: list[Page], *, keep: bool = False
    ) -> list[Page]:
        """`insert` for a fill's pages (clean, ascending indices): returns the
        resident page at each index, the new one or one that got there first.

        With ``keep`` room is made from older pages only, before the new ones
        join the LRU (as `insert` does), and the cache stays over its limit
        when there is not enough: a writer's read-modify-write fill is about to
        dirty its page, and a page evicted before that would take the write
        with it.
        """
        index = mapping.pages
        if not pages:
            return []
        first = pages[0].index
        consecutive = pages[-1].index - first == len(pages) - 1
        if consecutive:
            present = index.get_run(first, len(pages))
        else:  # a fill with stale pages left out
            present = [index.get(page.index) for page in pages]
        if consecutive and present.count(None) == len(pages):  # the usual case
            index.set_run(first, pages)
            added = resident = pages
        else:
            counters = self.counters
            resident = []
            added = []
            for page, existing in zip(pages, present, strict=True):
                if existing is None:
                    index[page.index] = page
                    added.append(page)
                    resident.append(page)
                    continue
                if page.readahead:  # see insert
                    counters["readahead_wasted"] += 1
                elif existing.readahead:
                    existing.readahead = False
                    counters["readahead_used"] += 1
                resident.append(existing)
        self.nr_pages += len(added)
        lru = self.lru
        if keep and self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)  # before the new pages join the LRU
        for page in added:
            lru[page] = None
        # Older pages go first; a fill bigger than the room left evicts its own
        # first pages too (clean: the caller still has them for its read).
        if not keep and self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)
        return resident

    def insert_dirty(self, mapping: Mapping, pages: list[Page]) -> None:
        """Insert new pages a write has just filled, dirty, none of them cached.

        Caller must hold the mapping's ADD side, with no await since it
        checked that the indices are free.
        """
        if not pages:
            return
        index = mapping.pages
        for page in pages:
            page.dirty = True
        if pages[-1].index - pages[0].index == len(pages) - 1:
            index.set_run(pages[0].index, pages)
        else:
            for page in pages:
                index[page.index] = page
        n = len(pages)
        self.nr_pages += n
        if not mapping.nr_dirty:
            mapping.dirtied_when = time.monotonic()
            self.dirty_mappings[mapping] = None
        mapping.nr_dirty += n
        self.nr_dirty += n
        if self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)
        if self.nr_dirty >= self.background_limit:
            self.kick.set()

    def touch(self, page: Page) -> None:
        """A hit: count it and move the page to the young end of the LRU."""
        self.touch_pages([page])

    def touch_pages(self, pages: list[Page]) -> None:
        """Hits on several pages: count them, count the first use of prefetched
        ones, and move them to the young end of the LRU."""
        self.counters["hits"] += len(pages)
        lru = self.lru
        used = 0
        for page in pages:
            if page.readahead:
                page.readahead = False
                used += 1
            if page in lru:
                lru.move_to_end(page)
        if used:
            self.counters["readahead_used"] += used

    def _remove(self, page: Page) -> None:
        m = page.mapping
        del m.pages[page.index]
        self.nr_pages -= 1
        self.lru.pop(page, None)
        if page.readahead:
            self.counters["readahead_wasted"] += 1
        if page.dirty:
            page.dirty = False
            self._clean(m, 1)
            self._wake_cleaned()
        if page.space == RESERVED:
            self._unreserve(page)

    def evict(self, count: int) -> int:
        """Evict up to ``count`` clean, idle pages, oldest first."""
        lru = self.lru
        done = min(count, len(lru))
        wasted = 0
        # Pages leave their mapping's index a stretch of consecutive indices
        # at a time (pages read or written together age together).
        run_map: Mapping | None = None
        run_first = run_end = 0
        emptied: list[Mapping] = []  # mappings that lost pages: retired if now empty
        for _ in range(done):
            page, _ = lru.popitem(last=False)
            m = page.mapping
            index = page.index
            for fill in m.fills:
                if fill.first <= index < fill.end:
                    fill.stale.add(index)
            if m is run_map and index == run_end:
                run_end += 1
            else:
                if run_map is not None:
                    run_map.pages.clear_run(run_first, run_end - run_first)
                    emptied.append(run_map)
                run_map, run_first, run_end = m, index, index + 1
            wasted += page.readahead
            # LRU pages are clean and idle; a clean page over a hole may
            # still hold a reservation (after a failed writeback).
            if page.space == RESERVED:
                self._unreserve(page)
        if run_map is not None:
            run_map.pages.clear_run(run_first, run_end - run_first)
            emptied.append(run_map)
        for m in emptied:
            if not m.pages:
                self.retire_if_idle(m)
        self.nr_pages -= done
        self.counters["readahead_wasted"] += wasted
        self.counters["evictions"] += done
        return done

    def drop_range(
        self, mapping: Mapping, first: int, end: int | None, *, discard_dirty: bool
    ) -> int:
        """Remove the pages of [first, end) from the cache.

        Caller must hold the mapping's BLOCK side and have waited for writeback
        in the range.  Dirty pages are written back first by callers that keep
        the data; ``discard_dirty`` says that losing them is the point
        (truncate, punch, a deleted file).
        """
        last = None if end is None else end - 1
        keys = list(mapping.pages.irange(first, last))
        dropped = 0
        for index in keys:
            page = mapping.pages[index]
            if page.writeback:
                raise RuntimeError(f"drop_range: {page!r} is under writeback")
            if page.dirty and not discard_dirty:
                raise RuntimeError(f"drop_range: {page!r} is dirty")
            self._remove(page)
            dropped += 1
        return dropped

    def drop_clean(self) -> int:
        """drop_caches: remove every clean, idle page."""
        return self.evict(len(self.lru))

    # dirty state and reservations:

    def reserve(self, page: Page) -> None:
        """Give a hole page its block of reservation; NoSpace if there is none."""
        if page.space != UNALLOCATED:
            return
        self.reservation.add(1)
        page.space = RESERVED
        self.nr_reserved += 1
        page.mapping.nr_reserved += 1

    def allocated_pages(self, mapping: Mapping, pages: list[Page]) -> None:
        """`allocated` for reserved pages of ``mapping`` whose reservation an
        allocation consumed."""
        for page in pages:
            page.space = ALLOCATED
        self.nr_reserved -= len(pages)
        mapping.nr_reserved -= len(pages)

    def reserve_pages(self, mapping: Mapping, pages: list[Page]) -> None:
        """`reserve` for several unallocated pages of ``mapping``, all or none."""
        if not pages:
            return
        self.reservation.add(len(pages))
        for page in pages:
            page.space = RESERVED
        self.nr_reserved += len(pages)
        mapping.nr_reserved += len(pages)

    def _unreserve(self, page: Page) -> None:
        self.reservation.release(1)
        page.space = UNALLOCATED
        self.nr_reserved -= 1
        page.mapping.nr_reserved -= 1

    def mark_dirty(self, page: Page) -> None:
        if page.dirty:
            return
        m = page.mapping
        page.dirty = True
        if not m.nr_dirty:
            m.dirtied_when = time.monotonic()
            self.dirty_mappings[m] = None
        m.nr_dirty += 1
        self.nr_dirty += 1
        self.lru.pop(page, None)
        if self.nr_dirty >= self.background_limit:
            self.kick.set()

    def _clean(self, m: Mapping, n: int) -> None:
        m.nr_dirty -= n
        self.nr_dirty -= n
        if m.nr_dirty == 0:
            self.dirty_mappings.pop(m, None)

    def start_writeback(self, pages: list[Page]) -> None:
        """The pages (dirty, of one mapping) go under writeback and are no longer dirty."""
        m = pages[0].mapping
        for page in pages:
            page.dirty = False
            page.writeback = True
        self._clean(m, len(pages))
        m.nr_writeback += len(pages)
        self.nr_writeback += len(pages)

    def end_writeback(self, pages: list[Page], *, failed: bool) -> None:
        """Writeback of the pages (of one mapping, consecutive) is over; a
        failed one leaves them dirty."""
        m = pages[0].mapping
        m.nr_writeback -= len(pages)
        self.nr_writeback -= len(pages)
        lru = self.lru
        if failed:
            for page in pages:
                page.writeback = False
                self.mark_dirty(page)
        else:
            # Still cached (not dropped or replaced meanwhile) and clean: to the LRU.
            resident = m.pages.get_run(pages[0].index, len(pages))
            for page, now in zip(pages, resident, strict=True):
                page.writeback = False
                if now is page and not page.dirty:
                    lru[page] = None
        # Dirty pages may have pushed the cache over its limit (one write can
        # dirty more than the limit); clean, they are evictable again.
        if self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)
        m.writeback_done.set()
        m.writeback_done = trio.Event()
        self._wake_cleaned()

    def _wake_cleaned(self) -> None:
        self._cleaned.set()
        self._cleaned = trio.Event()

    async def wait_cleaned(self) -> None:
        """Wait until some dirty or writeback page becomes clean."""
        await self._cleaned.wait()

    def check(self) -> None:
        """Verify the accounting (tests): counts, LRU membership, reservations."""
        pages = dirty = wb = reserved = 0
        for m in self.mappings.values():
            md = mw = 0
            for index, page in m.pages.items():
                assert page.index == index
                assert page.mapping is m
                pages += 1
                md += page.dirty
                mw += page.writeback
                reserved += page.space == RESERVED
                idle = not page.dirty and not page.writeback
                assert (page in self.lru) == idle, f"{page!r}: LRU membership wrong"
            assert m.nr_dirty == md, f"{m!r}: dirty count {m.nr_dirty} != {md}"
            assert m.nr_writeback == mw
            dirty += md
            wb += mw
        assert pages == self.nr_pages, f"page count {self.nr_pages} != {pages}"
        assert dirty == self.nr_dirty
        assert wb == self.nr_writeback
        assert reserved == self.nr_reserved
        assert self.reservation.remaining == reserved, (
            f"reservation holds {self.reservation.remaining} blocks for {reserved} reserved pages"
        )
