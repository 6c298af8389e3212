"""The per-inode page index: block number -> page, with ordered range walks.

A page of several blocks is stored at each of its blocks (`set_run`), so the
page of any block is one lookup; `values_in` gives such a page once.

A mapping needs two things of its index: O(1) get/insert/remove on the hot
paths (a cache hit, a fill inserting hundreds of pages, eviction), and walks
over [first, end) that cost the pages there, not the file (write back, drop,
truncate of a huge sparse file).  A sorted dict gives the second at a few
microseconds per insert and remove, which a fill of 256 pages pays 256 times.

`PageIndex` splits the index space into chunks of `CHUNK` consecutive
indices, the way the kernel's xarray groups 64 slots under a node: a dict
from chunk number to a list of `CHUNK` slots, and a sorted list of the chunk
numbers.  Get, insert and remove are a dict lookup and a list store; only the
first page of a chunk and the last one out touch the sorted list.  A range
walk visits the chunks that hold pages in the range and the slots of those
chunks, so it costs at most `CHUNK` slots per chunk with pages -- and nothing
for an empty stretch, however long.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Generic, TypeVar, final

from sortedcontainers import SortedList

CHUNK_SHIFT: Final = 6
CHUNK: Final = 1 << CHUNK_SHIFT
_MASK: Final = CHUNK - 1

V = TypeVar("V")


@final
class PageIndex(Generic[V]):
    """A sparse map from non-negative int to value, iterated in key order."""

    __slots__ = ("_chunks", "_counts", "_len", "_order")

    def __init__(self) -> None:
        self._chunks: dict[int, list[V | None]] = {}
        self._counts: dict[int, int] = {}
        self._order = SortedList()  # chunk numbers that hold a value
        self._len = 0

    def __repr__(self) -> str:
        return f"<PageIndex {self._len} entries in {len(self._chunks)} chunks>"

    def __len__(self) -> int:
        return self._len

    def get(self, index: int) -> V | None:
        chunk = self._chunks.get(index >> CHUNK_SHIFT)
        return None if chunk is None else chunk[index & _MASK]

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or index < 0:
            return False
        chunk = self._chunks.get(index >> CHUNK_SHIFT)
        return chunk is not None and chunk[index & _MASK] is not None

    def __getitem__(self, index: int) -> V:
        value = self.get(index)
        if value is None:
            raise KeyError(index)
        return value

    def __setitem__(self, index: int, value: V) -> None:
        if index < 0:
            raise KeyError(index)
        cno = index >> CHUNK_SHIFT
        chunk = self._chunks.get(cno)
        if chunk is None:
            chunk = self._chunks[cno] = [None] * CHUNK
            self._counts[cno] = 0
            self._order.add(cno)
        slot = index & _MASK
        if chunk[slot] is None:
            self._counts[cno] += 1
            self._len += 1
        chunk[slot] = value

    def __delitem__(self, index: int) -> None:
        cno = index >> CHUNK_SHIFT
        chunk = self._chunks.get(cno)
        slot = index & _MASK
        if chunk is None or chunk[slot] is None:
            raise KeyError(index)
        chunk[slot] = None
        self._len -= 1
        left = self._counts[cno] - 1
        if left:
            self._counts[cno] = left
        else:
            del self._chunks[cno], self._counts[cno]
            self._order.remove(cno)

    def get_run(self, first: int, count: int) -> list[V | None]:
        """The values at [first, first + count), None where there is none."""
        out: list[V | None] = []
        index = first
        end = first + count
        chunks = self._chunks
        while index < end:
            slot = index & _MASK
            n = min(CHUNK - slot, end - index)
            chunk = chunks.get(index >> CHUNK_SHIFT)
            out += [None] * n if chunk is None else chunk[slot : slot + n]
            index += n
        return out

    def set_run(self, first: int, values: list[V]) -> None:
        """Store ``values`` (none of them None) at first, first + 1, ..."""
        if first < 0:
            raise KeyError(first)
        index = first
        end = first + len(values)
        pos = 0
        while index < end:
            cno = index >> CHUNK_SHIFT
            slot = index & _MASK
            n = min(CHUNK - slot, end - index)
            chunk = self._chunks.get(cno)
            if chunk is None:
                chunk = self._chunks[cno] = [None] * CHUNK
                self._counts[cno] = 0
                self._order.add(cno)
            added = chunk[slot : slot + n].count(None)
            chunk[slot : slot + n] = values[pos : pos + n]
            self._counts[cno] += added
            self._len += added
            index += n
            pos += n

    def clear_run(self, first: int, count: int) -> None:
        """Remove the keys [first, first + count), every one of which is present."""
        index = first
        end = first + count
        while index < end:
            cno = index >> CHUNK_SHIFT
            slot = index & _MASK
            n = min(CHUNK - slot, end - index)
            chunk = self._chunks[cno]
            if chunk[slot : slot + n].count(None):
                raise KeyError(index)
            left = self._counts[cno] - n
            if left:
                chunk[slot : slot + n] = [None] * n
                self._counts[cno] = left
            else:
                del self._chunks[cno], self._counts[cno]
                self._order.remove(cno)
            self._len -= n
            index += n

    def first_present(self, first: int, stop: int) -> int:
        """The smallest key in [first, stop), or ``stop`` if there is none."""
        for start, slots in self._slices(first, stop - 1):
            if slots.count(None) != len(slots):
                for i, value in enumerate(slots):
                    if value is not None:
                        return start + i
        return stop

    def _slices(self, first: int, last: int | None) -> Iterator[tuple[int, list[V | None]]]:
        """For each chunk holding keys in [first, last]: the key of its first
        slot in range and its slots cut to the range."""
        first = max(first, 0)
        if last is not None and last < first:
            return
        chunks = self._chunks
        for cno in self._order.irange(
            first >> CHUNK_SHIFT, None if last is None else last >> CHUNK_SHIFT
        ):
            base = cno << CHUNK_SHIFT
            lo = max(first - base, 0)
            hi = CHUNK if last is None else min(last - base + 1, CHUNK)
            chunk = chunks[cno]
            yield base + lo, chunk[lo:hi] if lo or hi < CHUNK else chunk

    def irange(self, first: int, last: int | None = None) -> Iterator[int]:
        """The keys k with first <= k <= last (no upper bound when ``last`` is
        None), in order.  Not safe across changes to the index: callers that
        change it while walking take a list first."""
        for start, slots in self._slices(first, last):
            for i, value in enumerate(slots):
                if value is not None:
                    yield start + i

    def values_in(self, first: int, last: int | None = None) -> Iterator[V]:
        """The values of the keys `irange` would give, in the same order, a
        value stored at a run of consecutive keys once (a page of several
        blocks)."""
        prev: V | None = None
        expected = -1  # where the previous slice ended: a gap ends a run
        for start, slots in self._slices(first, last):
            if start != expected:
                prev = None
            for value in slots:
                if value is not prev:
                    if value is not None:
                        yield value
                    prev = value
            expected = start + len(slots)

    def __iter__(self) -> Iterator[int]:
        return self.irange(0)

    def keys(self) -> Iterator[int]:
        return self.irange(0)

    def values(self) -> Iterator[V]:
        """Every value in key order, each run of one value once (`values_in`)."""
        return self.values_in(0)

    def items(self) -> Iterator[tuple[int, V]]:
        chunks = self._chunks
        for cno in self._order:
            base = cno << CHUNK_SHIFT
            for slot, value in enumerate(chunks[cno]):
                if value is not None:
                    yield base + slot, value
