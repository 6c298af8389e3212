"""The page cache: pages of one or more blocks, per-inode mappings, LRU, dirty
accounting, reservations.

fusefs keeps its own page cache (the kernel's is bypassed with FUSE
``direct_io``, DESIGN §2).  A `Page` covers ``nblocks`` consecutive blocks of
one file (a power of two, aligned to it: the kernel's large folio); a
`Mapping` is one inode's pages, indexed by block number in a `PageIndex` whose
every slot of a page's blocks holds the page, so that finding the page of a
block is one lookup and range operations (write back, drop) cost the pages in
the range, not the file.  Each mapping carries the inode's `PagecacheLock` —
the pagecache add lock, the kernel's ``mapping->invalidate_lock``.

How big a page is follows how the file is being used: a fill (a read miss,
readahead) and a write of whole blocks make pages as large as the stretch they
cover allows, up to `MAX_PAGE_BLOCKS`, each aligned to its size (`pieces`); a
partial-block write, a read-modify-write and a stretch's ragged ends make
one-block pages.  A sequential stream so costs the Python work of one page
object per 64 blocks, while small files and random IO keep one-block pages and
waste no memory.

Only pages whose contents are valid are ever in a mapping: a read fills its
buffers first and inserts afterwards (so there are no locked, not-yet-uptodate
pages to wait on).  That insert, after an ``await``, is exactly where a page
with stale contents could get in while a truncate, punch or shift changes the
mapping underneath: the ADD side held across fill-and-insert, against the BLOCK
side held across drop-and-change, is what keeps them apart.

State is kept per block, in bit masks of the page (bit ``i`` is block
``page.index + i``), as iomap keeps per-block state in a folio:

* ``dirty`` — newer than the block on disk.  A page with a dirty block is not
  evictable; writeback writes only the dirty blocks.
* ``writeback`` — being written; BLOCK holders wait for it (`wait_writeback`).
* space — the state of the block on disk: neither bit (``UNALLOCATED``: a
  hole, nothing promised), ``reserved`` (``RESERVED``: a hole, with one block
  of the cache's reservation held for it, so writeback cannot hit ENOSPC),
  ``allocated`` (``ALLOCATED``: the extent map has a block behind it).  The
  invariant the tests check: the cache's reservation holds exactly one block
  per ``RESERVED`` block.

and per page: ``readahead`` — brought in by readahead and not yet read
(used/wasted counts, in blocks).

A page is split (its blocks copied into smaller pages) only when a range drop
(truncate, punch, a direct write, a shift) cuts through it; the part kept
keeps its per-block state.  Every count of the cache — pages in memory, dirty,
under writeback, reserved, evictions — is in blocks, so limits mean the same
whatever the page sizes.

Memory: a global limit (``cache_size``) with LRU eviction of clean pages not
under writeback; a dirty limit (half the cache) at which writers wait for
writeback, and a background threshold (a quarter) at which the flusher starts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
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

DEFAULT_CACHE_SIZE: Final = 64 << 20
MIN_CACHE_SIZE: Final = 1 << 20
DIRTY_EXPIRE_SECONDS: Final = 2.0
#: The largest page, in blocks (256 KiB at 4 KiB blocks).
MAX_PAGE_BLOCKS: Final = 64


def pieces(first: int, count: int, limit: int = MAX_PAGE_BLOCKS) -> list[tuple[int, int]]:
    """[first, first + count) cut into (start, n) pages: each n a power of two
    up to ``limit``, each start a multiple of its n, as few as that allows."""
    out: list[tuple[int, int]] = []
    index = first
    end = first + count
    while index < end:
        n = limit
        while n > 1 and (index & (n - 1) or index + n > end):
            n >>= 1
        out.append((index, n))
        index += n
    return out


def ones(n: int) -> int:
    """A mask of the ``n`` low bits."""
    return (1 << n) - 1


@final
class Page:
    """``nblocks`` consecutive blocks of one file, resident in the cache."""

    __slots__ = (
        "allocated",
        "data",
        "dirty",
        "index",
        "mapping",
        "nblocks",
        "readahead",
        "reserved",
        "writeback",
    )

    def __init__(
        self, mapping: Mapping, index: int, data: bytearray, nblocks: int, allocated: int
    ) -> None:
        self.mapping = mapping
        self.index = index  # the first block
        self.nblocks = nblocks
        self.data = data
        self.dirty = 0  # per-block masks
        self.writeback = 0
        self.reserved = 0
        self.allocated = allocated
        self.readahead = False

    def __repr__(self) -> str:
        flags = [f"{n}={getattr(self, n):#x}" for n in ("dirty", "writeback") if getattr(self, n)]
        if self.readahead:
            flags.append("readahead")
        return (
            f"<Page ino={self.mapping.inode.ino} blocks={self.index}+{self.nblocks} "
            f"allocated={self.allocated:#x} reserved={self.reserved:#x} {' '.join(flags)}>"
        )

    @property
    def end(self) -> int:
        return self.index + self.nblocks

    def mask(self, first: int, end: int) -> int:
        """The bits of the blocks of [first, end) this page covers."""
        lo = max(first, self.index) - self.index
        hi = min(end, self.index + self.nblocks) - self.index
        return ones(hi - lo) << lo if hi > lo else 0

    def bit(self, index: int) -> int:
        return 1 << (index - self.index)

    def space_at(self, index: int) -> int:
        """``UNALLOCATED``, ``RESERVED`` or ``ALLOCATED``: block ``index``'s space."""
        bit = 1 << (index - self.index)
        if self.allocated & bit:
            return ALLOCATED
        return RESERVED if self.reserved & bit else UNALLOCATED

    def is_dirty(self, index: int) -> bool:
        return bool(self.dirty >> (index - self.index) & 1)

    def under_writeback(self, index: int) -> bool:
        return bool(self.writeback >> (index - self.index) & 1)

    def stable_buffer(self, mask: int) -> bytearray:
        """The buffer to modify the blocks of ``mask`` in: a copy when one of
        them is under writeback, whose device write holds views of those
        blocks of the old buffer (the kernel's stable pages, by copy on write
        instead of waiting).  Other blocks' bytes are no device write's."""
        if self.writeback & mask:
            self.data = bytearray(self.data)
        return self.data

    def view(self, first: int, end: int, block_size: int) -> memoryview:
        """The bytes of blocks [first, end) ∩ this page."""
        lo = max(first, self.index) - self.index
        hi = min(end, self.index + self.nblocks) - self.index
        return memoryview(self.data)[lo * block_size : hi * block_size]


@final
class Fill:
    """A fill in flight over [first, end): blocks being read, pages not yet in.

    A page created in that range after the fill began (by a write) and then
    evicted leaves no trace in the mapping, so the fill would insert data
    older than what the cache already handed out.  Eviction marks such
    blocks ``stale`` and the fill does not insert them — the job the kernel
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
        self.nr_dirty = 0  # blocks, as every count here
        self.nr_writeback = 0
        self.nr_reserved = 0  # RESERVED blocks: counted in st_blocks like delalloc
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
            f"<Mapping ino={self.inode.ino} blocks={len(self.pages)} dirty={self.nr_dirty} "
            f"writeback={self.nr_writeback} lock={self.lock!r}>"
        )

    def get(self, index: int) -> Page | None:
        """The page holding block ``index``, if it is cached."""
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
        """The resident pages holding blocks of [first, end), in order, each once."""
        if end <= first:
            return iter(())
        return iter(list(self.pages.values_in(first, end - 1)))

    def dirty_in(self, first: int, end: int) -> bool:
        """Whether a block of [first, end) is dirty."""
        if not self.nr_dirty:
            return False
        return any(p.dirty & p.mask(first, end) for p in self.range(first, end))

    def writeback_in(self, first: int, end: int) -> bool:
        """Whether a page holding a block of [first, end) has blocks under writeback
        (anywhere in it: a page cut by a range drop must be idle to be split)."""
        return self.nr_writeback > 0 and any(p.writeback for p in self.range(first, end))


@dataclass(frozen=True, slots=True)
class PageCacheStatistics:
    pages: int  # blocks cached (4 KiB units at 4 KiB blocks)
    folios: int  # page objects holding them
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
    splits: int


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
        self.nr_pages = 0  # blocks cached
        self.nr_folios = 0  # Page objects
        self.nr_dirty = 0
        self.nr_writeback = 0
        self.nr_reserved = 0
        # Clean, idle pages in least-recently-used order (dict order).
        self.lru: OrderedDict[Page, None] = OrderedDict()
        # One reservation for every RESERVED block.
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
                "splits",
            ),
            0,
        )

    def __repr__(self) -> str:
        return f"<PageCache blocks={self.nr_pages}/{self.max_pages} dirty={self.nr_dirty}>"

    def _set_limits(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.max_pages = max(16, limit_bytes // self.block_size)
        self.dirty_limit = max(8, self.max_pages // 2)
        self.background_limit = max(4, self.max_pages // 4)

    def set_limit(self, limit_bytes: int) -> int:
        """Change ``cache_size`` while mounted (``.fusefs/cache_size``): clean
        pages over the new limit are evicted at once, dirty ones as writeback
        cleans them (writers throttle on the new dirty limit).  Returns the
        blocks evicted."""
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
            folios=self.nr_folios,
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
            splits=c["splits"],
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
        """A zeroed one-block page, not yet inserted (memory fault site ``pagecache_page``)."""
        return self.new_pages(mapping, index, 1, space)[0]

    def new_pages(
        self,
        mapping: Mapping,
        first: int,
        count: int,
        space: int,
        data: memoryview | None = None,
        *,
        limit: int = MAX_PAGE_BLOCKS,
    ) -> list[Page]:
        """Pages for [first, first + count) (`pieces`), not yet inserted:
        zeroed, or holding ``data`` (``count`` blocks of it).  Each page's
        allocation is a hit of the memory fault site ``pagecache_page``."""
        bs = self.block_size
        out: list[Page] = []
        for start, n in pieces(first, count, limit):
            init = None if data is None else data[(start - first) * bs : (start - first + n) * bs]
            (buf,) = alloc_pages("pagecache_page", n * bs, 1, init=init)
            out.append(Page(mapping, start, buf, n, ones(n) if space == ALLOCATED else 0))
        return out

    def _store(self, page: Page) -> None:
        """Put ``page`` in its mapping's index (its blocks are free there)."""
        if page.nblocks == 1:
            page.mapping.pages[page.index] = page
        else:
            page.mapping.pages.set_run(page.index, [page] * page.nblocks)
        self.nr_pages += page.nblocks
        self.nr_folios += 1

    def insert(self, page: Page) -> Page:
        """Insert a filled one-block page unless one is there already; return
        the resident one.

        Caller must hold the mapping's ADD side (or BLOCK, when it is the one
        changing the range).
        """
        existing = page.mapping.pages.get(page.index)
        if existing is not None:
            self._lost(page, existing)
            return existing
        self._store(page)
        # Make room before the new page joins the LRU: when every other page is
        # dirty or under writeback it would be the only candidate, and a write
        # would then dirty a page no longer in the cache.  Over the limit until
        # writeback catches up, then.
        if self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)
        self.lru[page] = None
        return page

    def _lost(self, page: Page, existing: Page) -> None:
        """``page`` was not inserted: ``existing`` got there first.  Keep
        readahead_issued == used + wasted + blocks still flagged: a prefetched
        copy that loses is dropped unread; a prefetched page that wins goes to a
        read or write that uses it."""
        if page.readahead:
            self.counters["readahead_wasted"] += page.nblocks
        elif existing.readahead:
            existing.readahead = False
            self.counters["readahead_used"] += existing.nblocks

    def insert_filled(
        self, mapping: Mapping, pages: list[Page], *, keep: bool = False
    ) -> list[Page]:
        """`insert` for a fill's pages (clean, ascending): returns the resident
        pages covering the fill's blocks, in order, each once -- the new ones,
        or ones that got there first (possibly reaching past the fill).

        A new page some of whose blocks got cached meanwhile is split into
        one-block pages, the free ones inserted.  With ``keep`` room is made
        from older pages only, before the new ones join the LRU (as `insert`
        does), and the cache stays over its limit when there is not enough: a
        writer's read-modify-write fill is about to dirty its page, and a page
        evicted before that would take the write with it.
        """
        if not pages:
            return []
        index = mapping.pages
        first = pages[0].index
        end = pages[-1].end
        added: list[Page] = []
        resident: list[Page] = []
        if index.first_present(first, end) == end and end - first == sum(
            p.nblocks for p in pages
        ):  # the usual case: nothing cached meanwhile, no gap
            for page in pages:
                self._store(page)
            added = resident = pages
        else:
            for page in pages:
                if index.first_present(page.index, page.end) == page.end:
                    self._store(page)
                    added.append(page)
                    resident.append(page)
                    continue
                for single in self.copy_blocks(page, page.index, page.end, limit=1):
                    existing = index.get(single.index)
                    if existing is None:
                        self._store(single)
                        added.append(single)
                        resident.append(single)
                    else:
                        self._lost(single, existing)
                        if not resident or resident[-1] is not existing:
                            resident.append(existing)
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
        """Insert new pages a write has just filled, every block dirty, none of
        them cached.

        Caller must hold the mapping's ADD side, with no await since it
        checked that the blocks are free.
        """
        if not pages:
            return
        n = 0
        for page in pages:
            page.dirty = ones(page.nblocks)
            self._store(page)
            n += page.nblocks
        if not mapping.nr_dirty:
            mapping.dirtied_when = time.monotonic()
            self.dirty_mappings[mapping] = None
        mapping.nr_dirty += n
        self.nr_dirty += n
        if self.nr_pages > self.max_pages:
            self.evict(self.nr_pages - self.max_pages)
        if self.nr_dirty >= self.background_limit:
            self.kick.set()

    def touch(self, page: Page, blocks: int = 1) -> None:
        """A hit on ``blocks`` blocks of ``page``: count it and move the page to
        the young end of the LRU."""
        self.touch_pages((page,), blocks)

    def touch_pages(self, pages: Iterable[Page], blocks: int) -> None:
        """Hits on ``blocks`` blocks of several pages: count them, count the
        first use of prefetched pages, and move the pages to the young end of
        the LRU."""
        lru = self.lru
        used = 0
        for page in pages:
            if page.readahead:
                page.readahead = False
                used += page.nblocks
            if page in lru:
                lru.move_to_end(page)
        self.counters["hits"] += blocks
        if used:
            self.counters["readahead_used"] += used

    def _unstore(self, page: Page) -> None:
        """Take ``page`` out of its mapping's index and the LRU (no accounting
        of its dirty or reserved blocks)."""
        page.mapping.pages.clear_run(page.index, page.nblocks)
        self.nr_pages -= page.nblocks
        self.nr_folios -= 1
        self.lru.pop(page, None)

    def _remove(self, page: Page) -> None:
        m = page.mapping
        self._unstore(page)
        if page.readahead:
            self.counters["readahead_wasted"] += page.nblocks
        if page.dirty:
            self._clean(m, page.dirty.bit_count())
            page.dirty = 0
            self._wake_cleaned()
        if page.reserved:
            self.unreserve(page, page.reserved)

    def evict(self, count: int) -> int:
        """Evict clean, idle pages, oldest first, until ``count`` blocks are
        gone or none is left; returns the blocks evicted."""
        lru = self.lru
        done = 0
        wasted = 0
        # Pages leave their mapping's index a stretch of consecutive blocks at
        # a time (pages read or written together age together).
        run_map: Mapping | None = None
        run_first = run_end = 0
        emptied: list[Mapping] = []  # mappings that lost pages: retired if now empty
        nfolios = 0
        while done < count and lru:
            page, _ = lru.popitem(last=False)
            m = page.mapping
            index = page.index
            n = page.nblocks
            for fill in m.fills:
                if fill.first < index + n and index < fill.end:
                    fill.stale.update(range(max(fill.first, index), min(fill.end, index + n)))
            if m is run_map and index == run_end:
                run_end += n
            else:
                if run_map is not None:
                    run_map.pages.clear_run(run_first, run_end - run_first)
                    emptied.append(run_map)
                run_map, run_first, run_end = m, index, index + n
            if page.readahead:
                wasted += n
            # LRU pages are clean and idle; a clean block over a hole may
            # still hold a reservation (after a failed writeback).
            if page.reserved:
                self.unreserve(page, page.reserved)
            done += n
            nfolios += 1
        if run_map is not None:
            run_map.pages.clear_run(run_first, run_end - run_first)
            emptied.append(run_map)
        for m in emptied:
            if not m.pages:
                self.retire_if_idle(m)
        self.nr_pages -= done
        self.nr_folios -= nfolios
        self.counters["readahead_wasted"] += wasted
        self.counters["evictions"] += done
        return done

    def copy_blocks(self, page: Page, first: int, end: int, *, limit: int) -> list[Page]:
        """New pages holding blocks [first, end) of ``page`` (`pieces` of at
        most ``limit`` blocks), with their bytes and per-block state; ``page``
        is not changed.  One hit of the memory fault site ``pagecache_split``
        per new page."""
        bs = self.block_size
        out: list[Page] = []
        for start, n in pieces(first, end - first, limit):
            rel = start - page.index
            init = memoryview(page.data)[rel * bs : (rel + n) * bs]
            (buf,) = alloc_pages("pagecache_split", n * bs, 1, init=init)
            new = Page(page.mapping, start, buf, n, page.allocated >> rel & ones(n))
            new.dirty = page.dirty >> rel & ones(n)
            new.reserved = page.reserved >> rel & ones(n)
            new.readahead = page.readahead
            out.append(new)
        return out

    def _replace(self, page: Page, parts: list[Page]) -> None:
        """Put ``parts`` (from `copy_blocks`, their dirty and reserved blocks
        moved over) in place of ``page``, which goes.  Blocks of ``page`` no
        part covers are dropped with their dirty and reserved state."""
        m = page.mapping
        self._unstore(page)
        self.counters["splits"] += 1
        kept_dirty = kept_reserved = 0
        for part in parts:
            self._store(part)
            kept_dirty |= part.dirty << (part.index - page.index)
            kept_reserved |= part.reserved << (part.index - page.index)
            if not part.dirty:
                self.lru[part] = None
        gone_dirty = page.dirty & ~kept_dirty
        if gone_dirty:
            self._clean(m, gone_dirty.bit_count())
            self._wake_cleaned()
        gone_reserved = page.reserved & ~kept_reserved
        if gone_reserved:
            self.unreserve(page, gone_reserved)
        if page.readahead:
            dropped = page.nblocks - sum(p.nblocks for p in parts)
            self.counters["readahead_wasted"] += dropped

    def drop_range(
        self, mapping: Mapping, first: int, end: int | None, *, discard_dirty: bool
    ) -> int:
        """Remove the blocks [first, end) from the cache; returns how many there were.

        Caller must hold the mapping's BLOCK side and have waited for writeback
        of every page in the range (`wait_writeback`: a page cut by the range
        is split, and must be idle whole).  Dirty blocks are written back first
        by callers that keep the data; ``discard_dirty`` says that losing them
        is the point (truncate, punch, a deleted file).  Pages cut by the range
        keep the blocks outside it: their copies are made before anything
        changes, so an allocation failure (``pagecache_split``) changes nothing.
        """
        stop = (1 << 62) if end is None else end
        if stop <= first:
            return 0
        pages = list(mapping.range(first, stop))
        splits: list[tuple[Page, list[Page]]] = []
        for page in pages:
            if page.writeback:
                raise RuntimeError(f"drop_range: {page!r} is under writeback")
            inside = page.mask(first, stop)
            if page.dirty & inside and not discard_dirty:
                raise RuntimeError(f"drop_range: {page!r} is dirty")
            if page.index < first or page.end > stop:
                parts: list[Page] = []
                if page.index < first:
                    parts += self.copy_blocks(page, page.index, first, limit=page.nblocks)
                if page.end > stop:
                    parts += self.copy_blocks(page, stop, page.end, limit=page.nblocks)
                splits.append((page, parts))
        dropped = 0
        split_pages = {id(page): parts for page, parts in splits}
        for page in pages:
            parts = split_pages.get(id(page), [])
            dropped += page.nblocks - sum(p.nblocks for p in parts)
            if parts:
                self._replace(page, parts)
            else:
                self._remove(page)
        return dropped

    def drop_clean(self) -> int:
        """drop_caches: remove every clean, idle page."""
        return self.evict(self.nr_pages)

    # dirty state and reservations:

    def reserve(self, page: Page, mask: int) -> None:
        """Give the hole blocks of ``mask`` in ``page`` their block of
        reservation each; NoSpace (and nothing reserved) if there is not enough."""
        self.reserve_blocks(page.mapping, [(page, mask)])

    def reserve_pages(self, mapping: Mapping, pages: list[Page]) -> None:
        """`reserve` every hole block of ``pages`` (of ``mapping``), all or none."""
        self.reserve_blocks(mapping, [(p, ones(p.nblocks)) for p in pages])

    def reserve_blocks(self, mapping: Mapping, blocks: list[tuple[Page, int]]) -> None:
        """`reserve` the hole blocks among (page, mask) of ``mapping``, all or none."""
        holes = [(p, mask & ~(p.allocated | p.reserved)) for p, mask in blocks]
        n = sum(mask.bit_count() for _, mask in holes)
        if not n:
            return
        self.reservation.add(n)
        for page, mask in holes:
            page.reserved |= mask
        self.nr_reserved += n
        mapping.nr_reserved += n

    def allocated_blocks(self, mapping: Mapping, blocks: list[tuple[Page, int]]) -> None:
        """The reserved blocks (page, mask) of ``mapping`` got blocks from an
        allocation that consumed their reservation."""
        n = 0
        for page, mask in blocks:
            page.allocated |= mask
            page.reserved &= ~mask
            n += mask.bit_count()
        self.nr_reserved -= n
        mapping.nr_reserved -= n

    def unreserve(self, page: Page, mask: int) -> None:
        """Give back the reservation of the reserved blocks of ``mask``."""
        mask &= page.reserved
        n = mask.bit_count()
        self.reservation.release(n)
        page.reserved &= ~mask
        self.nr_reserved -= n
        page.mapping.nr_reserved -= n

    def mark_dirty(self, page: Page, mask: int) -> None:
        """The blocks of ``mask`` in ``page`` are newer than the device now."""
        new = mask & ~page.dirty
        if not new:
            return
        m = page.mapping
        if not page.dirty:
            self.lru.pop(page, None)
        page.dirty |= new
        n = new.bit_count()
        if not m.nr_dirty:
            m.dirtied_when = time.monotonic()
            self.dirty_mappings[m] = None
        m.nr_dirty += n
        self.nr_dirty += n
        if self.nr_dirty >= self.background_limit:
            self.kick.set()

    def _clean(self, m: Mapping, n: int) -> None:
        m.nr_dirty -= n
        self.nr_dirty -= n
        if m.nr_dirty == 0:
            self.dirty_mappings.pop(m, None)

    def start_writeback(self, m: Mapping, blocks: list[tuple[Page, int]]) -> None:
        """The dirty blocks (page, mask) of ``m`` go under writeback and are no
        longer dirty."""
        n = 0
        for page, mask in blocks:
            page.dirty &= ~mask
            page.writeback |= mask
            n += mask.bit_count()
        self._clean(m, n)
        m.nr_writeback += n
        self.nr_writeback += n

    def end_writeback(self, m: Mapping, blocks: list[tuple[Page, int]], *, failed: bool) -> None:
        """Writeback of the blocks (page, mask) of ``m`` is over; a failed one
        leaves them dirty."""
        n = 0
        lru = self.lru
        pages = m.pages
        for page, mask in blocks:
            page.writeback &= ~mask
            n += mask.bit_count()
            if failed:
                self.mark_dirty(page, mask)
            elif not page.dirty and not page.writeback and pages.get(page.index) is page:
                # Still cached (not dropped meanwhile) and idle: to the LRU.
                lru[page] = None
        m.nr_writeback -= n
        self.nr_writeback -= n
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
        """Verify the accounting (tests): counts, page layout, LRU membership,
        reservations."""
        blocks = folios = dirty = wb = reserved = 0
        for m in self.mappings.values():
            md = mw = 0
            for index, page in m.pages.items():
                assert page.mapping is m
                assert page.index <= index < page.end, f"{page!r} at block {index}"
                blocks += 1
                if index != page.index:
                    continue
                n = page.nblocks
                assert n & (n - 1) == 0, f"{page!r}: size not a power of two"
                assert page.index % n == 0, f"{page!r}: not aligned to its size"
                assert len(page.data) == n * self.block_size
                assert not (page.allocated & page.reserved), f"{page!r}: two space states"
                assert (page.dirty | page.writeback | page.allocated | page.reserved) >> n == 0
                folios += 1
                md += page.dirty.bit_count()
                mw += page.writeback.bit_count()
                reserved += page.reserved.bit_count()
                idle = not page.dirty and not page.writeback
                assert (page in self.lru) == idle, f"{page!r}: LRU membership wrong"
            assert m.nr_dirty == md, f"{m!r}: dirty count {m.nr_dirty} != {md}"
            assert m.nr_writeback == mw
            dirty += md
            wb += mw
        assert blocks == self.nr_pages, f"block count {self.nr_pages} != {blocks}"
        assert folios == self.nr_folios, f"page count {self.nr_folios} != {folios}"
        assert dirty == self.nr_dirty
        assert wb == self.nr_writeback
        assert reserved == self.nr_reserved
        assert self.reservation.remaining == reserved, (
            f"reservation holds {self.reservation.remaining} blocks for {reserved} reserved blocks"
        )
