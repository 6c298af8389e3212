"""The filesystem core: one object with async methods, no FUSE.

`Filesystem` ties the layers together — block device, allocator, namespace,
committer, the data paths — and is what `fuse_ops` translates to and what the
unit tests drive in-process.  Every public method takes and returns plain
values (`Attr`, bytes, ints) and raises only `FsError` subclasses.

Life cycle: `Filesystem.mount` reads and verifies the checkpoint, rebuilds the
allocator from the mappings, reclaims orphans (files unlinked while open when
the last daemon died) and starts the background commit task; `unmount` stops it
and commits a last time.

Errors: a failed commit leaves the last durable state on disk and turns the
filesystem read-only (like ext4's errors=remount-ro): every later change gets
EROFS, reads keep working from memory.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, final

import trio

from fusefs.alloc import Allocator, Run
from fusefs.blockdev import BlockDevice
from fusefs.commit import Committer, load_checkpoint
from fusefs.errors import (
    Corrupt,
    FsError,
    InvalidArgument,
    IOFailure,
    IsADirectory,
    ReadOnly,
)
from fusefs.extents import MAX_FILE_BLOCKS
from fusefs.faults import REGISTRY, dynamic_fault
from fusefs.format import FIRST_DATA_BLOCK, VERSION, normalize_runs, probe_block_size
from fusefs.inode import Inode, now_ns
from fusefs.io import direct
from fusefs.namespace import NAME_MAX, ROOT_INO, Namespace, Unlinked

log = logging.getLogger(__name__)

NOW: Any = object()
"""Sentinel for `Filesystem.setattr` times: the current time."""


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int


@dataclass
class MountOptions:
    read_only: bool = False
    commit_interval: float = 5.0
    faults: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> MountOptions:
        """``-o`` options: ``ro``, ``rw``, ``commit=SECONDS``."""
        opts = cls()
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, _, value = item.partition("=")
            if key == "ro":
                opts.read_only = True
            elif key == "rw":
                opts.read_only = False
            elif key == "commit":
                try:
                    opts.commit_interval = float(value)
                except ValueError:
                    raise InvalidArgument(f"bad commit interval {value!r}") from None
                if opts.commit_interval <= 0:
                    raise InvalidArgument("commit interval must be positive")
            else:
                raise InvalidArgument(f"unknown mount option {key!r}")
        return opts


@dataclass(eq=False)
class Handle:
    inode: Inode
    flags: int

    @property
    def direct(self) -> bool:
        return bool(self.flags & os.O_DIRECT)


@dataclass(eq=False)
class DirHandle:
    inode: Inode
    names: list[tuple[bytes, int]]


@final
class Filesystem:
    """A mounted fusefs image, driven in-process or through `fuse_ops`."""

    def __init__(
        self,
        dev: BlockDevice,
        alloc: Allocator,
        namespace: Namespace,
        committer: Committer,
        options: MountOptions,
    ) -> None:
        self.dev = dev
        self.alloc = alloc
        self.ns = namespace
        self.committer = committer
        self.options = options
        self.block_size = dev.block_size
        self.read_only = options.read_only
        self.ro_reason = "mounted read-only" if options.read_only else ""
        self.dirty = False
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self._done = trio.Event()
        self.counters = {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0}

    def __repr__(self) -> str:
        return f"<Filesystem {self.dev.path!r} inodes={len(self.ns.inodes)}>"

    # mount and unmount:

    @classmethod
    async def mount(
        cls, image: str | os.PathLike[str], options: MountOptions | None = None
    ) -> Filesystem:
        """Open ``image``, verify it, recover, and start background commits."""
        options = options or MountOptions()
        if options.faults:
            REGISTRY.apply_startup(options.faults)
        if dynamic_fault("mount_open", cls="error:mount"):
            raise IOFailure("mount: injected error opening the image")
        path = os.fspath(image)
        bs = await trio.to_thread.run_sync(probe_block_size, path)
        try:
            dev = BlockDevice(path, bs, read_only=options.read_only)
        except OSError as e:
            raise IOFailure(f"{path}: {e.strerror}") from None
        try:
            fs = await trio.to_thread.run_sync(cls._load, dev, options)
        except BaseException:
            dev.close()
            raise
        if not fs.read_only:
            await fs._recover()
        return fs

    @classmethod
    def _load(cls, dev: BlockDevice, options: MountOptions) -> Filesystem:
        loaded = load_checkpoint(dev)
        state = loaded.state
        inodes: dict[int, Inode] = {}
        try:
            for rec in state["inodes"]:
                inode = Inode.from_record(rec)
                inodes[inode.ino] = inode
            next_ino = int(state["next_ino"])
        except (KeyError, TypeError, ValueError) as e:
            raise Corrupt(f"checkpoint body: bad inode table ({e})") from None
        if ROOT_INO not in inodes or not inodes[ROOT_INO].is_dir:
            raise Corrupt("checkpoint body: no root directory")
        used = list(mapped_runs(inodes.values())) + list(loaded.runs)
        alloc = Allocator.from_used(loaded.superblock.device_blocks, FIRST_DATA_BLOCK, used)
        committer = Committer(dev, alloc, loaded)
        return cls(dev, alloc, Namespace(inodes, next_ino), committer, options)

    async def _recover(self) -> None:
        """Reclaim orphans left by a daemon that died with unlinked files open."""
        if dynamic_fault("mount_recover", cls="error:mount"):
            raise IOFailure("mount: injected error during recovery")
        orphans = [i for i in self.ns.inodes.values() if i.nlink == 0]
        for inode in orphans:
            del self.ns.inodes[inode.ino]
            self._free_blocks(inode)
        if orphans:
            log.info("recovery: reclaimed %d orphan inode(s)", len(orphans))
            await self.commit()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (periodic commits) until `unmount`."""
        with trio.CancelScope() as scope:
            self._cancel = scope
            task_status.started()
            while True:
                await trio.sleep(self.options.commit_interval)
                if self.dirty and not self.read_only:
                    try:
                        await self.commit()
                    except FsError as e:
                        log.error("background commit failed: %s", e)
        self._done.set()

    async def unmount(self) -> None:
        """Commit everything and close the image; raises if the last commit failed."""
        if self._cancel is not None:
            self._cancel.cancel()
            await self._done.wait()
        try:
            if not self.read_only:
                await self.commit()
            elif self.ro_reason and not self.options.read_only:
                raise ReadOnly(f"unmounted read-only after an error: {self.ro_reason}")
        finally:
            self.dev.close()

    # commit:

    def _snapshot(self) -> dict[str, Any]:
        inodes = list(self.ns.inodes.values())
        return {
            "format": VERSION,
            "next_ino": self.ns.next_ino,
            "generation": 1,
            "inodes": [i.to_record() for i in inodes],
            "used": [list(r) for r in mapped_runs(inodes)],
        }

    async def commit(self) -> None:
        """Make every change so far durable (DESIGN §6)."""
        self._check_writable()
        self.dirty = False
        try:
            await self.committer.commit(self._snapshot)
        except FsError as e:
            self.dirty = True
            self._go_read_only(f"commit failed: {e}")
            raise IOFailure(f"commit failed: {e}") from e

    def _go_read_only(self, reason: str) -> None:
        if not self.read_only:
            log.error("fusefs: %s; the filesystem is now read-only", reason)
        self.read_only = True
        self.ro_reason = reason

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"read-only filesystem ({self.ro_reason})")

    def _changed(self) -> None:
        self.dirty = True

    # attributes:

    def attr(self, inode: Inode) -> Attr:
        bs = self.block_size
        blocks = inode.extents.mapped_blocks() * (bs // 512) if inode.extents is not None else 0
        return Attr(
            ino=inode.ino,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            rdev=inode.rdev,
            size=inode.size,
            blocks=blocks,
            blksize=bs,
            atime_ns=inode.atime_ns,
            mtime_ns=inode.mtime_ns,
            ctime_ns=inode.ctime_ns,
            generation=inode.generation,
        )

    async def lookup(self, parent: int, name: bytes) -> Attr:
        inode = self.ns.lookup(parent, name)
        inode.lookups += 1
        return self.attr(inode)

    async def getattr(self, ino: int) -> Attr:
        return self.attr(self.ns.get(ino))

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: Any = None,
        mtime_ns: Any = None,
        fh: int | None = None,
    ) -> Attr:
        self._check_writable()
        inode = self.ns.get(ino)
        if size is not None:
            await self.truncate(inode, size)
        if mode is not None:
            self.ns.chmod(inode, mode)
        if uid is not None and uid != 0xFFFFFFFF:
            inode.uid = uid
        if gid is not None and gid != 0xFFFFFFFF:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = now_ns() if atime_ns is NOW else int(atime_ns)
        if mtime_ns is not None:
            inode.mtime_ns = now_ns() if mtime_ns is NOW else int(mtime_ns)
        inode.touch()
        self._changed()
        return self.attr(inode)

    # namespace:

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        self._check_writable()
        inode = self.ns.create(parent, name, mode, uid, gid, rdev)
        inode.lookups += 1
        self._changed()
        return self.attr(inode)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        self._check_writable()
        inode = self.ns.mkdir(parent, name, mode, uid, gid)
        inode.lookups += 1
        self._changed()
        return self.attr(inode)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        self._check_writable()
        inode = self.ns.symlink(parent, name, target, uid, gid)
        inode.lookups += 1
        self._changed()
        return self.attr(inode)

    async def readlink(self, ino: int) -> bytes:
        inode = self.ns.get(ino)
        if not inode.is_symlink:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        return inode.target

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._check_writable()
        inode = self.ns.link(ino, new_parent, new_name)
        inode.lookups += 1
        self._changed()
        return self.attr(inode)

    async def unlink(self, parent: int, name: bytes) -> None:
        self._check_writable()
        self._reap(self.ns.unlink(parent, name))
        self._changed()

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._check_writable()
        self._reap(self.ns.rmdir(parent, name))
        self._changed()

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable()
        replaced = self.ns.rename(old_parent, old_name, new_parent, new_name, flags)
        if replaced is not None:
            self._reap(replaced)
        self._changed()

    def _reap(self, gone: Unlinked) -> None:
        if gone.unreferenced:
            self._free_blocks(gone.inode)

    def _free_blocks(self, inode: Inode) -> None:
        if inode.extents is None:
            return
        for pblk, n in inode.extents.unmap(0, MAX_FILE_BLOCKS):
            self.alloc.free(pblk, n)

    # files:

    def _new_fh(self, handle: Handle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _file(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if not isinstance(handle, Handle):
            raise InvalidArgument(f"bad file handle {fh}", errno=errno.EBADF)
        return handle

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attr]:
        self._check_writable()
        inode = self.ns.create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        inode.lookups += 1
        inode.open_count += 1
        self._changed()
        return self._new_fh(Handle(inode, flags)), self.attr(inode)

    async def open(self, ino: int, flags: int) -> int:
        inode = self.ns.get(ino)
        if inode.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        accmode = flags & os.O_ACCMODE
        if accmode != os.O_RDONLY or flags & os.O_TRUNC:
            self._check_writable()
        if flags & os.O_TRUNC and inode.is_reg:
            await self.truncate(inode, 0)
        inode.open_count += 1
        return self._new_fh(Handle(inode, flags))

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._file(fh)
        inode = handle.inode
        if inode.extents is None:
            raise InvalidArgument("read of a file without data")
        async with inode.io_lock.shared():
            data = await direct.read_range(self.dev, inode.extents, inode.size, offset, size)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._check_writable()
        handle = self._file(fh)
        inode = handle.inode
        if inode.extents is None:
            raise InvalidArgument("write to a file without data")
        if handle.flags & os.O_APPEND:
            offset = inode.size
        direct.check_file_range(offset, len(data), self.block_size)
        async with inode.io_lock.exclusive():
            await direct.write_range(self.dev, self.alloc, inode.extents, offset, data)
            inode.size = max(inode.size, offset + len(data))
            inode.touch(m=True)
        self._changed()
        self.counters["writes"] += 1
        self.counters["bytes_written"] += len(data)
        return len(data)

    async def truncate(self, inode: Inode, size: int) -> None:
        """Change a regular file's size: free blocks past EOF, zero the tail."""
        self._check_writable()
        if inode.is_dir:
            raise IsADirectory(f"inode {inode.ino} is a directory")
        if inode.extents is None:
            raise InvalidArgument(f"inode {inode.ino} is not a regular file")
        direct.check_file_range(size, 0, self.block_size)
        async with inode.io_lock.exclusive():
            if size < inode.size:
                await direct.zero_tail(self.dev, inode.extents, size)
                keep = direct.blocks_for(size, self.block_size)
                if keep < MAX_FILE_BLOCKS:
                    for pblk, n in inode.extents.unmap(keep, MAX_FILE_BLOCKS - keep):
                        self.alloc.free(pblk, n)
            inode.size = size
            inode.touch(m=True)
        self._changed()

    async def flush(self, fh: int) -> None:
        self._file(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._file(fh)
        if self.read_only:
            if self.ro_reason and not self.options.read_only:
                raise IOFailure(f"fsync on a filesystem gone read-only: {self.ro_reason}")
            return
        await self.commit()

    async def release(self, fh: int) -> None:
        handle = self._file(fh)
        del self._handles[fh]
        inode = handle.inode
        inode.open_count -= 1
        if inode.nlink == 0 and inode.open_count == 0 and inode.ino in self.ns.inodes:
            del self.ns.inodes[inode.ino]
            self._free_blocks(inode)
            self._changed()

    # directories:

    async def opendir(self, ino: int) -> int:
        d = self.ns.dir(ino)
        assert d.entries is not None
        return self._new_fh(DirHandle(d, list(d.entries.items())))

    async def readdir(self, fh: int, start_id: int) -> list[tuple[bytes, Attr, int]]:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise InvalidArgument(f"bad directory handle {fh}", errno=errno.EBADF)
        out = []
        entries = handle.inode.entries or {}
        for i in range(start_id, len(handle.names)):
            name, ino = handle.names[i]
            inode = self.ns.inodes.get(ino)
            if inode is None or entries.get(name) != ino:
                continue  # removed since opendir
            out.append((name, self.attr(inode), i + 1))
        return out

    async def releasedir(self, fh: int) -> None:
        if not isinstance(self._handles.pop(fh, None), DirHandle):
            raise InvalidArgument(f"bad directory handle {fh}", errno=errno.EBADF)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not self.read_only:
            await self.commit()

    async def forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, n in inodes:
            inode = self.ns.inodes.get(ino)
            if inode is not None:
                inode.lookups = max(0, inode.lookups - n)

    async def statfs(self) -> StatFs:
        st = self.alloc.statistics()
        free = st.free
        total = self.dev.blocks
        return StatFs(
            block_size=self.block_size,
            blocks=total,
            blocks_free=free + st.reserved,
            blocks_avail=free,
            files=len(self.ns.inodes) + free,
            files_free=free,
            name_max=NAME_MAX,
        )

    # xattrs:

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return self.ns.getxattr(ino, name)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        self._check_writable()
        self.ns.setxattr(ino, name, value, flags)
        self._changed()

    async def listxattr(self, ino: int) -> list[bytes]:
        return self.ns.listxattr(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._check_writable()
        self.ns.removexattr(ino, name)
        self._changed()

    # statistics:

    def stats(self) -> dict[str, object]:
        st = self.alloc.statistics()
        dev = self.dev.statistics()
        return {
            "inodes": len(self.ns.inodes),
            "open_handles": len(self._handles),
            "blocks_total": dev.blocks,
            "blocks_free": st.free,
            "blocks_reserved": st.reserved,
            "blocks_allocated": st.allocated,
            "blocks_deferred": st.deferred,
            "commits": self.committer.commits,
            "checkpoint_bytes": self.committer.last_commit_bytes,
            "dirty": int(self.dirty),
            "read_only": int(self.read_only),
            "dev_reads": dev.reads,
            "dev_writes": dev.writes,
            "dev_flushes": dev.flushes,
            **self.counters,
            "faults_fired": REGISTRY.statistics().fired,
        }


def mapped_runs(inodes: Any) -> list[Run]:
    """Every physical run mapped by the given inodes."""
    runs: list[Run] = []
    for inode in inodes:
        if inode.extents is None:
            continue
        for ext in inode.extents.extents():
            if ext.pblk is not None:
                runs.append((ext.pblk, ext.length))
    return normalize_runs(runs)
