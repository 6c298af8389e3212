"""The extent map: one inode's logical block -> physical block map.

Runs.  A *run* is a stored extent: a logical range mapped to consecutive
physical blocks with one unwritten flag, at most ``MAX_EXTENT_BLOCKS`` long
(ext4 caps its extents the same way).  A map holds its runs in one of two
stores, and every method answers the same in both, because both hold exactly
the same runs:

* **inline**, a sorted tuple of at most ``INLINE_RUNS`` packed ints, one a run,
  for small files (ext4 keeps four extents in the inode the same way);
* a **genradix** (`GenRadix`), one record per mapped block, for the rest.

A map starts inline (an empty map holds the shared empty tuple and no
`GenRadix` object), moves its runs to a genradix as soon as it needs more than
``INLINE_RUNS`` of them, and moves them back when it is down to
``INLINE_RUNS // 2`` runs or fewer (truncate to 0, a punch that leaves a
couple of runs).  The gap between the two thresholds keeps a file that hovers
around the limit from being copied back and forth.  Whether a map may have
shrunk is checked in O(1) from its mapped block count (a map of N runs maps
at most ``N * MAX_EXTENT_BLOCKS`` blocks), and only then are its first few
runs counted, so a large map never pays for the check.

Inline layout.  A run is the int ``(lblk << 64) | record``, where ``record``
is the genradix record of the run's first block (below).  Sorting the ints
sorts the runs, so `lookup` is one ``bisect`` over at most four ints.  One
run costs its int (~32-40 bytes) and a tuple slot; an `ExtentMap` itself is
a few slots, and the page-size constants it needs are shared by every map of
that page size.  Changes build a new tuple: copying four ints is cheaper than
anything mutable would be, and a generator over the old tuple stays valid.

Genradix layout.  The map is a `GenRadix` indexed by logical block with one
8-byte record per block, a little-endian u64::

    bits  0..7   offset of this block inside its run (0 .. MAX_EXTENT_BLOCKS-1)
    bits  8..15  length of the run, minus one
    bit   16     unwritten (preallocated: reads as zeros)
    bit   17     mapped; a record of 0 is a hole
    bits 18..63  physical block where the run starts (46 bits)

Every record knows its run, so `lookup` is O(1): one tree walk, one unpack,
no scan however long the file's contiguous stretches are.  The records of
one run form an arithmetic progression (only the offset field changes), so a
run is written with one C-level ``array('Q', range(...))`` and a slice
assignment; the cap bounds what one split or merge rewrites to
``MAX_EXTENT_BLOCKS`` records.

The algorithms (map, unmap, mark_written, the shifts, the merging in
``_fixup``) are written once, against a handful of store primitives (read
the record of a block, write a run, zero a range, move the tail, walk the
runs, find the next or previous mapping), each of which has an inline and a
genradix version.  The genradix leaves stale records behind while an
operation is half done (a run partly overwritten still names its old
length); the inline store trims such runs at once.  Both agree whenever an
operation reads, which is only between whole steps.

Run rule (what `lookup` and `extents` return).  Runs of one physically
contiguous stretch are kept *merged*: two neighbouring runs that are
physically contiguous with the same unwritten flag always have a combined
length above ``MAX_EXTENT_BLOCKS``.  Every operation re-establishes this by
merging at the run boundaries it touched (``_fixup``); a merge only makes a
run longer, so it never breaks the rule elsewhere.  A stretch of L contiguous
blocks is thus stored in fewer than ``2 * L / MAX_EXTENT_BLOCKS + 1`` runs;
`map` fills a short run in front of the new range up to the cap before it
chunks, so a file that grows by appending is stored in full-length runs.
The stronger "cut every stretch into full runs from its start" would make one
map in front of a long stretch rewrite the whole stretch.

Holes are all-zero records.  The map never keeps a leaf that is all zeros, so
finding the next or previous mapping skips unallocated subtrees in the tree
and then scans at most one leaf with ``bytes.lstrip``/``rstrip`` (C speed).

Shifts (collapse / insert range) move records, never rewrite them: offsets in
the records are relative to the run, so a moved run stays valid (insert first
splits the one run crossing the offset).  Everything from the offset's leaf on
is detached from the tree in one pass (`GenRadix.detach_leaves`).  When the
shift is a whole number of leaves, the same leaves are hung back at their new
page numbers (`GenRadix.attach_leaves`, one slice assignment per interior
node; no record is copied).  Otherwise each stretch of consecutive leaves is
joined into one bytes object and cut into leaves again at the new alignment,
recycling the stretch's old bytearrays (allocating fresh 4 KiB bytearrays
costs ten times the copy).  Either way the cost is linear in the mapped leaves
after the offset, with a per-leaf constant of a few Python operations, and
unallocated subtrees are never visited.  Inline, a shift adds the distance to
the runs after the offset.

Change tracking.  A map remembers the logical range ``[lo, hi)`` that holds
every block whose mapping (physical block or unwritten flag) may have changed
since `take_changes` last returned it; each mutation widens it in O(1):
`map`, `unmap` and `mark_written` by the blocks they changed; a collapse at
offset o by ``[o, last + 1)`` and an insert of n blocks at o by
``[o, last + n + 1)``, where last is the last mapped block before the shift
(everything from o on moved); `clear` by everything; `replace_range` by the
blocks it unmapped and mapped.  The range may be too
wide, never too narrow.  It says nothing of how the blocks are cut into
runs: merging at a boundary changes no block's mapping.  A metadata journal
records ``runs_in(lo, hi)`` for the range, and replay applies
``replace_range(lo, hi, runs)``, which leaves the replayed map with the same
`to_runs` as the original.  A map built by `from_runs` starts with no
changes (it is what was loaded).

Costs, measured by ``benchmarks/bench_extents.py`` (CPython 3.11, bytes as
tracemalloc counts them): an empty map ~75 bytes, a one-block map ~150,
three runs ~240, where every map owned a genradix and its own zero pages
(~8.8 KiB empty, ~12.9 KiB with one block); a 100-run map ~4.5 KiB (one
leaf).  Inline `lookup` and `map` cost no more than the genradix's (`lookup`
in a hole much less: no leaf scan).  A 1,000,000-block file: 8.0 bytes per
mapped block against ~106 for a dict {lblk: pblk}; a random `lookup` 1.5-2x
a dict's ``d[b]`` (both are dominated by cache misses; building the `Extent`
tuple is a third of ours); collapse or insert of one block at block 0 in ~4
ms of CPU (25-50x faster than rebuilding the dict), 0.7 ms when the shift is
a multiple of 512 blocks.  An isolated mapped block in a genradix costs a
whole 4 KiB leaf plus its share of interior nodes (4.5-7 KiB against ~65
bytes in a dict): the genradix trade-off, right for large file maps, which
are dense in patches, and the reason small maps stay inline.

Protected by: the owning inode's lock (an `ExtentMap` does no locking).
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import islice
from typing import TYPE_CHECKING, Final, NamedTuple, final

from fusefs.errors import ExtentError
from fusefs.genradix import GenRadix, GenRadixStatistics

if TYPE_CHECKING:
    from fusefs.journal import Tracker

__all__ = [
    "INLINE_RUNS",
    "MAX_EXTENT_BLOCKS",
    "MAX_FILE_BLOCKS",
    "MAX_PHYS_BLOCKS",
    "Extent",
    "ExtentMap",
    "ExtentMapStatistics",
]

#: Largest logical block count of a file: blocks are numbered [0, MAX_FILE_BLOCKS).
MAX_FILE_BLOCKS: Final = 2**40

#: Runs a map keeps inline before it moves them to a genradix.
INLINE_RUNS: Final = 4

_RUN_BITS: Final = 8
#: Longest run (stored extent); splitting or merging one rewrites at most this many records.
MAX_EXTENT_BLOCKS: Final = 1 << _RUN_BITS

_OFF_MASK: Final = MAX_EXTENT_BLOCKS - 1
_LEN_SHIFT: Final = _RUN_BITS
_UNWRITTEN: Final = 1 << (2 * _RUN_BITS)
_MAPPED: Final = 1 << (2 * _RUN_BITS + 1)
_PBLK_SHIFT: Final = 2 * _RUN_BITS + 2

#: Physical block numbers must be below this (the width of the record's pblk field).
MAX_PHYS_BLOCKS: Final = 1 << (64 - _PBLK_SHIFT)

# An inline run: (lblk << _LBLK_SHIFT) | record of its first block.
_LBLK_SHIFT: Final = 64
_REC_MASK: Final = (1 << _LBLK_SHIFT) - 1

_RECORD: Final = struct.Struct("<Q")
_unpack_rec: Final = _RECORD.unpack_from
_BIG_ENDIAN: Final = sys.byteorder == "big"


class Extent(NamedTuple):
    """A logical range and where it lives; ``pblk`` is None for a hole."""

    start: int
    pblk: int | None
    length: int
    unwritten: bool = False

    @property
    def end(self) -> int:
        """First logical block past the extent."""
        return self.start + self.length

    @property
    def is_hole(self) -> bool:
        return self.pblk is None


@dataclass(frozen=True, slots=True)
class ExtentMapStatistics:
    """A snapshot of an `ExtentMap`'s size."""

    mapped_blocks: int
    memory_bytes: int
    inline_runs: int | None
    """Runs held inline; None when they live in the genradix."""
    radix: GenRadixStatistics | None
    """The genradix's shape; None while the runs are inline (no genradix exists)."""


@dataclass(frozen=True, slots=True)
class _Geometry:
    """Constants of one page size, shared by every map of that page size."""

    page_size: int
    inline_runs: int
    shrink_runs: int  # back to inline at this many runs or fewer
    shift: int  # log2 of records per leaf
    mask: int  # records per leaf - 1
    fanout_mask: int
    zero: bytes  # one all-zero leaf


@cache
def _geometry(page_size: int, inline_runs: int) -> _Geometry:
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two >= 16")
    if inline_runs < 0:
        raise ValueError(f"inline run count {inline_runs} is negative")
    rpp = page_size // _RECORD.size
    return _Geometry(
        page_size=page_size,
        inline_runs=inline_runs,
        shrink_runs=inline_runs // 2,
        shift=rpp.bit_length() - 1,
        mask=rpp - 1,
        fanout_mask=page_size // 8 - 1,
        zero=bytes(page_size),
    )


# tuple.__new__ skips the Python-level NamedTuple constructor: lookup is hot.
_new_extent: Final = tuple.__new__

Run = tuple[int, int, int, bool]
"""``(lblk, pblk, n, unwritten)``, as `ExtentMap.to_runs` gives them."""


@final
class ExtentMap:
    """One inode's map from logical blocks to physical blocks."""

    __slots__ = ("_geo", "_hi", "_ino", "_lo", "_mapped", "_store", "_track")

    def __init__(self, *, page_size: int = 4096, inline_runs: int = INLINE_RUNS) -> None:
        """`inline_runs` is how many runs stay inline (0: a genradix whenever
        anything is mapped)."""
        self._geo: Final = _geometry(page_size, inline_runs)
        # The runs inline (sorted), or the genradix holding them.
        self._store: tuple[int, ...] | GenRadix = ()
        self._mapped = 0
        # Blocks whose mapping may have changed since take_changes(); empty when lo >= hi.
        self._lo = MAX_FILE_BLOCKS
        self._hi = 0
        # The journal's tracker told of every change, as inode `_ino`'s.
        self._track: Tracker | None = None
        self._ino = 0

    def __repr__(self) -> str:
        store = self._store
        where = f"inline={len(store)}" if isinstance(store, tuple) else f"depth={store.depth}"
        return f"<ExtentMap mapped_blocks={self._mapped} memory={self.memory_bytes()} {where}>"

    # ------------------------------------------------------------- queries

    def lookup(self, lblk: int) -> Extent:
        """The whole run containing `lblk`, or the whole hole around it.

        A hole's extent runs from the end of the previous mapping (or 0) to
        the next mapping (or MAX_FILE_BLOCKS).
        """
        store = self._store
        # type() is, not isinstance(): lookup is the hot path.
        if type(store) is GenRadix:
            # GenRadix.leaf() inlined: on CPython the method call costs as
            # much as the walk itself.
            node = store._root
            if node is not None and 0 <= lblk < MAX_FILE_BLOCKS:
                geo = self._geo
                pno = lblk >> geo.shift
                if pno < store._cap_pages:
                    fmask = geo.fanout_mask
                    for shift in store._shifts:
                        node = node[(pno >> shift) & fmask]
                        if node is None:
                            break
                    else:
                        v = _unpack_rec(node, (lblk & geo.mask) << 3)[0]
                        if v:
                            return _new_extent(
                                Extent,
                                (
                                    lblk - (v & _OFF_MASK),
                                    v >> _PBLK_SHIFT,
                                    ((v >> _LEN_SHIFT) & _OFF_MASK) + 1,
                                    v & _UNWRITTEN != 0,
                                ),
                            )
            if not 0 <= lblk < MAX_FILE_BLOCKS:
                raise ExtentError(f"lookup: block {lblk} outside [0, {MAX_FILE_BLOCKS})")
            start = self._prev_mapped(lblk) + 1
            end = self._next_mapped(lblk, MAX_FILE_BLOCKS)
            return Extent(start, None, end - start, False)
        if not 0 <= lblk < MAX_FILE_BLOCKS:
            raise ExtentError(f"lookup: block {lblk} outside [0, {MAX_FILE_BLOCKS})")
        i = bisect_left(store, (lblk + 1) << _LBLK_SHIFT)
        start = 0
        if i:
            e = store[i - 1]
            s = e >> _LBLK_SHIFT
            n = ((e >> _LEN_SHIFT) & _OFF_MASK) + 1
            if lblk < s + n:
                return _new_extent(
                    Extent, (s, (e & _REC_MASK) >> _PBLK_SHIFT, n, e & _UNWRITTEN != 0)
                )
            start = s + n
        end = store[i] >> _LBLK_SHIFT if i < len(store) else MAX_FILE_BLOCKS
        return Extent(start, None, end - start, False)

    def pblk_of(self, lblk: int) -> int | None:
        """The physical block behind `lblk`, or None in a hole."""
        store = self._store
        if type(store) is GenRadix:
            node = store._root
            if node is not None and 0 <= lblk < MAX_FILE_BLOCKS:
                geo = self._geo
                pno = lblk >> geo.shift
                if pno < store._cap_pages:
                    fmask = geo.fanout_mask
                    for shift in store._shifts:
                        node = node[(pno >> shift) & fmask]
                        if node is None:
                            return None
                    v: int = _unpack_rec(node, (lblk & geo.mask) << 3)[0]
                    return (v >> _PBLK_SHIFT) + (v & _OFF_MASK) if v else None
                return None
        if not 0 <= lblk < MAX_FILE_BLOCKS:
            raise ExtentError(f"pblk_of: block {lblk} outside [0, {MAX_FILE_BLOCKS})")
        if type(store) is GenRadix:
            return None
        v = _inline_rec(store, lblk)
        return (v >> _PBLK_SHIFT) + (v & _OFF_MASK) if v else None

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Yield the mapped runs intersecting [start, end), clipped to it, ascending.

        The map must not change while the iterator is live.
        """
        if end is None:
            end = MAX_FILE_BLOCKS
        if not 0 <= start <= end <= MAX_FILE_BLOCKS:
            raise ExtentError(f"extents: bad range [{start}, {end})")
        for s, p, n, uw in self._runs(start, end):
            a = max(s, start)
            b = min(s + n, end)
            yield Extent(a, p + a - s, b - a, uw)

    def holes(self, first: int, count: int) -> list[tuple[int, int]]:
        """The unmapped runs ``(lblk, n)`` of [first, first + count), ascending."""
        holes: list[tuple[int, int]] = []
        pos = first
        end = first + count
        for ext in self.extents(first, end):
            if ext.start > pos:
                holes.append((pos, ext.start - pos))
            pos = ext.start + ext.length
        if pos < end:
            holes.append((pos, end - pos))
        return holes

    def mapped_blocks(self) -> int:
        return self._mapped

    def memory_bytes(self) -> int:
        """Bytes held by the runs: the inline tuple and its ints, or the radix
        tree counted the kernel's way (a page per leaf and per node).  The
        map's own few slots are not counted."""
        store = self._store
        if isinstance(store, tuple):
            if not store:
                return 0  # the shared empty tuple
            return sys.getsizeof(store) + sum(map(sys.getsizeof, store))
        return store.memory_bytes()

    def statistics(self) -> ExtentMapStatistics:
        store = self._store
        if isinstance(store, tuple):
            return ExtentMapStatistics(self._mapped, self.memory_bytes(), len(store), None)
        return ExtentMapStatistics(self._mapped, self.memory_bytes(), None, store.statistics())

    # ------------------------------------------------------------ mutation

    def map(self, lblk: int, pblk: int, n: int, unwritten: bool = False) -> None:
        """Map [lblk, lblk + n) to [pblk, pblk + n); the range must be a hole."""
        _check_range("map", lblk, n)
        _check_phys("map", pblk, n)
        end = lblk + n
        hit = self._next_mapped(lblk, end)
        if hit < end:
            raise ExtentError(f"map: [{lblk}, {end}) overlaps the mapping of block {hit}")
        self._map(lblk, pblk, n, unwritten)
        self._settle()

    def unmap(self, lblk: int, n: int) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk + n) (holes inside are fine).

        Returns the freed physical runs as ``(pblk, count)`` in logical order,
        neighbours merged where they are physically contiguous.
        """
        _check_range("unmap", lblk, n)
        freed = self._unmap(lblk, lblk + n)
        self._settle()
        return freed

    def mark_written(self, lblk: int, n: int) -> None:
        """Clear the unwritten flag of every mapped block in [lblk, lblk + n)."""
        _check_range("mark_written", lblk, n)
        end = lblk + n
        fix: list[int] = []
        for s, p, k, uw in list(self._runs(lblk, end)):
            if not uw:
                continue
            a = max(s, lblk)
            b = min(s + k, end)
            self._widen(a, b)
            if s < a:
                self._write_run(s, p, a - s, True)
            self._write_run(a, p + a - s, b - a, False)
            if b < s + k:
                self._write_run(b, p + b - s, s + k - b, True)
            fix += (s, a, b, s + k)
        for x in sorted(set(fix)):
            self._fixup(x)
        self._settle()

    def shift_left(self, lblk: int, n: int) -> None:
        """Collapse [lblk, lblk + n): mappings at or after lblk + n move down by n.

        The range must already be unmapped.
        """
        _check_range("shift_left", lblk, n)
        end = lblk + n
        hit = self._next_mapped(lblk, end)
        if hit < end:
            raise ExtentError(f"shift_left: block {hit} in [{lblk}, {end}) is still mapped")
        last = self._prev_mapped(MAX_FILE_BLOCKS)
        if last < end:
            return  # nothing moves
        self._widen(lblk, last + 1)
        self._move_tail(end, lblk)
        self._fixup(lblk)
        self._settle()

    def shift_right(self, lblk: int, n: int) -> None:
        """Insert n blocks of hole at lblk: mappings at or after lblk move up by n.

        A run crossing lblk is split.  Moving a mapping to or past
        MAX_FILE_BLOCKS raises ExtentError and changes nothing.
        """
        _check_range("shift_right", lblk, n)
        last = self._prev_mapped(MAX_FILE_BLOCKS)
        if last < lblk:
            return
        if last + n >= MAX_FILE_BLOCKS:
            raise ExtentError(
                f"shift_right: block {last} would move past the maximum file size "
                f"of {MAX_FILE_BLOCKS} blocks"
            )
        self._widen(lblk, last + n + 1)
        fix: list[int] = []
        v = self._rec(lblk)
        if v & _OFF_MASK:
            off = v & _OFF_MASK
            s = lblk - off
            k = ((v >> _LEN_SHIFT) & _OFF_MASK) + 1
            p = v >> _PBLK_SHIFT
            uw = bool(v & _UNWRITTEN)
            self._write_run(s, p, off, uw)
            self._write_run(lblk, p + off, k - off, uw)
            fix = [s, s + k + n]
        self._move_tail(lblk, lblk + n)
        for b in fix:
            self._fixup(b)
        self._settle()

    def clear(self) -> None:
        """Forget every mapping (the caller frees the blocks)."""
        if self._mapped:
            self._widen(0, MAX_FILE_BLOCKS)
        self._store = ()
        self._mapped = 0

    # ------------------------------------------------------ change tracking

    def track(self, tracker: Tracker | None, ino: int) -> None:
        """Report changes to ``tracker`` as inode ``ino``'s (None: stop)."""
        self._track = tracker
        self._ino = ino

    def take_changes(self) -> tuple[int, int] | None:
        """The logical range ``[lo, hi)`` holding every block whose mapping
        may have changed since the previous call, or None; starts afresh.

        The range may be wider than what changed, never narrower.
        """
        lo, hi = self._lo, self._hi
        if lo >= hi:
            return None
        self._lo = MAX_FILE_BLOCKS
        self._hi = 0
        return lo, hi

    def runs_in(self, lo: int, hi: int) -> list[Run]:
        """The mappings of [lo, hi) as ``(lblk, pblk, n, unwritten)``, clipped
        to the range, ascending, merged as `to_runs` merges them.

        Costs time proportional to the runs in the range, not the file.
        """
        if not 0 <= lo <= hi <= MAX_FILE_BLOCKS:
            raise ExtentError(f"runs_in: bad range [{lo}, {hi})")
        out: list[Run] = []
        for s, p, k, uw in self._runs(lo, hi):
            a = max(s, lo)
            n = min(s + k, hi) - a
            p += a - s
            if out:
                ls, lp, lk, luw = out[-1]
                if ls + lk == a and lp + lk == p and luw == uw:
                    out[-1] = (ls, lp, lk + n, uw)
                    continue
            out.append((a, p, n, uw))
        return out

    def replace_range(self, lo: int, hi: int, runs: Iterable[Run]) -> None:
        """Make [lo, hi) hold exactly `runs`: unmap the rest of the range, map these.

        `runs` are ``(lblk, pblk, n, unwritten)`` inside [lo, hi), ascending,
        not overlapping (what `runs_in` returns).  Runs are merged with their
        neighbours at the range's edges as everywhere.  The blocks unmapped
        are not reported: the caller replays, it does not free.  Bad runs
        raise ExtentError and change nothing.
        """
        if not 0 <= lo <= hi <= MAX_FILE_BLOCKS:
            raise ExtentError(f"replace_range: bad range [{lo}, {hi})")
        todo = [(int(a), int(b), int(c), bool(d)) for a, b, c, d in runs]
        pos = lo
        for lblk, pblk, n, _ in todo:
            if n <= 0 or lblk < pos or lblk + n > hi:
                raise ExtentError(
                    f"replace_range: run [{lblk}, {lblk + n}) is empty, out of order "
                    f"or outside [{lo}, {hi})"
                )
            _check_phys("replace_range", pblk, n)
            pos = lblk + n
        if lo < hi:
            self._unmap(lo, hi)
        for lblk, pblk, n, unwritten in todo:
            self._map(lblk, pblk, n, unwritten)
        self._settle()

    # --------------------------------------------------------- persistence

    def to_runs(self) -> list[Run]:
        """Every mapping as ``(lblk, pblk, n, unwritten)``, ascending.

        Physically contiguous neighbours with one flag are merged regardless
        of MAX_EXTENT_BLOCKS, so the list is as short as it can be.
        """
        return self.runs_in(0, MAX_FILE_BLOCKS)

    @classmethod
    def from_runs(
        cls,
        runs: Iterable[Run],
        *,
        page_size: int = 4096,
        inline_runs: int = INLINE_RUNS,
    ) -> ExtentMap:
        """Rebuild a map from `to_runs` output (any runs that do not overlap).

        The new map has no changes to take: it is what was stored.
        """
        em = cls(page_size=page_size, inline_runs=inline_runs)
        for lblk, pblk, n, unwritten in runs:
            em.map(lblk, pblk, n, unwritten)
        em.take_changes()
        return em

    # ------------------------------------------------- operations, unchecked

    def _widen(self, lo: int, hi: int) -> None:
        if lo < self._lo:
            self._lo = lo
        if hi > self._hi:
            self._hi = hi
        if self._track is not None:
            self._track.extents.add(self._ino)

    def _map(self, lblk: int, pblk: int, n: int, unwritten: bool) -> None:
        """`map` of a range known to be a hole, without `_settle`."""
        end = lblk + n
        self._widen(lblk, end)
        start, first_pblk = lblk, pblk
        if lblk:
            # Top up a short run that this range continues, so appends
            # produce full runs.
            v = self._rec(lblk - 1)
            length = ((v >> _LEN_SHIFT) & _OFF_MASK) + 1
            run_pblk = v >> _PBLK_SHIFT
            if (
                v
                and length < MAX_EXTENT_BLOCKS
                and run_pblk + length == pblk
                and bool(v & _UNWRITTEN) == unwritten
            ):
                start, first_pblk = lblk - length, run_pblk
        chunks = range(start, end, MAX_EXTENT_BLOCKS)
        store = self._store
        # Past this many runs even the one merge at `end` leaves too many to
        # keep inline: move to the genradix first, so a long map is never
        # built run by run in a tuple.
        if (
            isinstance(store, tuple)
            and len(store) + len(chunks) - (start < lblk) > self._geo.inline_runs + 1
        ):
            self._to_radix(store)
        for s in chunks:
            self._write_run(s, first_pblk + s - start, min(MAX_EXTENT_BLOCKS, end - s), unwritten)
        self._mapped += n
        self._fixup(end)

    def _unmap(self, lblk: int, end: int) -> list[tuple[int, int]]:
        """`unmap` of [lblk, end), without `_settle`."""
        runs = list(self._runs(lblk, end))
        if not runs:
            return []
        freed: list[tuple[int, int]] = []
        for s, p, k, _ in runs:
            a = max(s, lblk)
            count = min(s + k, end) - a
            fp = p + a - s
            if freed and freed[-1][0] + freed[-1][1] == fp:
                freed[-1] = (freed[-1][0], freed[-1][1] + count)
            else:
                freed.append((fp, count))
            self._mapped -= count
        fix = []
        s, p, k, uw = runs[0]
        first = max(lblk, s)
        if s < lblk:
            self._write_run(s, p, lblk - s, uw)
            fix.append(s)
        s, p, k, uw = runs[-1]
        if s + k > end:
            self._write_run(end, p + end - s, s + k - end, uw)
            fix.append(s + k)
        self._widen(first, min(end, s + k))
        self._zero_range(first, min(end, s + k))
        for b in fix:
            self._fixup(b)
        return freed

    def _fixup(self, b: int) -> None:
        """Merge the runs meeting at block boundary `b` if the run rule allows."""
        if not 0 < b < MAX_FILE_BLOCKS:
            return
        rv = self._rec(b)
        if not rv or rv & _OFF_MASK:
            return
        lv = self._rec(b - 1)
        if not lv or (lv ^ rv) & _UNWRITTEN:
            return
        llen = ((lv >> _LEN_SHIFT) & _OFF_MASK) + 1
        rlen = ((rv >> _LEN_SHIFT) & _OFF_MASK) + 1
        lp = lv >> _PBLK_SHIFT
        if llen + rlen > MAX_EXTENT_BLOCKS or lp + llen != rv >> _PBLK_SHIFT:
            return
        self._write_run(b - llen, lp, llen + rlen, bool(lv & _UNWRITTEN))

    def _settle(self) -> None:
        """Choose the store after a mutation: inline up to ``inline_runs`` runs,
        back from the genradix at ``shrink_runs`` or fewer."""
        store = self._store
        geo = self._geo
        if isinstance(store, tuple):
            if len(store) > geo.inline_runs:
                self._to_radix(store)
            return
        keep = geo.shrink_runs
        # N runs map at most N * MAX_EXTENT_BLOCKS blocks: a large map is
        # never walked here.
        if self._mapped > keep * MAX_EXTENT_BLOCKS:
            return
        runs = list(islice(self._radix_runs(0, MAX_FILE_BLOCKS), keep + 1))
        if len(runs) <= keep:
            self._store = tuple(_inline_run(s, p, k, uw) for s, p, k, uw in runs)

    def _to_radix(self, runs: tuple[int, ...]) -> None:
        radix = GenRadix(_RECORD, self._geo.page_size)
        for e in runs:
            start = e >> _LBLK_SHIFT
            v = e & _REC_MASK
            n = ((v >> _LEN_SHIFT) & _OFF_MASK) + 1
            self._radix_write_run(radix, start, v >> _PBLK_SHIFT, n, bool(v & _UNWRITTEN))
        self._store = radix

    # ------------------------------------------------------ store primitives

    def _rec(self, idx: int) -> int:
        """The genradix record of block `idx` (0 for a hole), whichever the store."""
        store = self._store
        if isinstance(store, tuple):
            return _inline_rec(store, idx)
        page = store.leaf(idx >> self._geo.shift)
        if page is None:
            return 0
        v: int = _unpack_rec(page, (idx & self._geo.mask) << 3)[0]
        return v

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        """Every stored run intersecting [start, end), unclipped:
        ``(lblk, pblk, n, unwritten)``."""
        store = self._store
        if isinstance(store, tuple):
            return _inline_runs(store, start, end)
        return self._radix_runs(start, end)

    def _next_mapped(self, idx: int, limit: int) -> int:
        """The first mapped block in [idx, limit), or `limit`."""
        store = self._store
        if isinstance(store, tuple):
            for e in store:
                s = e >> _LBLK_SHIFT
                if s + ((e >> _LEN_SHIFT) & _OFF_MASK) + 1 > idx:
                    return min(max(s, idx), limit)
            return limit
        geo = self._geo
        shift = geo.shift
        for pno, page in store.iter_leaves(idx >> shift):
            base = pno << shift
            if base >= limit:
                break
            off = (idx - base) << 3 if idx > base else 0
            rest = page[off:].lstrip(b"\0") if off else page.lstrip(b"\0")
            if rest:
                return min(base + ((geo.page_size - len(rest)) >> 3), limit)
        return limit

    def _prev_mapped(self, idx: int) -> int:
        """The last mapped block before `idx`, or -1."""
        if idx <= 0:
            return -1
        store = self._store
        if isinstance(store, tuple):
            for e in reversed(store):
                s = e >> _LBLK_SHIFT
                if s < idx:
                    return min(s + ((e >> _LEN_SHIFT) & _OFF_MASK) + 1, idx) - 1
            return -1
        last = idx - 1
        geo = self._geo
        shift = geo.shift
        for pno, page in store.iter_leaves_reverse(last >> shift):
            base = pno << shift
            stop = (last - base + 1) << 3
            head = page[:stop].rstrip(b"\0") if stop < geo.page_size else page.rstrip(b"\0")
            if head:
                return base + ((len(head) - 1) >> 3)
        return -1

    def _write_run(self, start: int, pblk: int, n: int, unwritten: bool) -> None:
        """Store one run over [start, start + n); 1 <= n <= MAX_EXTENT_BLOCKS."""
        store = self._store
        if isinstance(store, tuple):
            runs = _inline_cut(store, start, start + n)
            insort(runs, _inline_run(start, pblk, n, unwritten))
            self._store = tuple(runs)
        else:
            self._radix_write_run(store, start, pblk, n, unwritten)

    def _zero_range(self, start: int, end: int) -> None:
        """Unmap [start, end) in the store, runs crossing its ends cut."""
        if start >= end:
            return
        store = self._store
        if isinstance(store, tuple):
            self._store = tuple(_inline_cut(store, start, end))
            return
        geo = self._geo
        shift, rpp, zero = geo.shift, geo.mask + 1, geo.zero
        for pno, page in list(store.iter_leaves(start >> shift, ((end - 1) >> shift) + 1)):
            base = pno << shift
            lo = max(start - base, 0)
            hi = min(end - base, rpp)
            if lo or hi != rpp:
                page[lo << 3 : hi << 3] = zero[: (hi - lo) << 3]
                if page != zero:
                    continue
            store.remove_leaf(pno)

    def _move_tail(self, src: int, dst: int) -> None:
        """Move every record at index >= src by (dst - src); vacated slots read
        as holes.  No run crosses src; for dst < src, [dst, src) is a hole."""
        store = self._store
        if isinstance(store, tuple):
            delta = (dst - src) << _LBLK_SHIFT
            self._store = tuple(e if e >> _LBLK_SHIFT < src else e + delta for e in store)
        else:
            self._radix_move_tail(store, src, dst)

    # ------------------------------------------------------ genradix store

    def _radix_runs(self, start: int, end: int) -> Iterator[Run]:
        if start >= end:
            return
        i = start
        v = self._rec(i)
        if v:
            i -= v & _OFF_MASK
        while i < end:
            if not v:
                i = self._next_mapped(i, end)
                if i >= end:
                    return
                v = self._rec(i)
            n = ((v >> _LEN_SHIFT) & _OFF_MASK) + 1
            yield i, v >> _PBLK_SHIFT, n, bool(v & _UNWRITTEN)
            i += n
            v = self._rec(i) if i < end else 0

    def _radix_write_run(
        self, radix: GenRadix, start: int, pblk: int, n: int, unwritten: bool
    ) -> None:
        base = (pblk << _PBLK_SHIFT) | _MAPPED | ((n - 1) << _LEN_SHIFT)
        if unwritten:
            base |= _UNWRITTEN
        records = array("Q", range(base, base + n))
        if _BIG_ENDIAN:  # pragma: no cover
            records.byteswap()
        data = memoryview(records).cast("B")
        geo = self._geo
        shift, mask, ps = geo.shift, geo.mask, geo.page_size
        pos, total, idx = 0, n << 3, start
        while pos < total:
            page = radix.leaf_alloc(idx >> shift)
            off = (idx & mask) << 3
            take = min(ps - off, total - pos)
            page[off : off + take] = data[pos : pos + take]
            pos += take
            idx += take >> 3

    def _radix_move_tail(self, radix: GenRadix, src: int, dst: int) -> None:
        geo = self._geo
        shift, mask, zero = geo.shift, geo.mask, geo.zero
        first = src >> shift
        leaves = radix.detach_leaves(first)
        if not leaves:
            return
        delta = dst - src
        head = (src & mask) << 3  # bytes of the first leaf that stay put
        if head and leaves[0][0] == first:
            page = leaves[0][1]
            kept = bytearray(page[:head])
            kept += zero[head:]
            page[:head] = zero[:head]
            if kept != zero:
                radix.set_leaf(first, kept)
        # Stretches of consecutive leaves: (first page number, leaves).
        stretches: list[tuple[int, list[bytearray]]] = []
        for pno, page in leaves:
            if stretches and stretches[-1][0] + len(stretches[-1][1]) == pno:
                stretches[-1][1].append(page)
            else:
                stretches.append((pno, [page]))
        del leaves
        if not delta & mask:
            # Whole leaves: re-hang them at their new page numbers, no copy.
            dp = delta >> shift
            for pno, pages in stretches:
                if pno == first and head:
                    # The moved part of a split leaf may land on a kept leaf,
                    # in the part that leaf holds as a hole.
                    moved = pages.pop(0)
                    old = radix.leaf(pno + dp)
                    if old is not None:
                        old[head:] = moved[head:]
                    elif moved != zero:
                        radix.set_leaf(pno + dp, moved)
                    pno += 1
                radix.attach_leaves(pno + dp, pages)
            return
        # Misaligned: join each stretch once and cut it into leaves again at
        # the new alignment.  Stretches land on disjoint leaves (a whole
        # unallocated leaf separates any two), so one at a time is safe.
        # The old leaves of a stretch are recycled as its new ones: a fresh 4
        # KiB bytearray costs ten times a copy into one that is already there.
        for pno, pages in stretches:
            rec0 = pno << shift
            data = b"".join(pages)
            pos = head if rec0 < src else 0
            self._store_moved(radix, rec0 + (pos >> 3) + delta, memoryview(data)[pos:], pages)

    def _store_moved(
        self, radix: GenRadix, idx: int, data: memoryview, pool: list[bytearray]
    ) -> None:
        """Store the records `data` at index `idx`, taking new leaves from `pool`.

        The leaves `data` covers whole are fresh (everything from there on
        was detached); the partial leaves at either end may be kept leaves.
        """
        geo = self._geo
        shift, mask, ps, zero = geo.shift, geo.mask, geo.page_size, geo.zero
        pos, total = 0, len(data)
        off = (idx & mask) << 3
        if off:
            pos = min(ps - off, total)
            self._patch(radix, idx >> shift, off, data[:pos], pool)
            idx += pos >> 3
        count = (total - pos) // ps
        if count:
            offsets = range(pos, pos + count * ps, ps)
            reuse = min(len(pool), count)
            pages = pool[len(pool) - reuse :]
            del pool[len(pool) - reuse :]
            for page, o in zip(pages, offsets, strict=False):
                page[:] = data[o : o + ps]
            pages += [bytearray(data[o : o + ps]) for o in offsets[reuse:]]
            pno = idx >> shift
            if zero in pages:  # rare: a seam between moved leaves holds only holes
                for i, page in enumerate(pages):
                    if page != zero:
                        radix.set_leaf(pno + i, page)
            else:
                radix.attach_leaves(pno, pages)
            pos += count * ps
            idx += count << shift
        if pos < total:
            self._patch(radix, idx >> shift, 0, data[pos:], pool)

    def _patch(
        self, radix: GenRadix, pno: int, off: int, chunk: memoryview, pool: list[bytearray]
    ) -> None:
        """Write `chunk` into leaf `pno` at byte `off`; never keep an all-zero leaf."""
        zero = self._geo.zero
        page = radix.leaf(pno)
        if page is None:
            if pool:
                page = pool.pop()
                page[:] = zero
            else:
                page = bytearray(len(zero))
            page[off : off + len(chunk)] = chunk
            if page != zero:
                radix.set_leaf(pno, page)
        else:
            page[off : off + len(chunk)] = chunk
            if page == zero:
                radix.remove_leaf(pno)


# ------------------------------------------------------------ inline store


def _inline_run(start: int, pblk: int, n: int, unwritten: bool) -> int:
    """The inline form of a run: ``(start << 64) | record of its first block``."""
    e = (start << _LBLK_SHIFT) | (pblk << _PBLK_SHIFT) | _MAPPED | ((n - 1) << _LEN_SHIFT)
    return e | _UNWRITTEN if unwritten else e


def _inline_rec(runs: tuple[int, ...], idx: int) -> int:
    """The genradix record block `idx` would have (0 in a hole)."""
    i = bisect_left(runs, (idx + 1) << _LBLK_SHIFT)
    if i:
        e = runs[i - 1]
        off = idx - (e >> _LBLK_SHIFT)
        if off <= (e >> _LEN_SHIFT) & _OFF_MASK:
            return (e & _REC_MASK) + off
    return 0


def _inline_runs(runs: tuple[int, ...], start: int, end: int) -> Iterator[Run]:
    if start >= end:
        return
    for e in runs:
        s = e >> _LBLK_SHIFT
        if s >= end:
            return
        n = ((e >> _LEN_SHIFT) & _OFF_MASK) + 1
        if s + n > start:
            yield s, (e & _REC_MASK) >> _PBLK_SHIFT, n, bool(e & _UNWRITTEN)


def _inline_cut(runs: tuple[int, ...], start: int, end: int) -> list[int]:
    """`runs` with [start, end) unmapped, runs crossing its ends cut."""
    out: list[int] = []
    for e in runs:
        s = e >> _LBLK_SHIFT
        n = ((e >> _LEN_SHIFT) & _OFF_MASK) + 1
        if s + n <= start or s >= end:
            out.append(e)
            continue
        p = (e & _REC_MASK) >> _PBLK_SHIFT
        uw = bool(e & _UNWRITTEN)
        if s < start:
            out.append(_inline_run(s, p, start - s, uw))
        if s + n > end:
            out.append(_inline_run(end, p + end - s, s + n - end, uw))
    return out


def _check_range(op: str, lblk: int, n: int) -> None:
    if lblk < 0:
        raise ExtentError(f"{op}: negative logical block {lblk}")
    if n <= 0:
        raise ExtentError(f"{op}: block count {n} is not positive")
    if lblk + n > MAX_FILE_BLOCKS:
        raise ExtentError(
            f"{op}: [{lblk}, {lblk + n}) ends past the maximum file size of "
            f"{MAX_FILE_BLOCKS} blocks"
        )


def _check_phys(op: str, pblk: int, n: int) -> None:
    if not 0 <= pblk <= MAX_PHYS_BLOCKS - n:
        raise ExtentError(f"{op}: physical range [{pblk}, {pblk + n}) out of range")
