"""The extent map: one inode's logical block -> physical block map.

Layout.  The map is a `GenRadix` indexed by logical block with one 8-byte
record per block, a little-endian u64::

    bits  0..7   offset of this block inside its run (0 .. MAX_EXTENT_BLOCKS-1)
    bits  8..15  length of the run, minus one
    bit   16     unwritten (preallocated: reads as zeros)
    bit   17     mapped; a record of 0 is a hole
    bits 18..63  physical block where the run starts (46 bits)

A *run* is a stored extent: a logical range mapped to consecutive physical
blocks with one unwritten flag, at most ``MAX_EXTENT_BLOCKS`` long (ext4 caps
its extents the same way).  Every record knows its run, so `lookup` is O(1):
one tree walk, one unpack, no scan however long the file's contiguous
stretches are.  The records of one run form an arithmetic progression (only
the offset field changes), so a run is written with one C-level
``array('Q', range(...))`` and a slice assignment; the cap bounds what one
split or merge rewrites to ``MAX_EXTENT_BLOCKS`` records.

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
unallocated subtrees are never visited.

Costs, measured by ``benchmarks/bench_extents.py`` (1,000,000-block file,
CPython 3.11): 8.0 bytes per mapped block against ~106 for a dict
{lblk: pblk}; a random `lookup` 1.5-2x a dict's ``d[b]`` (both are dominated
by cache misses; building the `Extent` tuple is a third of ours); collapse or
insert of one block at block 0 in ~4 ms of CPU (25-50x faster than rebuilding
the dict), 0.7 ms when the shift is a multiple of 512 blocks.
An isolated mapped block costs a whole 4 KiB leaf plus its share of interior
nodes (4.5-7 KiB against ~65 bytes in a dict): the genradix trade-off, right
for file maps, which are dense in patches, wrong for a few scattered keys.

Protected by: the owning inode's lock (an `ExtentMap` does no locking).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple, final

from fusefs.errors import ExtentError
from fusefs.genradix import GenRadix, GenRadixStatistics

if TYPE_CHECKING:
    from fusefs.journal import Tracker

__all__ = [
    "MAX_EXTENT_BLOCKS",
    "MAX_FILE_BLOCKS",
    "MAX_PHYS_BLOCKS",
    "Extent",
    "ExtentMap",
    "ExtentMapStatistics",
]

#: Largest logical block count of a file: blocks are numbered [0, MAX_FILE_BLOCKS).
MAX_FILE_BLOCKS: Final = 2**40

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
    radix: GenRadixStatistics


# tuple.__new__ skips the Python-level NamedTuple constructor: lookup is hot.
_new_extent: Final = tuple.__new__


@final
class ExtentMap:
    """One inode's map from logical blocks to physical blocks."""

    __slots__ = (
        "_changed_hi",
        "_changed_lo",
        "_fanout_mask",
        "_ino",
        "_leaf",
        "_mapped",
        "_mask",
        "_page_size",
        "_radix",
        "_rpp",
        "_shift",
        "_track",
        "_zero",
    )

    def __init__(self, *, page_size: int = 4096) -> None:
        self._radix: Final = GenRadix(_RECORD, page_size)
        self._leaf: Final = self._radix.leaf
        self._page_size: Final = page_size
        self._rpp: Final = self._radix.records_per_page
        self._shift: Final = self._rpp.bit_length() - 1
        self._mask: Final = self._rpp - 1
        self._fanout_mask: Final = page_size // 8 - 1
        self._zero: Final = bytes(page_size)
        self._mapped = 0
        self._changed_lo = MAX_FILE_BLOCKS
        self._changed_hi = 0
        self._track: Tracker | None = None
        self._ino = 0

    def __repr__(self) -> str:
        return (
            f"<ExtentMap mapped_blocks={self._mapped} memory={self.memory_bytes()} "
            f"depth={self._radix.depth}>"
        )

    # ------------------------------------------------------------- queries

    def lookup(self, lblk: int) -> Extent:
        """The whole run containing `lblk`, or the whole hole around it.

        A hole's extent runs from the end of the previous mapping (or 0) to
        the next mapping (or MAX_FILE_BLOCKS).
        """
        # GenRadix.leaf() inlined: lookup is the hot path, and on CPython the
        # method call costs as much as the walk itself.
        radix = self._radix
        node = radix._root
        if node is not None and 0 <= lblk < MAX_FILE_BLOCKS:
            pno = lblk >> self._shift
            if pno < radix._cap_pages:
                fmask = self._fanout_mask
                for shift in radix._shifts:
                    node = node[(pno >> shift) & fmask]
                    if node is None:
                        break
                else:
                    v = _unpack_rec(node, (lblk & self._mask) << 3)[0]
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

    def pblk_of(self, lblk: int) -> int | None:
        """The physical block behind `lblk`, or None in a hole."""
        radix = self._radix
        node = radix._root
        if node is not None and 0 <= lblk < MAX_FILE_BLOCKS:
            pno = lblk >> self._shift
            if pno < radix._cap_pages:
                fmask = self._fanout_mask
                for shift in radix._shifts:
                    node = node[(pno >> shift) & fmask]
                    if node is None:
                        return None
                v: int = _unpack_rec(node, (lblk & self._mask) << 3)[0]
                return (v >> _PBLK_SHIFT) + (v & _OFF_MASK) if v else None
            return None
        if not 0 <= lblk < MAX_FILE_BLOCKS:
            raise ExtentError(f"pblk_of: block {lblk} outside [0, {MAX_FILE_BLOCKS})")
        return None

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
        """Bytes held by the map's radix tree (a page per leaf and per node)."""
        return self._radix.memory_bytes()

    def statistics(self) -> ExtentMapStatistics:
        return ExtentMapStatistics(self._mapped, self.memory_bytes(), self._radix.statistics())

    # ------------------------------------------------------------ mutation

    def map(self, lblk: int, pblk: int, n: int, unwritten: bool = False) -> None:
        """Map [lblk, lblk + n) to [pblk, pblk + n); the range must be a hole."""
        _check_range("map", lblk, n)
        self._note(lblk, lblk + n)
        if not 0 <= pblk <= MAX_PHYS_BLOCKS - n:
            raise ExtentError(f"map: physical range [{pblk}, {pblk + n}) out of range")
        end = lblk + n
        hit = self._next_mapped(lblk, end)
        if hit < end:
            raise ExtentError(f"map: [{lblk}, {end}) overlaps the mapping of block {hit}")
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
        for s in range(start, end, MAX_EXTENT_BLOCKS):
            self._write_run(s, first_pblk + s - start, min(MAX_EXTENT_BLOCKS, end - s), unwritten)
        self._mapped += n
        self._fixup(end)

    def unmap(self, lblk: int, n: int) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk + n) (holes inside are fine).

        Returns the freed physical runs as ``(pblk, count)`` in logical order,
        neighbours merged where they are physically contiguous.
        """
        _check_range("unmap", lblk, n)
        end = lblk + n
        self._note(lblk, end)
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
        if s < lblk:
            self._write_run(s, p, lblk - s, uw)
            fix.append(s)
        s, p, k, uw = runs[-1]
        if s + k > end:
            self._write_run(end, p + end - s, s + k - end, uw)
            fix.append(s + k)
        self._zero_range(max(lblk, runs[0][0]), min(end, s + k))
        for b in fix:
            self._fixup(b)
        return freed

    def mark_written(self, lblk: int, n: int) -> None:
        """Clear the unwritten flag of every mapped block in [lblk, lblk + n)."""
        _check_range("mark_written", lblk, n)
        end = lblk + n
        self._note(lblk, end)
        fix: list[int] = []
        for s, p, k, uw in list(self._runs(lblk, end)):
            if not uw:
                continue
            a = max(s, lblk)
            b = min(s + k, end)
            if s < a:
                self._write_run(s, p, a - s, True)
            self._write_run(a, p + a - s, b - a, False)
            if b < s + k:
                self._write_run(b, p + b - s, s + k - b, True)
            fix += (s, a, b, s + k)
        for x in sorted(set(fix)):
            self._fixup(x)

    def shift_left(self, lblk: int, n: int) -> None:
        """Collapse [lblk, lblk + n): mappings at or after lblk + n move down by n.

        The range must already be unmapped.
        """
        _check_range("shift_left", lblk, n)
        end = lblk + n
        self._note(lblk, MAX_FILE_BLOCKS)
        hit = self._next_mapped(lblk, end)
        if hit < end:
            raise ExtentError(f"shift_left: block {hit} in [{lblk}, {end}) is still mapped")
        self._move_tail(end, lblk)
        self._fixup(lblk)

    def shift_right(self, lblk: int, n: int) -> None:
        """Insert n blocks of hole at lblk: mappings at or after lblk move up by n.

        A run crossing lblk is split.  Moving a mapping to or past
        MAX_FILE_BLOCKS raises ExtentError and changes nothing.
        """
        _check_range("shift_right", lblk, n)
        self._note(lblk, MAX_FILE_BLOCKS)
        last = self._prev_mapped(MAX_FILE_BLOCKS)
        if last < lblk:
            return
        if last + n >= MAX_FILE_BLOCKS:
            raise ExtentError(
                f"shift_right: block {last} would move past the maximum file size "
                f"of {MAX_FILE_BLOCKS} blocks"
            )
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

    def clear(self) -> None:
        """Forget every mapping (the caller frees the blocks)."""
        self._note(0, MAX_FILE_BLOCKS)
        self._radix.free()
        self._mapped = 0

    # --------------------------------------------------------- persistence

    def to_runs(self) -> list[tuple[int, int, int, bool]]:
        """Every mapping as ``(lblk, pblk, n, unwritten)``, ascending.

        Physically contiguous neighbours with one flag are merged regardless
        of MAX_EXTENT_BLOCKS, so the list is as short as it can be.
        """
        out: list[tuple[int, int, int, bool]] = []
        for s, p, k, uw in self._runs(0, MAX_FILE_BLOCKS):
            if out:
                ls, lp, lk, luw = out[-1]
                if ls + lk == s and lp + lk == p and luw == uw:
                    out[-1] = (ls, lp, lk + k, uw)
                    continue
            out.append((s, p, k, uw))
        return out

    @classmethod
    def from_runs(
        cls, runs: Iterable[tuple[int, int, int, bool]], *, page_size: int = 4096
    ) -> ExtentMap:
        """Rebuild a map from `to_runs` output (any runs that do not overlap)."""
        em = cls(page_size=page_size)
        for lblk, pblk, n, unwritten in runs:
            em.map(lblk, pblk, n, unwritten)
        return em

    # ------------------------------------------------------ change tracking

    def track(self, tracker: Tracker | None, ino: int) -> None:
        """Report changes to ``tracker`` as inode ``ino``'s (None: stop)."""
        self._track = tracker
        self._ino = ino

    def _note(self, lo: int, hi: int) -> None:
        if lo < self._changed_lo:
            self._changed_lo = lo
        if hi > self._changed_hi:
            self._changed_hi = hi
        if self._track is not None:
            self._track.extents.add(self._ino)

    def take_changes(self) -> tuple[int, int] | None:
        """The range [lo, hi) of logical blocks that may have changed since the
        last call (None: nothing did), and start over.  Conservative: a shift
        reports everything from its offset on."""
        lo, hi = self._changed_lo, self._changed_hi
        self._changed_lo, self._changed_hi = MAX_FILE_BLOCKS, 0
        return (lo, hi) if lo < hi else None

    def runs_in(self, lo: int, hi: int) -> list[tuple[int, int, int, bool]]:
        """The runs inside [lo, hi), clipped to it: ``(lblk, pblk, n, unwritten)``."""
        out: list[tuple[int, int, int, bool]] = []
        for s, p, k, uw in self._runs(lo, hi):
            a, b = max(s, lo), min(s + k, hi)
            if out:
                ls, lp, lk, luw = out[-1]
                if ls + lk == a and lp + lk == p + a - s and luw == uw:
                    out[-1] = (ls, lp, lk + b - a, uw)
                    continue
            out.append((a, p + a - s, b - a, uw))
        return out

    def replace_range(self, lo: int, hi: int, runs: Iterable[tuple[int, int, int, bool]]) -> None:
        """Make [lo, hi) hold exactly ``runs`` (journal replay)."""
        if lo < hi:
            self.unmap(lo, min(hi, MAX_FILE_BLOCKS) - lo)
        for lblk, pblk, n, unwritten in runs:
            if not (lo <= lblk and lblk + n <= hi):
                raise ExtentError(f"replace_range: run {lblk}+{n} outside [{lo}, {hi})")
            self.map(lblk, pblk, n, unwritten)

    # ------------------------------------------------------------ internals

    def _rec(self, idx: int) -> int:
        page = self._leaf(idx >> self._shift)
        if page is None:
            return 0
        v: int = _unpack_rec(page, (idx & self._mask) << 3)[0]
        return v

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, bool]]:
        """Yield every stored run intersecting [start, end), unclipped:
        ``(lblk, pblk, n, unwritten)``."""
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

    def _next_mapped(self, idx: int, limit: int) -> int:
        """The first mapped block in [idx, limit), or `limit`."""
        shift = self._shift
        for pno, page in self._radix.iter_leaves(idx >> shift):
            base = pno << shift
            if base >= limit:
                break
            off = (idx - base) << 3 if idx > base else 0
            rest = page[off:].lstrip(b"\0") if off else page.lstrip(b"\0")
            if rest:
                return min(base + ((self._page_size - len(rest)) >> 3), limit)
        return limit

    def _prev_mapped(self, idx: int) -> int:
        """The last mapped block before `idx`, or -1."""
        if idx <= 0:
            return -1
        last = idx - 1
        shift = self._shift
        for pno, page in self._radix.iter_leaves_reverse(last >> shift):
            base = pno << shift
            stop = (last - base + 1) << 3
            head = page[:stop].rstrip(b"\0") if stop < self._page_size else page.rstrip(b"\0")
            if head:
                return base + ((len(head) - 1) >> 3)
        return -1

    def _write_run(self, start: int, pblk: int, n: int, unwritten: bool) -> None:
        """Store one run; 1 <= n <= MAX_EXTENT_BLOCKS."""
        base = (pblk << _PBLK_SHIFT) | _MAPPED | ((n - 1) << _LEN_SHIFT)
        if unwritten:
            base |= _UNWRITTEN
        records = array("Q", range(base, base + n))
        if _BIG_ENDIAN:  # pragma: no cover
            records.byteswap()
        data = memoryview(records).cast("B")
        shift, mask, ps = self._shift, self._mask, self._page_size
        pos, total, idx = 0, n << 3, start
        while pos < total:
            page = self._radix.leaf_alloc(idx >> shift)
            off = (idx & mask) << 3
            take = min(ps - off, total - pos)
            page[off : off + take] = data[pos : pos + take]
            pos += take
            idx += take >> 3

    def _zero_range(self, start: int, end: int) -> None:
        """Zero the records of [start, end), dropping leaves left all zero."""
        if start >= end:
            return
        radix, shift, rpp = self._radix, self._shift, self._rpp
        for pno, page in list(radix.iter_leaves(start >> shift, ((end - 1) >> shift) + 1)):
            base = pno << shift
            lo = max(start - base, 0)
            hi = min(end - base, rpp)
            if lo or hi != rpp:
                page[lo << 3 : hi << 3] = self._zero[: (hi - lo) << 3]
                if page != self._zero:
                    continue
            radix.remove_leaf(pno)

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

    def _move_tail(self, src: int, dst: int) -> None:
        """Move every record at index >= src by (dst - src); vacated slots read
        as holes.  For dst < src, [dst, src) must be a hole."""
        radix, shift, mask = self._radix, self._shift, self._mask
        first = src >> shift
        leaves = radix.detach_leaves(first)
        if not leaves:
            return
        delta = dst - src
        head = (src & mask) << 3  # bytes of the first leaf that stay put
        if head and leaves[0][0] == first:
            page = leaves[0][1]
            kept = bytearray(page[:head])
            kept += self._zero[head:]
            page[:head] = self._zero[:head]
            if kept != self._zero:
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
                    elif moved != self._zero:
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
            self._store_moved(rec0 + (pos >> 3) + delta, memoryview(data)[pos:], pages)

    def _store_moved(self, idx: int, data: memoryview, pool: list[bytearray]) -> None:
        """Store the records `data` at index `idx`, taking new leaves from `pool`.

        The leaves `data` covers whole are fresh (everything from there on
        was detached); the partial leaves at either end may be kept leaves.
        """
        radix, shift, mask, ps = self._radix, self._shift, self._mask, self._page_size
        pos, total = 0, len(data)
        off = (idx & mask) << 3
        if off:
            pos = min(ps - off, total)
            self._patch(idx >> shift, off, data[:pos], pool)
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
            if self._zero in pages:  # rare: a seam between moved leaves holds only holes
                for i, page in enumerate(pages):
                    if page != self._zero:
                        radix.set_leaf(pno + i, page)
            else:
                radix.attach_leaves(pno, pages)
            pos += count * ps
            idx += count << shift
        if pos < total:
            self._patch(idx >> shift, 0, data[pos:], pool)

    def _patch(self, pno: int, off: int, chunk: memoryview, pool: list[bytearray]) -> None:
        """Write `chunk` into leaf `pno` at byte `off`; never keep an all-zero leaf."""
        radix = self._radix
        page = radix.leaf(pno)
        if page is None:
            if pool:
                page = pool.pop()
                page[:] = self._zero
            else:
                page = bytearray(self._page_size)
            page[off : off + len(chunk)] = chunk
            if page != self._zero:
                radix.set_leaf(pno, page)
        else:
            page[off : off + len(chunk)] = chunk
            if page == self._zero:
                radix.remove_leaf(pno)


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
