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
ignored), and the command's error is that ``write()``'s error.  A handle opened
for reading *and* writing takes a new snapshot right after each of its commands,
so ``pread(fd, ..., 0)`` after ``write(fd, cmd)`` returns that command's own
result even while other processes use the same file: the file's text after a
command that succeeded, one line ``error EINVAL: <reason>`` after one that
failed (``fusefs fallocate`` and ``fusefs fault`` read their error messages that
way).

The files use FUSE ``direct_io`` like every other file, so the kernel passes each
read and write through even though ``getattr`` reports size 0.

Files for this issue:

``dynamic_fault`` (0600)
    read: the fault-site listing; write: fault commands (DESIGN §4), several may be
    separated by ``;`` or newlines.  A malformed command fails with EINVAL, a query
    that matches nothing with ENOENT; the reason goes to the daemon log, and to a
    read-write handle's next read.
``stats`` (0400)
    read: ``key: value`` lines from `Filesystem.stats`.
``pid`` (0400)
    read: the daemon's process id.  ``fusefs umount`` uses it to wait until the
    daemon has committed and exited.
``fallocate`` (0600)
    write: one fallocate request (`parse_fallocate`; docs/fallocate.md), run with
    the file's own errno as the ``write()``'s error; read: the last result, one
    line: ``ok ino=5 mode=collapse offset=4096 length=8192 size=12288`` or
    ``error EINVAL: <reason>`` (``none`` before the first request).  Afterwards the
    kernel's cached attributes of the target are invalidated at once, so the next
    ``stat`` sees the new size and times (DESIGN §5); its cached data goes
    through `Filesystem.invalidate_kernel`.
``drop_caches`` (0200)
    write ``1``, ``2`` or ``3``, as Linux's ``/proc/sys/vm/drop_caches``: write back
    every dirty page and drop every clean one.  Linux's ``2`` (reclaimable slab:
    dentries and inodes) has no counterpart here -- fusefs caches nothing besides
    pages that it could drop (inodes stay in memory while mounted) -- so ``2`` and
    ``3`` do what ``1`` does.  Anything else fails with EINVAL.
``cache_size`` (0600)
    read: the page cache's limit in bytes; write a size (``1M``, ``65536``,
    at least 1M, as the ``cache_size=`` mount option) to change it while
    mounted: clean pages over the new limit are evicted at once, dirty ones
    once written back.  Stress tools shrink the cache with it (``--pressure``).
``pagecache_lock`` (0600)
    read: ``on`` or ``off``; write ``on`` or ``off`` to switch the pagecache add
    lock of every inode (``off`` only to demonstrate the races, DESIGN §3).
``log_path`` (0400)
    read: the path of the daemon's log, where every refused command says why.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Final, final

from fusefs.errors import FsError, InvalidArgument, NotADirectory, NotFound
from fusefs.faults import REGISTRY
from fusefs.filesystem import Attr, Filesystem
from fusefs.format import parse_size
from fusefs.io.fallocate import (
    CANONICAL_MODES,
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    mode_name,
)
from fusefs.namespace import ROOT_INO
from fusefs.pagecache import MIN_CACHE_SIZE

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
    snapshot: bytes  # the file's text at open (or after this handle's last write)
    readable: bool


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
        log_path: str = "",
    ) -> None:
        self._fs = fs
        self._log_path = log_path
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._pid = os.getpid() if pid is None else pid
        self._time_ns = time.time_ns()
        self._table: tuple[ControlFile, ...] = (
            ControlFile(b"dynamic_fault", 0o600, read=REGISTRY.listing, write=self._fault_command),
            ControlFile(b"stats", 0o400, read=self._render_stats),
            ControlFile(b"pid", 0o400, read=lambda: f"{self._pid}\n"),
            ControlFile(
                b"fallocate",
                0o600,
                read=lambda: self._fallocate_result + "\n",
                write=self._fallocate_command,
            ),
            ControlFile(b"drop_caches", 0o200, write=self._drop_caches_command),
            ControlFile(
                b"cache_size",
                0o600,
                read=lambda: f"{self._fs.cache.limit_bytes}\n",
                write=self._cache_size_command,
            ),
            ControlFile(
                b"pagecache_lock",
                0o600,
                read=lambda: "on\n" if self._fs.cache.lock_enabled else "off\n",
                write=self._pagecache_lock_command,
            ),
            ControlFile(b"log_path", 0o400, read=lambda: f"{self._log_path or '-'}\n"),
        )
        self._fallocate_result = "none"
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
        self._file_handles[fh] = _Handle(f, snapshot, wants_read)
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._file_handle(fh)
        return h.snapshot[offset : offset + size]

    async def write(self, fh: int, data: bytes) -> int:
        h = self._file_handle(fh)
        if h.file.write is None:
            raise FsError(f"{h.file.name.decode()} is read-only", errno=errno.EBADF)
        try:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise InvalidArgument(f"{h.file.name.decode()}: command is not UTF-8") from None
            await h.file.write(text)
        except FsError as e:
            if h.readable:
                h.snapshot = f"error {_errname(e.code)}: {e}\n".encode()
            raise
        # No await between the command's end and this: the snapshot is its result.
        if h.readable and h.file.read is not None:
            h.snapshot = h.file.read().encode()
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

    async def _fallocate_command(self, text: str) -> None:
        try:
            request = parse_fallocate(text)
        except FsError as e:
            self._fallocate_result = f"error {_errname(e.code)}: {e}"
            log.warning("fallocate: %s", e)
            raise
        try:
            inode = self._fs.ns.get(self._target(request))
            await self._fs.fallocate(
                inode.ino, request.mode, request.offset, request.length, route="control"
            )
        except FsError as e:
            self._fallocate_result = f"error {_errname(e.code)}: {e}"
            log.info("fallocate %s: %s", request, self._fallocate_result)
            raise
        self._fallocate_result = f"ok ino={inode.ino} {request} size={inode.size}"
        log.info("fallocate: %s", self._fallocate_result)
        # The size and times changed behind the kernel's back (DESIGN §5).
        self.invalidate_attr(inode.ino)

    def _target(self, request: FallocateRequest) -> int:
        """``ino=`` as given; ``path=`` looked up component by component from the
        root (the core's lookups, no kernel lookup count taken), following no
        symlink."""
        if request.path is None:
            assert request.ino is not None
            return request.ino
        ino = ROOT_INO
        for name in os.fsencode(request.path).split(b"/"):
            if name and name != b".":
                ino = self._fs.ns.lookup(ino, name).ino
        return ino

    async def _drop_caches_command(self, text: str) -> None:
        if text.strip() not in ("1", "2", "3"):
            log.warning("drop_caches: write 1, 2 or 3, not %r", text.strip()[:40])
            raise InvalidArgument(f"drop_caches: write 1, 2 or 3, not {text.strip()[:40]!r}")
        # 2 and 3 do what 1 does: no other cache here could be dropped (see above).
        dropped = await self._fs.drop_caches()
        log.info("drop_caches: %d page(s) dropped", dropped)

    async def _cache_size_command(self, text: str) -> None:
        word = text.strip()
        try:
            size = parse_size(word)
        except FsError as e:
            log.warning("cache_size: %s", e)
            raise InvalidArgument(f"cache_size: {e}") from None
        if size < MIN_CACHE_SIZE:
            log.warning("cache_size: %r is below the minimum of 1M", word[:40])
            raise InvalidArgument(f"cache_size: {word[:40]!r} is below the minimum of 1M")
        evicted = self._fs.cache.set_limit(size)
        log.info("cache_size: %d bytes (%d page(s) evicted)", size, evicted)

    async def _pagecache_lock_command(self, text: str) -> None:
        word = text.strip()
        if word not in ("on", "off"):
            log.warning("pagecache_lock: write on or off, not %r", word[:40])
            raise InvalidArgument(f"pagecache_lock: write on or off, not {word[:40]!r}")
        self._fs.set_pagecache_lock(word == "on")
        log.info("pagecache_lock: %s", word)

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


# the fallocate language:

FALLOCATE_MODES: Final[Mapping[str, int]] = {
    "alloc": 0,
    "keep_size": FALLOC_FL_KEEP_SIZE,
    # Punching a hole never changes the size: the name says both flags.  The bare
    # PUNCH_HOLE flag (EOPNOTSUPP, as fallocate(2)) is ``mode=2``.
    "punch": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero": FALLOC_FL_ZERO_RANGE,
    "zero_range": FALLOC_FL_ZERO_RANGE,
    "collapse": FALLOC_FL_COLLAPSE_RANGE,
    "collapse_range": FALLOC_FL_COLLAPSE_RANGE,
    "insert": FALLOC_FL_INSERT_RANGE,
    "insert_range": FALLOC_FL_INSERT_RANGE,
}
_TRUE: Final = frozenset({"1", "yes", "true", "on"})
_FALSE: Final = frozenset({"0", "no", "false", "off"})


def parse_mode(text: str) -> int:
    """Names or numbers joined by ``,``, ``+`` or ``|``: ``zero+keep_size``, ``0x11``."""
    mode = 0
    for word in text.replace("+", ",").replace("|", ",").split(","):
        word = word.strip().lower()
        if word in FALLOCATE_MODES:
            mode |= FALLOCATE_MODES[word]
            continue
        try:
            value = int(word, 0)
        except ValueError:
            names = "/".join(CANONICAL_MODES.values())
            raise InvalidArgument(f"fallocate: unknown mode {word!r} (one of {names})") from None
        if value < 0:
            raise InvalidArgument(f"fallocate: negative mode {word!r}")
        mode |= value
    return mode


@dataclass(frozen=True, slots=True)
class FallocateRequest:
    ino: int | None
    path: str | None
    mode: int
    offset: int
    length: int

    def __str__(self) -> str:
        return f"mode={mode_name(self.mode)} offset={self.offset} length={self.length}"


def parse_fallocate(text: str) -> FallocateRequest:
    """One request: ``key=value`` words, split like a shell does (quote a path
    with spaces): ``ino=N`` or ``path=P`` (relative to the mount root), ``mode=``
    (`parse_mode`, default ``alloc``), ``offset=`` (default 0), ``length=``
    (required; sizes as ``4096``, ``64K``, ``1M``), ``keep_size=1`` (adds
    KEEP_SIZE).  Any mistake is EINVAL with a one-line reason."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise InvalidArgument(f"fallocate: {e}") from None
    if not words:
        raise InvalidArgument("fallocate: empty request")
    values: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise InvalidArgument(f"fallocate: {word!r} is not key=value")
        if key not in ("ino", "path", "mode", "offset", "length", "keep_size"):
            raise InvalidArgument(f"fallocate: unknown key {key!r}")
        if key in values:
            raise InvalidArgument(f"fallocate: {key}= given twice")
        values[key] = value
    if ("ino" in values) == ("path" in values):
        raise InvalidArgument("fallocate: give exactly one of ino= and path=")
    if "length" not in values:
        raise InvalidArgument("fallocate: length= is required")
    ino = None
    if "ino" in values:
        if not values["ino"].isdigit():
            raise InvalidArgument(f"fallocate: bad inode number {values['ino']!r}")
        ino = int(values["ino"])
    mode = parse_mode(values.get("mode", "alloc"))
    keep = values.get("keep_size", "0").lower()
    if keep not in _TRUE | _FALSE:
        raise InvalidArgument(f"fallocate: keep_size= takes 1 or 0, not {keep!r}")
    if keep in _TRUE:
        mode |= FALLOC_FL_KEEP_SIZE
    offset = parse_size(values.get("offset", "0"))
    length = parse_size(values["length"])
    return FallocateRequest(ino, values.get("path"), mode, offset, length)


def _errname(code: int) -> str:
    if code == errno.EOPNOTSUPP:  # the same number as ENOTSUP, which errorcode prefers
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, str(code))


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
