"""The ``.fusefs/`` control directory (DESIGN §5).

A directory at the mount root that ``readdir`` never shows but ``lookup`` finds by
name.  Its files are the filesystem's knobs and gauges, in the style of procfs and
debugfs: reading one returns its current text, writing one runs a command.

Everything here is virtual.  Inode numbers and file handles come from a range far
above anything the core hands out (`CONTROL_BASE` = 2**62 upward), so one range
check (`ControlDir.owns`) tells the FUSE layer whether a request is ours; nothing
virtual ever reaches the core.

Files are a table of `ControlFile` entries: a name, permission bits, a read
callback returning the file's text and an async write callback taking the text
written.  Adding a file is adding a row to `ControlDir._table`.

Reads work on a snapshot taken at ``open``: a reader that reads in several pieces
(or at an offset) sees one consistent text, not the halves of two.  Writes are
not buffered: each ``write()`` is one command (procfs style; the offset is
ignored), and the command's error is that ``write()``'s error.

The files use FUSE ``direct_io`` like every other file, so the kernel passes each
read and write through even though ``getattr`` reports size 0.

Files for this issue:

``dynamic_fault`` (0600)
    read: the fault-site listing; write: fault commands (DESIGN §4), several may be
    separated by ``;`` or newlines.  A malformed command fails with EINVAL, a query
    that matches nothing with ENOENT; the reason goes to the daemon log.
``stats`` (0400)
    read: ``key: value`` lines from `Filesystem.stats`.
``pid`` (0400)
    read: the daemon's process id.  ``fusefs umount`` uses it to wait until the
    daemon has committed and exited.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Final, final

from fusefs.errors import FsError, InvalidArgument, NotADirectory, NotFound
from fusefs.faults import REGISTRY
from fusefs.filesystem import Attr, Filesystem
from fusefs.namespace import ROOT_INO

log = logging.getLogger(__name__)

CONTROL_NAME: Final = b".fusefs"
# Inode numbers and file handles at or above this are virtual (this module's).
CONTROL_BASE: Final = 1 << 62
_DIR_INO: Final = CONTROL_BASE
# Handles sit in their own sub-range so a handle can never be mistaken for an inode.
_FIRST_HANDLE: Final = CONTROL_BASE + (1 << 32)
_BLKSIZE: Final = 4096


def _denied(what: str) -> FsError:
    return FsError(f"{CONTROL_NAME.decode()}: {what}", errno=errno.EPERM)


@dataclass(frozen=True, slots=True)
class ControlFile:
    """One row of the table: a file of the control directory."""

    name: bytes
    mode: int  # permission bits only
    read: Callable[[], str] | None = None
    write: Callable[[str], Awaitable[None]] | None = None


@dataclass(slots=True)
class _Handle:
    file: ControlFile
    snapshot: bytes  # the file's text at open; empty if opened write-only


@final
class ControlDir:
    """Owns every virtual inode and handle, and dispatches requests on them.

    The FUSE layer asks `owns` (for an inode number or a file handle) or
    `is_entry` (for a name under the root) and hands the whole request over.
    It also installs `invalidate_attr`, for files whose commands change an inode
    behind the kernel's back (``fallocate`` will: DESIGN §5).
    """

    def __init__(
        self,
        fs: Filesystem,
        *,
        uid: int | None = None,
        gid: int | None = None,
        pid: int | None = None,
    ) -> None:
        self._fs = fs
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._pid = os.getpid() if pid is None else pid
        self._time_ns = time.time_ns()
        self._table: tuple[ControlFile, ...] = (
            ControlFile(b"dynamic_fault", 0o600, read=REGISTRY.listing, write=self._fault_command),
            ControlFile(b"stats", 0o400, read=self._render_stats),
            ControlFile(b"pid", 0o400, read=lambda: f"{self._pid}\n"),
        )
        self._by_name = {f.name: i for i, f in enumerate(self._table)}
        self._dir_handles: set[int] = set()
        self._file_handles: dict[int, _Handle] = {}
        self._next_handle = _FIRST_HANDLE
        self.invalidate_attr: Callable[[int], None] = lambda ino: None

    def __repr__(self) -> str:
        names = ", ".join(f.name.decode() for f in self._table)
        n = len(self._dir_handles) + len(self._file_handles)
        return f"<ControlDir [{names}] open={n}>"

    # dispatch:

    @staticmethod
    def owns(number: int) -> bool:
        """True for a virtual inode number or file handle."""
        return number >= CONTROL_BASE

    @staticmethod
    def is_entry(parent: int, name: bytes) -> bool:
        """True for the control directory's own name in the root directory."""
        return parent == ROOT_INO and name == CONTROL_NAME

    @property
    def dir_ino(self) -> int:
        return _DIR_INO

    # attributes:

    def _attr(self, ino: int, mode: int, nlink: int) -> Attr:
        t = self._time_ns
        return Attr(
            ino=ino,
            mode=mode,
            nlink=nlink,
            uid=self._uid,
            gid=self._gid,
            rdev=0,
            size=0,
            blocks=0,
            blksize=_BLKSIZE,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
            generation=0,
        )

    def _file(self, ino: int) -> ControlFile:
        index = ino - _DIR_INO - 1
        if not 0 <= index < len(self._table):
            raise NotFound(f"no control inode {ino}")
        return self._table[index]

    def getattr(self, ino: int) -> Attr:
        if ino == _DIR_INO:
            return self._attr(ino, stat.S_IFDIR | 0o700, 2)
        f = self._file(ino)
        return self._attr(ino, stat.S_IFREG | f.mode, 1)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        """Look up `name` in `parent`, where `parent` is ours or `name` is ours."""
        if self.is_entry(parent, name):
            return self.getattr(_DIR_INO)
        if parent != _DIR_INO:
            raise NotADirectory(f"control inode {parent} is not a directory")
        if name == b".":
            return self.getattr(_DIR_INO)
        if name == b"..":
            return await self._fs.getattr(ROOT_INO)
        i = self._by_name.get(name)
        if i is None:
            raise NotFound(f"no control file {name!r}")
        return self.getattr(_DIR_INO + 1 + i)

    def setattr(self, ino: int, *, size: int | None, other: bool) -> Attr:
        """Accept only a truncate to 0 (``echo cmd > file`` asks for it); refuse the rest."""
        if other or (size is not None and (size != 0 or ino == _DIR_INO)):
            raise _denied("attributes of control files cannot be changed")
        return self.getattr(ino)

    # the directory:

    def opendir(self, ino: int) -> int:
        if ino != _DIR_INO:
            raise NotADirectory(f"control inode {ino} is not a directory")
        fh = self._new_handle()
        self._dir_handles.add(fh)
        return fh

    def readdir(self, fh: int, start_id: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after `start_id`; an entry's id is its table index + 1."""
        if fh not in self._dir_handles:
            raise FsError(f"stale control directory handle {fh}", errno=errno.EBADF)
        for i in range(start_id, len(self._table)):
            f = self._table[i]
            yield f.name, self.getattr(_DIR_INO + 1 + i), i + 1

    def releasedir(self, fh: int) -> None:
        self._dir_handles.discard(fh)

    # files:

    def open(self, ino: int, flags: int) -> int:
        f = self._file(ino) if ino != _DIR_INO else None
        if f is None:
            raise FsError("control directory opened as a file", errno=errno.EISDIR)
        accmode = flags & os.O_ACCMODE
        wants_read = accmode in (os.O_RDONLY, os.O_RDWR)
        wants_write = accmode in (os.O_WRONLY, os.O_RDWR)
        # Root passes the kernel's permission check whatever the mode says.
        if (wants_read and f.read is None) or (wants_write and f.write is None):
            raise FsError(f"{f.name.decode()}: not opened that way", errno=errno.EACCES)
        snapshot = f.read().encode() if wants_read and f.read is not None else b""
        fh = self._new_handle()
        self._file_handles[fh] = _Handle(f, snapshot)
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._file_handle(fh)
        return h.snapshot[offset : offset + size]

    async def write(self, fh: int, data: bytes) -> int:
        h = self._file_handle(fh)
        if h.file.write is None:
            raise FsError(f"{h.file.name.decode()} is read-only", errno=errno.EBADF)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise InvalidArgument(f"{h.file.name.decode()}: command is not UTF-8") from None
        await h.file.write(text)
        return len(data)

    def release(self, fh: int) -> None:
        self._file_handles.pop(fh, None)

    # the files' callbacks:

    async def _fault_command(self, text: str) -> None:
        try:
            REGISTRY.control(text)
        except FsError as e:
            log.warning("%s", e)
            raise
        log.info("dynamic_fault: %s", text.strip())

    def _render_stats(self) -> str:
        return "".join(f"{key}: {value}\n" for key, value in _flatten(self._fs.stats()))

    # handles:

    def _new_handle(self) -> int:
        fh = self._next_handle
        self._next_handle += 1
        return fh

    def _file_handle(self, fh: int) -> _Handle:
        h = self._file_handles.get(fh)
        if h is None:
            raise FsError(f"stale control file handle {fh}", errno=errno.EBADF)
        return h


def _flatten(values: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, object]]:
    """Nested mappings and dataclasses become dotted keys: ``lock.add.waiters: 0``."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in fields(value)}
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value
