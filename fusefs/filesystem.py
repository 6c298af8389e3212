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

Set-user-ID and set-group-ID bits are cleared as the kernel's own filesystems
clear them (`Inode.kill_setid`): on a write and on a size change (truncate,
``O_TRUNC``) by anyone but root -- uid 0 stands for the CAP_FSETID the kernel
checks, since FUSE hands over only the caller's ids -- and on every change of
owner or group, by root too.  The kernel does part of it for a FUSE filesystem
(it adds the cleared mode to a truncate's or a chown's SETATTR unless
FUSE_CAP_HANDLE_KILLPRIV was negotiated), but nothing for a write to a
``direct_io`` file, which every fusefs file is, nor for an ``O_TRUNC`` that the
filesystem does inside OPEN; fusefs does all of it, whatever was negotiated.
pyfuse3 gives a write no caller, so a file handle remembers the uid that opened
it (`Handle.uid`) and its writes are judged by that.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, final

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
from fusefs.faults import REGISTRY, dynamic_fault, race_fault
from fusefs.format import normalize_runs, parse_size, probe_block_size
from fusefs.inode import INO_LIMIT, Inode, now_ns
from fusefs.io import buffered, direct
from fusefs.io.readahead import ReadaheadState
from fusefs.io.truncate import truncate as truncate_inode
from fusefs.io.writeback import flusher, wait_writeback, write_and_drop, writeback_range
from fusefs.namespace import NAME_MAX, ROOT_INO, Namespace, Unlinked
from fusefs.pagecache import DEFAULT_CACHE_SIZE, MIN_CACHE_SIZE, PageCache
from fusefs.reclaim import Reclaimer

log = logging.getLogger(__name__)

_SETID = stat.S_ISUID | stat.S_ISGID

NOW: Any = object()
"""Sentinel for `Filesystem.setattr` times: the current time."""


class Attr(NamedTuple):
    """An inode's attributes, as ``stat`` shows them: made for every lookup,
    getattr and create, so a tuple (a frozen dataclass costs three times as much
    to build)."""

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


def _on_off(key: str, value: str) -> bool:
    if value in ("on", "1", "yes", "true"):
        return True
    if value in ("off", "0", "no", "false"):
        return False
    raise InvalidArgument(f"{key}= takes on or off, not {value!r}")


@dataclass
class MountOptions:
    read_only: bool = False
    commit_interval: float = 5.0
    faults: list[str] = field(default_factory=list)
    cache_size: int = DEFAULT_CACHE_SIZE
    pagecache_lock: bool = True
    readahead: bool = True

    @classmethod
    def parse(cls, text: str) -> MountOptions:
        """``-o`` options: ``ro``, ``rw``, ``commit=SECONDS``, ``cache_size=SIZE``,
        ``pagecache_lock=on|off`` (off only to demonstrate races), ``readahead=on|off``."""
        opts = cls()
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, _, value = item.partition("=")
            if key == "ro":
                opts.read_only = True
            elif key == "rw":
                opts.read_only = False
            elif key == "cache_size":
                opts.cache_size = parse_size(value)
                if opts.cache_size < MIN_CACHE_SIZE:
                    raise InvalidArgument("cache_size must be at least 1M")
            elif key == "pagecache_lock":
                opts.pagecache_lock = _on_off(key, value)
            elif key == "readahead":
                opts.readahead = _on_off(key, value)
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
    uid: int = 0  # who opened it: writes through it by anyone but root clear set-id bits
    readahead: ReadaheadState = field(default_factory=ReadaheadState)
    direct_ahead: direct.DirectReadahead | None = None  # made by the first direct read

    @property
    def direct(self) -> bool:
        return bool(self.flags & os.O_DIRECT)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


@dataclass(eq=False)
class DirHandle:
    inode: Inode  # the position of a scan is the kernel's: the cookie it sends back


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
        self.counters = {
            "reads": 0,
            "writes": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "seek_data": 0,
            "seek_hole": 0,
        }
        # fallocate requests by route ("kernel": fallocate(2); "control":
        # ``.fusefs/fallocate``) and mode name, counted as they arrive.
        self.fallocate_requests: dict[str, dict[str, int]] = {"kernel": {}, "control": {}}
        self.cache = PageCache(self.block_size, alloc, limit_bytes=options.cache_size)
        self.cache.set_lock_enabled(options.pagecache_lock)
        # ENOSPC while frees wait for a commit: commit and try once more.
        self.reclaim = Reclaimer(alloc, self.commit, lambda: not self.read_only)
        self.readahead_enabled = options.readahead
        # Set by the FUSE layer: drop the kernel's cached pages (and attributes)
        # of an inode whose data or size fusefs changed behind its back.
        self.invalidate_hook: Callable[[int, bool], None] | None = None

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
        sb = loaded.superblock
        used = list(mapped_runs(loaded.inodes.values())) + list(loaded.runs)
        alloc = Allocator.from_used(sb.device_blocks, sb.first_data_block, used)
        committer = Committer(dev, alloc, loaded)
        if loaded.journal.entries or loaded.journal.torn:
            log.info(
                "mount: replayed %d journal entr%s%s",
                loaded.journal.entries,
                "y" if loaded.journal.entries == 1 else "ies",
                "; dropped a torn entry at its end" if loaded.journal.torn else "",
            )
        # A next inode number at or below one in use (fsck reports it) would
        # hand that number out again; one past the limit, numbers no load takes.
        next_ino = max(loaded.next_ino, max(loaded.inodes) + 1)
        if next_ino >= INO_LIMIT:
            raise Corrupt(f"next inode number {next_ino} out of range (run fusefs fsck --repair)")
        return cls(dev, alloc, Namespace(loaded.inodes, next_ino), committer, options)

    async def _recover(self) -> None:
        """Reclaim orphans left by a daemon that died with unlinked files open."""
        if dynamic_fault("mount_recover", cls="error:mount"):
            raise IOFailure("mount: injected error during recovery")
        orphans = [i for i in self.ns.inodes.values() if i.nlink == 0]
        if orphans:
            # A link count of 0 on an inode that a name still reaches is a wrong
            # count (fsck fixes it), not an orphan: reclaiming it would leave the
            # names dangling -- or, for the root, no filesystem.
            named = {ino for d in self.ns.inodes.values() for ino in (d.entries or {}).values()}
            named.add(ROOT_INO)
            orphans = [i for i in orphans if i.ino not in named]
        for inode in orphans:
            self.ns.remove(inode)
            await self._free_blocks(inode)
        if orphans:
            log.info("recovery: reclaimed %d orphan inode(s)", len(orphans))
            await self.commit()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work until `unmount`: the flusher, readahead, periodic commits."""
        try:
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(flusher, self)
                    task_status.started()
                    while True:
                        await trio.sleep(self.options.commit_interval)
                        if (self.dirty or self.ns.track) and not self.read_only:
                            try:
                                await self.commit()
                            except FsError as e:
                                log.error("background commit failed: %s", e)
        finally:
            self._nursery = None
            self._cancel = None
            self._done.set()

    def spawn(self, work: Awaitable[None]) -> None:
        """Run background work (readahead) in the filesystem's nursery, if running."""
        if self._nursery is None:
            if hasattr(work, "close"):
                work.close()
            return

        async def runner() -> None:
            await work

        self._nursery.start_soon(runner)

    def invalidate_kernel(self, ino: int, *, attr_only: bool = False) -> None:
        if self.invalidate_hook is not None:
            self.invalidate_hook(ino, attr_only)

    async def sync_data(self) -> None:
        """Write back every dirty page and wait for it (and for writeback in
        flight).  Only the mappings that have such pages: a syncfs with 100,000
        files cached costs what is dirty, not what is cached."""
        busy = [m for m in self.cache.mappings.values() if m.nr_dirty or m.nr_writeback]
        for mapping in busy:
            await writeback_range(self, mapping, wait=True)

    async def sync(self) -> None:
        """syncfs: write back every file, then commit."""
        await self.sync_data()
        await self.commit()

    async def unmount(self) -> None:
        """Write back, commit everything and close the image; raises if that failed."""
        if self._cancel is not None:
            self._cancel.cancel()
            await self._done.wait()
        try:
            if not self.read_only:
                await self.sync_data()
                await self.commit()
            elif self.ro_reason and not self.options.read_only:
                raise ReadOnly(f"unmounted read-only after an error: {self.ro_reason}")
        finally:
            self.dev.close()

    # commit:

    async def commit(self) -> None:
        """Make every change so far durable (DESIGN §6): one journal entry."""
        self._check_writable()
        self.dirty = False
        try:
            await self.committer.commit(self.ns)
        except FsError as e:
            self.dirty = True
            self._go_read_only(f"commit failed: {e}")
            raise IOFailure(f"commit failed: {e}") from e
        if self.committer.wants_checkpoint:
            self.spawn(self.checkpoint())

    async def checkpoint(self) -> None:
        """Write a checkpoint so the journal's older entries can be reused
        (started by `commit` when the journal is half full; runs beside requests)."""
        if self.read_only:
            return
        try:
            await self.committer.checkpoint(self.ns)
        except FsError as e:
            self._go_read_only(f"checkpoint failed: {e}")
            log.error("checkpoint failed: %s", e)

    def _go_read_only(self, reason: str) -> None:
        if not self.read_only:
            log.error("fusefs: %s; the filesystem is now read-only", reason)
        self.read_only = True
        self.ro_reason = reason

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"read-only filesystem ({self.ro_reason})")

    def mark_changed(self) -> None:
        """Metadata changed: the next periodic commit has work to do."""
        self.dirty = True

    # attributes:

    def attr(self, inode: Inode) -> Attr:
        bs = self.block_size
        blocks = 0
        if inode.extents is not None:
            mapping = self.cache.mappings.get(inode.ino)
            delayed = mapping.nr_reserved if mapping is not None else 0
            blocks = (inode.extents.mapped_blocks() + delayed) * (bs // 512)
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

    async def find(self, parent: int, name: bytes) -> Attr | None:
        """`lookup`, but None for a missing name (`Namespace.find`)."""
        inode = self.ns.find(parent, name)
        if inode is None:
            return None
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
        caller_uid: int = 0,
    ) -> Attr:
        """Change what is given; ``caller_uid`` is who asks (see the module's note on
        set-id bits)."""
        self._check_writable()
        inode = self.ns.get(ino)
        if size is not None:
            await self.truncate(inode, size)
            if caller_uid != 0:
                inode.kill_setid()
        if uid is not None and uid != 0xFFFFFFFF:
            inode.uid = uid
            inode.kill_setid()
        if gid is not None and gid != 0xFFFFFFFF:
            inode.gid = gid
            inode.kill_setid()
        if mode is not None:
            self.ns.chmod(inode, mode)
        if atime_ns is not None:
            inode.atime_ns = now_ns() if atime_ns is NOW else int(atime_ns)
        if mtime_ns is not None:
            inode.mtime_ns = now_ns() if mtime_ns is NOW else int(mtime_ns)
        inode.touch()
        self.mark_changed()
        return self.attr(inode)

    # namespace:

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        self._check_writable()
        inode = self.ns.create(parent, name, mode, uid, gid, rdev)
        inode.lookups += 1
        self.mark_changed()
        return self.attr(inode)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        self._check_writable()
        inode = self.ns.mkdir(parent, name, mode, uid, gid)
        inode.lookups += 1
        self.mark_changed()
        return self.attr(inode)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        self._check_writable()
        inode = self.ns.symlink(parent, name, target, uid, gid)
        inode.lookups += 1
        self.mark_changed()
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
        self.mark_changed()
        return self.attr(inode)

    async def unlink(self, parent: int, name: bytes) -> None:
        self._check_writable()
        await self._reap(self.ns.unlink(parent, name))
        self.mark_changed()

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._check_writable()
        await self._reap(self.ns.rmdir(parent, name))
        self.mark_changed()

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable()
        replaced = self.ns.rename(old_parent, old_name, new_parent, new_name, flags)
        if replaced is not None:
            await self._reap(replaced)
        self.mark_changed()

    async def _reap(self, gone: Unlinked) -> None:
        if gone.unreferenced:
            await self._free_blocks(inode=gone.inode)

    async def _free_blocks(self, inode: Inode) -> None:
        """The inode is gone from the table: drop its pages, free its blocks.

        BLOCK waits out a prefetch still filling pages of the file (it would
        insert them into a mapping no longer in the cache, and keep them
        counted); writeback in flight finishes first (it maps blocks into the
        extent map); no await between that and the drop, so none can start.
        """
        if inode.extents is None:
            return
        mapping = self.cache.mappings.get(inode.ino)
        if mapping is not None:
            async with mapping.lock.block():
                await wait_writeback(mapping, 0, None)
                self.cache.forget_mapping(inode)
        else:
            self.cache.forget_mapping(inode)
        if inode.extents.mapped_blocks():  # an empty file has nothing to free
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
        self.mark_changed()
        return self._new_fh(Handle(inode, flags, uid)), self.attr(inode)

    async def open(self, ino: int, flags: int, uid: int = 0) -> int:
        """Open ``ino`` for the process of ``uid`` (see the module's note on set-id bits)."""
        inode = self.ns.get(ino)
        if inode.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        accmode = flags & os.O_ACCMODE
        if accmode != os.O_RDONLY or flags & os.O_TRUNC:
            self._check_writable()
        if flags & os.O_TRUNC and inode.is_reg:
            await self.truncate(inode, 0)
            if uid != 0 and inode.kill_setid():
                inode.touch()
                self.mark_changed()
        inode.open_count += 1
        return self._new_fh(Handle(inode, flags, uid))

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._file(fh)
        if handle.inode.extents is None:
            raise InvalidArgument("read of a file without data")
        if offset < 0:
            raise InvalidArgument(f"negative offset {offset}")
        if handle.direct:
            data = await self._direct_read(handle, offset, size)
        else:
            data = await buffered.read(self, handle, offset, size)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._check_writable()
        handle = self._file(fh)
        inode = handle.inode
        if inode.extents is None:
            raise InvalidArgument("write to a file without data")
        direct.check_file_range(offset, len(data), self.block_size)
        if inode.mode & _SETID and handle.uid != 0 and inode.kill_setid():
            inode.touch()
            self.mark_changed()
            # The kernel's cached mode is stale now (DESIGN §5).
            self.invalidate_kernel(inode.ino, attr_only=True)
        if handle.direct:
            done = await self._direct_write(handle, offset, data)
        else:
            done = await buffered.write(self, handle, offset, data)
        self.counters["writes"] += 1
        self.counters["bytes_written"] += done
        return done

    async def _direct_read(self, handle: Handle, offset: int, size: int) -> bytes:
        inode = handle.inode
        assert inode.extents is not None
        direct.check_aligned(offset, size, self.block_size)
        bs = self.block_size
        async with inode.io_lock.shared():
            mapping = self.cache.mappings.get(inode.ino)
            if mapping is not None and (mapping.nr_dirty or mapping.nr_writeback):
                first, end = offset // bs, -(-(offset + size) // bs)
                await writeback_range(self, mapping, first, end, wait=True)
                if mapping.dirty_in(first, end):
                    # The device holds older data than the cache: fail rather
                    # than return it (the error stays for fsync to report too).
                    error = mapping.error
                    code = error.code if isinstance(error, FsError) else errno.EIO
                    raise IOFailure(
                        f"direct read of inode {inode.ino}: writeback of the range failed",
                        errno=code,
                    )
            ahead = handle.direct_ahead
            if ahead is None:
                ahead = handle.direct_ahead = direct.DirectReadahead()
            return await direct.read_range(self.dev, inode.extents, inode.size, offset, size, ahead)

    async def _direct_write(self, handle: Handle, offset: int, data: bytes) -> int:
        inode = handle.inode
        assert inode.extents is not None
        bs = self.block_size
        direct.check_aligned(offset, len(data), bs)
        mapping = self.cache.mapping(inode)
        async with inode.io_lock.exclusive():
            if handle.append:
                offset = inode.size
                direct.check_aligned(offset, len(data), bs)
            first, end = offset // bs, -(-(offset + len(data)) // bs)
            async with mapping.lock.block():
                await write_and_drop(self, mapping, first, end, what="direct write")
                await direct.write_range(self, inode.extents, offset, data)
                await race_fault("direct_write_before_drop")
                # Drop again: with the lock on nothing can have come in; with it
                # off, a read that raced the write may have inserted old data.
                await wait_writeback(mapping, first, end)
                self.cache.drop_range(mapping, first, end, discard_dirty=True)
                inode.size = max(inode.size, offset + len(data))
                inode.touch(m=True)
        self.mark_changed()
        self.invalidate_kernel(inode.ino)
        return len(data)

    async def truncate(self, inode: Inode, size: int) -> None:
        """Change a regular file's size (`io.truncate`)."""
        self._check_writable()
        await truncate_inode(self, inode, size)

    async def fallocate(
        self, ino: int, mode: int, offset: int, length: int, *, route: str | None = None
    ) -> None:
        """fallocate(2), every mode (`io.fallocate`): FALLOC_FL_* flags in ``mode``.
        ``route`` (``kernel``, ``control``) counts the request in the stats."""
        from fusefs.io.fallocate import fallocate as fallocate_inode
        from fusefs.io.fallocate import mode_name

        if route is not None:
            counts = self.fallocate_requests.setdefault(route, {})
            name = mode_name(mode)
            counts[name] = counts.get(name, 0) + 1
        await fallocate_inode(self, self.ns.get(ino), mode, offset, length)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """lseek(2) with SEEK_DATA or SEEK_HOLE (`io.seek`); the kernel answers the rest."""
        from fusefs.io.seek import SEEK_DATA, SEEK_HOLE, seek

        if whence in (SEEK_DATA, SEEK_HOLE):
            self.counters["seek_data" if whence == SEEK_DATA else "seek_hole"] += 1
        return await seek(self, self._file(fh).inode, offset, whence)

    async def flush(self, fh: int) -> None:
        self._file(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Write back the file, wait, commit, flush (DESIGN §6)."""
        handle = self._file(fh)
        mapping = self.cache.mappings.get(handle.inode.ino)
        if mapping is not None:
            await writeback_range(self, mapping, wait=True)
            if mapping.error is not None:
                error, mapping.error = mapping.error, None
                code = error.code if isinstance(error, FsError) else errno.EIO
                raise IOFailure(
                    f"writeback of inode {handle.inode.ino} failed: {error}", errno=code
                )
        if self.read_only:
            if self.ro_reason and not self.options.read_only:
                raise IOFailure(f"fsync on a filesystem gone read-only: {self.ro_reason}")
            return
        await self.commit()

    async def drop_caches(self) -> int:
        """Write back dirty pages and drop every clean page; returns pages dropped."""
        await self.sync_data()
        return self.cache.drop_clean()

    def set_pagecache_lock(self, enabled: bool) -> None:
        """Switch the pagecache add lock (demonstration of the races only)."""
        if not enabled:
            log.warning("pagecache add lock switched OFF: the page cache can go stale")
        self.cache.set_lock_enabled(enabled)

    async def release(self, fh: int) -> None:
        handle = self._file(fh)
        del self._handles[fh]
        inode = handle.inode
        inode.open_count -= 1
        if inode.nlink == 0 and inode.open_count == 0 and inode.ino in self.ns.inodes:
            self.ns.remove(inode)
            await self._free_blocks(inode)
            self.mark_changed()
        elif inode.open_count == 0:
            # Closed: an idle inode keeps no empty mapping and no lock (its
            # cached pages keep the mapping until they are evicted).
            mapping = self.cache.mappings.get(inode.ino)
            if mapping is None or not self.cache.retire_if_idle(mapping):
                inode.drop_lock_if_idle()

    # directories:

    async def opendir(self, ino: int) -> int:
        return self._new_fh(DirHandle(self.ns.dir(ino)))

    async def readdir(self, fh: int, start_id: int) -> list[tuple[bytes, Attr, int]]:
        """Every entry from ``start_id`` on (`readdir_entries`, all of them)."""
        return list(self.readdir_entries(fh, start_id))

    def readdir_entries(self, fh: int, start_id: int) -> Iterator[tuple[bytes, Attr, int]]:
        """The entries after cookie ``start_id`` (0: from the start), each with its
        attributes and its own cookie, the ``start_id`` that resumes after it
        (`fusefs.dirents`: cookies stay valid while the directory changes).  Made
        one at a time: a caller that stops after the few that fit its reply
        (FUSE's readdir buffer) pays for those -- O(log n) to find the place, then
        O(1) an entry -- not for the rest of the directory.  The generator never
        awaits; consume it without awaiting between entries."""
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise InvalidArgument(f"bad directory handle {fh}", errno=errno.EBADF)
        return self._dir_entries(handle, start_id)

    def _dir_entries(self, handle: DirHandle, start_id: int) -> Iterator[tuple[bytes, Attr, int]]:
        entries = handle.inode.entries
        assert entries is not None
        inodes = self.ns.inodes
        for name, ino, cookie in entries.after(start_id):
            inode = inodes.get(ino)
            if inode is not None:  # never otherwise; fsck would call it a dangling entry
                yield name, self.attr(inode), cookie

    async def releasedir(self, fh: int) -> None:
        if not isinstance(self._handles.pop(fh, None), DirHandle):
            raise InvalidArgument(f"bad directory handle {fh}", errno=errno.EBADF)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if self.read_only:
            # Gone read-only after an error: nothing since the last commit is durable.
            if self.ro_reason and not self.options.read_only:
                raise IOFailure(f"fsyncdir on a filesystem gone read-only: {self.ro_reason}")
            return
        await self.commit()

    async def forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, n in inodes:
            inode = self.ns.inodes.get(ino)
            if inode is not None:
                inode.lookups = max(0, inode.lookups - n)

    async def statfs(self) -> StatFs:
        """Free space leaves out reservations -- blocks promised to dirty pages
        over holes and to the next checkpoints -- and the blocks the metadata
        reservation lacks of its target, which the next commit takes first.  It
        counts the frees that wait for a commit (DESIGN §6): an allocation that
        needs them commits to get them (`fusefs.reclaim`), so ``df`` shows the
        space of an ``rm`` at once."""
        st = self.alloc.statistics()
        free = max(0, st.free + st.deferred - self.committer.reserve_shortfall())
        return StatFs(
            block_size=self.block_size,
            blocks=self.dev.blocks,
            blocks_free=free,
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
        self.mark_changed()

    async def listxattr(self, ino: int) -> list[bytes]:
        return self.ns.listxattr(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._check_writable()
        self.ns.removexattr(ino, name)
        self.mark_changed()

    # statistics:

    def lock_statistics(self) -> dict[str, float]:
        """The pagecache add lock, summed over every inode's mapping."""
        totals = dict.fromkeys(
            (
                "add_holders",
                "block_holders",
                "add_waiting",
                "block_waiting",
                "add_waits",
                "block_waits",
                "add_wait_seconds",
                "block_wait_seconds",
                "tryget_failures",
            ),
            0.0,
        )
        for mapping in self.cache.mappings.values():
            st = mapping.lock.statistics()
            for key in totals:
                totals[key] += getattr(st, key)
        for key, value in self.cache.retired_lock_totals.items():
            totals[key] += value
        return {k: v if k.endswith("seconds") else int(v) for k, v in totals.items()}

    def stats(self) -> dict[str, object]:
        st = self.alloc.statistics()
        reclaim = self.reclaim.statistics()
        dev = self.dev.statistics()
        cache = self.cache.statistics()
        out: dict[str, object] = {
            "inodes": len(self.ns.inodes),
            "open_handles": len(self._handles),
            "blocks_total": dev.blocks,
            "blocks_free": st.free,
            "blocks_reserved": st.reserved,
            "blocks_allocated": st.allocated,
            "blocks_deferred": st.deferred,
            "nospace_commits": reclaim.commits,
            "nospace_retries": reclaim.retries,
            "nospace_refused": reclaim.refused,
            "commits": self.committer.commits,
            "journal_entries": self.committer.entries,
            "journal_used_blocks": self.committer.journal_used,
            "journal_blocks": self.committer.ring,
            "commit_bytes": self.committer.last_commit_bytes,
            "checkpoints": self.committer.checkpoints,
            "full_checkpoints": self.committer.full_checkpoints,
            "checkpoint_bytes": self.committer.last_checkpoint_bytes,
            "dirty": int(self.dirty),
            "read_only": int(self.read_only),
            "dev_reads": dev.reads,
            "dev_writes": dev.writes,
            "dev_flushes": dev.flushes,
            **self.counters,
            "fallocate": {
                route: dict(sorted(c.items())) for route, c in self.fallocate_requests.items()
            },
            "cache_pages": cache.pages,
            "cache_folios": cache.folios,
            "cache_splits": cache.splits,
            "cache_bytes": cache.memory_bytes,
            "cache_limit_bytes": cache.limit_bytes,
            "cache_dirty": cache.dirty,
            "cache_writeback": cache.writeback,
            "cache_reserved_pages": cache.reserved_pages,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "readahead_issued": cache.readahead_issued,
            "readahead_used": cache.readahead_used,
            "readahead_wasted": cache.readahead_wasted,
            "readahead_abandoned": cache.readahead_abandoned,
            "evictions": cache.evictions,
            "writeback_pages": cache.writeback_pages,
            "writeback_runs": cache.writeback_runs,
            "writeback_errors": cache.writeback_errors,
            "writeback_unreserved": cache.writeback_unreserved,
            "throttled": cache.throttled,
            "pagecache_lock": "on" if self.cache.lock_enabled else "off",
        }
        for key, value in self.lock_statistics().items():
            out[f"lock_{key}"] = round(value, 6) if isinstance(value, float) else value
        out["faults_fired"] = REGISTRY.statistics().fired
        return out


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
