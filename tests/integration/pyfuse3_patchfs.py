"""A one-file pyfuse3 filesystem for the pyfuse3 patch's own tests
(test_pyfuse3_patch.py): it answers FUSE_FALLOCATE by recording the call and
FUSE_LSEEK from a fixed layout, and nothing else beyond what a lookup, a stat and
an open need.

    python pyfuse3_patchfs.py MOUNTPOINT RECORD [--plain]

Every fallocate request is appended to RECORD as a line ``MODE OFFSET LENGTH`` before
the reply, so the caller sees it once its syscall returns.  ``--plain`` serves without
the two new handlers: the defaults must behave as an unpatched pyfuse3 does.  The file
is opened ``direct_io``, as fusefs opens every file.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Sequence
from typing import Final

import pyfuse3
import trio

FILE_NAME: Final = b"file"
FILE_INODE: Final = pyfuse3.ROOT_INODE + 1
FILE_SIZE: Final = 1 << 20
# The data extents of the file, [start, end); everything else up to the size is hole.
DATA: Final = ((0, 64 << 10), (256 << 10, 320 << 10))
KEEP_SIZE: Final = 0x01
PUNCH_HOLE: Final = 0x02


class PlainFs(pyfuse3.Operations):
    """The file and nothing else; fallocate and lseek left to pyfuse3's defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.size = FILE_SIZE

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode == FILE_INODE:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # No caching: every stat after a fallocate asks again.
        attr.attr_timeout = 0
        attr.entry_timeout = 0
        return attr

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE, ctx)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        return bytes(
            1 if any(start <= pos < stop for start, stop in DATA) else 0 for pos in range(off, end)
        )

    async def release(self, fh: int) -> None:
        pass


class PatchFs(PlainFs):
    """`PlainFs` answering FUSE_FALLOCATE and FUSE_LSEEK."""

    def __init__(self, record: str) -> None:
        super().__init__()
        self.record_fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def fallocate(self, inode: int, fh: int, mode: int, offset: int, length: int) -> None:
        os.write(self.record_fd, f"{mode} {offset} {length}\n".encode())
        if not mode & (KEEP_SIZE | PUNCH_HOLE):
            self.size = max(self.size, offset + length)

    async def lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        if offset >= self.size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            for start, stop in DATA:
                if offset < stop:
                    return max(start, offset)
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence == os.SEEK_HOLE:
            for start, stop in DATA:
                if start <= offset < stop:
                    return stop
            return offset
        raise pyfuse3.FUSEError(errno.EINVAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("record")
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args(argv)
    ops = PlainFs() if args.plain else PatchFs(args.record)
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfuse3_patchfs")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
