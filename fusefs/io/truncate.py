"""Truncate: change a regular file's size, down or up.

Locks: the inode lock, exclusive, and the mapping's pagecache lock, BLOCK side.

Down: wait for writeback past the new EOF, drop those pages (dirty ones are
discarded: the data is being cut off), zero the tail of the page and of the
block holding the new EOF (through the page's writeback when it is dirty, see
`_zero_eof_block`), unmap and free the blocks past it (the frees are
deferred until the next commit is durable).  Up: drop any page past the old EOF
(none can exist with the lock on; with it off, readahead may have put stale
pages there — race 4 of DESIGN §3), and the new range reads as zeros.

Either way the kernel's cached pages of the inode are invalidated afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusefs.errors import InvalidArgument, IsADirectory
from fusefs.extents import MAX_FILE_BLOCKS
from fusefs.faults import dynamic_fault, race_fault
from fusefs.io import direct
from fusefs.io.writeback import discard, wait_writeback, writeback_range

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem
    from fusefs.inode import Inode
    from fusefs.pagecache import Mapping


async def truncate(fs: Filesystem, inode: Inode, size: int) -> None:
    if inode.is_dir:
        raise IsADirectory(f"inode {inode.ino} is a directory")
    emap = inode.extents
    if emap is None:
        raise InvalidArgument(f"inode {inode.ino} is not a regular file")
    direct.check_file_range(size, 0, fs.block_size)
    bs = fs.block_size
    mapping = fs.cache.mapping(inode)
    async with inode.io_lock.exclusive(), mapping.lock.block():
        old = inode.size
        if size < old:
            keep = direct.blocks_for(size, bs)
            await discard(fs, mapping, keep, None)
            await race_fault("truncate_before_unmap")
            if size % bs:
                await _zero_eof_block(fs, mapping, size)
            if keep < MAX_FILE_BLOCKS:
                for pblk, n in emap.unmap(keep, MAX_FILE_BLOCKS - keep):
                    fs.alloc.free(pblk, n)
        else:
            # Nothing can be cached past EOF with the lock on; with it off,
            # readahead may have put stale pages past the *old* EOF, and only
            # pages past the new one go (as the kernel's truncate_pagecache).
            await discard(fs, mapping, direct.blocks_for(size, bs), None)
        inode.size = size
        inode.touch(m=True)
    fs.mark_changed()
    fs.invalidate_kernel(inode.ino)


async def _zero_eof_block(fs: Filesystem, mapping: Mapping, size: int) -> None:
    """Zero the tail of the block holding the new EOF, in the page and on the device.

    Caller must hold the inode lock (no writer can dirty the page) and BLOCK
    (no fill can bring the page in).  A dirty page is the newest copy of the
    block: its tail is zeroed and it is written back, and the device block is
    left to that writeback -- a read-modify-write of the device block would
    race with it (writeback takes no lock: the flusher, ``drop_caches`` or a
    throttled writer can write the page between the read and the write, and
    the block would then get the old head back).  A clean or absent page can
    not be written back, so the device block is zeroed in place.
    """
    bs = fs.block_size
    index = size // bs
    emap = mapping.inode.extents
    assert emap is not None
    await wait_writeback(mapping, index, index + 1)
    page = mapping.get(index)
    if page is not None:
        # Pages past the block were dropped (a page reaching past it split).
        page.view(index, index + 1, bs)[size % bs :] = bytes(bs - size % bs)
        # The self-test site zeroes the device block in place under a dirty
        # page, as truncate once did: the stress tools must catch that.
        if page.is_dirty(index) and not dynamic_fault(
            "truncate_zero_under_dirty_page", cls="error:selftest"
        ):
            # A failure leaves the page dirty (zeroed tail and all) and the
            # error on the mapping for fsync, as any writeback.
            await writeback_range(fs, mapping, index, index + 1, wait=True)
            return
    await direct.zero_tail(fs.dev, emap, size)
