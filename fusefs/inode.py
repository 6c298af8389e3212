"""Inodes: attributes, directory entries, symlink targets, xattrs, extent maps.

An `Inode` is the in-memory form of one checkpoint record.  Regular files own an
`ExtentMap`; directories own their entries (name → inode number) and know their
parent, which rename needs to refuse moving a directory into itself.

Journaling: every assignment to a stored attribute adds the inode to its
filesystem's `fusefs.journal.Tracker` (``track``), so a commit writes the records of
the inodes that changed and no others; directory entries and extent maps report
their changes to the same tracker (the namespace and `ExtentMap` do that).  An
inode read by fsck, or not yet in a namespace, has no tracker.

Memory: slots, and the lock made on first use: an idle inode is a few hundred
bytes beside its extent map.

Locking: attribute and namespace fields are changed only by code that does not
await between reading and writing them (the trio loop is the metadata lock).
Data paths that do await take the per-inode `io_lock` (the kernel's i_rwsem):
exclusive to change the size or the mapping, shared to read the mapping.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from fusefs.dirents import Directory
from fusefs.extents import ExtentMap
from fusefs.locking import InodeLock

if TYPE_CHECKING:
    from fusefs.journal import Tracker


def now_ns() -> int:
    return time.time_ns()


def name_to_json(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def name_from_json(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


#: Inode numbers are below this (what a loaded record may hold).
INO_LIMIT: Final = 1 << 63

#: The attributes a checkpoint or journal record holds (entries and extents aside).
STORED: Final = frozenset(
    {
        "mode",
        "uid",
        "gid",
        "nlink",
        "size",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "rdev",
        "generation",
        "xattrs",
        "parent",
        "target",
    }
)


@dataclass(eq=False, slots=True, init=False)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    generation: int
    xattrs: dict[bytes, bytes]
    # directories:
    entries: Directory | None
    parent: int
    # symlinks:
    target: bytes
    # regular files:
    extents: ExtentMap | None
    # run time only, never stored:
    open_count: int
    lookups: int
    _lock: InodeLock | None = field(repr=False)
    track: Tracker | None = field(repr=False)

    def __init__(
        self,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        size: int = 0,
        atime_ns: int = 0,
        mtime_ns: int = 0,
        ctime_ns: int = 0,
        rdev: int = 0,
        generation: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
        entries: Directory | None = None,
        parent: int = 0,
        target: bytes = b"",
        extents: ExtentMap | None = None,
    ) -> None:
        # Not through `__setattr__`: a new inode has no tracker (the namespace
        # that adopts it journals it whole), and twenty Python-level calls, each
        # failing to read the unset ``track`` slot, cost 10 us a create.
        put = object.__setattr__
        put(self, "ino", ino)
        put(self, "mode", mode)
        put(self, "uid", uid)
        put(self, "gid", gid)
        put(self, "nlink", nlink)
        put(self, "size", size)
        put(self, "atime_ns", atime_ns)
        put(self, "mtime_ns", mtime_ns)
        put(self, "ctime_ns", ctime_ns)
        put(self, "rdev", rdev)
        put(self, "generation", generation)
        put(self, "xattrs", {} if xattrs is None else xattrs)
        put(self, "entries", entries)
        put(self, "parent", parent)
        put(self, "target", target)
        put(self, "extents", extents)
        put(self, "open_count", 0)
        put(self, "lookups", 0)
        put(self, "_lock", None)
        put(self, "track", None)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in STORED:
            track = self.track
            if track is not None:
                track.inodes.add(self.ino)

    @property
    def io_lock(self) -> InodeLock:
        lock = self._lock
        if lock is None:
            lock = self._lock = InodeLock()
        return lock

    def idle(self) -> bool:
        """No open handle, and nobody holds or waits for the inode lock."""
        return self.open_count == 0 and (self._lock is None or self._lock.idle())

    def drop_lock_if_idle(self) -> None:
        """Forget an idle inode lock (`io_lock` makes a new one when needed)."""
        if self._lock is not None and self._lock.idle():
            object.__setattr__(self, "_lock", None)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def kill_setid(self) -> bool:
        """Clear S_ISUID, and S_ISGID where group-execute makes it a real set-group-ID
        (without it the bit is a locking mark, left alone) -- the kernel's
        ``should_remove_suid``, on a regular file only.  True if a bit was cleared;
        the caller touches ctime and commits."""
        mode = self.mode
        kill = mode & stat.S_ISUID
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if not kill or not stat.S_ISREG(mode):
            return False
        self.mode = mode & ~kill
        return True

    def touch(self, *, m: bool = False, c: bool = True, a: bool = False) -> None:
        # Every create and unlink touches its directory: the times go straight
        # into the slots and the inode to the journal once, not per field.
        t = now_ns()
        put = object.__setattr__
        if m:
            put(self, "mtime_ns", t)
        if c:
            put(self, "ctime_ns", t)
        if a:
            put(self, "atime_ns", t)
        track = self.track
        if track is not None and (m or c or a):
            track.inodes.add(self.ino)

    # checkpoint encoding:

    def to_record(self, *, whole: bool = True) -> dict[str, Any]:
        """The inode's record: everything (a checkpoint's), or with ``whole``
        false its attributes only, without directory entries and extent runs (a
        journal's, which records those apart, as they change)."""
        rec: dict[str, Any] = {
            "ino": self.ino,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "nlink": self.nlink,
            "size": self.size,
            "atime": self.atime_ns,
            "mtime": self.mtime_ns,
            "ctime": self.ctime_ns,
            "rdev": self.rdev,
            "gen": self.generation,
        }
        if self.xattrs:
            rec["xattrs"] = {name_to_json(k): v.hex() for k, v in self.xattrs.items()}
        if self.entries is not None:
            rec["parent"] = self.parent
            if whole:
                rec["entries"] = {name_to_json(k): v for k, v in self.entries.items()}
        if self.is_symlink:
            rec["target"] = name_to_json(self.target)
        if self.extents is not None and whole:
            rec["extents"] = [list(r) for r in self.extents.to_runs()]
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Inode:
        """The inode of a checkpoint or journal record (untracked: the namespace
        adopts it), as `__init__` builds one: without `__setattr__`, which
        mount would pay per field.

        Raises ValueError, TypeError, KeyError or AttributeError when the record
        is not one that fusefs writes: a field of the wrong type or out of its
        range, an unknown file type, an xattr no setxattr could have made (the
        loader turns them into `Corrupt`)."""
        mode = _field(rec, "mode", 0, 1 << 32)
        if stat.S_IFMT(mode) not in _FILE_TYPES:
            raise ValueError(f"mode {mode:o}: unknown file type")
        ino = _field(rec, "ino", 1, INO_LIMIT)
        uid = _field(rec, "uid", 0, 1 << 32)
        gid = _field(rec, "gid", 0, 1 << 32)
        nlink = _field(rec, "nlink", 0, 1 << 32)
        size = _field(rec, "size", 0, 1 << 63)
        atime_ns = _field(rec, "atime", -(1 << 63), 1 << 63)
        mtime_ns = _field(rec, "mtime", -(1 << 63), 1 << 63)
        ctime_ns = _field(rec, "ctime", -(1 << 63), 1 << 63)
        rdev = _field(rec, "rdev", 0, 1 << 64, 0)
        generation = _field(rec, "gen", 0, 1 << 64, 0)
        stored_xattrs = rec.get("xattrs")
        xattrs = _xattrs(stored_xattrs) if stored_xattrs else {}
        entries = None
        parent = 0
        target = b""
        extents = None
        if stat.S_ISDIR(mode):
            parent = _field(rec, "parent", 0, 1 << 63, 0)
            entries = Directory(
                (name_from_json(k), int(v)) for k, v in rec.get("entries", {}).items()
            )
        elif stat.S_ISLNK(mode):
            target = name_from_json(rec.get("target", ""))
        elif stat.S_ISREG(mode):
            runs = [(int(a), int(b), int(c), bool(d)) for a, b, c, d in rec.get("extents", ())]
            extents = ExtentMap.from_runs(runs)
        return cls(
            ino,
            mode,
            uid,
            gid,
            nlink,
            size,
            atime_ns,
            mtime_ns,
            ctime_ns,
            rdev,
            generation,
            xattrs,
            entries,
            parent,
            target,
            extents,
        )


#: The file types fusefs makes (mknod makes the device, fifo and socket nodes).
_FILE_TYPES: Final = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)
#: What setxattr accepts (`fusefs.namespace`): names of 1..255 bytes, values to 64 KiB.
_XATTR_NAME_MAX: Final = 255
_XATTR_SIZE_MAX: Final = 65536


def _field(rec: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    """``rec[key]``, an int in [lo, hi) (``default`` when it may be absent)."""
    value = rec[key] if default is None else rec.get(key, default)
    if type(value) is not int or not lo <= value < hi:
        raise ValueError(f"{key} {value!r} out of range")
    return value


def _xattrs(stored: dict[str, str]) -> dict[bytes, bytes]:
    out = {name_from_json(k): bytes.fromhex(v) for k, v in stored.items()}
    for name, value in out.items():
        if not 0 < len(name) <= _XATTR_NAME_MAX or len(value) > _XATTR_SIZE_MAX:
            raise ValueError(f"xattr {name[:40]!r}: name or value out of range")
    return out
