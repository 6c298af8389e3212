"""Buffered IO: reads and writes through the page cache.

Locks:

* buffered read — no inode lock; the mapping's pagecache lock, ADD side,
  across looking up the extent map, reading the device and inserting pages;
* buffered write — the inode lock, exclusive (size and reservations), then
  ADD across filling, modifying and dirtying pages.

Lock order: inode lock → pagecache lock → page.

A read that misses fills every missing page of the request with one device
read per physical run, then inserts them; a page that appeared meanwhile
(another reader, a writer) wins over the one just read.  The window between
the device read and the insert is the ``buffered_read_before_insert`` race
site: without the ADD side held across it, a punch, truncate, shift or direct
write can run there and the insert then brings back data the file no longer
has (races 2 and 3 of DESIGN §3).

A write into a page that is not cached reads the old block first when the page
is only partly overwritten and lies inside the file (read-modify-write); pages
over holes take one block of the cache's reservation each before they are
dirtied, so ENOSPC comes from write() and never from writeback.  A
reservation that fails while frees wait for a commit commits and tries once
more before the write comes back short or with ENOSPC (`fusefs.reclaim`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fusefs.errors import FsError, NoSpace
from fusefs.extents import Extent, ExtentMap
from fusefs.faults import dynamic_fault, race_fault
from fusefs.io import readahead
from fusefs.io.writeback import balance_dirty_pages
from fusefs.pagecache import ALLOCATED, UNALLOCATED, Fill, Mapping, Page, ones

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem, Handle
    from fusefs.inode import Inode


# read:


async def fill_pages(
    fs: Filesystem,
    mapping: Mapping,
    first: int,
    count: int,
    *,
    readahead_pages: bool = False,
    fill: Fill | None = None,
    for_write: bool = False,
) -> list[Page]:
    """Read blocks [first, first + count) from the device and insert them as pages.

    Caller must hold the mapping's ADD side (or BLOCK).  Returns the resident
    pages holding the range, in order, each once: the ones inserted, or ones
    that got there first (which may reach past the range).  ``fill`` is the
    caller's registration of this range (`Mapping.start_fill`), if it made one
    ahead of time; it ends here either way.  ``for_write``: a writer's
    read-modify-write, whose page must stay resident (`PageCache.insert_filled`).
    """
    cache = fs.cache
    bs = fs.block_size
    emap = mapping.inode.extents
    assert emap is not None
    pages = cache.new_pages(mapping, first, count, UNALLOCATED)
    if fill is None:
        fill = mapping.start_fill(first, first + count)
    try:
        # A list: writeback may map blocks of this range while the device reads.
        for ext in list(emap.extents(first, first + count)):
            assert ext.pblk is not None
            end = ext.start + ext.length
            views = []
            for page in pages:
                if page.index < end and ext.start < page.end:
                    page.allocated |= page.mask(ext.start, end)
                    views.append(page.view(ext.start, end, bs))
            if not ext.unwritten:  # preallocated blocks read as zeros
                await fs.dev.read_into(ext.pblk, views)
        # The window the pagecache add lock closes: blocks read, pages not yet in.
        if readahead_pages:
            await race_fault("readahead_before_insert")
        else:
            await race_fault("buffered_read_before_insert")
    finally:
        # Waiters run only after this task's next checkpoint: the pages are in by then.
        mapping.end_fill(fill)
    if readahead_pages:
        for page in pages:
            page.readahead = True
    stale = fill.stale
    if not stale:
        resident = cache.insert_filled(mapping, pages, keep=for_write)
    else:
        resident = _insert_fresh(fs, mapping, pages, stale, readahead_pages, for_write)
    if readahead_pages:
        cache.counters["readahead_issued"] += count
    return resident


def _insert_fresh(
    fs: Filesystem,
    mapping: Mapping,
    pages: list[Page],
    stale: set[int],
    readahead_pages: bool,
    for_write: bool,
) -> list[Page]:
    """`insert_filled` for a fill some of whose blocks went stale (newer data
    was cached there meanwhile, and evicted: ours is older).  The pages with
    stale blocks are cut into one-block pages and those blocks left out; the
    result still covers the whole range, the stale blocks by pages the reader
    may use (its read overlapped) but the cache never holds."""
    cache = fs.cache
    parts: list[Page] = []
    for page in pages:
        if any(page.index <= i < page.end for i in stale):
            parts += cache.copy_blocks(page, page.index, page.end, limit=1)
        else:
            parts.append(page)
    kept = [p for p in parts if p.nblocks > 1 or p.index not in stale]
    inserted = iter(cache.insert_filled(mapping, kept, keep=for_write))
    resident: list[Page] = []
    current: Page | None = None
    for page in parts:
        if page.nblocks == 1 and page.index in stale:
            cache.counters["fill_stale"] += 1
            if readahead_pages:
                cache.counters["readahead_wasted"] += 1
            page.readahead = False
            resident.append(page)
            continue
        # The resident page holding this piece's first block: the next one
        # insert_filled gave, unless the last one reaches over it already.
        if current is None or not current.index <= page.index < current.end:
            current = next(inserted)
            resident.append(current)
    return resident


def _cached(fs: Filesystem, mapping: Mapping, offset: int, end: int) -> bytes | None:
    """The bytes of [offset, end) if every block is cached, else None.

    No lock and no await: pages are only removed by code that runs between
    awaits of this task, so a read that finds all its pages copies a
    consistent state — as the kernel reads cached pages without the
    invalidate lock and takes it only to add pages.
    """
    bs = fs.block_size
    first = offset // bs
    last = (end - 1) // bs
    pages = mapping.pages
    page: Page | None = pages.get(first)
    if page is None:
        return None
    if last < page.index + page.nblocks:  # one page holds it all
        fs.cache.touch(page, last + 1 - first)
        head = offset - page.index * bs
        return bytes(page.data[head : head + end - offset])
    found = [page]
    index = page.index + page.nblocks
    while index <= last:
        page = pages.get(index)
        if page is None:
            return None
        found.append(page)
        index += page.nblocks
    fs.cache.touch_pages(found, last + 1 - first)
    return _gather(found, offset - found[0].index * bs, end - offset, bs)


def _gather(pages: list[Page], head: int, length: int, block_size: int) -> bytes:
    """``length`` bytes from ``head`` into consecutive pages, copied once."""
    first = pages[0]
    if len(pages) == 1 or head + length <= len(first.data):
        return bytes(first.data[head : head + length])
    parts: list[bytes | bytearray | memoryview] = [memoryview(first.data)[head:]]
    left = length - (len(first.data) - head)
    for page in pages[1:]:
        if left <= len(page.data):
            parts.append(memoryview(page.data)[:left])
            break
        parts.append(page.data)
        left -= len(page.data)
    return b"".join(parts)


async def read(fs: Filesystem, handle: Handle, offset: int, size: int) -> bytes:
    inode = handle.inode
    mapping = fs.cache.mapping(inode)
    bs = fs.block_size
    end = min(offset + size, inode.size)
    if offset >= end:
        return b""
    data = _cached(fs, mapping, offset, end)
    if data is None:
        data = await _read_fill(fs, mapping, inode, offset, size)
    if data:
        readahead.on_read(fs, handle, mapping, offset // bs, (offset + len(data) - 1) // bs)
    return data


async def _read_fill(
    fs: Filesystem, mapping: Mapping, inode: Inode, offset: int, size: int
) -> bytes:
    """The slow path: some block is missing; fill under the ADD side."""
    bs = fs.block_size
    cache = fs.cache
    async with mapping.lock.add():
        end = min(offset + size, inode.size)  # the size may have changed meanwhile
        if offset >= end:
            return b""
        first = offset // bs
        last = (end - 1) // bs
        pages = mapping.pages
        out: list[Page] = []  # pages holding first..last, in order, each once
        index = first
        while index <= last:
            page: Page | None = pages.get(index)
            if page is not None:
                cache.touch(page, min(page.end, last + 1) - index)
                out.append(page)
                index = page.end
                continue
            fill = mapping.fill_at(index)
            if fill is not None:
                # Being read already (readahead, another reader): wait for that
                # rather than read the blocks twice, then look again.
                await fill.done.wait()
                continue
            # A run of misses: fill it with as few device reads as possible.
            stop = pages.first_present(index, mapping.next_fill(index, last + 1))
            cache.counters["misses"] += stop - index
            got = await fill_pages(fs, mapping, index, stop - index)
            if out and got and out[-1] is got[0]:
                got = got[1:]  # a page that got there first, holding blocks of both
            out += got
            index = out[-1].end
        return _gather(out, offset - out[0].index * bs, end - offset, bs)


# write:


async def _page_for_write(
    fs: Filesystem, mapping: Mapping, emap: ExtentMap, index: int, size: int, *, whole: bool
) -> Page:
    """The resident page holding block ``index``, or a new one-block page:
    with the block's old contents when the write covers only part of it
    (read-modify-write).

    The page returned is in the mapping, and the caller dirties the block
    before its next await: a page a writer modifies is never one that eviction
    already took out of the cache (its data would go with it), nor one a fill
    in flight is about to replace.
    """
    cache = fs.cache
    bs = fs.block_size
    while True:
        page = mapping.get(index)
        if page is not None:
            cache.touch(page)
            return page
        mapped = emap.pblk_of(index) is not None
        if not (mapped and not whole and index * bs < size):
            # Nothing to read: a fill in flight here inserts nothing over this page.
            space = ALLOCATED if mapped else UNALLOCATED
            return cache.insert(cache.new_page(mapping, index, space))
        fill = mapping.fill_at(index)
        if fill is not None:
            # A reader or readahead is reading this block: use its page.
            await fill.done.wait()
            continue
        # Read-modify-write: the bytes around the write come from the block.
        cache.counters["misses"] += 1
        (page,) = await fill_pages(fs, mapping, index, 1, for_write=True)
        await race_fault("buffered_write_after_fill")
        # The self-test site writes into the page even when it is no longer
        # cached, as this path once did: the stress tools must catch that.
        if mapping.get(index) is page or dynamic_fault(
            "buffered_write_into_evicted_page", cls="error:selftest"
        ):
            return page
        # Not resident: newer data got cached here and evicted meanwhile, or a
        # BLOCK holder dropped it (lock off).  Look again.


def _write_whole_pages(
    fs: Filesystem, mapping: Mapping, emap: ExtentMap, first: int, src: memoryview
) -> int:
    """Write ``src`` over the whole blocks from ``first`` on, with no await.

    Cached blocks are overwritten in their pages; missing stretches get new
    pages made from the new bytes (nothing to read: every byte is replaced),
    inserted dirty together.  Blocks over holes are reserved together.
    Returns the bytes written: short if the filesystem fills up partway (the
    blocks before the first that could not be reserved), `NoSpace` if not
    even the first block could be.
    """
    cache = fs.cache
    bs = fs.block_size
    count = len(src) // bs
    end = first + count
    resident = mapping.pages
    # Whether each block is mapped: the extents once, not a lookup per block.
    mapped = list(emap.extents(first, end))
    whole = sum(e.length for e in mapped)
    if (not whole or whole == count) and resident.first_present(first, end) == end:
        # Nothing cached and all mapped or all holes (appending, rewriting a
        # file laid out before): new pages straight from the data.
        new = cache.new_pages(mapping, first, count, ALLOCATED if whole else UNALLOCATED, src)
        try:
            if not whole:
                cache.reserve_pages(mapping, new)
        except NoSpace:
            pass  # block by block below, for the short write
        else:
            cache.insert_dirty(mapping, new)
            return count * bs
    # The stretch in pieces: (page, mask) of cached pages, new pages for the gaps.
    cached: list[tuple[Page, int]] = []
    fresh: list[Page] = []
    index = first
    while index < end:
        page = resident.get(index)
        if page is not None:
            cached.append((page, page.mask(index, end)))
            index = page.end
            continue
        stop = resident.first_present(index, end)
        for ext_first, ext_end, space in _spaces(mapped, index, stop):
            fresh += cache.new_pages(mapping, ext_first, ext_end - ext_first, space)
        index = stop
    wanted = [(p, ones(p.nblocks)) for p in fresh] + cached
    try:
        cache.reserve_blocks(mapping, wanted)
    except NoSpace:
        # Block by block, in order: write as far as there is room for, the
        # blocks before the first hole block the filesystem has no block for.
        room = _reserve_each(fs, wanted, end)
        if room == first:
            raise
        if room < end:
            return _write_whole_pages(fs, mapping, emap, first, src[: (room - first) * bs])
    cache.touch_pages((p for p, _ in cached), sum(m.bit_count() for _, m in cached))
    for page, mask in cached:
        lo = max(first, page.index)
        hi = min(end, page.end)
        at = (lo - page.index) * bs
        page.stable_buffer(mask)[at : at + (hi - lo) * bs] = src[
            (lo - first) * bs : (hi - first) * bs
        ]
        cache.mark_dirty(page, mask)
    for page in fresh:
        pos = (page.index - first) * bs
        page.data[:] = src[pos : pos + len(page.data)]
    # Dirty the cached pages before inserting the new ones: inserting may
    # evict clean pages, and these are not clean any more.
    cache.insert_dirty(mapping, fresh)
    return count * bs


def _spaces(mapped: list[Extent], first: int, end: int) -> Iterator[tuple[int, int, int]]:
    """[first, end) cut where the ``mapped`` extents (ascending) begin and
    end: (first, end, ALLOCATED or UNALLOCATED) pieces."""
    pos = first
    for ext in mapped:
        lo = max(ext.start, first)
        hi = min(ext.start + ext.length, end)
        if hi <= lo:
            continue
        if pos < lo:
            yield pos, lo, UNALLOCATED
        yield lo, hi, ALLOCATED
        pos = hi
    if pos < end:
        yield pos, end, UNALLOCATED


def _reserve_each(fs: Filesystem, blocks: list[tuple[Page, int]], end: int) -> int:
    """`reserve` the hole blocks among (page, mask) one at a time, in block
    order.  Returns ``end`` when every one got its block (they stay reserved),
    else the first that could not (and gives back those it took)."""
    cache = fs.cache
    holes = sorted(
        (p.index + i, p)
        for p, mask in blocks
        for i in range(p.nblocks)
        if (mask & ~(p.allocated | p.reserved)) >> i & 1
    )
    taken: list[tuple[int, Page]] = []
    for index, page in holes:
        try:
            cache.reserve(page, page.bit(index))
        except NoSpace:
            for got, owner in taken:
                cache.unreserve(owner, owner.bit(got))
            return index
        taken.append((index, page))
    return end


async def _reclaim(fs: Filesystem, done: int) -> bool:
    """`Reclaimer.reclaim` for a write that has written ``done`` bytes so far.

    A commit that fails (the filesystem goes read-only) fails the write only if
    nothing was written yet; otherwise the write returns short, as it does on
    ENOSPC: an error would tell the caller that none of its bytes went in, while
    the pages hold them and the size covers them.  The next write gets EROFS.
    """
    try:
        return await fs.reclaim.reclaim()
    except FsError:
        if done == 0:
            raise
        return False


async def write(fs: Filesystem, handle: Handle, offset: int, data: bytes) -> int:
    """Buffered write; returns the bytes written (short only on ENOSPC)."""
    inode: Inode = handle.inode
    emap = inode.extents
    assert emap is not None
    cache = fs.cache
    bs = fs.block_size
    await balance_dirty_pages(fs)
    mapping = cache.mapping(inode)
    view = memoryview(data)
    done = 0
    # Uncontended, take the inode lock without a scheduler round trip (the
    # request already passed checkpoints on its way in); else wait in line.
    if not inode.io_lock.acquire_exclusive_nowait():
        await inode.io_lock.acquire_exclusive()
    try:
        if handle.append:
            offset = inode.size
        # Likewise ADD (trio's acquire_nowait), else wait in line for it.
        if not mapping.lock.add_get_nowait():
            await mapping.lock.add_get()
        try:
            pos = offset
            end = offset + len(data)
            # Out of space while frees wait for a commit: commit (holding the
            # inode lock and ADD is fine, see fusefs.reclaim) and go on, once.
            reclaimed = False
            while pos < end:
                index = pos // bs
                start = pos - index * bs
                want = min(bs - start, end - pos)
                try:
                    if start == 0 and end - pos >= 2 * bs:
                        # A stretch of whole pages: no read, no await.
                        want = (end - pos) // bs * bs
                        n = _write_whole_pages(fs, mapping, emap, index, view[done : done + want])
                    else:
                        # One page, whole or part: the per-page path is cheaper.
                        page = await _page_for_write(
                            fs, mapping, emap, index, inode.size, whole=want == bs
                        )
                        bit = 1 << (index - page.index)
                        cache.reserve(page, bit)
                        at = (index - page.index) * bs + start
                        page.stable_buffer(bit)[at : at + want] = view[done : done + want]
                        cache.mark_dirty(page, bit)
                        n = want
                except NoSpace:
                    if not reclaimed:
                        reclaimed = True
                        if await _reclaim(fs, done):
                            continue
                    if done == 0:
                        raise
                    break
                done += n
                pos += n
                if pos > inode.size:
                    inode.size = pos
                if n < want:
                    # ENOSPC partway through a stretch: a short write, unless a
                    # commit gives the space for the rest.
                    if reclaimed:
                        break
                    reclaimed = True
                    if not await _reclaim(fs, done):
                        break
        finally:
            mapping.lock.add_put()
        inode.touch(m=True)
    finally:
        inode.io_lock.release_exclusive()
    fs.mark_changed()
    return done
