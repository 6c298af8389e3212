"""A null pyfuse3 filesystem: the floor of what any pyfuse3 + trio filesystem reaches here.

Everything lives in a few dicts.  Files hold no data: a read answers zeros up to the
file's recorded size, a write is discarded but extends that size.  It implements just
enough for fio and for a create/stat/unlink loop -- lookup, getattr, setattr,
create, open, read, write, unlink, mkdir, rmdir, readdir, statfs -- and answers each
request with as little work as Python allows, so that what it measures is the cost of
the FUSE round trip through libfuse, pyfuse3 and trio, and nothing else (DESIGN §8).

It is configured like fusefs, so that ratios against it mean something:

- every open returns ``direct_io`` (DESIGN §2): the kernel caches no file data, and
  each read or write is one request;
- positive entry and attribute timeouts: the kernel does not ask twice;
- ``default_permissions``: the kernel checks permissions itself, no ACCESS requests.

Handlers allocate nothing they can avoid: a node's `EntryAttributes` *is* its
inode (it is returned as is; pyfuse3 copies it into the reply), the `FileInfo` of an
open is made once per node, and a read returns a slice of a `memoryview` of one
cached zero buffer.  File handles are inode numbers: nothing is kept per open.
Timestamps are set at creation and by setattr only; a write does not touch them.

Run: ``python -m benchmarks.nullfs MOUNTPOINT`` -- serves in the foreground,
prints ``ready`` on stdout once mounted, unmounts on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final, final

import pyfuse3
import trio

CACHE_TIMEOUT: Final = 60.0
ZERO_CHUNK: Final = 1 << 20  # FUSE requests here are at most 1 MiB

log = logging.getLogger("nullfs")


@final
class Node:
    """One inode: its attributes, and for a directory its entries."""

    __slots__ = ("attr", "children", "file_info", "lookups", "parent")

    def __init__(self, attr: pyfuse3.EntryAttributes, parent: int, *, is_dir: bool) -> None:
        self.attr = attr
        self.parent = parent
        self.children: dict[bytes, int] | None = {} if is_dir else None
        self.file_info = pyfuse3.FileInfo(fh=attr.st_ino, direct_io=True, keep_cache=False)
        self.lookups = 0  # the kernel's references (lookup count), dropped by forget

    def __repr__(self) -> str:
        kind = "dir" if self.children is not None else "file"
        return (
            f"<Node {self.attr.st_ino} {kind} size={self.attr.st_size} "
            f"nlink={self.attr.st_nlink} lookups={self.lookups}>"
        )


@final
class NullOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self) -> None:
        super().__init__()
        self._nodes: dict[int, Node] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._zeros = memoryview(bytes(ZERO_CHUNK))
        root = self._new_node(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, 0, 0)
        root.attr.st_nlink = 2

    def _new_node(self, ino: int, parent: int, mode: int, uid: int, gid: int) -> Node:
        now = time.time_ns()
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_mode = mode
        attr.st_nlink = 1
        attr.st_uid = uid
        attr.st_gid = gid
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        node = Node(attr, parent, is_dir=stat.S_ISDIR(mode))
        self._nodes[ino] = node
        return node

    def _dir(self, ino: int) -> dict[bytes, int]:
        children = self._nodes[ino].children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return children

    def _add(
        self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        children = self._dir(parent)
        if name in children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino = self._next_ino
        self._next_ino += 1
        node = self._new_node(ino, parent, mode, ctx.uid, ctx.gid)
        node.lookups = 1
        children[name] = ino
        return node.attr

    def _remove(self, parent: int, name: bytes, *, is_dir: bool) -> None:
        children = self._dir(parent)
        ino = children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._nodes[ino]
        if is_dir:
            if node.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if node.children:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self._nodes[parent].attr.st_nlink -= 1
        elif node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        del children[name]
        node.attr.st_nlink = 0
        if node.lookups == 0:
            del self._nodes[ino]

    # names and attributes:

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = self._nodes[parent_inode].parent
        else:
            found = self._dir(parent_inode).get(name)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            ino = found
        node = self._nodes[ino]
        node.lookups += 1
        return node.attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self._nodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and node.attr.st_nlink == 0:
                del self._nodes[ino]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._nodes[inode].attr

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        mine = self._nodes[inode].attr
        if fields.update_size:
            mine.st_size = attr.st_size
        if fields.update_mode:
            mine.st_mode = stat.S_IFMT(mine.st_mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            mine.st_uid = attr.st_uid
        if fields.update_gid:
            mine.st_gid = attr.st_gid
        if fields.update_atime:
            mine.st_atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            mine.st_mtime_ns = attr.st_mtime_ns
        mine.st_ctime_ns = time.time_ns()
        return mine

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self._add(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        attr.st_nlink = 2
        self._nodes[parent_inode].attr.st_nlink += 1
        return attr

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, is_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, is_dir=True)

    # files:

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = self._add(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return self._nodes[attr.st_ino].file_info, attr

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._nodes[inode]
        if flags & os.O_TRUNC:
            node.attr.st_size = 0
        return node.file_info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        left = self._nodes[fh].attr.st_size - off
        if left <= 0:
            return b""
        size = min(size, left)
        if size > len(self._zeros):  # never seen with 1 MiB requests; keep correct anyway
            self._zeros = memoryview(bytes(size))
        # pyfuse3 takes any buffer (PyObject_GetBuffer); the stubs say bytes.
        return self._zeros[:size]  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        attr = self._nodes[fh].attr
        end = off + len(buf)
        if end > attr.st_size:
            attr.st_size = end
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    # directories:

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries in insertion order; next_id is the position after an entry.  Good
        # enough for a benchmark: a listing that races with unlinks may skip a name.
        entries = list(self._dir(fh).items())
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            node = self._nodes[ino]
            if not pyfuse3.readdir_reply(token, name, node.attr, index + 1):
                break
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 30  # 4 TiB, all free
        out.f_files = out.f_ffree = out.f_favail = 1 << 30
        out.f_namemax = 255
        return out


# serving:


async def _serve(ops: NullOperations, mountpoint: str) -> None:
    stopped = False

    async def watch(signals: AsyncIterator[int]) -> None:
        nonlocal stopped
        async for _ in signals:
            stopped = True
            pyfuse3.terminate()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        pyfuse3.init(ops, mountpoint, {"fsname=nullfs", "subtype=nullfs", "default_permissions"})
        print("ready", flush=True)
        # After a signal (or a crash) the kernel side is still mounted; after
        # `fusermount3 -u` it is not, and pyfuse3.main simply returns.
        unmount = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, signals)
                await pyfuse3.main()
                unmount = stopped
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=unmount)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.nullfs",
        description="Mount a null filesystem (zeros in, nothing kept) in the foreground.",
    )
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nullfs: %(levelname)s %(message)s")
    ops = NullOperations()
    try:
        trio.run(_serve, ops, args.mountpoint)
    except RuntimeError as e:  # pyfuse3.init: libfuse printed the reason already
        print(f"nullfs: cannot mount on {args.mountpoint}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
