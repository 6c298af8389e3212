"""SEEK_DATA and SEEK_HOLE: where a file's data and holes are, as lseek(2) says.

Locks: the inode lock, shared.  Every change to where data lies takes it
exclusive -- buffered writes (which dirty pages over holes), truncate, every
fallocate mode (punch, zero, collapse, insert), direct writes -- so the answer
is one consistent state of the file, never a punch or a shift half done.  The
pagecache lock is not needed: the answer reads the extent map and the page
index without an ``await`` (the race site ``seek_before_lookup`` sits just
before, inside the lock).  Writeback, which takes no lock, may map a dirty
page's block meanwhile; a page under writeback counts as data, so the answer
is the same before and after it.

Data, block by block: a mapped, written block; or a cached page that is dirty
or under writeback -- data a write put over a hole (or over an unwritten,
preallocated extent) that has not reached the device yet, the case real
filesystems have got wrong.  Everything else is a hole: unmapped blocks,
unwritten extents without dirty pages, clean pages over holes (they hold
zeros).  The end of the file is a hole (lseek(2)); an offset at or past it is
ENXIO for both.  Answers are block-granular, never before ``offset``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Final

from fusefs.errors import FsError, InvalidArgument
from fusefs.faults import race_fault
from fusefs.io.direct import blocks_for

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem
    from fusefs.inode import Inode
    from fusefs.pagecache import Mapping

SEEK_DATA: Final = os.SEEK_DATA
SEEK_HOLE: Final = os.SEEK_HOLE


async def seek(fs: Filesystem, inode: Inode, offset: int, whence: int) -> int:
    """The offset lseek(``offset``, ``whence``) moves to, for SEEK_DATA / SEEK_HOLE."""
    if whence not in (SEEK_DATA, SEEK_HOLE):
        raise InvalidArgument(f"lseek: whence {whence} is not SEEK_DATA or SEEK_HOLE")
    if inode.extents is None:
        raise InvalidArgument(f"lseek: inode {inode.ino} is not a regular file")
    async with inode.io_lock.shared():
        # The window the shared lock keeps a punch, shift or truncate out of.
        await race_fault("seek_before_lookup")
        size = inode.size
        if offset < 0 or offset >= size:
            raise FsError(
                f"lseek: offset {offset} is outside the file (size {size})", errno=errno.ENXIO
            )
        mapping = fs.cache.mappings.get(inode.ino)
        bs = fs.block_size
        first = offset // bs
        end = blocks_for(size, bs)
        if whence == SEEK_DATA:
            block = _next_data(inode, mapping, first, end)
            if block is None:
                raise FsError(f"lseek: no data at or after {offset}", errno=errno.ENXIO)
        else:
            block = _next_hole(inode, mapping, first, end)
        return min(max(offset, block * bs), size)


def _pending(mapping: Mapping | None, index: int) -> bool:
    """Whether the cache holds data for block ``index`` that the device may not."""
    page = None if mapping is None else mapping.get(index)
    return page is not None and bool((page.dirty | page.writeback) & page.bit(index))


def _next_data(inode: Inode, mapping: Mapping | None, first: int, end: int) -> int | None:
    emap = inode.extents
    assert emap is not None
    found = None
    for ext in emap.extents(first, end):
        if not ext.unwritten:
            found = ext.start
            break
    if mapping is not None and mapping.nr_dirty + mapping.nr_writeback:
        stop = end if found is None else found
        if stop > first:
            for page in mapping.pages.values_in(first, stop - 1):
                pending = (page.dirty | page.writeback) & page.mask(first, stop)
                if pending:
                    return page.index + (pending & -pending).bit_length() - 1
    return found


def _next_hole(inode: Inode, mapping: Mapping | None, first: int, end: int) -> int:
    emap = inode.extents
    assert emap is not None
    block = first
    while block < end:
        ext = emap.lookup(block)
        if ext.pblk is not None and not ext.unwritten:
            block = ext.start + ext.length  # written: data to its end
        elif _pending(mapping, block):
            block += 1
        else:
            return block
    return end
