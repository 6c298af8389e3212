"""The extent map: a stateful model check against a per-block dict, plus edge
cases (the run rule, shifts by whole and partial leaves, limits, errors, the
inline store and its moves to and from the genradix, change tracking).

The run rule checked everywhere: every stored run is physically contiguous
with one flag and at most MAX_EXTENT_BLOCKS long, and two neighbouring runs
that could be one (contiguous, same flag) have a combined length above
MAX_EXTENT_BLOCKS.  `lookup` returns exactly the stored run holding the block
(or the exact hole), and `extents()` yields the stored runs clipped to the range.

The state machine drives three maps with the same operations: `em` (runs
inline up to INLINE_RUNS, or a given count), `ref` (always a genradix), which
must agree with `em` on every answer and every stored run, and the model.  A
fourth, `replica`, sees only what a journal would carry: at each `sync` it
gets ``replace_range(lo, hi, em.runs_in(lo, hi))`` for the range
``em.take_changes()`` reports, and must then hold the same mappings as `em`.
"""

from __future__ import annotations

import errno
import tracemalloc
from collections.abc import Callable
from itertools import pairwise
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fusefs.errors import ExtentError, InvalidArgument
from fusefs.extents import (
    INLINE_RUNS,
    MAX_EXTENT_BLOCKS,
    MAX_FILE_BLOCKS,
    MAX_PHYS_BLOCKS,
    Extent,
    ExtentMap,
    ExtentMapStatistics,
)
from fusefs.genradix import GenRadix

CAP = MAX_EXTENT_BLOCKS
Model = dict[int, tuple[int, bool]]


def expand(em: ExtentMap) -> Model:
    out: Model = {}
    for e in em.extents():
        assert e.pblk is not None
        for i in range(e.length):
            out[e.start + i] = (e.pblk + i, e.unwritten)
    return out


def check_run_rule(runs: list[Extent]) -> None:
    for r in runs:
        assert 1 <= r.length <= CAP
    for a, b in pairwise(runs):
        assert a.end <= b.start
        assert a.pblk is not None
        if a.end == b.start and a.pblk + a.length == b.pblk and a.unwritten == b.unwritten:
            assert a.length + b.length > CAP, (a, b)


def radix_of(em: ExtentMap) -> GenRadix | None:
    """The map's genradix, or None while its runs are inline."""
    store = em._store
    return store if isinstance(store, GenRadix) else None


def check_leaves_hold_mappings(em: ExtentMap) -> None:
    """The map never keeps an all-zero leaf, so memory follows mapped blocks."""
    radix = radix_of(em)
    if radix is not None:
        for _, page in radix.iter_leaves():
            assert not radix.is_zero_page(page)
    if em.mapped_blocks() == 0:
        assert em.memory_bytes() == 0


def check_store(em: ExtentMap, inline_runs: int) -> None:
    """Inline up to `inline_runs` runs; a genradix only above half of that."""
    runs = len(list(em.extents()))
    stats = em.statistics()
    if stats.inline_runs is not None:
        assert stats.radix is None
        assert radix_of(em) is None
        assert stats.inline_runs == runs <= inline_runs
    else:
        assert stats.radix is not None
        assert radix_of(em) is not None
        assert runs > inline_runs // 2


def freed_from_model(model: Model, lblk: int, n: int) -> list[tuple[int, int]]:
    freed: list[tuple[int, int]] = []
    for b in sorted(x for x in model if lblk <= x < lblk + n):
        p = model.pop(b)[0]
        if freed and freed[-1][0] + freed[-1][1] == p:
            freed[-1] = (freed[-1][0], freed[-1][1] + 1)
        else:
            freed.append((p, 1))
    return freed


def hole_from_model(model: Model, lblk: int) -> Extent:
    start = max((b for b in model if b < lblk), default=-1) + 1
    end = min((b for b in model if b > lblk), default=MAX_FILE_BLOCKS)
    return Extent(start, None, end - start, False)


def runs_from_model(model: Model, lo: int, hi: int) -> list[tuple[int, int, int, bool]]:
    """The mappings of [lo, hi) merged as far as they go."""
    out: list[tuple[int, int, int, bool]] = []
    for b in sorted(x for x in model if lo <= x < hi):
        p, uw = model[b]
        if out:
            ls, lp, lk, luw = out[-1]
            if ls + lk == b and lp + lk == p and luw == uw:
                out[-1] = (ls, lp, lk + 1, uw)
                continue
        out.append((b, p, 1, uw))
    return out


# ---------------------------------------------------------------- the model


class ExtentMapMachine(RuleBasedStateMachine):
    page_size: ClassVar[int] = 4096
    inline_runs: ClassVar[int] = INLINE_RUNS

    def __init__(self) -> None:
        super().__init__()
        self.em = ExtentMap(page_size=self.page_size, inline_runs=self.inline_runs)
        self.ref = ExtentMap(page_size=self.page_size, inline_runs=0)
        self.replica = ExtentMap(page_size=self.page_size, inline_runs=self.inline_runs)
        self.model: Model = {}
        self.synced: Model = {}  # the model as of the last sync
        self.was_inline = True
        rpp = self.page_size // 8
        edges = [0, 1, rpp - 1, rpp, rpp + 1, CAP - 1, CAP, CAP + 1, 2 * rpp + 3]
        span = 3 * max(rpp, CAP)
        self.lblks = st.sampled_from(edges) | st.integers(0, CAP + 10) | st.integers(0, span)
        self.counts = (
            st.sampled_from([1, 2, rpp, rpp + 1, CAP, CAP + 1])
            | st.integers(1, 8)
            | st.integers(1, 400)
        )

    def shift_model(self, at: int, by: int) -> None:
        self.model = {(b + by if b >= at else b): v for b, v in self.model.items()}

    def both(self, call: Callable[[ExtentMap], Any], match: str | None = None) -> Any:
        """`call` on `em` and on `ref`: the same answer, or the same error."""
        if match is not None:
            with pytest.raises(ExtentError, match=match) as a:
                call(self.em)
            with pytest.raises(ExtentError, match=match) as b:
                call(self.ref)
            assert str(a.value) == str(b.value)
            return None
        got = call(self.em)
        assert call(self.ref) == got
        return got

    @rule(data=st.data(), unwritten=st.booleans())
    def map(self, data: st.DataObject, unwritten: bool) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        prev = self.model.get(lblk - 1)
        # Often continue the previous mapping physically, so runs merge.
        if prev is not None and data.draw(st.booleans()):
            pblk = prev[0] + 1
            unwritten = prev[1] if data.draw(st.booleans()) else unwritten
        else:
            pblk = data.draw(st.integers(0, 5000))
        if any(b in self.model for b in range(lblk, lblk + n)):
            self.both(lambda em: em.map(lblk, pblk, n, unwritten), "overlaps")
            return
        self.both(lambda em: em.map(lblk, pblk, n, unwritten))
        for i in range(n):
            self.model[lblk + i] = (pblk + i, unwritten)

    @rule(data=st.data(), count=st.integers(1, 2 * INLINE_RUNS))
    def map_scattered(self, data: st.DataObject, count: int) -> None:
        """A few short runs in the holes: past the inline limit in one go."""
        for _ in range(count):
            lblk = data.draw(self.lblks)
            n = data.draw(st.integers(1, 3))
            if any(b in self.model for b in range(lblk - 1, lblk + n + 1)):
                continue
            self.map_both(lblk, data.draw(st.integers(10_000, 20_000)), n)

    def map_both(self, lblk: int, pblk: int, n: int) -> None:
        self.both(lambda em: em.map(lblk, pblk, n))
        for i in range(n):
            self.model[lblk + i] = (pblk + i, False)

    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        assert self.both(lambda em: em.unmap(lblk, n)) == freed_from_model(self.model, lblk, n)

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        """What truncate does: unmap everything from a block on (often down to
        a run or two, or nothing: back to inline)."""
        lblk = data.draw(self.lblks | st.sampled_from(sorted(self.model) or [0]))
        n = MAX_FILE_BLOCKS - lblk
        assert self.both(lambda em: em.unmap(lblk, n)) == freed_from_model(self.model, lblk, n)

    @rule(data=st.data())
    def mark_written(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        self.both(lambda em: em.mark_written(lblk, n))
        for b in range(lblk, lblk + n):
            if b in self.model:
                self.model[b] = (self.model[b][0], False)

    @rule(data=st.data())
    def shift_left(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        if any(b in self.model for b in range(lblk, lblk + n)):
            self.both(lambda em: em.shift_left(lblk, n), "still mapped")
            return
        self.both(lambda em: em.shift_left(lblk, n))
        self.shift_model(lblk + n, -n)

    @rule(data=st.data())
    def punch_and_collapse(self, data: st.DataObject) -> None:
        """What fallocate(COLLAPSE_RANGE) does: unmap, then shift down."""
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        assert self.both(lambda em: em.unmap(lblk, n)) == freed_from_model(self.model, lblk, n)
        self.both(lambda em: em.shift_left(lblk, n))
        self.shift_model(lblk + n, -n)

    @rule(data=st.data())
    def shift_right(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        self.both(lambda em: em.shift_right(lblk, n))
        self.shift_model(lblk, n)

    @rule(data=st.data())
    def shift_right_too_far(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        last = max(self.model, default=-1)
        if last < lblk:
            self.both(lambda em: em.shift_right(lblk, MAX_FILE_BLOCKS - lblk))  # nothing moves
            return
        self.both(lambda em: em.shift_right(lblk, MAX_FILE_BLOCKS - last), "maximum file size")

    @rule()
    def clear(self) -> None:
        self.both(lambda em: em.clear())
        self.model.clear()

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks | st.sampled_from(sorted(self.model) or [0]))
        got = self.both(lambda em: em.lookup(lblk))
        pblk = self.both(lambda em: em.pblk_of(lblk))
        if lblk not in self.model:
            assert got == hole_from_model(self.model, lblk)
            assert pblk is None
            return
        assert got.start <= lblk < got.end
        assert got.pblk is not None
        assert pblk == self.model[lblk][0]
        # Exactly the stored run that holds the block.
        runs = [e for e in self.em.extents() if e.start <= lblk < e.end]
        assert runs == [got]
        for i in range(got.length):
            assert self.model[got.start + i] == (got.pblk + i, got.unwritten)

    @rule(data=st.data())
    def extents_in_range(self, data: st.DataObject) -> None:
        start = data.draw(self.lblks)
        end = start + data.draw(self.counts)
        got = self.both(lambda em: list(em.extents(start, end)))
        blocks: Model = {}
        for e in got:
            assert e.pblk is not None
            assert start <= e.start < e.end <= end
            for i in range(e.length):
                blocks[e.start + i] = (e.pblk + i, e.unwritten)
        assert blocks == {b: v for b, v in self.model.items() if start <= b < end}
        holes = self.both(lambda em: em.holes(start, end - start))
        assert sum(n for _, n in holes) == end - start - len(blocks)

    @rule(data=st.data())
    def runs_in(self, data: st.DataObject) -> None:
        lo = data.draw(self.lblks)
        hi = lo + data.draw(self.counts)
        got = self.both(lambda em: em.runs_in(lo, hi))
        assert got == runs_from_model(self.model, lo, hi)

    @rule()
    def persist_roundtrip(self) -> None:
        runs = self.both(lambda em: em.to_runs())
        for a, b in pairwise(runs):  # as short as it can be
            assert not (a[0] + a[2] == b[0] and a[1] + a[2] == b[1] and a[3] == b[3])
        again = ExtentMap.from_runs(runs, page_size=self.page_size, inline_runs=self.inline_runs)
        assert again.take_changes() is None  # what was loaded is not a change
        assert expand(again) == self.model
        assert again.to_runs() == runs
        check_store(again, self.inline_runs)

    @rule()
    def sync(self) -> None:
        """A journal commit and its replay: only the changed range travels."""
        changes = self.em.take_changes()
        assert self.em.take_changes() is None
        if changes is None:
            assert self.model == self.synced
        else:
            lo, hi = changes
            assert 0 <= lo < hi <= MAX_FILE_BLOCKS
            self.replica.replace_range(lo, hi, self.em.runs_in(lo, hi))
        assert self.replica.to_runs() == self.em.to_runs()
        assert expand(self.replica) == self.model
        check_run_rule(list(self.replica.extents()))
        check_store(self.replica, self.inline_runs)
        check_leaves_hold_mappings(self.replica)
        self.synced = dict(self.model)

    @invariant()
    def matches_model(self) -> None:
        assert self.em.mapped_blocks() == self.ref.mapped_blocks() == len(self.model)
        assert list(self.em.extents()) == list(self.ref.extents())
        assert expand(self.em) == self.model
        check_run_rule(list(self.em.extents()))
        check_leaves_hold_mappings(self.em)
        check_leaves_hold_mappings(self.ref)
        check_store(self.em, self.inline_runs)
        check_store(self.ref, 0)
        inline = self.em.statistics().inline_runs is not None
        if inline != self.was_inline:
            event("moved to the genradix" if self.was_inline else "moved back inline")
            self.was_inline = inline


def machine_test(page_size: int, inline_runs: int = INLINE_RUNS) -> Any:
    machine: type[ExtentMapMachine] = type(
        f"ExtentMapMachine_{page_size}_{inline_runs}",
        (ExtentMapMachine,),
        {"page_size": page_size, "inline_runs": inline_runs},
    )
    case = machine.TestCase
    case.settings = settings(
        max_examples=80,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return case


TestExtentMapSmallPages = machine_test(64)  # 8 records a leaf: runs span many leaves
TestExtentMap = machine_test(4096)
TestExtentMapOneInlineRun = machine_test(64, 1)  # in and out of the genradix all the time


# --------------------------------------------------------------- edge cases


def test_empty_map() -> None:
    em = ExtentMap()
    assert em.lookup(0) == Extent(0, None, MAX_FILE_BLOCKS, False)
    assert em.lookup(MAX_FILE_BLOCKS - 1) == Extent(0, None, MAX_FILE_BLOCKS, False)
    assert list(em.extents()) == []
    assert em.to_runs() == []
    assert em.unmap(0, MAX_FILE_BLOCKS) == []
    em.mark_written(0, 10)
    em.shift_left(0, 10)
    em.shift_right(0, 10)
    assert em.mapped_blocks() == 0
    assert em.memory_bytes() == 0
    assert "mapped_blocks=0" in repr(em)


def test_runs_are_capped_and_lookup_is_the_whole_run() -> None:
    em = ExtentMap()
    em.map(10, 1000, 3 * CAP + 5)
    assert [(e.start, e.pblk, e.length) for e in em.extents()] == [
        (10, 1000, CAP),
        (10 + CAP, 1000 + CAP, CAP),
        (10 + 2 * CAP, 1000 + 2 * CAP, CAP),
        (10 + 3 * CAP, 1000 + 3 * CAP, 5),
    ]
    assert em.lookup(10 + CAP + 17) == Extent(10 + CAP, 1000 + CAP, CAP, False)
    assert em.lookup(5) == Extent(0, None, 10, False)
    assert em.lookup(10 + 3 * CAP + 5) == Extent(
        10 + 3 * CAP + 5, None, MAX_FILE_BLOCKS - (10 + 3 * CAP + 5), False
    )
    assert em.pblk_of(10 + CAP + 17) == 1000 + CAP + 17
    assert em.to_runs() == [(10, 1000, 3 * CAP + 5, False)]


def test_appending_block_by_block_fills_runs() -> None:
    em = ExtentMap()
    for b in range(3 * CAP):
        em.map(b, 500 + b, 1)
    assert [e.length for e in em.extents()] == [CAP, CAP, CAP]
    em.map(3 * CAP, 500 + 3 * CAP, 10, unwritten=True)  # other flag: a new run
    assert em.lookup(3 * CAP).length == 10
    em.mark_written(3 * CAP, 10)
    assert [e.length for e in em.extents()] == [CAP, CAP, CAP, 10]


def test_unmap_returns_merged_physical_runs() -> None:
    em = ExtentMap()
    em.map(0, 100, 4)
    em.map(6, 104, 2)  # logically after a hole, physically contiguous
    em.map(8, 900, 3)
    assert em.unmap(1, 100) == [(101, 5), (900, 3)]
    assert em.mapped_blocks() == 1
    assert em.lookup(0) == Extent(0, 100, 1, False)
    assert em.lookup(1) == Extent(1, None, MAX_FILE_BLOCKS - 1, False)


def test_unmap_splits_a_run_and_remerges_neighbours() -> None:
    em = ExtentMap()
    em.map(0, 0, CAP + 100)  # runs of CAP and 100
    em.unmap(CAP + 50, 50)  # the second run shrinks to 50
    em.unmap(0, 10)
    assert [(e.start, e.length) for e in em.extents()] == [(10, CAP - 10), (CAP, 50)]
    em.unmap(CAP - 20, 10)  # split the first run; its right part merges with (CAP, 50)
    assert [(e.start, e.length) for e in em.extents()] == [(10, CAP - 30), (CAP - 10, 60)]


def test_mark_written_splits_and_merges() -> None:
    em = ExtentMap()
    em.map(0, 0, 100, unwritten=True)
    em.mark_written(40, 20)
    assert list(em.extents()) == [
        Extent(0, 0, 40, True),
        Extent(40, 40, 20, False),
        Extent(60, 60, 40, True),
    ]
    em.mark_written(0, 100)
    assert list(em.extents()) == [Extent(0, 0, 100, False)]


def test_mark_written_remerges_the_shortened_remainder() -> None:
    em = ExtentMap()
    em.map(0, 0, CAP + 44, unwritten=True)  # runs of CAP and 44
    em.mark_written(200, 10)
    # [210, CAP) is left unwritten and short enough to join [CAP, CAP + 44).
    assert list(em.extents()) == [
        Extent(0, 0, 200, True),
        Extent(200, 200, 10, False),
        Extent(210, 210, CAP - 210 + 44, True),
    ]


def test_shift_by_whole_leaves_moves_pages_without_copying() -> None:
    em = ExtentMap()
    em.map(0, 7, 2048)
    radix = radix_of(em)
    assert radix is not None
    leaves_before = {id(page) for _, page in radix.iter_leaves()}
    em.shift_right(0, 512)
    assert radix_of(em) is radix
    assert {id(page) for _, page in radix.iter_leaves()} == leaves_before
    assert em.lookup(0) == Extent(0, None, 512, False)
    assert em.to_runs() == [(512, 7, 2048, False)]
    em.shift_left(0, 512)
    assert {id(page) for _, page in radix.iter_leaves()} == leaves_before
    assert em.to_runs() == [(0, 7, 2048, False)]


@pytest.mark.parametrize(("at", "by"), [(0, 1), (3, 509), (700, 512), (511, 1025), (1, 3 * 512)])
def test_insert_then_collapse_restores(at: int, by: int) -> None:
    em = ExtentMap()
    em.map(0, 10_000, 1500)
    em.map(1600, 20_000, 700, unwritten=True)
    em.map(5000, 30_000, 1)
    before = em.to_runs()
    em.shift_right(at, by)
    expect: list[tuple[int, int, int, bool]] = []
    for lblk, pblk, n, uw in before:
        if lblk + n <= at:
            expect.append((lblk, pblk, n, uw))
        elif lblk >= at:
            expect.append((lblk + by, pblk, n, uw))
        else:
            expect += [(lblk, pblk, at - lblk, uw), (at + by, pblk + at - lblk, lblk + n - at, uw)]
    assert em.to_runs() == expect
    assert em.lookup(at) == Extent(at, None, by, False)
    check_run_rule(list(em.extents()))
    em.shift_left(at, by)
    assert em.to_runs() == before
    check_run_rule(list(em.extents()))
    check_leaves_hold_mappings(em)


def test_sparse_map_costs_leaves_not_range() -> None:
    em = ExtentMap()
    for i in range(50):
        em.map(i * (MAX_FILE_BLOCKS // 50), 2 * i, 1)
    stats = em.statistics().radix
    assert stats is not None
    assert em.statistics().mapped_blocks == 50
    assert stats.leaves == 50
    assert em.memory_bytes() == (stats.leaves + stats.interior_nodes) * 4096
    assert em.lookup(1).length == MAX_FILE_BLOCKS // 50 - 1
    em.shift_left(1, MAX_FILE_BLOCKS // 50 - 1)  # collapse the first gap
    assert em.lookup(1) == Extent(1, 2, 1, False)
    assert em.mapped_blocks() == 50
    check_leaves_hold_mappings(em)


def test_limits() -> None:
    em = ExtentMap()
    last = MAX_FILE_BLOCKS - 1
    em.map(last, MAX_PHYS_BLOCKS - 1, 1)
    assert em.lookup(last) == Extent(last, MAX_PHYS_BLOCKS - 1, 1, False)
    assert em.lookup(0) == Extent(0, None, last, False)
    with pytest.raises(ExtentError, match="maximum file size"):
        em.shift_right(0, 1)
    assert em.to_runs() == [(last, MAX_PHYS_BLOCKS - 1, 1, False)]
    em.map(0, 0, 1)
    em.unmap(last, 1)
    em.shift_right(0, last)  # block 0 moves to the last block exactly
    assert em.to_runs() == [(last, 0, 1, False)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda em: em.map(-1, 0, 1), "negative"),
        (lambda em: em.map(0, 0, 0), "not positive"),
        (lambda em: em.map(MAX_FILE_BLOCKS - 1, 0, 2), "maximum file size"),
        (lambda em: em.map(0, -5, 1), "physical range"),
        (lambda em: em.map(0, MAX_PHYS_BLOCKS - 1, 2), "physical range"),
        (lambda em: em.map(5, 0, 1), "overlaps"),
        (lambda em: em.unmap(-3, 1), "negative"),
        (lambda em: em.unmap(0, -1), "not positive"),
        (lambda em: em.mark_written(MAX_FILE_BLOCKS, 1), "maximum file size"),
        (lambda em: em.shift_left(4, 2), "still mapped"),
        (lambda em: em.shift_left(0, MAX_FILE_BLOCKS + 1), "maximum file size"),
        (lambda em: em.shift_right(-1, 1), "negative"),
        (lambda em: em.shift_right(0, MAX_FILE_BLOCKS - 5), "maximum file size"),
        (lambda em: em.lookup(-1), "outside"),
        (lambda em: em.lookup(MAX_FILE_BLOCKS), "outside"),
        (lambda em: em.pblk_of(MAX_FILE_BLOCKS), "outside"),
        (lambda em: list(em.extents(5, 4)), "bad range"),
        (lambda em: list(em.extents(0, MAX_FILE_BLOCKS + 1)), "bad range"),
        (lambda em: em.runs_in(4, 3), "bad range"),
        (lambda em: em.runs_in(-1, 3), "bad range"),
        (lambda em: em.replace_range(0, MAX_FILE_BLOCKS + 1, []), "bad range"),
        (lambda em: em.replace_range(0, 10, [(8, 0, 3, False)]), "outside"),
        (lambda em: em.replace_range(2, 10, [(1, 0, 2, False)]), "out of order"),
        (lambda em: em.replace_range(0, 10, [(0, 0, 4, False), (3, 9, 1, False)]), "order"),
        (lambda em: em.replace_range(0, 10, [(0, 0, 0, False)]), "empty"),
        (lambda em: em.replace_range(0, 10, [(0, MAX_PHYS_BLOCKS - 1, 2, False)]), "physical"),
    ],
)
def test_misuse_raises_extent_error(call: Any, match: str) -> None:
    em = ExtentMap()
    em.map(5, 50, 1)
    before = em.to_runs()
    with pytest.raises(ExtentError, match=match) as info:
        call(em)
    assert isinstance(info.value, InvalidArgument)
    assert info.value.code == errno.EINVAL
    assert "\n" not in str(info.value)
    assert em.to_runs() == before


def test_clear_and_from_runs() -> None:
    runs = [(0, 10, 5, False), (5, 15, 600, True), (10_000, 3, 1, False)]
    em = ExtentMap.from_runs(runs)
    assert em.to_runs() == runs
    assert em.mapped_blocks() == 606
    with pytest.raises(ExtentError, match="overlaps"):
        ExtentMap.from_runs([(0, 0, 10, False), (5, 100, 1, False)])
    em.clear()
    assert em.mapped_blocks() == 0
    assert em.memory_bytes() == 0
    assert list(em.extents()) == []
    em.map(0, 1, 1)
    assert em.lookup(0) == Extent(0, 1, 1, False)


def test_extent_helpers() -> None:
    e = Extent(4, None, 6)
    assert e.end == 10
    assert e.is_hole
    assert not e.unwritten
    assert not Extent(4, 9, 1, True).is_hole


# ------------------------------------------------------------- inline store


def scattered(em: ExtentMap, count: int) -> None:
    """`count` one-block runs that can never merge."""
    for i in range(count):
        em.map(10 * i, 1000 + 10 * i, 1)


def test_a_small_map_has_no_genradix() -> None:
    em = ExtentMap()
    assert em.statistics() == ExtentMapStatistics(0, 0, 0, None)
    em.map(0, 1_000_000, 1)
    stats = em.statistics()
    assert stats.radix is None
    assert stats.inline_runs == 1
    assert radix_of(em) is None
    assert 0 < stats.memory_bytes < 100  # a tuple and an int, not a 4 KiB leaf
    assert "inline=1" in repr(em)
    em.map(1, 1_000_001, 3 * CAP)  # one stretch in four runs: still inline
    assert em.statistics().inline_runs == 4
    assert [e.length for e in em.extents()] == [CAP, CAP, CAP, 1]
    assert em.lookup(CAP + 5) == Extent(CAP, 1_000_000 + CAP, CAP, False)


def test_inline_maps_cost_a_few_hundred_bytes() -> None:
    """Measured as the allocator sees it: the map object, its tuple, its ints."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        maps = [ExtentMap() for _ in range(500)]
        for i, em in enumerate(maps):
            em.map(i, 1_000_000 + 7 * i, 1)
            em.map(i + 5, 2_000_000 + 7 * i, 2)
            em.map(i + 9, 3_000_000 + 7 * i, 3)
        per_map = (tracemalloc.get_traced_memory()[0] - before) / len(maps)
    finally:
        tracemalloc.stop()
    assert all(radix_of(em) is None for em in maps)
    assert per_map < 512, per_map  # a genradix leaf alone is 4096


def test_the_store_moves_both_ways_with_a_gap() -> None:
    em = ExtentMap()
    ref = ExtentMap(inline_runs=0)
    for m in (em, ref):
        scattered(m, INLINE_RUNS)
    assert radix_of(em) is None
    assert radix_of(ref) is not None
    for m in (em, ref):
        m.map(10 * INLINE_RUNS, 5, 1)
    assert radix_of(em) is not None  # one run too many
    assert list(em.extents()) == list(ref.extents())
    # Down to INLINE_RUNS runs: the genradix stays (no copying back and forth
    # at the limit) ...
    for m in (em, ref):
        m.unmap(10 * INLINE_RUNS, 1)
    assert radix_of(em) is not None
    # ... until half of them are left.
    for m in (em, ref):
        m.unmap(10 * (INLINE_RUNS // 2), MAX_FILE_BLOCKS - 10 * (INLINE_RUNS // 2))
    assert radix_of(em) is None
    assert em.statistics().inline_runs == INLINE_RUNS // 2
    assert list(em.extents()) == list(ref.extents())
    assert radix_of(ref) is not None
    for m in (em, ref):
        m.unmap(0, MAX_FILE_BLOCKS)  # truncate to 0
    assert em._store == ()
    assert radix_of(ref) is None  # an empty map holds nothing, even with inline_runs=0


def test_a_long_map_lands_in_the_genradix_whole() -> None:
    em = ExtentMap()
    em.map(3, 77, 100 * CAP)
    assert radix_of(em) is not None
    assert em.to_runs() == [(3, 77, 100 * CAP, False)]
    assert [e.length for e in em.extents()] == [CAP] * 100


def test_inline_operations_split_and_merge_like_the_genradix() -> None:
    em = ExtentMap()
    ref = ExtentMap(inline_runs=0)
    steps: list[Callable[[ExtentMap], object]] = [
        lambda m: m.map(0, 100, 40, unwritten=True),
        lambda m: m.mark_written(10, 5),  # three runs
        lambda m: m.map(40, 140, 3, unwritten=True),  # tops up the last run
        lambda m: m.mark_written(0, 100),  # everything merges back into one
        lambda m: m.shift_right(20, 7),  # split by an insert
        lambda m: m.shift_left(20, 7),  # and merged again by the collapse
        lambda m: m.unmap(5, 2),
        lambda m: m.map(5, 105, 2),  # refills the hole: one run again
    ]
    for step in steps:
        assert step(em) == step(ref)
        assert list(em.extents()) == list(ref.extents())
        assert radix_of(em) is None
    assert em.to_runs() == [(0, 100, 43, False)]


# --------------------------------------------------------- change tracking


def test_take_changes_reports_what_each_mutation_touched() -> None:
    em = ExtentMap()
    assert em.take_changes() is None
    em.map(10, 100, 5)
    assert em.take_changes() == (10, 15)
    assert em.take_changes() is None
    em.map(20, 200, 1)
    em.map(3, 300, 2)
    assert em.take_changes() == (3, 21)
    assert em.unmap(50, 10) == []  # nothing there: nothing changed
    em.mark_written(0, 100)  # nothing unwritten
    em.shift_left(30, 5)  # nothing after the range to move
    em.shift_right(30, 5)
    assert em.take_changes() is None
    em.unmap(12, 100)  # only the mapped part counts
    assert em.take_changes() == (12, 21)
    em.map(40, 400, 4, unwritten=True)
    em.take_changes()
    em.mark_written(41, 2)
    assert em.take_changes() == (41, 43)
    em.shift_right(2, 3)  # everything from 2 on moves, up to the last block's new home
    assert em.take_changes() == (2, 47)
    em.shift_left(0, 2)  # [0, 2) is a hole: everything after moves down
    assert em.take_changes() == (0, 47)
    em.clear()
    assert em.take_changes() == (0, MAX_FILE_BLOCKS)


def test_changes_survive_a_move_between_stores() -> None:
    em = ExtentMap()
    scattered(em, INLINE_RUNS)
    em.take_changes()
    em.map(1000, 9, 1)  # to the genradix
    assert radix_of(em) is not None
    em.unmap(10, MAX_FILE_BLOCKS - 10)  # and back
    assert radix_of(em) is None
    assert em.take_changes() == (10, 1001)


def test_runs_in_clips_and_merges() -> None:
    em = ExtentMap()
    em.map(0, 1000, 3 * CAP)  # stored as three runs, one stretch
    em.map(3 * CAP + 1, 5, 4, unwritten=True)
    assert em.runs_in(10, 2 * CAP) == [(10, 1010, 2 * CAP - 10, False)]
    assert em.runs_in(0, MAX_FILE_BLOCKS) == em.to_runs()
    assert em.runs_in(3 * CAP, 3 * CAP + 3) == [(3 * CAP + 1, 5, 2, True)]
    assert em.runs_in(7, 7) == []
    assert list(em.extents(7, 7)) == []
    assert list(ExtentMap.from_runs(em.to_runs(), inline_runs=0).extents(7, 7)) == []


def test_replace_range_replays_into_a_map_that_differs() -> None:
    em = ExtentMap.from_runs([(0, 10, 5, False), (8, 50, 4, True), (100, 7, 1, False)])
    em.replace_range(3, 10, [(4, 14, 2, False), (9, 60, 1, True)])
    assert em.to_runs() == [
        (0, 10, 3, False),
        (4, 14, 2, False),
        (9, 60, 1, True),
        (10, 52, 2, True),
        (100, 7, 1, False),
    ]
    assert em.take_changes() == (3, 10)
    # Edges merge as everywhere: block 3 joins both neighbours into one run.
    em.replace_range(3, 4, [(3, 13, 1, False)])
    assert next(em.extents()) == Extent(0, 10, 6, False)
    assert em.take_changes() == (3, 4)
    em.replace_range(0, MAX_FILE_BLOCKS, [])
    assert em.to_runs() == []
    assert em.mapped_blocks() == 0
    assert em.take_changes() == (0, 101)
