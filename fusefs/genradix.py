"""Generic radix tree: a sparse array of fixed-size records.

After Linux's ``include/linux/generic-radix-tree.h``.  A `GenRadix` stores
records of one `struct.Struct` layout in *leaves*, bytearrays of ``page_size``
bytes each, holding ``page_size // record.size`` records.  A record never
straddles two leaves, so a layout that does not divide the page wastes the
tail of every leaf (a 3-byte record in a 4096-byte page uses 4095 bytes).

Leaves hang off a tree of *interior nodes*, each with ``page_size // 8``
children -- the kernel's pages of pointers.  The tree is built lazily: a leaf
and the interior nodes above it are allocated by the first write into the
leaf, and the tree grows a level at the top when an index past the current
capacity is written.  A record that was never written reads as all zeros, and
reading never allocates.  Iteration walks only allocated subtrees, so the
cost of walking a sparse array is proportional to what is allocated, not to
the index range.

Trade-offs, and why they are the right ones here:

* Memory is counted the kernel's way (``page_size`` per leaf and per interior
  node).  A dense array costs ``record.size`` bytes per record plus about
  ``1 / fanout`` of that for the tree; an isolated record costs a whole leaf
  plus its path of interior nodes.  The structure is for arrays that are dense
  in patches (a file's block map), not for a handful of scattered keys.
* Leaves are plain bytearrays, so bulk users (the extent map) can scan them
  with C-speed byte operations (``lstrip``, ``==``, slicing) and can move a
  whole leaf from one page number to another without copying a record
  (`detach_leaves`, `attach_leaves`, `set_leaf`).
* An interior node is a Python list of ``fanout`` child slots plus one trailing
  slot that counts the non-empty children, so removing a leaf prunes the now
  empty interior nodes above it in O(depth) instead of scanning each node.
* The tree never holds an empty interior node, and it drops a level at the
  top when only the leftmost child of the root is left, so lookups stay as
  shallow as the largest allocated page needs.  Pages handed out (``ptr``,
  ``leaf``) stay valid until their page is removed or the tree is freed; a
  view of a removed page writes to a page the tree no longer holds.

A tree is not safe to mutate while one of its iterators is live; callers that
mutate while walking take a snapshot first (``list(tree.iter_leaves(...))``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import compress, islice
from typing import Any, Final, final

__all__ = ["MAX_INDEX", "GenRadix", "GenRadixStatistics"]

#: The largest record index a `GenRadix` accepts.
MAX_INDEX: Final = 2**48 - 1

# An interior node: ``fanout`` child slots (None, an interior node, or a
# leaf on the lowest interior level) followed by the count of non-empty slots.
_Interior = list[Any]


@cache
def _zero_page(page_size: int) -> bytes:
    """One all-zero page per page size, shared: a tree is often small."""
    return bytes(page_size)


@dataclass(frozen=True, slots=True)
class GenRadixStatistics:
    """A snapshot of a `GenRadix`'s shape and memory use."""

    depth: int
    """Levels in the tree, leaves included; 0 when nothing is allocated."""
    leaves: int
    interior_nodes: int
    records_per_page: int
    record_size: int
    page_size: int
    memory_bytes: int
    """``page_size`` per leaf and per interior node, as the kernel counts."""
    capacity: int
    """Records addressable at the current depth without growing the tree."""
    max_index: int
    """Highest record index inside an allocated leaf, or -1 when empty."""


@final
class GenRadix:
    """A sparse array of `record`-shaped entries in lazily allocated pages."""

    __slots__ = (
        "_cap_pages",
        "_depth",
        "_fanout",
        "_interior",
        "_leaves",
        "_mask",
        "_page_size",
        "_record",
        "_root",
        "_rpp",
        "_shifts",
        "_size",
        "_zero_page",
        "_zero_record",
    )

    def __init__(self, record: struct.Struct, page_size: int = 4096) -> None:
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two >= 16")
        if record.size == 0:
            raise ValueError(f"record layout {record.format!r} has size 0")
        if record.size > page_size:
            raise ValueError(
                f"record layout {record.format!r} of {record.size} bytes "
                f"does not fit in a {page_size}-byte page"
            )
        self._record: Final = record
        self._size: Final = record.size
        self._page_size: Final = page_size
        self._rpp: Final = page_size // record.size
        self._fanout: Final = page_size // 8
        self._mask: Final = self._fanout - 1
        self._zero_record: Final = record.unpack(bytes(record.size))
        self._zero_page: Final = _zero_page(page_size)
        # Protected by nothing: a GenRadix belongs to one owner (an inode's
        # extent map), which serialises its mutations.
        # A leaf at depth 1, an interior node deeper, None when empty.
        self._root: Any = None
        self._depth = 0
        self._cap_pages = 0  # fanout ** (depth - 1) once depth >= 1
        self._shifts: tuple[int, ...] = ()  # child-index shift per interior level
        self._leaves = 0
        self._interior = 0

    # ------------------------------------------------------------------ shape

    @property
    def record(self) -> struct.Struct:
        return self._record

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def records_per_page(self) -> int:
        return self._rpp

    @property
    def depth(self) -> int:
        return self._depth

    def memory_bytes(self) -> int:
        """Bytes held, counted as the kernel would: a page per leaf and per node."""
        return (self._leaves + self._interior) * self._page_size

    def statistics(self) -> GenRadixStatistics:
        last = -1
        for pno, _ in self.iter_leaves_reverse(self._cap_pages - 1):
            last = (pno + 1) * self._rpp - 1
            break
        return GenRadixStatistics(
            depth=self._depth,
            leaves=self._leaves,
            interior_nodes=self._interior,
            records_per_page=self._rpp,
            record_size=self._size,
            page_size=self._page_size,
            memory_bytes=self.memory_bytes(),
            capacity=self._cap_pages * self._rpp,
            max_index=last,
        )

    def __repr__(self) -> str:
        return (
            f"<GenRadix record={self._record.format!r} page_size={self._page_size} "
            f"depth={self._depth} leaves={self._leaves} interior={self._interior} "
            f"memory={self.memory_bytes()}>"
        )

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        levels = max(depth - 1, 0)
        bits = self._fanout.bit_length() - 1
        self._shifts = tuple(bits * i for i in range(levels - 1, -1, -1))
        self._cap_pages = self._fanout**levels if depth else 0

    def _new_interior(self) -> _Interior:
        self._interior += 1
        node: _Interior = [None] * (self._fanout + 1)
        node[self._fanout] = 0
        return node

    def _grow(self, pno: int) -> None:
        """Add levels at the top until page `pno` is addressable."""
        if self._depth == 0:
            self._set_depth(1)
        while pno >= self._cap_pages:
            old = self._root
            if old is not None:
                node = self._new_interior()
                node[0] = old
                node[self._fanout] = 1
                self._root = node
            self._set_depth(self._depth + 1)

    def _shrink(self) -> None:
        """Drop top levels that only hold their leftmost child."""
        fanout = self._fanout
        root = self._root
        if root is None:
            self._set_depth(0)
            return
        while self._depth > 1:
            assert isinstance(root, list)
            if root[fanout] != 1 or root[0] is None:
                break
            root = root[0]
            self._interior -= 1
            self._set_depth(self._depth - 1)
        self._root = root

    # ------------------------------------------------------------- indexing

    def _check_index(self, idx: int) -> None:
        if not 0 <= idx <= MAX_INDEX:
            raise ValueError(f"genradix index {idx} out of range [0, {MAX_INDEX}]")

    def _check_page(self, pno: int) -> None:
        if not 0 <= pno <= MAX_INDEX // self._rpp:
            raise ValueError(f"genradix page {pno} out of range [0, {MAX_INDEX // self._rpp}]")

    def leaf(self, pno: int) -> bytearray | None:
        """The leaf holding page number `pno`, or None if it was never allocated."""
        node = self._root
        if node is None or not 0 <= pno < self._cap_pages:
            return None
        mask = self._mask
        for shift in self._shifts:
            node = node[(pno >> shift) & mask]
            if node is None:
                return None
        return node  # type: ignore[no-any-return]

    def leaf_alloc(self, pno: int) -> bytearray:
        """The leaf for page `pno`, allocating it and its path as needed."""
        if not 0 <= pno < self._cap_pages:
            self._check_page(pno)
            self._grow(pno)
        node = self._root
        if self._depth == 1:
            if node is None:
                self._root = node = bytearray(self._page_size)
                self._leaves += 1
            return node  # type: ignore[no-any-return]
        node = self._leaf_parent(node, pno)
        fanout, i = self._fanout, pno & self._mask
        leaf: bytearray | None = node[i]
        if leaf is None:
            node[i] = leaf = bytearray(self._page_size)
            node[fanout] += 1
            self._leaves += 1
        return leaf

    def _leaf_parent(self, root: Any, pno: int) -> Any:
        """The interior node whose slot holds leaf `pno` (depth >= 2), creating
        the interior nodes on the way down as needed."""
        node = root
        if node is None:
            self._root = node = self._new_interior()
        fanout, mask = self._fanout, self._mask
        for shift in self._shifts[:-1]:
            i = (pno >> shift) & mask
            child = node[i]
            if child is None:
                node[i] = child = self._new_interior()
                node[fanout] += 1
            node = child
        return node

    def set_leaf(self, pno: int, page: bytearray) -> bytearray | None:
        """Install `page` as leaf `pno`; returns the leaf it replaces, if any."""
        if type(page) is not bytearray or len(page) != self._page_size:
            raise ValueError(f"a leaf must be a bytearray of {self._page_size} bytes")
        if not 0 <= pno < self._cap_pages:
            self._check_page(pno)
            self._grow(pno)
        node = self._root
        if self._depth == 1:
            self._root = page
            if node is None:
                self._leaves += 1
            return node  # type: ignore[no-any-return]
        node = self._leaf_parent(node, pno)
        fanout, i = self._fanout, pno & self._mask
        old: bytearray | None = node[i]
        node[i] = page
        if old is None:
            node[fanout] += 1
            self._leaves += 1
        return old

    def remove_leaf(self, pno: int) -> bytearray | None:
        """Remove leaf `pno` (pruning interior nodes left empty); returns it."""
        node = self._root
        if node is None or not 0 <= pno < self._cap_pages:
            return None
        if self._depth == 1:
            self._root = None
            self._leaves -= 1
            self._shrink()
            return node  # type: ignore[no-any-return]
        fanout, mask = self._fanout, self._mask
        path: list[tuple[_Interior, int]] = []
        for shift in self._shifts:
            i = (pno >> shift) & mask
            path.append((node, i))
            node = node[i]
            if node is None:
                return None
        self._leaves -= 1
        for parent, i in reversed(path):
            parent[i] = None
            parent[fanout] -= 1
            if parent[fanout]:
                break
            self._interior -= 1
        else:
            self._root = None
        self._shrink()
        return node  # type: ignore[no-any-return]

    def detach_leaves(self, first: int) -> list[tuple[int, bytearray]]:
        """Remove every leaf numbered `first` or higher; returns them in order.

        Costs time proportional to the leaves removed, with one pass over the
        tree: this is how bulk users move a tail of the array elsewhere.
        """
        out: list[tuple[int, bytearray]] = []
        root = self._root
        if root is None or first >= self._cap_pages:
            return out
        first = max(first, 0)
        if self._depth == 1:
            out.append((0, root))
            self._root = None
            self._leaves -= 1
        else:
            self._detach(root, 0, 0, first, out)
            if not root[self._fanout]:
                self._root = None
                self._interior -= 1
        self._shrink()
        return out

    def _detach(
        self, node: _Interior, level: int, base: int, first: int, out: list[tuple[int, bytearray]]
    ) -> None:
        fanout = self._fanout
        shift = self._shifts[level]
        start = (first - base) >> shift if first > base else 0
        indices = list(compress(range(start, fanout), islice(node, start, fanout)))
        if level == len(self._shifts) - 1:
            out.extend((base + i, node[i]) for i in indices)
            node[start:fanout] = [None] * (fanout - start)
            node[fanout] -= len(indices)
            self._leaves -= len(indices)
            return
        for i in indices:
            child = node[i]
            self._detach(child, level + 1, base + (i << shift), first, out)
            if not child[fanout]:
                node[i] = None
                node[fanout] -= 1
                self._interior -= 1

    def attach_leaves(self, first: int, pages: list[bytearray]) -> None:
        """Install `pages` as leaves ``first, first + 1, ...``; those slots must be free.

        The counterpart of `detach_leaves`: consecutive leaves under one node
        are installed with a single slice assignment, so re-hanging a stretch
        of leaves costs one tree walk per ``fanout`` leaves.  Raises
        ValueError, changing nothing, if a page is malformed or a slot is taken.
        """
        n = len(pages)
        if not n:
            return
        ps = self._page_size
        # map() keeps the checks at C speed: this runs once per moved leaf.
        if set(map(type, pages)) != {bytearray} or set(map(len, pages)) != {ps}:
            raise ValueError(f"a leaf must be a bytearray of {ps} bytes")
        self._check_page(first)
        self._check_page(first + n - 1)
        taken = next(self.iter_leaves(first, first + n), None)
        if taken is not None:
            raise ValueError(f"genradix page {taken[0]} is already allocated")
        if first + n > self._cap_pages:
            self._grow(first + n - 1)
        if self._depth == 1:
            self._root = pages[0]
            self._leaves += 1
            return
        fanout, mask = self._fanout, self._mask
        if self._root is None:
            self._root = self._new_interior()
        done = 0
        while done < n:
            pno = first + done
            node = self._root
            for shift in self._shifts[:-1]:
                i = (pno >> shift) & mask
                child = node[i]
                if child is None:
                    node[i] = child = self._new_interior()
                    node[fanout] += 1
                node = child
            slot = pno & mask
            k = min(fanout - slot, n - done)
            node[slot : slot + k] = pages[done : done + k]
            node[fanout] += k
            self._leaves += k
            done += k

    # ------------------------------------------------------------ iteration

    def iter_leaves(
        self, first: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, bytearray]]:
        """Yield ``(page number, leaf)`` for allocated leaves in [first, stop), ascending.

        Unallocated subtrees are skipped without being visited.
        """
        root = self._root
        limit = self._cap_pages if stop is None else min(stop, self._cap_pages)
        first = max(first, 0)
        if root is None or first >= limit:
            return
        if self._depth == 1:
            yield 0, root
            return
        for pno, leaf in self._iter_node(root, 0, 0, first):
            if pno >= limit:
                return
            yield pno, leaf

    def _iter_node(
        self, node: _Interior, level: int, base: int, first: int
    ) -> Iterator[tuple[int, bytearray]]:
        fanout = self._fanout
        shift = self._shifts[level]
        start = (first - base) >> shift if first > base else 0
        indices = compress(range(start, fanout), islice(node, start, fanout))
        if level == len(self._shifts) - 1:
            for i in indices:
                yield base + i, node[i]
        else:
            for i in indices:
                yield from self._iter_node(node[i], level + 1, base + (i << shift), first)

    def iter_leaves_reverse(self, last: int) -> Iterator[tuple[int, bytearray]]:
        """Yield ``(page number, leaf)`` for allocated leaves numbered <= `last`, descending."""
        root = self._root
        if root is None or last < 0:
            return
        last = min(last, self._cap_pages - 1)
        if self._depth == 1:
            yield 0, root
            return
        yield from self._iter_node_reverse(root, 0, 0, last)

    def _iter_node_reverse(
        self, node: _Interior, level: int, base: int, last: int
    ) -> Iterator[tuple[int, bytearray]]:
        fanout = self._fanout
        shift = self._shifts[level]
        end = min((last - base) >> shift, fanout - 1)
        indices = compress(range(end, -1, -1), node[end::-1])
        if level == len(self._shifts) - 1:
            for i in indices:
                yield base + i, node[i]
        else:
            for i in indices:
                yield from self._iter_node_reverse(node[i], level + 1, base + (i << shift), last)

    def iter_pages_from(self, start: int = 0) -> Iterator[tuple[int, bytearray]]:
        """Yield ``(index of the leaf's first record, leaf)`` for every allocated
        leaf holding records at or after `start`."""
        self._check_index(start)
        rpp = self._rpp
        for pno, page in self.iter_leaves(start // rpp):
            yield pno * rpp, page

    def iter_from(self, start: int = 0) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(index, writable view)`` for every record slot at or after
        `start` in an allocated leaf, ascending."""
        self._check_index(start)
        rpp, size = self._rpp, self._size
        for first, page in self.iter_pages_from(start):
            view = memoryview(page)
            for slot in range(max(start - first, 0), rpp):
                yield first + slot, view[slot * size : slot * size + size]

    # -------------------------------------------------------------- records

    def ptr(self, idx: int) -> memoryview | None:
        """A writable view of record `idx`, or None if its page was never allocated."""
        self._check_index(idx)
        pno, slot = divmod(idx, self._rpp)
        page = self.leaf(pno)
        if page is None:
            return None
        off = slot * self._size
        return memoryview(page)[off : off + self._size]

    def ptr_alloc(self, idx: int) -> memoryview:
        """A writable view of record `idx`, allocating its page as needed."""
        self._check_index(idx)
        pno, slot = divmod(idx, self._rpp)
        off = slot * self._size
        return memoryview(self.leaf_alloc(pno))[off : off + self._size]

    def get(self, idx: int) -> tuple[Any, ...]:
        """Record `idx`, unpacked; zeros where nothing was written.  Never allocates."""
        self._check_index(idx)
        pno, slot = divmod(idx, self._rpp)
        page = self.leaf(pno)
        if page is None:
            return self._zero_record
        return self._record.unpack_from(page, slot * self._size)

    def set(self, idx: int, *values: Any) -> None:
        """Pack `values` into record `idx`, allocating its page as needed."""
        self._check_index(idx)
        pno, slot = divmod(idx, self._rpp)
        try:
            self._record.pack_into(self.leaf_alloc(pno), slot * self._size, *values)
        except struct.error as exc:
            raise ValueError(f"bad record for layout {self._record.format!r}: {exc}") from None

    def prealloc(self, n: int) -> None:
        """Allocate every page holding indices [0, n)."""
        if n <= 0:
            return
        self._check_index(n - 1)
        for pno in range((n - 1) // self._rpp + 1):
            self.leaf_alloc(pno)

    def free(self) -> None:
        """Drop every page and node; the tree is empty again, at depth 0."""
        self._root = None
        self._leaves = self._interior = 0
        self._set_depth(0)

    def is_zero_page(self, page: bytearray) -> bool:
        """Whether `page` holds only zero bytes (a leaf with nothing written)."""
        return page == self._zero_page
