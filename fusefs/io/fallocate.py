"""fallocate: every mode of fallocate(2) on a regular file.

Locks: the inode lock, exclusive, then the mapping's pagecache lock, BLOCK side,
across the whole operation::

    async with inode.io_lock.exclusive(), mapping.lock.block():

The inode lock keeps writers, truncate, direct IO and other fallocates out (the
size and the mapping change); BLOCK keeps buffered reads and readahead from
putting pages into the cache while the mapping changes underneath them (races 1,
2, 5 and 6 of DESIGN §3).  Lock order: inode lock → pagecache lock → page.

Modes (the Linux flags, `FALLOC_FL_*`):

* ``0`` — allocate: every hole in the blocks touched gets an **unwritten**
  extent (reads as zeros; the first write makes it written); the size grows to
  ``offset + length`` if that is larger.
* ``KEEP_SIZE`` — the same without changing the size (preallocation past EOF).
* ``PUNCH_HOLE | KEEP_SIZE`` — the bytes of the partial blocks at the edges are
  zeroed on the device (read-modify-write); the whole blocks are unmapped and
  freed (deferred until the next commit is durable).  The size never changes.
  Blocks past EOF (preallocated) are punched too, as XFS does.
* ``ZERO_RANGE`` (``| KEEP_SIZE``) — the range reads as zeros and stays
  allocated: holes in the blocks touched (edges included, as ext4) get unwritten
  extents, written whole blocks are **converted in place** to unwritten (unmap
  and map again with the same physical blocks: no data IO, no free, no new
  space, so it cannot fail with ENOSPC over blocks that are already allocated),
  and the partial edge blocks are zeroed on the device.  Grows the size unless
  ``KEEP_SIZE``.
* ``COLLAPSE_RANGE`` — removes ``[offset, offset + length)``: the blocks are
  unmapped and freed, every mapping after them moves down
  (`ExtentMap.shift_left`), the size shrinks by ``length``.
* ``INSERT_RANGE`` — inserts a hole of ``length`` bytes at ``offset``: every
  mapping from there moves up (`ExtentMap.shift_right`), the size grows by
  ``length``.

Errors, in the order they are checked (fallocate(2); vfs_fallocate and ext4):

=============  ================================================================
EINVAL         ``offset < 0`` or ``length <= 0``
EOPNOTSUPP     a mode bit outside the five above; PUNCH_HOLE with ZERO_RANGE;
               PUNCH_HOLE without KEEP_SIZE
EINVAL         COLLAPSE_RANGE or INSERT_RANGE with any other flag
EROFS          the filesystem is read-only
ESPIPE         a FIFO
EISDIR         a directory
ENODEV         anything else that is not a regular file
EFBIG          ``offset + length`` past the maximum file size
EINVAL         collapse/insert: offset or length not a multiple of the block size
EINVAL         collapse: ``offset + length >= size`` (the range reaches EOF)
EFBIG          insert: ``size + length`` past the maximum file size (or a block
               preallocated past EOF would move past it)
EINVAL         insert: ``offset >= size``
ENOSPC         allocate/zero: not enough free space for the holes, even after
               the commit that releases the frees waiting for one
               (`fusefs.reclaim`); nothing is allocated (all or nothing, unlike
               ext4 which keeps what it got)
EIO, ENOSPC    writeback of a dirty page in the range failed first: nothing changed
               (the dirty pages stay, and fsync reports the error too)
=============  ================================================================

Page cache (DESIGN §3).  Before the mapping changes, the cached pages of every
block it touches are written back and dropped: for collapse and insert, every
page from the offset's block to EOF (they all move); for the others, the blocks
of the range — the partial edge blocks written back first (their other bytes
are kept), the whole blocks of a punch or zero range simply discarded (their
contents are going anyway; dirty pages over holes give their reservation back).
Then the ``fallocate_before_change`` race site, the change, and the same range
is dropped again.  With the lock on, that second drop finds nothing; with it
off (demonstration only), it removes what readers inserted meanwhile — except
what they insert *after* it, which is the race the lock exists to close.

Afterwards: ``mtime``/``ctime`` updated, the change marked for the next commit,
and the kernel's cached pages and attributes of the inode invalidated
(`Filesystem.invalidate_kernel`).

Crash safety: new blocks are allocated and only mapped once every device write
of the operation succeeded; a failure frees them at once (`Allocator.free_now`,
nothing durable ever named them).  A device error while zeroing a partial
block can leave that block partly zeroed, the mapping unchanged: the file stays
consistent and the caller gets EIO.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING, Final

from fusefs.alloc import Run, place_runs
from fusefs.errors import (
    FileTooBig,
    FsError,
    InvalidArgument,
    IsADirectory,
    NotSupported,
)
from fusefs.extents import MAX_FILE_BLOCKS, ExtentMap
from fusefs.faults import alloc_buffer, race_fault
from fusefs.io.writeback import discard, write_and_drop

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem
    from fusefs.inode import Inode

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_INSERT_RANGE: Final = 0x20
SUPPORTED_MODES: Final = (
    FALLOC_FL_KEEP_SIZE
    | FALLOC_FL_PUNCH_HOLE
    | FALLOC_FL_COLLAPSE_RANGE
    | FALLOC_FL_ZERO_RANGE
    | FALLOC_FL_INSERT_RANGE
)


# The name of each mode fusefs implements, as ``.fusefs/fallocate`` and the
# stats (``fallocate.kernel.punch``) spell it.
CANONICAL_MODES: Final = {
    0: "alloc",
    FALLOC_FL_KEEP_SIZE: "keep_size",
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: "punch",
    FALLOC_FL_ZERO_RANGE: "zero",
    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE: "zero,keep_size",
    FALLOC_FL_COLLAPSE_RANGE: "collapse",
    FALLOC_FL_INSERT_RANGE: "insert",
}


def mode_name(mode: int) -> str:
    """``collapse``, ``zero,keep_size``... or the flags in hex for anything else."""
    return CANONICAL_MODES.get(mode, f"{mode:#x}")


def check_mode(mode: int, offset: int, length: int) -> None:
    """The checks that need neither the inode nor the size (vfs_fallocate's)."""
    if offset < 0 or length <= 0:
        raise InvalidArgument(f"fallocate: bad range offset={offset} length={length}")
    if mode & ~SUPPORTED_MODES:
        raise NotSupported(f"fallocate: unsupported mode bits {mode & ~SUPPORTED_MODES:#x}")
    if mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE:
        raise NotSupported("fallocate: PUNCH_HOLE and ZERO_RANGE together")
    if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
        raise NotSupported("fallocate: PUNCH_HOLE needs KEEP_SIZE")
    for flag, name in ((FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE"), (FALLOC_FL_INSERT_RANGE, "INSERT")):
        if mode & flag and mode != flag:
            raise InvalidArgument(f"fallocate: {name}_RANGE takes no other flag")


def _check_file(inode: Inode) -> ExtentMap:
    if inode.is_dir:
        raise IsADirectory(f"fallocate: inode {inode.ino} is a directory")
    if stat.S_ISFIFO(inode.mode):
        raise FsError(f"fallocate: inode {inode.ino} is a FIFO", errno=errno.ESPIPE)
    if inode.extents is None or not inode.is_reg:
        raise FsError(f"fallocate: inode {inode.ino} is not a regular file", errno=errno.ENODEV)
    return inode.extents


async def fallocate(fs: Filesystem, inode: Inode, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on ``inode``; see the module docstring for modes and errors."""
    check_mode(mode, offset, length)
    fs._check_writable()
    emap = _check_file(inode)
    bs = fs.block_size
    if offset + length > MAX_FILE_BLOCKS * bs:
        raise FileTooBig(f"fallocate: {offset}+{length} past the maximum file size")
    shifting = mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)
    if shifting and (offset % bs or length % bs):
        raise InvalidArgument(
            f"fallocate: collapse/insert range {offset}+{length} not aligned to the "
            f"{bs}-byte block size"
        )
    mapping = fs.cache.mapping(inode)
    async with inode.io_lock.exclusive(), mapping.lock.block():
        if mode & FALLOC_FL_COLLAPSE_RANGE:
            _check_collapse(inode, offset, length)
        elif mode & FALLOC_FL_INSERT_RANGE:
            _check_insert(inode, emap, offset, length, bs)
        first, end, a, b = _blocks(offset, length, bs)
        drop_end = None if shifting else end
        edges = _edges(offset, length, bs)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            # The partial blocks keep some bytes: write them back.  The whole
            # blocks lose theirs: discard (reserved pages give their block back).
            for lblk, _, _ in edges:
                await write_and_drop(fs, mapping, lblk, lblk + 1, what="fallocate")
            if a < b:
                await discard(fs, mapping, a, b)
        else:
            # Allocate: a page over a hole that gets mapped would keep a stale
            # space state (a reservation it no longer needs, or none when it
            # thinks it needs one).  Collapse, insert: every page from the
            # offset to EOF moves.
            await write_and_drop(fs, mapping, first, drop_end, what="fallocate")
        # Pages are gone and, with the lock on, stay gone: change the mapping.
        await race_fault("fallocate_before_change")
        try:
            if mode & FALLOC_FL_COLLAPSE_RANGE:
                _collapse(fs, emap, inode, first, length // bs)
            elif mode & FALLOC_FL_INSERT_RANGE:
                emap.shift_right(first, length // bs)
                inode.size += length
            elif mode & FALLOC_FL_PUNCH_HOLE:
                await _punch(fs, emap, edges, a, b)
            else:
                await _zero_or_allocate(fs, emap, edges, first, end, a, b, mode)
                if not mode & FALLOC_FL_KEEP_SIZE and offset + length > inode.size:
                    inode.size = offset + length
        finally:
            # After a failure too: a partial block may have been zeroed already.
            fs.invalidate_kernel(inode.ino)
        # With the lock off, readers may have inserted pages of the old layout
        # meanwhile; this drops those that got in before now (not later ones).
        await discard(fs, mapping, first, drop_end)
        inode.touch(m=True)
    fs.mark_changed()


def _check_collapse(inode: Inode, offset: int, length: int) -> None:
    if offset + length >= inode.size:
        raise InvalidArgument(
            f"fallocate: collapse range {offset}+{length} reaches EOF (size {inode.size})"
        )


def _check_insert(inode: Inode, emap: ExtentMap, offset: int, length: int, bs: int) -> None:
    if inode.size + length > MAX_FILE_BLOCKS * bs:
        raise FileTooBig(
            f"fallocate: inserting {length} bytes into a file of {inode.size} passes the "
            f"maximum file size"
        )
    if offset >= inode.size:
        raise InvalidArgument(
            f"fallocate: insert range at {offset} is at or past EOF (size {inode.size})"
        )
    # Blocks preallocated past EOF move too: the last mapped one must stay in range.
    tail = emap.lookup(MAX_FILE_BLOCKS - 1)
    last = MAX_FILE_BLOCKS - 1 if tail.pblk is not None else tail.start - 1
    if last >= offset // bs and last + length // bs >= MAX_FILE_BLOCKS:
        raise FileTooBig(
            f"fallocate: insert range would move block {last} past the maximum file size"
        )


# the page cache:


# the range, in blocks:


def _blocks(offset: int, length: int, bs: int) -> tuple[int, int, int, int]:
    """[first, end): every block touched; [a, b): the whole blocks inside the range."""
    stop = offset + length
    return offset // bs, -(-stop // bs), -(-offset // bs), stop // bs


def _edges(offset: int, length: int, bs: int) -> list[tuple[int, int, int]]:
    """The partial blocks at the edges of the range: (lblk, start, stop) byte ranges."""
    stop = offset + length
    first, last = offset // bs, (stop - 1) // bs
    head, tail = offset % bs, stop % bs
    if first == last:
        return [(first, head, tail or bs)] if head or tail else []
    out = []
    if head:
        out.append((first, head, bs))
    if tail:
        out.append((last, 0, tail))
    return out


async def _zero_partial(fs: Filesystem, emap: ExtentMap, lblk: int, start: int, stop: int) -> None:
    """Zero bytes [start, stop) of block ``lblk`` on the device (like `direct.zero_tail`).

    Holes and unwritten blocks read as zeros already: nothing to do.  Caller
    has written back and dropped the block's page.
    """
    ext = emap.lookup(lblk)
    if ext.pblk is None or ext.unwritten:
        return
    pblk = ext.pblk + (lblk - ext.start)
    block = alloc_buffer("fallocate_zero_block", fs.block_size)
    block[:] = await fs.dev.read(pblk, 1)
    # Nothing else writes the block meanwhile: its page was written back and
    # dropped, and BLOCK keeps a new one out.
    await race_fault("fallocate_zero_partial")
    block[start:stop] = bytes(stop - start)
    await fs.dev.write(pblk, block)


# the changes (caller holds the inode lock and BLOCK, and dropped the pages):


def _collapse(fs: Filesystem, emap: ExtentMap, inode: Inode, first: int, n: int) -> None:
    for pblk, k in emap.unmap(first, n):
        fs.alloc.free(pblk, k)
    emap.shift_left(first, n)
    inode.size -= n * fs.block_size


async def _punch(
    fs: Filesystem, emap: ExtentMap, edges: list[tuple[int, int, int]], a: int, b: int
) -> None:
    for lblk, start, stop in edges:
        await _zero_partial(fs, emap, lblk, start, stop)
    if a < b:
        for pblk, n in emap.unmap(a, b - a):
            fs.alloc.free(pblk, n)


async def _zero_or_allocate(
    fs: Filesystem,
    emap: ExtentMap,
    edges: list[tuple[int, int, int]],
    first: int,
    end: int,
    a: int,
    b: int,
    mode: int,
) -> None:
    """Unwritten extents over the holes of [first, end); for ZERO_RANGE also the
    partial edges zeroed and the written whole blocks [a, b) made unwritten."""
    holes = emap.holes(first, end - first)
    need = sum(n for _, n in holes)
    runs: list[Run] = []
    if need:
        lblk = holes[0][0]
        prev = emap.pblk_of(lblk - 1) if lblk > 0 else None
        # All or nothing: NoSpace here leaves everything as it was.  On a full
        # filesystem this may wait for a commit (`fusefs.reclaim`): the holes
        # stay as they are, the range's pages are dropped and BLOCK keeps them out.
        runs = await fs.reclaim.allocate(need, hint=None if prev is None else prev + 1)
    if mode & FALLOC_FL_ZERO_RANGE:
        try:
            for lblk, start, stop in edges:
                await _zero_partial(fs, emap, lblk, start, stop)
        except BaseException:
            for pblk, n in runs:
                fs.alloc.free_now(pblk, n)  # never mapped, never durable
            raise
        # No await from here on: the conversion and the new mappings land together.
        if a < b:
            for ext in list(emap.extents(a, b)):
                if not ext.unwritten:
                    assert ext.pblk is not None
                    emap.unmap(ext.start, ext.length)
                    emap.map(ext.start, ext.pblk, ext.length, unwritten=True)
    if runs:
        for lblk, pblk, n in place_runs(holes, runs):
            emap.map(lblk, pblk, n, unwritten=True)
