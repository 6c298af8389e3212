"""Truncate: change a regular file's size, down or up.

Locks: the inode lock, exclusive, and the mapping's pagecache lock, BLOCK side.

Down: wait for writeback past the new EOF, drop those pages (dirty ones are
discarded: the data is being cut off), zero the tail of the page and of the
block holding the new EOF, unmap and free the blocks past it (the frees are
deferred until the next commit is durable).  Up: drop any page past the old EOF
(none can exist with the lock on; with it off, readahead may have put stale
pages there — race 4 of DESIGN §3), and the new range reads as zeros.

Either way the kernel's cached pages of the inode are invalidated afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusefs.errors import InvalidArgument, IsADirectory
from fusefs.extents import MAX_FILE_BLOCKS
from fusefs.faults import race_fault
from fusefs.io import direct
from fusefs.io.writeback import discard, wait_writeback

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem
    from fusefs.inode import Inode


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
                # The block holding EOF keeps its head; its tail must read as zeros.
                await wait_writeback(mapping, size // bs, keep)
                page = mapping.get(size // bs)
                if page is not None:
                    page.data[size % bs :] = bytes(bs - size % bs)
                await direct.zero_tail(fs.dev, emap, size)
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
