"""The extent map: a stateful model check against a per-block dict, plus edge
cases (the run rule, shifts by whole and partial leaves, limits, errors).

The run rule checked everywhere: every stored run is physically contiguous
with one flag and at most MAX_EXTENT_BLOCKS long, and two neighbouring runs
that could be one (contiguous, same flag) have a combined length above
MAX_EXTENT_BLOCKS.  `lookup` returns exactly the stored run holding the block
(or the exact hole), and `extents()` yields the stored runs clipped to the range.
"""

from __future__ import annotations

import errno
from itertools import pairwise
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fusefs.errors import ExtentError, InvalidArgument
from fusefs.extents import (
    MAX_EXTENT_BLOCKS,
    MAX_FILE_BLOCKS,
    MAX_PHYS_BLOCKS,
    Extent,
    ExtentMap,
)

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


def check_leaves_hold_mappings(em: ExtentMap) -> None:
    """The map never keeps an all-zero leaf, so memory follows mapped blocks."""
    radix = em._radix
    for _, page in radix.iter_leaves():
        assert not radix.is_zero_page(page)
    if em.mapped_blocks() == 0:
        assert em.memory_bytes() == 0


def freed_from_model(model: Model, lblk: int, n: int) -> list[tuple[int, int]]:
    freed: list[tuple[int, int]] = []
    for b in range(lblk, lblk + n):
        if b in model:
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


# ---------------------------------------------------------------- the model


class ExtentMapMachine(RuleBasedStateMachine):
    page_size: ClassVar[int] = 4096

    def __init__(self) -> None:
        super().__init__()
        self.em = ExtentMap(page_size=self.page_size)
        self.model: Model = {}
        rpp = self.page_size // 8
        edges = [0, 1, rpp - 1, rpp, rpp + 1, CAP - 1, CAP, CAP + 1, 2 * rpp + 3]
        span = 3 * max(rpp, CAP)
        self.lblks = st.sampled_from(edges) | st.integers(0, CAP + 10) | st.integers(0, span)
        self.counts = st.sampled_from([1, 2, rpp, rpp + 1, CAP, CAP + 1]) | st.integers(1, 400)

    def shift_model(self, at: int, by: int) -> None:
        self.model = {(b + by if b >= at else b): v for b, v in self.model.items()}

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
            with pytest.raises(ExtentError, match="overlaps"):
                self.em.map(lblk, pblk, n, unwritten)
            return
        self.em.map(lblk, pblk, n, unwritten)
        for i in range(n):
            self.model[lblk + i] = (pblk + i, unwritten)

    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        assert self.em.unmap(lblk, n) == freed_from_model(self.model, lblk, n)

    @rule(data=st.data())
    def mark_written(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        self.em.mark_written(lblk, n)
        for b in range(lblk, lblk + n):
            if b in self.model:
                self.model[b] = (self.model[b][0], False)

    @rule(data=st.data())
    def shift_left(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        if any(b in self.model for b in range(lblk, lblk + n)):
            with pytest.raises(ExtentError, match="still mapped"):
                self.em.shift_left(lblk, n)
            return
        self.em.shift_left(lblk, n)
        self.shift_model(lblk + n, -n)

    @rule(data=st.data())
    def punch_and_collapse(self, data: st.DataObject) -> None:
        """What fallocate(COLLAPSE_RANGE) does: unmap, then shift down."""
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        assert self.em.unmap(lblk, n) == freed_from_model(self.model, lblk, n)
        self.em.shift_left(lblk, n)
        self.shift_model(lblk + n, -n)

    @rule(data=st.data())
    def shift_right(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        n = data.draw(self.counts)
        self.em.shift_right(lblk, n)
        self.shift_model(lblk, n)

    @rule(data=st.data())
    def shift_right_too_far(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks)
        last = max(self.model, default=-1)
        if last < lblk:
            self.em.shift_right(lblk, MAX_FILE_BLOCKS - lblk)  # nothing moves
            return
        with pytest.raises(ExtentError, match="maximum file size"):
            self.em.shift_right(lblk, MAX_FILE_BLOCKS - last)

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        lblk = data.draw(self.lblks | st.sampled_from(sorted(self.model) or [0]))
        got = self.em.lookup(lblk)
        if lblk not in self.model:
            assert got == hole_from_model(self.model, lblk)
            assert self.em.pblk_of(lblk) is None
            return
        assert got.start <= lblk < got.end
        assert got.pblk is not None
        assert self.em.pblk_of(lblk) == self.model[lblk][0]
        # Exactly the stored run that holds the block.
        runs = [e for e in self.em.extents() if e.start <= lblk < e.end]
        assert runs == [got]
        for i in range(got.length):
            assert self.model[got.start + i] == (got.pblk + i, got.unwritten)

    @rule(data=st.data())
    def extents_in_range(self, data: st.DataObject) -> None:
        start = data.draw(self.lblks)
        end = start + data.draw(self.counts)
        got = list(self.em.extents(start, end))
        blocks: Model = {}
        for e in got:
            assert e.pblk is not None
            assert start <= e.start < e.end <= end
            for i in range(e.length):
                blocks[e.start + i] = (e.pblk + i, e.unwritten)
        assert blocks == {b: v for b, v in self.model.items() if start <= b < end}

    @rule()
    def persist_roundtrip(self) -> None:
        runs = self.em.to_runs()
        for a, b in pairwise(runs):  # as short as it can be
            assert not (a[0] + a[2] == b[0] and a[1] + a[2] == b[1] and a[3] == b[3])
        again = ExtentMap.from_runs(runs, page_size=self.page_size)
        assert expand(again) == self.model
        assert again.to_runs() == runs

    @invariant()
    def matches_model(self) -> None:
        assert self.em.mapped_blocks() == len(self.model)
        assert expand(self.em) == self.model
        check_run_rule(list(self.em.extents()))
        check_leaves_hold_mappings(self.em)


def machine_test(page_size: int) -> Any:
    machine: type[ExtentMapMachine] = type(
        f"ExtentMapMachine_{page_size}", (ExtentMapMachine,), {"page_size": page_size}
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
    leaves_before = {id(page) for _, page in em._radix.iter_leaves()}
    em.shift_right(0, 512)
    assert {id(page) for _, page in em._radix.iter_leaves()} == leaves_before
    assert em.lookup(0) == Extent(0, None, 512, False)
    assert em.to_runs() == [(512, 7, 2048, False)]
    em.shift_left(0, 512)
    assert {id(page) for _, page in em._radix.iter_leaves()} == leaves_before
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
