"""Inodes: attributes, directory entries, symlink targets, xattrs, extent maps.

An `Inode` is the in-memory form of one checkpoint record.  Regular files own an
`ExtentMap`; directories own their entries (name → inode number) and know their
parent, which rename needs to refuse moving a directory into itself.

Locking: attribute and namespace fields are changed only by code that does not
await between reading and writing them (the trio loop is the metadata lock).
Data paths that do await take the per-inode `io_lock` (the kernel's i_rwsem):
exclusive to change the size or the mapping, shared to read the mapping.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from typing import Any

from fusefs.dirents import Directory
from fusefs.extents import ExtentMap
from fusefs.locking import InodeLock


def now_ns() -> int:
    return time.time_ns()


def _name_to_json(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _name_from_json(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(eq=False)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    generation: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    # directories:
    entries: Directory | None = None
    parent: int = 0
    # symlinks:
    target: bytes = b""
    # regular files:
    extents: ExtentMap | None = None
    # run time only, never stored:
    open_count: int = 0
    lookups: int = 0
    io_lock: InodeLock = field(default_factory=InodeLock)

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
        t = now_ns()
        if m:
            self.mtime_ns = t
        if c:
            self.ctime_ns = t
        if a:
            self.atime_ns = t

    # checkpoint encoding:

    def to_record(self) -> dict[str, Any]:
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
            rec["xattrs"] = {_name_to_json(k): v.hex() for k, v in self.xattrs.items()}
        if self.entries is not None:
            rec["parent"] = self.parent
            rec["entries"] = {_name_to_json(k): v for k, v in self.entries.items()}
        if self.is_symlink:
            rec["target"] = _name_to_json(self.target)
        if self.extents is not None:
            rec["extents"] = [list(r) for r in self.extents.to_runs()]
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Inode:
        inode = cls(
            ino=int(rec["ino"]),
            mode=int(rec["mode"]),
            uid=int(rec["uid"]),
            gid=int(rec["gid"]),
            nlink=int(rec["nlink"]),
            size=int(rec["size"]),
            atime_ns=int(rec["atime"]),
            mtime_ns=int(rec["mtime"]),
            ctime_ns=int(rec["ctime"]),
            rdev=int(rec.get("rdev", 0)),
            generation=int(rec.get("gen", 0)),
        )
        xattrs = rec.get("xattrs")
        if xattrs:
            inode.xattrs = {_name_from_json(k): bytes.fromhex(v) for k, v in xattrs.items()}
        if inode.is_dir:
            inode.parent = int(rec.get("parent", 0))
            inode.entries = Directory(
                (_name_from_json(k), int(v)) for k, v in rec.get("entries", {}).items()
            )
        elif inode.is_symlink:
            inode.target = _name_from_json(rec.get("target", ""))
        elif inode.is_reg:
            runs = [(int(a), int(b), int(c), bool(d)) for a, b, c, d in rec.get("extents", [])]
            inode.extents = ExtentMap.from_runs(runs)
        return inode
