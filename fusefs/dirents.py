"""A directory's entries, with readdir cookies that stay valid while it changes.

FUSE's readdir is resumable: every entry goes out with a cookie (``off_t``), and
the next call starts after the cookie the kernel got last.  pyfuse3 asks that no
file be skipped or reported twice when others are created or removed between
the calls.  An index into a list fails that as soon as an earlier entry goes; a
snapshot per opendir holds it, but costs the whole directory on every opendir.

`Directory` gives each entry a cookie when its name is inserted: the next value
of a per-directory counter, starting at 1 (0 is FUSE's "from the start").  The
cookie never changes while the name stays, so ``after(cookie)`` -- the entries
with a greater cookie, in cookie order -- resumes a scan exactly where it
stopped, whatever was created or removed meanwhile: an entry present for the
whole scan comes out once.  Storing a new inode number under an existing name
(RENAME_EXCHANGE) keeps the name's cookie: the entry stays where it was, as a
dict keeps an overwritten key in place.  A rename that moves a name removes the
old entry and inserts a new one, so the new name gets a new cookie, after every
cookie given before; a scan under way may return it (it was added during the
scan).  Cookies live in memory only: a checkpoint stores the entries in cookie
order and mount numbers them 1, 2, 3 ... again, which is fine because no
directory handle outlives the mount.

Layout: the names in cookie order, cut into blocks of at most `BLOCK` entries;
a block holds its names, and beside them packed arrays of their cookies and
inode numbers.  A dict maps each name to its block, which makes the mapping: a
lookup is the dict, then a scan of one block's name pointers for the slot (in C,
a few hundred nanoseconds).  Insertion order of that dict is cookie order, so
iterating it lists the directory in readdir order.  The last cookie of every
block is in `_lasts`, so finding where ``after(c)`` starts is two bisections:
the block, then the slot -- O(log n).  A new name is appended to the last block;
a removed name is deleted from its block, so a deleted entry leaves no
tombstone for later scans to step over, and no deletion costs more than one
block's memmove plus, when a block empties, one pointer per block.  A block
that falls under a quarter full is merged with a neighbour that has room, which
keeps the blocks at least an eighth full on average.

Memory: an entry costs its dict slot, whose value points to a block shared by
up to `BLOCK` names (no object of its own), and three machine words in the
block: the name pointer, the cookie and the inode number -- 24 bytes beside what
a plain ``{name: ino}`` dict costs, and nothing for an int object per inode
number, which such a dict holds unless its values are shared.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import ItemsView, Iterable, Iterator, MutableMapping, ValuesView
from typing import Final, final

BLOCK: Final = 64
"""Entries per block at most: a lookup scans at most this many names, a deletion
moves at most this many slots."""

COOKIE_MAX: Final = 2**63 - 1
"""FUSE's ``off_t`` is signed 64-bit."""

_INO_MAX: Final = 2**64 - 1


@final
class _Block:
    """Up to `BLOCK` consecutive entries in cookie order."""

    __slots__ = ("cookies", "inos", "names")

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.cookies = array("Q")
        self.inos = array("Q")

    def __repr__(self) -> str:
        return f"<_Block {len(self.names)} entries>"


@final
class Directory(MutableMapping[bytes, int]):
    """name -> inode number, iterated in cookie (insertion) order; see the module
    docstring.  Caller must not mutate a `Directory` while iterating it other
    than through `after`, which tolerates any change between two entries.

    Protected by the trio loop, as the rest of the namespace: every change is
    made by synchronous code, with no await between its check and its change."""

    __slots__ = ("_blocks", "_entries", "_lasts", "_next_cookie", "_version")

    _entries: dict[bytes, _Block]  # name -> the block that holds it
    _blocks: list[_Block]  # in cookie order
    _lasts: list[int]  # each block's last cookie
    _next_cookie: int
    _version: int  # changes whenever an entry moves (a deletion, a renumbering)

    def __init__(self, items: Iterable[tuple[bytes, int]] = ()) -> None:
        self._version = 0
        self._load(items)

    def _load(self, items: Iterable[tuple[bytes, int]]) -> None:
        self._entries = {}
        self._blocks = []
        self._lasts = []
        self._next_cookie = 1
        for name, ino in items:
            self[name] = ino

    def __repr__(self) -> str:
        return (
            f"<Directory {len(self._entries)} entries in {len(self._blocks)} blocks,"
            f" next cookie {self._next_cookie}>"
        )

    # the mapping:

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: bytes) -> int:
        block = self._entries[name]
        return block.inos[block.names.index(name)]

    def get(self, name: bytes, default: int | None = None) -> int | None:  # type: ignore[override]
        block = self._entries.get(name)
        return default if block is None else block.inos[block.names.index(name)]

    def items(self) -> ItemsView[bytes, int]:
        return _Items(self)

    def values(self) -> ValuesView[int]:
        return _Values(self)

    def _iter_items(self) -> Iterator[tuple[bytes, int]]:
        for block in self._blocks:
            yield from zip(block.names, block.inos, strict=True)

    def __setitem__(self, name: bytes, ino: int) -> None:
        if not 0 <= ino <= _INO_MAX:
            raise ValueError(f"inode number {ino} out of range")
        block = self._entries.get(name)
        if block is not None:  # a new inode under the name: same entry, same cookie
            block.inos[block.names.index(name)] = ino
            return
        cookie = self._next_cookie
        if cookie > COOKIE_MAX:
            self._renumber()
            cookie = self._next_cookie
        self._next_cookie = cookie + 1
        # Appending moves no entry: a scan under way just finds one more.
        if self._blocks and len(self._blocks[-1].names) < BLOCK:
            block = self._blocks[-1]
            self._lasts[-1] = cookie
        else:
            block = _Block()
            self._blocks.append(block)
            self._lasts.append(cookie)
        block.names.append(name)
        block.cookies.append(cookie)
        block.inos.append(ino)
        self._entries[name] = block

    def __delitem__(self, name: bytes) -> None:
        block = self._entries.pop(name)
        i = block.names.index(name)
        b = bisect_left(self._lasts, block.cookies[i])
        del block.names[i], block.cookies[i], block.inos[i]
        self._version += 1
        if not block.names:
            del self._blocks[b], self._lasts[b]
            return
        if i == len(block.names):
            self._lasts[b] = block.cookies[-1]
        if len(block.names) < BLOCK // 4:
            self._merge(b)

    def _merge(self, b: int) -> None:
        """Join under-full block ``b`` with its smaller neighbour, if they fit in one."""
        blocks = self._blocks
        sizes = [(len(blocks[n].names), n) for n in (b - 1, b + 1) if 0 <= n < len(blocks)]
        if not sizes:
            return
        size, n = min(sizes)
        if size + len(blocks[b].names) > BLOCK:
            return
        lo, hi = blocks[min(b, n)], blocks[max(b, n)]
        lo.names += hi.names
        lo.cookies += hi.cookies
        lo.inos += hi.inos
        for name in hi.names:
            self._entries[name] = lo
        self._lasts[min(b, n)] = self._lasts[max(b, n)]
        del blocks[max(b, n)], self._lasts[max(b, n)]

    def _renumber(self) -> None:
        """Give the entries cookies 1, 2, 3 ... again, in the same order.  Only
        reached after 2**63 insertions into one directory since mount: scans under
        way then lose their place, which nothing else could avoid."""
        self._load(list(self._iter_items()))
        self._version += 1

    # readdir:

    def cookie(self, name: bytes) -> int:
        """The cookie of entry ``name`` (KeyError if there is none)."""
        block = self._entries[name]
        return block.cookies[block.names.index(name)]

    def _seek(self, cookie: int) -> tuple[int, int]:
        """Block and slot of the first entry whose cookie is greater than ``cookie``."""
        b = bisect_right(self._lasts, cookie)
        if b == len(self._lasts):
            return b, 0
        return b, bisect_right(self._blocks[b].cookies, cookie)

    def after(self, cookie: int) -> Iterator[tuple[bytes, int, int]]:
        """``(name, ino, cookie)`` of every entry whose cookie is greater than
        ``cookie``, in cookie order: O(log n) to start, O(1) for each entry.  The
        directory may change between two entries: the walk then finds its place
        again from the last cookie it gave."""
        b, i = self._seek(cookie)
        version = self._version
        while b < len(self._blocks):
            block = self._blocks[b]
            if i >= len(block.names):
                b, i = b + 1, 0
                continue
            c = block.cookies[i]
            yield block.names[i], block.inos[i], c
            if self._version != version:
                version = self._version
                b, i = self._seek(c)
            else:
                i += 1


class _Items(ItemsView[bytes, int]):
    """``Directory.items()`` read from the blocks, not a lookup per name."""

    __slots__ = ()
    _mapping: Directory

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return self._mapping._iter_items()


class _Values(ValuesView[int]):
    __slots__ = ()
    _mapping: Directory

    def __iter__(self) -> Iterator[int]:
        for _, ino in self._mapping._iter_items():
            yield ino
