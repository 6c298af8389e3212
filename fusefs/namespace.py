"""The namespace: the inode table, directories, links, rename, attributes, xattrs.

Every method here is synchronous: it checks, then changes the table, with no
await in between, so under trio it is atomic with respect to every other task
(the loop itself is the namespace lock).  Errors are the core's `FsError`
classes with the errno Linux filesystems give (rename(2), unlink(2), rmdir(2),
link(2), setxattr(2)).

An inode whose link count reaches zero while it is still open stays in the
table — and in checkpoints, with ``nlink == 0`` — until its last handle is
released; such *orphans* are reclaimed at the next mount if the daemon dies
first.  Freeing an inode's blocks is the caller's job (`Namespace.unlink`
returns the inode when it has become unreferenced).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import NamedTuple

from fusefs.dirents import Directory
from fusefs.errors import (
    ArgumentTooBig,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoData,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    OutOfRange,
)
from fusefs.extents import ExtentMap
from fusefs.inode import Inode, now_ns
from fusefs.journal import Changes, Tracker, collect

ROOT_INO = 1
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


class Unlinked(NamedTuple):
    """What an unlink or a replacing rename left behind."""

    inode: Inode
    unreferenced: bool  # no links and no open handles: the caller frees it


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes (max {NAME_MAX})")
    if not name or b"/" in name or name in (b".", b".."):
        raise InvalidArgument(f"bad name {name!r}")


class Namespace:
    """The inode table and the operations on names."""

    def __init__(self, inodes: dict[int, Inode], next_ino: int) -> None:
        self.inodes = inodes
        self.next_ino = next_ino
        self.track = Tracker()
        for inode in inodes.values():
            self.track.adopt(inode)

    # what a commit reads (`fusefs.commit.Source`):

    def collect(self) -> Changes:
        return collect(self.track, self.inodes, self.next_ino)

    def inode_numbers(self) -> list[int]:
        return list(self.inodes)

    def inode(self, ino: int) -> Inode | None:
        return self.inodes.get(ino)

    def remove(self, inode: Inode) -> None:
        """Take an inode without links or handles out of the table."""
        del self.inodes[inode.ino]
        self.track.removed(inode)

    # lookups:

    def get(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise NotFound(f"inode {ino} does not exist")
        return inode

    def dir(self, ino: int) -> Inode:
        inode = self.get(ino)
        if inode.entries is None:
            raise NotADirectory(f"inode {ino} is not a directory")
        return inode

    def lookup(self, parent: int, name: bytes) -> Inode:
        return self._lookup_in(self.dir(parent), name)

    def _lookup_in(self, d: Inode, name: bytes) -> Inode:
        inode = self._find_in(d, name)
        if inode is None:
            raise NotFound(f"no entry {name!r} in directory {d.ino}")
        return inode

    def find(self, parent: int, name: bytes) -> Inode | None:
        """`lookup`, but None for a name that is not there: the lookup before
        every create misses, and an exception would cost it a third."""
        return self._find_in(self.dir(parent), name)

    def _find_in(self, d: Inode, name: bytes) -> Inode | None:
        if name == b".":
            return d
        if name == b"..":
            return self.get(d.parent)
        if len(name) > NAME_MAX:
            raise NameTooLong(f"name of {len(name)} bytes (max {NAME_MAX})")
        assert d.entries is not None
        ino = d.entries.get(name)
        return None if ino is None else self.get(ino)

    def iter_inodes(self) -> Iterator[Inode]:
        return iter(self.inodes.values())

    # creation:

    def _new_inode(self, mode: int, uid: int, gid: int, rdev: int = 0) -> Inode:
        ino = self.next_ino
        self.next_ino += 1
        t = now_ns()
        is_dir = stat.S_ISDIR(mode)
        inode = Inode(
            ino=ino,
            mode=mode,
            uid=uid,
            gid=gid,
            nlink=2 if is_dir else 1,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
            rdev=rdev,
            generation=1,
            entries=Directory() if is_dir else None,
            extents=ExtentMap() if stat.S_ISREG(mode) else None,
        )
        self.inodes[ino] = inode
        self.track.new(inode)
        return inode

    def _free_slot(self, parent: int, name: bytes) -> Inode:
        check_name(name)
        d = self.dir(parent)
        assert d.entries is not None
        if name in d.entries:
            raise Exists(f"{name!r} exists")
        return d

    def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        """Create a file, FIFO, socket or device node (mknod and create)."""
        d = self._free_slot(parent, name)
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt == stat.S_IFDIR or fmt == stat.S_IFLNK:
            raise InvalidArgument("create: use mkdir/symlink")
        inode = self._new_inode(fmt | stat.S_IMODE(mode), uid, gid, rdev)
        self._link_into(d, name, inode)
        return inode

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        d = self._free_slot(parent, name)
        inode = self._new_inode(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
        inode.parent = d.ino
        self._link_into(d, name, inode)
        d.nlink += 1
        return inode

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        d = self._free_slot(parent, name)
        if not target or len(target) > 4095:
            raise (
                NameTooLong("symlink target too long")
                if target
                else InvalidArgument("empty symlink target")
            )
        inode = self._new_inode(stat.S_IFLNK | 0o777, uid, gid)
        inode.target = target
        inode.size = len(target)
        self._link_into(d, name, inode)
        return inode

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        inode = self.get(ino)
        if inode.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        if inode.nlink == 0:
            raise NotFound("cannot link an unlinked file")
        d = self._free_slot(new_parent, new_name)
        self._link_into(d, new_name, inode)
        inode.nlink += 1
        inode.touch()
        return inode

    def _link_into(self, d: Inode, name: bytes, inode: Inode) -> None:
        assert d.entries is not None
        d.entries[name] = inode.ino
        self.track.dirent(d.ino, name)
        d.touch(m=True)

    # removal:

    def _drop_link(self, inode: Inode) -> Unlinked:
        # A directory loses its "." link with its name: both go at once.
        inode.nlink = 0 if inode.is_dir else inode.nlink - 1
        inode.touch()
        unreferenced = inode.nlink == 0 and inode.open_count == 0
        if unreferenced:
            self.remove(inode)
        return Unlinked(inode, unreferenced)

    def unlink(self, parent: int, name: bytes) -> Unlinked:
        d = self.dir(parent)
        inode = self._lookup_in(d, name)
        if inode.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        assert d.entries is not None
        del d.entries[name]
        self.track.dirent(d.ino, name)
        d.touch(m=True)
        return self._drop_link(inode)

    def rmdir(self, parent: int, name: bytes) -> Unlinked:
        if name == b".":
            raise InvalidArgument("rmdir of '.'")
        if name == b"..":
            raise NotEmpty("rmdir of '..'")
        d = self.dir(parent)
        inode = self._lookup_in(d, name)
        if not inode.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if inode.entries:
            raise NotEmpty(f"{name!r} is not empty")
        assert d.entries is not None
        del d.entries[name]
        self.track.dirent(d.ino, name)
        d.nlink -= 1
        d.touch(m=True)
        return self._drop_link(inode)

    # rename:

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """Whether directory ``ancestor`` is ``ino`` or one of its ancestors."""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO or seen > len(self.inodes):
                return False
            ino = self.get(ino).parent
            seen += 1

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> Unlinked | None:
        """rename(2) and renameat2(2); returns the replaced inode, if any."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise InvalidArgument(f"rename: unknown flags {flags:#x}")
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise InvalidArgument("rename: NOREPLACE and EXCHANGE together")
        check_name(new_name)
        src_dir = self.dir(old_parent)
        dst_dir = self.dir(new_parent)
        src = self.lookup(old_parent, old_name)
        assert src_dir.entries is not None
        assert dst_dir.entries is not None
        dst_ino = dst_dir.entries.get(new_name)
        dst = self.inodes[dst_ino] if dst_ino is not None else None

        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise NotFound(f"rename exchange: {new_name!r} does not exist")
            self._exchange(src_dir, old_name, src, dst_dir, new_name, dst)
            return None
        if dst is not None and flags & RENAME_NOREPLACE:
            raise Exists(f"{new_name!r} exists")
        if src.is_dir and self._is_ancestor(src.ino, new_parent):
            raise InvalidArgument("rename: a directory cannot move into itself")
        if dst is src:
            return None
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise NotADirectory(f"{new_name!r} is not a directory")
            if not src.is_dir and dst.is_dir:
                raise IsADirectory(f"{new_name!r} is a directory")
            if dst.is_dir and dst.entries:
                raise NotEmpty(f"{new_name!r} is not empty")
            if dst.is_dir and self._is_ancestor(dst.ino, old_parent):
                raise NotEmpty("rename: target is an ancestor of the source")

        del src_dir.entries[old_name]
        replaced: Unlinked | None = None
        if dst is not None:
            del dst_dir.entries[new_name]
            if dst.is_dir:
                dst_dir.nlink -= 1
            replaced = self._drop_link(dst)
        dst_dir.entries[new_name] = src.ino
        self.track.dirent(src_dir.ino, old_name)
        self.track.dirent(dst_dir.ino, new_name)
        if src.is_dir and src_dir is not dst_dir:
            src.parent = dst_dir.ino
            src_dir.nlink -= 1
            dst_dir.nlink += 1
        src.touch()
        src_dir.touch(m=True)
        dst_dir.touch(m=True)
        return replaced

    def _exchange(
        self,
        src_dir: Inode,
        old_name: bytes,
        src: Inode,
        dst_dir: Inode,
        new_name: bytes,
        dst: Inode,
    ) -> None:
        if src is dst:
            return None
        if src.is_dir and self._is_ancestor(src.ino, dst_dir.ino):
            raise InvalidArgument("rename exchange: a directory cannot move into itself")
        if dst.is_dir and self._is_ancestor(dst.ino, src_dir.ino):
            raise InvalidArgument("rename exchange: a directory cannot move into itself")
        assert src_dir.entries is not None
        assert dst_dir.entries is not None
        src_dir.entries[old_name] = dst.ino
        dst_dir.entries[new_name] = src.ino
        self.track.dirent(src_dir.ino, old_name)
        self.track.dirent(dst_dir.ino, new_name)
        if src_dir is not dst_dir:
            if src.is_dir:
                src.parent = dst_dir.ino
                src_dir.nlink -= 1
                dst_dir.nlink += 1
            if dst.is_dir:
                dst.parent = src_dir.ino
                dst_dir.nlink -= 1
                src_dir.nlink += 1
        for inode in (src, dst):
            inode.touch()
        src_dir.touch(m=True)
        dst_dir.touch(m=True)

    # attributes:

    def chmod(self, inode: Inode, mode: int) -> None:
        inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)

    # xattrs (user.* only, as a test filesystem needs):

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name:
            raise InvalidArgument("empty xattr name")
        if len(name) > XATTR_NAME_MAX:
            raise OutOfRange(f"xattr name of {len(name)} bytes (max {XATTR_NAME_MAX})")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        inode = self.get(ino)
        self._check_xattr_name(name)
        value = inode.xattrs.get(name)
        if value is None:
            raise NoData(f"no xattr {name!r}")
        return value

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        inode = self.get(ino)
        self._check_xattr_name(name)
        if not name.startswith(b"user."):
            raise NotSupported(f"xattr namespace of {name!r} not supported (user.* only)")
        if len(value) > XATTR_SIZE_MAX:
            raise ArgumentTooBig(f"xattr value of {len(value)} bytes")
        exists = name in inode.xattrs
        if flags & XATTR_CREATE and exists:
            raise Exists(f"xattr {name!r} exists")
        if flags & XATTR_REPLACE and not exists:
            raise NoData(f"no xattr {name!r}")
        inode.xattrs[name] = bytes(value)
        inode.touch()

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.get(ino).xattrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        inode = self.get(ino)
        self._check_xattr_name(name)
        if inode.xattrs.pop(name, None) is None:
            raise NoData(f"no xattr {name!r}")
        inode.touch()
