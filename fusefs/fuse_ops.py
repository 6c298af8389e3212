"""The FUSE layer: `pyfuse3.Operations` translated onto the core `Filesystem`.

Every handler is a few lines: unpack pyfuse3's arguments, call the core (or the
control directory for a virtual inode), pack the result.  Errors cross the
boundary in exactly one place, `errno_boundary`: a core `FsError` becomes
`pyfuse3.FUSEError(e.code)`; anything else is a bug, whose traceback goes to the
daemon log while the caller gets EIO.  pyfuse3's rule holds: nothing but
`FUSEError` leaves a handler (an escaping exception would end the main loop).

The kernel caches attributes and entries for `CACHE_TIMEOUT` seconds (DESIGN §8:
never make the kernel ask twice).  Whatever fusefs changes behind the kernel's
back (a size change through ``.fusefs/fallocate``, say) it must invalidate
explicitly with `FuseOperations.invalidate_attr`.  File data is never cached by
the kernel through read/write: every open returns ``direct_io`` (DESIGN §2), so
the userspace page cache is the only one.  A consequence is that the kernel
refuses ``MAP_SHARED`` mappings of fusefs files with ENODEV; private mappings
work, and fill the kernel's page cache behind fusefs's back.

So whenever the core drops its own pages of a range and changes the data under
them (truncate, fallocate, direct write) it calls `Filesystem.invalidate_kernel`,
which lands in `FuseOperations.invalidate_kernel`: the inode is queued, and the
`run_invalidations` task (started by the daemon) has a worker thread call
``pyfuse3.invalidate_inode`` — never the request handler itself, because
invalidating data makes the kernel lock the inode's pages, and a page may be
locked by a page fault that waits for a read this very loop has to answer: a
deadlock.  Requests that arrive while the thread works are coalesced per inode.
Attribute-only invalidation takes no page lock and is done synchronously
(`invalidate_attr`), so that the ``stat`` right after a ``.fusefs/fallocate``
write already sees the new size.

A write to a control file does not reply before the invalidations it queued
are done (`invalidations_flushed`: the request waits, the loop goes on serving
the reads a fault may need): otherwise a private mapping that was already
faulted in would show the old data of a range that ``.fusefs/fallocate`` has
just punched, zeroed or shifted, for as long as the worker thread takes -- the
write has returned, the change is not visible.  What the kernel itself sends
(fallocate(2), truncate, write(2)) needs no such wait: the kernel's FUSE
driver drops its own pages of the range after the reply (``fuse_file_fallocate``
calls ``truncate_pagecache_range`` for punch and zero range; truncate and
direct_io writes likewise), and every new mapping of a ``direct_io`` file
starts with the inode's page cache invalidated (``fuse_file_mmap``).  A fault
racing any of these cannot leave a stale page behind: its page is locked in
the kernel's cache before its read is sent, and the invalidation waits for
that lock (docs/fallocate.md, "Private mappings").

``fallocate`` needs the patched pyfuse3 (patches/pyfuse3/; stock 3.5.0 never calls
it, and the kernel then fails every fallocate(2) with EOPNOTSUPP).  The kernel
forwards only modes 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE (± KEEP_SIZE);
collapse and insert range stay on ``.fusefs/fallocate`` (docs/fallocate.md).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Final, ParamSpec, TypeVar, final

import pyfuse3
import trio

from fusefs.control import CONTROL_NAME, ControlDir
from fusefs.errors import FsError, NotSupported
from fusefs.faults import dynamic_fault
from fusefs.filesystem import Attr, Filesystem
from fusefs.namespace import ROOT_INO

log = logging.getLogger(__name__)

CACHE_TIMEOUT: Final = 60.0

# Errors that mean something went wrong (rather than "no such file"): worth a log line.
_NOTEWORTHY: Final = frozenset(
    {errno.EIO, errno.EUCLEAN, errno.EROFS, errno.ENOSPC, errno.ENOMEM, errno.EFBIG}
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def errno_boundary(
    handler: Callable[_P, Awaitable[_R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """The one place where exceptions become errnos."""

    @functools.wraps(handler)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            level = logging.WARNING if e.code in _NOTEWORTHY else logging.DEBUG
            log.log(level, "%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.code) from None
        except Exception:
            # trio.Cancelled is a BaseException and passes through untouched.
            log.exception("%s: unexpected error, returning EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def entry_attributes(attr: Attr, timeout: float = CACHE_TIMEOUT) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = attr.generation
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blksize = attr.blksize
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = attr.atime_ns
    entry.st_mtime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.ctime_ns
    return entry


def _negative_entry() -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = 0
    return entry


# The answer to a lookup of a name that does not exist: inode number 0 is FUSE's
# negative entry, the same to the kernel as ENOENT -- with a timeout of 0 it
# caches nothing -- and cheaper to make than an exception through the error
# boundary, on the lookup that precedes every create.  pyfuse3 copies it into
# the reply, so one object serves every miss.
_NO_ENTRY: Final = _negative_entry()


def _file_info(fh: int) -> pyfuse3.FileInfo:
    # DESIGN §2: the kernel must not cache file data; O_DIRECT stays in the flags.
    return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)


def _invalidate_inode(ino: int, *, attr_only: bool) -> None:
    try:
        pyfuse3.invalidate_inode(ino, attr_only=attr_only)
    except OSError as e:
        # ENOENT: the kernel does not know the inode (nothing cached); ENOTCONN:
        # the mount is gone.
        if e.errno not in (errno.ENOENT, errno.ENOTCONN):
            log.warning("invalidate_inode(%d): %s", ino, e.strerror)


def _invalidate_batch(batch: Mapping[int, bool]) -> None:
    for ino, attr_only in batch.items():
        _invalidate_inode(ino, attr_only=attr_only)


def _control_denied() -> FsError:
    return FsError("the control directory cannot be changed", errno=errno.EPERM)


@final
class FuseOperations(pyfuse3.Operations):
    """Thin translation from pyfuse3 requests to `Filesystem` and `ControlDir` calls."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem, control: ControlDir) -> None:
        super().__init__()
        self.fs = fs
        self.control = control
        control.invalidate_attr = self.invalidate_attr
        fs.invalidate_hook = self.invalidate_kernel
        # Handles of open root directories: their listings hide the control directory.
        self._root_dir_handles: set[int] = set()
        # (ino, attr_only) for run_invalidations; unbounded, so queueing never blocks.
        self._invalidate_send, self._invalidate_receive = trio.open_memory_channel[
            tuple[int, bool]
        ](math.inf)
        # How many invalidations were queued, and how many of them are done
        # (protected by being touched only from the trio thread).
        self._invalidations_queued = 0
        self._invalidations_done = 0
        self._invalidations_running = False
        self._invalidations_lot = trio.lowlevel.ParkingLot()

    def invalidate_attr(self, ino: int) -> None:
        """Make the kernel forget its cached attributes of `ino` (size changed behind
        its back).  Never fails: an inode the kernel does not know needs nothing."""
        _invalidate_inode(ino, attr_only=True)

    def invalidate_kernel(self, ino: int, attr_only: bool) -> None:
        """`Filesystem.invalidate_hook`: queue the invalidation of the kernel's cached
        data (unless ``attr_only``) and attributes of `ino` for `run_invalidations`.
        Never blocks and never calls into the kernel from the request."""
        self._invalidations_queued += 1
        self._invalidate_send.send_nowait((ino, attr_only))

    async def invalidations_flushed(self) -> None:
        """Wait until every invalidation queued so far has been sent to the kernel
        (at once when none is pending, or when `run_invalidations` is not running)."""
        target = self._invalidations_queued
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._invalidations_running and self._invalidations_done < target:
            await self._invalidations_lot.park()

    async def run_invalidations(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve `invalidate_kernel`'s queue until cancelled: each batch (one entry
        per inode; data wins over attributes only) in one worker-thread call."""
        self._invalidations_running = True
        task_status.started()
        try:
            async for ino, attr_only in self._invalidate_receive:
                batch = {ino: attr_only}
                taken = 1
                while True:
                    try:
                        ino, attr_only = self._invalidate_receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch[ino] = batch.get(ino, True) and attr_only
                    taken += 1
                # abandon_on_cancel: an unmount must not wait on a kernel that may be
                # waiting on us.
                await trio.to_thread.run_sync(_invalidate_batch, batch, abandon_on_cancel=True)
                self._invalidations_done += taken
                self._invalidations_lot.unpark_all()
        finally:
            self._invalidations_running = False
            self._invalidations_lot.unpark_all()

    def _check_mutable(self, parent: int, name: bytes) -> None:
        if self.control.owns(parent) or self.control.is_entry(parent, name):
            raise _control_denied()

    # attributes and names:

    @errno_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.control.owns(parent_inode) or self.control.is_entry(parent_inode, name):
            return entry_attributes(await self.control.lookup(parent_inode, name))
        attr = await self.fs.find(parent_inode, name)
        if attr is None:
            return _NO_ENTRY
        return entry_attributes(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Must not raise at all: there is no request to fail.
        real = [(ino, n) for ino, n in inode_list if not self.control.owns(ino)]
        try:
            if real:
                await self.fs.forget(real)
        except Exception:
            log.exception("forget: unexpected error")

    @errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.control.owns(inode):
            return entry_attributes(self.control.getattr(inode))
        return entry_attributes(await self.fs.getattr(inode))

    @errno_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        size = attr.st_size if fields.update_size else None
        if self.control.owns(inode):
            other = (
                fields.update_mode
                or fields.update_uid
                or fields.update_gid
                or fields.update_atime
                or fields.update_mtime
            )
            return entry_attributes(self.control.setattr(inode, size=size, other=other))
        # pyfuse3 has already turned UTIME_NOW into the current time.
        new = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
            caller_uid=ctx.uid,
        )
        return entry_attributes(new)

    @errno_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.control.owns(inode):
            raise FsError("not a symlink", errno=errno.EINVAL)
        return await self.fs.readlink(inode)

    @errno_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_mutable(parent_inode, name)
        attr = await self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
        return entry_attributes(attr)

    @errno_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_mutable(parent_inode, name)
        return entry_attributes(await self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_mutable(parent_inode, name)
        await self.fs.unlink(parent_inode, name)

    @errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_mutable(parent_inode, name)
        await self.fs.rmdir(parent_inode, name)

    @errno_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_mutable(parent_inode, name)
        attr = await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return entry_attributes(attr)

    @errno_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._check_mutable(parent_inode_old, name_old)
        self._check_mutable(parent_inode_new, name_new)
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @errno_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.control.owns(inode):
            raise _control_denied()
        self._check_mutable(new_parent_inode, new_name)
        return entry_attributes(await self.fs.link(inode, new_parent_inode, new_name))

    # files:

    @errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.control.owns(inode):
            return _file_info(self.control.open(inode, flags))
        return _file_info(await self.fs.open(inode, flags, ctx.uid))

    @errno_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_mutable(parent_inode, name)
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return _file_info(fh), entry_attributes(attr)

    @errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.control.owns(fh):
            return self.control.read(fh, off, size)
        return await self.fs.read(fh, off, size)

    @errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        # Self-test site: the daemon dies mid-request, so that campaigns can
        # show they tell a crash (ENOTCONN) from a clean error.
        if dynamic_fault("daemon_crash", cls="error:selftest"):
            os.abort()
        if self.control.owns(fh):
            try:
                return await self.control.write(fh, buf)
            finally:
                # A change behind the kernel's back is visible once write() returns.
                await self.invalidations_flushed()
        return await self.fs.write(fh, off, buf)

    @errno_boundary
    async def flush(self, fh: int) -> None:
        if not self.control.owns(fh):
            await self.fs.flush(fh)

    @errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.control.owns(fh):
            await self.fs.fsync(fh, datasync)

    @errno_boundary
    async def fallocate(self, inode: int, fh: int, mode: int, offset: int, length: int) -> None:
        if self.control.owns(inode):
            raise NotSupported("fallocate: a control file has no blocks")
        # Self-test site: answer as a kernel that does not forward the mode would
        # (EOPNOTSUPP), so the fallbacks to ``.fusefs/fallocate`` can be shown.
        if dynamic_fault("fallocate_kernel_unsupported", cls="error:selftest"):
            raise NotSupported(f"fallocate: mode {mode:#x} refused (self-test site)")
        await self.fs.fallocate(inode, mode, offset, length, route="kernel")
        # As after ``.fusefs/fallocate``: times (and maybe the size) changed in the
        # core; the kernel must not serve cached attributes for CACHE_TIMEOUT.  Only
        # attributes, so no page lock: safe from the request itself.
        self.invalidate_attr(inode)

    @errno_boundary
    async def lseek(self, inode: int, fh: int, offset: int, whence: int) -> int:
        if self.control.owns(inode):
            # Control files are empty: every offset is past EOF.  (ENOSYS would
            # make the kernel stop asking for every file of the mount.)
            raise FsError("lseek: a control file has no data", errno=errno.ENXIO)
        return await self.fs.lseek(fh, offset, whence)

    @errno_boundary
    async def release(self, fh: int) -> None:
        if self.control.owns(fh):
            self.control.release(fh)
        else:
            await self.fs.release(fh)

    # directories:

    @errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.control.owns(inode):
            return self.control.opendir(inode)
        fh = await self.fs.opendir(inode)
        if inode == ROOT_INO:
            self._root_dir_handles.add(fh)
        return fh

    @errno_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries: Iterable[tuple[bytes, Attr, int]]
        if self.control.owns(fh):
            entries = list(self.control.readdir(fh, start_id))
        else:
            # Made lazily: only the entries that fit this reply get attributes.
            entries = self.fs.readdir_entries(fh, start_id)
            if fh in self._root_dir_handles:
                entries = (e for e in entries if e[0] != CONTROL_NAME)
        for name, attr, next_id in entries:
            if not pyfuse3.readdir_reply(token, name, entry_attributes(attr), next_id):
                break

    @errno_boundary
    async def releasedir(self, fh: int) -> None:
        if self.control.owns(fh):
            self.control.releasedir(fh)
        else:
            self._root_dir_handles.discard(fh)
            await self.fs.releasedir(fh)

    @errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not self.control.owns(fh):
            await self.fs.fsyncdir(fh, datasync)

    # the filesystem:

    @errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.block_size
        out.f_frsize = st.block_size
        out.f_blocks = st.blocks
        out.f_bfree = st.blocks_free
        out.f_bavail = st.blocks_avail
        out.f_files = st.files
        out.f_ffree = st.files_free
        out.f_favail = st.files_free
        out.f_namemax = st.name_max
        return out

    # extended attributes (pyfuse3 implements XATTR_CREATE/REPLACE itself):

    @errno_boundary
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if self.control.owns(inode):
            raise _control_denied()
        await self.fs.setxattr(inode, name, value, 0)

    @errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self.control.owns(inode):
            raise FsError("control files have no extended attributes", errno=errno.ENODATA)
        return await self.fs.getxattr(inode, name)

    @errno_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if self.control.owns(inode):
            return []
        return await self.fs.listxattr(inode)

    @errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.control.owns(inode):
            raise _control_denied()
        await self.fs.removexattr(inode, name)
