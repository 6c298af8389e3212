"""The generic radix tree: a stateful model check against a dict for several
record layouts, plus edge cases (index 0 and MAX_INDEX, page boundaries,
record sizes 1..4096, misuse)."""

from __future__ import annotations

import struct
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fusefs.genradix import MAX_INDEX, GenRadix

# ---------------------------------------------------------------- the model


def expected_shape(pages: set[int], fanout: int) -> tuple[int, int]:
    """(depth, interior nodes) of a minimal tree holding exactly `pages`."""
    if not pages:
        return 0, 0
    depth, cap = 1, 1
    while max(pages) >= cap:
        depth, cap = depth + 1, cap * fanout
    bits = fanout.bit_length() - 1
    levels = depth - 1
    interior = sum(len({p >> (bits * (levels - i)) for p in pages}) for i in range(levels))
    return depth, interior


class GenRadixMachine(RuleBasedStateMachine):
    """GenRadix against a dict {index: bytes} plus the set of allocated pages."""

    layout: ClassVar[str] = "<Q"
    page_size: ClassVar[int] = 4096

    def __init__(self) -> None:
        super().__init__()
        self.rec = struct.Struct(self.layout)
        self.tree = GenRadix(self.rec, self.page_size)
        self.rpp = self.page_size // self.rec.size
        self.fanout = self.page_size // 8
        self.model: dict[int, bytes] = {}
        self.pages: set[int] = set()
        self.zero = bytes(self.rec.size)

    # Indices cluster near 0 and near page and subtree boundaries, with a few
    # far out, so the tree grows, shrinks and reuses interior nodes.
    @property
    def indices(self) -> st.SearchStrategy[int]:
        rpp, fanout = self.rpp, self.fanout
        near = st.sampled_from([0, 1, rpp - 1, rpp, rpp + 1, 2 * rpp, rpp * fanout - 1])
        near = near | st.sampled_from([rpp * fanout, rpp * fanout * fanout, MAX_INDEX])
        return near | st.integers(0, 4 * rpp) | st.integers(0, MAX_INDEX)

    @property
    def raws(self) -> st.SearchStrategy[bytes]:
        """Record contents; a big record gets a short patch of bytes at a
        random offset, so examples stay small."""
        size = self.rec.size
        if size <= 16:
            return st.binary(min_size=size, max_size=size)
        return st.builds(
            lambda off, patch: bytes(off) + patch + bytes(size - off - len(patch)),
            st.integers(0, size - 8),
            st.binary(min_size=1, max_size=8),
        )

    def page_of(self, idx: int) -> int:
        return idx // self.rpp

    def expected_page(self, pno: int) -> bytes:
        page = bytearray(self.page_size)
        size = self.rec.size
        for idx, raw in self.model.items():
            if self.page_of(idx) == pno:
                slot = idx - pno * self.rpp
                page[slot * size : (slot + 1) * size] = raw
        return bytes(page)

    def store(self, idx: int, raw: bytes) -> None:
        self.pages.add(self.page_of(idx))
        if raw == self.zero:
            self.model.pop(idx, None)
        else:
            self.model[idx] = raw

    @rule(data=st.data())
    def set_record(self, data: st.DataObject) -> None:
        idx = data.draw(self.indices)
        raw = data.draw(self.raws)
        self.tree.set(idx, *self.rec.unpack(raw))
        self.store(idx, raw)

    @rule(data=st.data())
    def write_through_ptr_alloc(self, data: st.DataObject) -> None:
        idx = data.draw(self.indices)
        raw = data.draw(self.raws)
        view = self.tree.ptr_alloc(idx)
        assert len(view) == self.rec.size
        view[:] = raw
        self.store(idx, raw)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        idx = data.draw(self.indices)
        raw = self.model.get(idx, self.zero)
        assert self.tree.get(idx) == self.rec.unpack(raw)
        view = self.tree.ptr(idx)
        if self.page_of(idx) in self.pages:
            assert view is not None
            assert bytes(view) == raw
        else:
            assert view is None
        # Reading never allocates.
        assert self.tree.statistics().leaves == len(self.pages)

    @rule(data=st.data())
    def iterate(self, data: st.DataObject) -> None:
        start = data.draw(self.indices)
        seen = 0
        last = -1
        for seen, (idx, view) in enumerate(self.tree.iter_from(start), 1):
            assert idx > last
            assert idx >= start
            assert self.page_of(idx) in self.pages
            assert bytes(view) == self.model.get(idx, self.zero)
            last = idx
            if seen > 3 * self.rpp:
                break
        else:
            pages_after = [p for p in self.pages if (p + 1) * self.rpp > start]
            slots = sum(self.rpp - max(start - p * self.rpp, 0) for p in pages_after)
            assert seen == slots

    @rule(data=st.data())
    def iterate_pages(self, data: st.DataObject) -> None:
        start = data.draw(self.indices)
        got = [(first, bytes(page)) for first, page in self.tree.iter_pages_from(start)]
        want = sorted(p for p in self.pages if (p + 1) * self.rpp > start)
        assert [first // self.rpp for first, _ in got] == want
        for first, page in got:
            assert page == self.expected_page(first // self.rpp)

    @rule(data=st.data())
    def prealloc(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, 6 * self.rpp + 1))
        self.tree.prealloc(n)
        if n:
            self.pages.update(range(self.page_of(n - 1) + 1))

    @rule(data=st.data())
    def remove_leaf(self, data: st.DataObject) -> None:
        pno = self.page_of(data.draw(self.indices))
        page = self.tree.remove_leaf(pno)
        assert (page is not None) == (pno in self.pages)
        self.pages.discard(pno)
        for idx in [i for i in self.model if self.page_of(i) == pno]:
            del self.model[idx]

    @rule(data=st.data())
    def move_leaf(self, data: st.DataObject) -> None:
        """Re-hang a leaf at another page number, the way a shift does."""
        src = self.page_of(data.draw(self.indices))
        dst = self.page_of(data.draw(self.indices))
        page = self.tree.remove_leaf(src)
        if page is None:
            return
        self.pages.discard(src)
        moved = {i: v for i, v in self.model.items() if self.page_of(i) == src}
        for i in moved:
            del self.model[i]
        self.tree.set_leaf(dst, page)
        for i in [i for i in self.model if self.page_of(i) == dst]:
            del self.model[i]
        self.pages.add(dst)
        for i, v in moved.items():
            self.model[i - src * self.rpp + dst * self.rpp] = v

    @rule(data=st.data())
    def detach_tail(self, data: st.DataObject) -> None:
        first = self.page_of(data.draw(self.indices))
        detached = self.tree.detach_leaves(first)
        want = sorted(p for p in self.pages if p >= first)
        assert [pno for pno, _ in detached] == want
        for pno, page in detached:
            assert page == self.expected_page(pno)
        self.pages.difference_update(want)
        for idx in [i for i in self.model if self.page_of(i) >= first]:
            del self.model[idx]

    @rule(data=st.data(), count=st.integers(1, 20))
    def attach_stretch(self, data: st.DataObject, count: int) -> None:
        """Install consecutive leaves in one call, as a shift does."""
        first = self.page_of(data.draw(self.indices))
        count = min(count, (MAX_INDEX // self.rpp) - first + 1)
        pages = []
        for _ in range(count):
            page = bytearray(self.page_size)
            slot = data.draw(st.integers(0, self.rpp - 1))
            raw = data.draw(self.raws)
            page[slot * self.rec.size : (slot + 1) * self.rec.size] = raw
            pages.append((slot, raw, page))
        if any(p in self.pages for p in range(first, first + count)):
            with pytest.raises(ValueError, match="already allocated"):
                self.tree.attach_leaves(first, [page for _, _, page in pages])
            return
        self.tree.attach_leaves(first, [page for _, _, page in pages])
        for i, (slot, raw, _) in enumerate(pages):
            self.pages.add(first + i)
            if raw != self.zero:
                self.model[(first + i) * self.rpp + slot] = raw

    @rule()
    def free(self) -> None:
        self.tree.free()
        self.model.clear()
        self.pages.clear()

    @invariant()
    def shape(self) -> None:
        s = self.tree.statistics()
        depth, interior = expected_shape(self.pages, self.fanout)
        assert s.leaves == len(self.pages)
        assert (s.depth, s.interior_nodes) == (depth, interior)
        assert (
            s.memory_bytes
            == self.tree.memory_bytes()
            == (len(self.pages) + interior) * (self.page_size)
        )
        assert s.records_per_page == self.rpp
        assert s.max_index == ((max(self.pages) + 1) * self.rpp - 1 if self.pages else -1)
        assert s.capacity >= s.max_index + 1


def machine_test(layout: str, page_size: int = 4096) -> Any:
    machine: type[GenRadixMachine] = type(
        f"GenRadixMachine_{layout}_{page_size}",
        (GenRadixMachine,),
        {"layout": layout, "page_size": page_size},
    )
    case = machine.TestCase
    case.settings = settings(
        max_examples=30,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return case


TestByte = machine_test("<B")
TestU64 = machine_test("<Q")
TestMixed = machine_test("<IHH")
TestWholePage = machine_test("4096s")
TestThreeBytes = machine_test("<BH")  # 3 bytes: 1365 per page, 1 byte wasted
TestSmallPages = machine_test("<Q", page_size=64)  # fanout 8: deep trees fast
TestSmallPagesOdd = machine_test("<BH", page_size=32)


# --------------------------------------------------------------- edge cases


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 13, 100, 1000, 2049, 4095, 4096])
def test_record_sizes_never_straddle_pages(size: int) -> None:
    rec = struct.Struct(f"{size}s")
    tree = GenRadix(rec)
    rpp = 4096 // size
    assert tree.records_per_page == rpp
    values = {
        0: b"\x01" * size,
        rpp - 1: b"\x02" * size,
        rpp: b"\x03" * size,
        MAX_INDEX: b"\x04" * size,
    }
    for idx, raw in values.items():
        tree.set(idx, raw)
    for idx, raw in values.items():
        assert tree.get(idx) == (raw,)
        view = tree.ptr(idx)
        assert view is not None
        assert bytes(view) == raw
    # The last slot of a page ends inside it; the next index starts a new page.
    pages = list(tree.iter_pages_from(0))
    assert [first for first, _ in pages[:2]] == [0, rpp]
    first_page = pages[0][1]
    assert first_page[(rpp - 1) * size : rpp * size] == values[rpp - 1]
    assert first_page[rpp * size :] == bytes(4096 - rpp * size)
    assert tree.get(1 if rpp > 2 else 2 * rpp) == (bytes(size),)


def test_index_zero_and_max_index() -> None:
    tree = GenRadix(struct.Struct("<Q"))
    tree.set(0, 7)
    assert tree.statistics().depth == 1
    tree.set(MAX_INDEX, 9)
    s = tree.statistics()
    assert s.depth == 6  # 2**48 records / 512 per leaf / 512 per node
    assert s.max_index == MAX_INDEX
    assert s.leaves == 2
    assert s.interior_nodes == 9
    assert tree.get(0) == (7,)
    assert tree.get(MAX_INDEX) == (9,)
    assert [idx for idx, _ in tree.iter_pages_from(1)] == [0, MAX_INDEX - 511]
    assert tree.remove_leaf(MAX_INDEX // 512) is not None
    assert tree.statistics().depth == 1  # shrinks back to the root leaf


@pytest.mark.parametrize("idx", [-1, MAX_INDEX + 1, -(2**60)])
def test_bad_index(idx: int) -> None:
    tree = GenRadix(struct.Struct("<I"))
    for call in (tree.get, tree.ptr, tree.ptr_alloc):
        with pytest.raises(ValueError, match="out of range"):
            call(idx)
    with pytest.raises(ValueError, match="out of range"):
        tree.set(idx, 1)
    with pytest.raises(ValueError, match="out of range"):
        list(tree.iter_from(idx))


def test_bad_layouts_and_pages() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        GenRadix(struct.Struct("4097s"))
    with pytest.raises(ValueError, match="size 0"):
        GenRadix(struct.Struct(""))
    with pytest.raises(ValueError, match="power of two"):
        GenRadix(struct.Struct("<Q"), page_size=1000)
    with pytest.raises(ValueError, match="power of two"):
        GenRadix(struct.Struct("<B"), page_size=8)
    tree = GenRadix(struct.Struct("<Q"))
    with pytest.raises(ValueError, match="bad record"):
        tree.set(0, -1)
    with pytest.raises(ValueError, match="bad record"):
        tree.set(0, 1, 2)
    with pytest.raises(ValueError, match="bytearray of 4096"):
        tree.set_leaf(0, bytearray(10))
    with pytest.raises(ValueError, match="out of range"):
        tree.set_leaf(-1, bytearray(4096))


def test_empty_tree() -> None:
    tree = GenRadix(struct.Struct("<IHH"))
    assert list(tree.iter_from()) == []
    assert list(tree.iter_pages_from()) == []
    assert list(tree.iter_leaves()) == []
    assert list(tree.iter_leaves_reverse(10**9)) == []
    assert tree.detach_leaves(0) == []
    assert tree.remove_leaf(3) is None
    assert tree.ptr(12345) is None
    assert tree.get(12345) == (0, 0, 0)
    s = tree.statistics()
    assert (s.depth, s.leaves, s.interior_nodes, s.memory_bytes, s.max_index) == (0, 0, 0, 0, -1)
    assert "depth=0" in repr(tree)


def test_ptr_none_then_writable_view() -> None:
    tree = GenRadix(struct.Struct("<HH"))
    assert tree.ptr(5000) is None
    view = tree.ptr_alloc(5000)
    view[:] = struct.pack("<HH", 1, 2)
    assert tree.get(5000) == (1, 2)
    again = tree.ptr(5000)
    assert again is not None
    again[0:2] = b"\xff\xff"
    assert tree.get(5000) == (0xFFFF, 2)
    # The neighbours in the same page exist (zeros) and are distinct slots.
    neighbour = tree.ptr(5001)
    assert neighbour is not None
    assert bytes(neighbour) == bytes(4)
    assert tree.ptr(5000 + 4096 // 4) is None


def test_prealloc_then_free() -> None:
    tree = GenRadix(struct.Struct("<Q"))
    tree.prealloc(512 * 1000 + 1)
    s = tree.statistics()
    assert s.leaves == 1001
    assert s.depth == 3
    assert s.interior_nodes == 1 + 2
    assert s.memory_bytes == (1001 + 3) * 4096
    assert sum(1 for _ in tree.iter_pages_from(0)) == 1001
    assert tree.get(512 * 1000) == (0,)
    assert "leaves=1001" in repr(tree)
    tree.free()
    s = tree.statistics()
    assert (s.depth, s.leaves, s.interior_nodes, s.memory_bytes) == (0, 0, 0, 0)
    assert list(tree.iter_from(0)) == []
    tree.prealloc(0)
    assert tree.statistics().leaves == 0


def test_iteration_skips_unallocated_subtrees() -> None:
    tree = GenRadix(struct.Struct("<Q"), page_size=64)  # 8 records a leaf, fanout 8
    for idx in (3, 8 * 8**5 + 1, 8 * 8**9):
        tree.set(idx, idx)
    got = [(idx, int.from_bytes(v, "little")) for idx, v in tree.iter_from(4) if any(v)]
    assert got == [(8 * 8**5 + 1, 8 * 8**5 + 1), (8 * 8**9, 8 * 8**9)]
    assert [pno for pno, _ in tree.iter_leaves_reverse(8**9 - 1)] == [8**5, 0]
    assert [pno for pno, _ in tree.iter_leaves(1, 8**9)] == [8**5]


def test_attach_leaves_checks_before_changing_anything() -> None:
    tree = GenRadix(struct.Struct("<Q"), page_size=64)  # fanout 8
    tree.set(8 * 12, 1)  # page 12
    with pytest.raises(ValueError, match="page 12 is already allocated"):
        tree.attach_leaves(5, [bytearray(64) for _ in range(10)])
    with pytest.raises(ValueError, match="bytearray of 64"):
        tree.attach_leaves(0, [bytearray(64), bytearray(8)])
    with pytest.raises(ValueError, match="out of range"):
        tree.attach_leaves(MAX_INDEX // 8, [bytearray(64), bytearray(64)])
    assert [pno for pno, _ in tree.iter_leaves()] == [12]
    tree.attach_leaves(13, [bytearray(64) for _ in range(20)])  # crosses two nodes
    assert [pno for pno, _ in tree.iter_leaves()] == list(range(12, 33))
    assert tree.statistics().interior_nodes == 1 + 4  # depth 3: pages 12..32 under 4 nodes
    tree.attach_leaves(0, [])


def test_set_leaf_replaces_and_returns_old() -> None:
    tree = GenRadix(struct.Struct("<B"))
    tree.set(4096 * 3 + 1, 5)
    new = bytearray(4096)
    new[1] = 9
    old = tree.set_leaf(3, new)
    assert old is not None
    assert old[1] == 5
    assert tree.get(4096 * 3 + 1) == (9,)
    assert tree.set_leaf(700, bytearray(4096)) is None
    assert tree.statistics().leaves == 2
