"""What a commit writes: the changes since the last one, as journal records.

A `Tracker` collects the *keys* of what changed -- inodes whose attributes
changed (`Inode.__setattr__` adds them), directory entries by (directory, name)
(the namespace adds them), files whose extent map changed (`ExtentMap` adds
them, with the range inside the map) and inodes removed.  A commit turns the
keys into records holding the *current* values (`collect`), synchronously, so
the records are one consistent state and cost what changed, not what exists:

* ``inodes``: an inode's attribute record (`Inode.to_record` without entries
  and extent runs), which also creates it;
* ``dirents``: ``[dir, name, ino]``, or ``[dir, name, null]`` for a removed name;
* ``extents``: ``[ino, lo, hi, runs]``: blocks [lo, hi) of the file hold
  exactly ``runs``;
* ``deleted``: inode numbers gone (numbers are never reused).

Every record sets a piece of state to a value; none adds or subtracts.  So
`apply` may replay records onto a checkpoint chunk written after them (a fuzzy
checkpoint, `fusefs.commit`): each piece ends at the value of the last record
that set it, or at the chunk's value if no record after the checkpoint began
set it -- and then the chunk's value is the current one.  That is also why
`apply` skips records about inodes it does not have: a record made before the
inode was removed, replayed on a checkpoint written after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, final

from fusefs.errors import Corrupt
from fusefs.inode import Inode, name_from_json, name_to_json


@final
class Tracker:
    """The keys of what changed since the last commit."""

    __slots__ = ("deleted", "dirents", "extents", "inodes")

    def __init__(self) -> None:
        self.inodes: set[int] = set()
        # Per directory, its names in the order last touched: replayed in that
        # order, the entries added get their cookies in the order they had.
        self.dirents: dict[int, dict[bytes, None]] = {}
        self.extents: set[int] = set()
        self.deleted: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.inodes or self.dirents or self.extents or self.deleted)

    def dirent(self, dir_ino: int, name: bytes) -> None:
        names = self.dirents.get(dir_ino)
        if names is None:
            self.dirents[dir_ino] = {name: None}
        else:
            names.pop(name, None)
            names[name] = None

    def adopt(self, inode: Inode) -> None:
        """Journal ``inode``'s changes from now on (a new or loaded inode)."""
        inode.track = self
        if inode.extents is not None:
            inode.extents.track(self, inode.ino)
            inode.extents.take_changes()  # what loading it did is on disk already

    def new(self, inode: Inode) -> None:
        """``inode`` was just created: journal it whole."""
        self.adopt(inode)
        self.inodes.add(inode.ino)

    def removed(self, inode: Inode) -> None:
        inode.track = None
        if inode.extents is not None:
            inode.extents.track(None, 0)
        self.deleted.add(inode.ino)


@dataclass(slots=True)
class Changes:
    """One commit's records (see the module docstring), ready to encode."""

    next_ino: int
    inodes: list[dict[str, Any]] = field(default_factory=list)
    dirents: list[list[Any]] = field(default_factory=list)
    extents: list[list[Any]] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.inodes or self.dirents or self.extents or self.deleted)

    def records(self) -> int:
        return len(self.inodes) + len(self.dirents) + len(self.extents) + len(self.deleted)

    def payload(self) -> dict[str, Any]:
        return {
            "next_ino": self.next_ino,
            "inodes": self.inodes,
            "dirents": self.dirents,
            "extents": self.extents,
            "deleted": self.deleted,
        }


def collect(tracker: Tracker, inodes: dict[int, Inode], next_ino: int) -> Changes:
    """The records of everything ``tracker`` names, with the current values, and
    an empty tracker.  Synchronous: no other task runs in between."""
    out = Changes(next_ino)
    deleted = tracker.deleted
    for ino in tracker.inodes:
        inode = inodes.get(ino)
        if inode is not None:
            out.inodes.append(inode.to_record(whole=False))
    for dir_ino, names in tracker.dirents.items():
        d = inodes.get(dir_ino)
        if d is None or d.entries is None:
            continue  # removed: its removal record covers its names
        for name in names:
            out.dirents.append([dir_ino, name_to_json(name), d.entries.get(name)])
    for ino in tracker.extents:
        inode = inodes.get(ino)
        if inode is None or inode.extents is None:
            continue
        changed = inode.extents.take_changes()
        if changed is not None:
            lo, hi = changed
            runs = inode.extents.runs_in(lo, hi)
            out.extents.append([ino, lo, hi, [list(r) for r in runs]])
    out.deleted = sorted(deleted)
    tracker.inodes = set()
    tracker.dirents = {}
    tracker.extents = set()
    tracker.deleted = set()
    return out


def apply(payload: Any, inodes: dict[int, Inode], what: str) -> int:
    """Replay one journal entry's payload onto ``inodes``; returns its
    ``next_ino``.  Raises Corrupt when the payload is malformed."""
    try:
        for rec in payload["inodes"]:
            new = Inode.from_record(rec)
            old = inodes.get(new.ino)
            if old is not None:
                if old.is_dir and new.is_dir:
                    new.entries = old.entries
                if old.is_reg and new.is_reg:
                    new.extents = old.extents
            inodes[new.ino] = new
        for dir_ino, name_text, ino in payload["dirents"]:
            d = inodes.get(int(dir_ino))
            if d is None or d.entries is None:
                continue  # removed later (a record older than the checkpoint)
            name = name_from_json(name_text)
            if ino is None:
                d.entries.pop(name, None)
            else:
                d.entries[name] = int(ino)
        for ino, lo, hi, runs in payload["extents"]:
            inode = inodes.get(int(ino))
            if inode is None or inode.extents is None:
                continue
            inode.extents.replace_range(
                int(lo), int(hi), [(int(a), int(b), int(c), bool(d)) for a, b, c, d in runs]
            )
        for ino in payload["deleted"]:
            inodes.pop(int(ino), None)
        return int(payload["next_ino"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # AttributeError: a string method called on a decoded non-string (a name).
        raise Corrupt(f"{what}: bad record ({type(e).__name__}: {e})") from None


__all__ = ["Changes", "Tracker", "apply", "collect"]
