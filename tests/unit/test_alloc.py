"""The block allocator: placement, reservations, deferred frees, encoding.

The stateful test runs the allocator against a model made of sets of blocks and
checks every answer, including exactly when ENOSPC must happen; the unit tests pin
down placement (contiguity, fragmentation, hints) and the commit protocol.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

import fusefs.alloc as alloc_mod
from fusefs.alloc import Allocator, Reservation, Run
from fusefs.errors import Corrupt, NoSpace
from fusefs.faults import REGISTRY


def blocks_of(runs: list[Run]) -> list[int]:
    return [b for pblk, n in runs for b in range(pblk, pblk + n)]


def finish(alloc: Allocator) -> None:
    """End every test with a consistency check and an encode round trip."""
    alloc.check()
    again = Allocator.decode(alloc.encode())
    again.check()
    assert again.used_runs() == alloc.used_runs()


# -- placement ------------------------------------------------------------------


def test_sequential_allocations_are_contiguous() -> None:
    alloc = Allocator(1000, first_data=8)
    runs = [alloc.allocate(10) for _ in range(20)]
    assert all(len(r) == 1 for r in runs)
    starts = [r[0][0] for r in runs]
    assert starts == list(range(8, 208, 10))
    assert alloc.statistics().allocated == 200
    finish(alloc)


def test_metadata_blocks_are_never_allocated() -> None:
    alloc = Allocator(20, first_data=4)
    assert alloc.statistics().total == 16
    got = blocks_of(alloc.allocate(16))
    assert sorted(got) == list(range(4, 20))
    assert alloc.is_used(0, 4)
    assert not alloc.is_free(0)
    with pytest.raises(NoSpace):
        alloc.allocate(1)
    finish(alloc)


def test_fragmented_allocation_returns_several_runs() -> None:
    alloc = Allocator(100)
    singles = [alloc.allocate(1)[0][0] for _ in range(100)]
    # Free every other block: 50 free blocks, no two adjacent.
    for pblk in singles[::2]:
        alloc.free_now(pblk, 1)
    runs = alloc.allocate(5)
    assert len(runs) == 5
    assert all(n == 1 for _, n in runs)
    assert len(set(blocks_of(runs))) == 5
    assert runs == [(0, 1), (2, 1), (4, 1), (6, 1), (8, 1)]
    # A run of three appears ahead of the cursor: a single run wins over fragments.
    alloc.free_now(13, 1)
    assert alloc.allocate(3) == [(12, 3)]
    # None of four: the fragments from the cursor on, in order.
    assert alloc.allocate(4) == [(16, 1), (18, 1), (20, 1), (22, 1)]
    finish(alloc)


def test_prefers_a_single_run_over_earlier_fragments() -> None:
    alloc = Allocator(100)
    alloc.allocate(100)
    alloc.free_now(0, 2)
    alloc.free_now(10, 2)
    alloc.free_now(50, 8)
    assert alloc.allocate(5, hint=0) == [(50, 5)]
    finish(alloc)


def test_hint_places_the_run_and_wraps() -> None:
    alloc = Allocator(100, first_data=2)
    assert alloc.allocate(4, hint=40) == [(40, 4)]
    # A hint leaves the next-fit cursor alone.
    assert alloc.allocate(4) == [(2, 4)]
    # Nothing fits after the hint: wrap to the start of the data area.
    assert alloc.allocate(4, hint=97) == [(6, 4)]
    # Out-of-range hints are advisory: they start at the data area.
    assert alloc.allocate(1, hint=1000) == [(10, 1)]
    assert alloc.allocate(1, hint=0) == [(11, 1)]
    finish(alloc)


def test_wrapping_finds_a_run_straddling_the_start() -> None:
    alloc = Allocator(30)
    alloc.allocate(30)
    alloc.free_now(8, 6)  # free [8, 14)
    assert alloc.allocate(6, hint=10) == [(8, 6)]
    finish(alloc)


def test_fragmented_walk_does_not_take_a_straddling_run_twice() -> None:
    alloc = Allocator(30)
    alloc.allocate(30)
    alloc.free_now(8, 4)  # free [8, 12) around the start point 10
    alloc.free_now(20, 2)
    runs = alloc.allocate(6, hint=10)
    assert runs == [(10, 2), (20, 2), (8, 2)]
    finish(alloc)


def test_next_fit_does_not_reuse_freed_blocks_before_wrapping() -> None:
    alloc = Allocator(100)
    first = alloc.allocate(10)
    alloc.free_now(*first[0])
    assert alloc.allocate(10) == [(10, 10)]
    finish(alloc)


def test_allocate_zero() -> None:
    alloc = Allocator(10)
    assert alloc.allocate(0) == []
    with pytest.raises(ValueError, match="negative"):
        alloc.allocate(-1)
    finish(alloc)


def test_largest_free_run() -> None:
    alloc = Allocator(100, first_data=10)
    assert alloc.largest_free_run() == 90
    alloc.allocate(90)
    assert alloc.largest_free_run() == 0
    alloc.free_now(20, 3)
    alloc.free_now(50, 7)
    alloc.free(60, 9)
    assert alloc.largest_free_run() == 7
    finish(alloc)


# -- reservations -----------------------------------------------------------------


def test_reservation_exhaustion() -> None:
    alloc = Allocator(64)
    r = alloc.reserve(40)
    assert r.remaining == 40
    with pytest.raises(NoSpace):
        alloc.reserve(25)
    with pytest.raises(NoSpace):
        alloc.allocate(25)
    with pytest.raises(NoSpace):
        r.add(25)
    r.add(24)
    assert alloc.statistics().free == 0
    with pytest.raises(NoSpace):
        alloc.allocate(1)
    # The reservation still gets all of its blocks.
    runs = alloc.allocate(64, reservation=r)
    assert sorted(blocks_of(runs)) == list(range(64))
    assert r.remaining == 0
    stats = alloc.statistics()
    assert (stats.reserved, stats.allocated, stats.reservations) == (0, 64, 0)
    finish(alloc)


def test_reservation_misuse() -> None:
    alloc = Allocator(64)
    r = alloc.reserve(4)
    with pytest.raises(RuntimeError, match="holding 4"):
        alloc.allocate(5, reservation=r)
    with pytest.raises(RuntimeError, match="release 5"):
        r.release(5)
    other = Allocator(64).reserve(1)
    with pytest.raises(RuntimeError, match="another allocator"):
        alloc.allocate(1, reservation=other)
    with pytest.raises(ValueError, match="negative"):
        r.add(-1)
    assert r.remaining == 4
    finish(alloc)


def test_reservation_release_and_context_manager() -> None:
    alloc = Allocator(64)
    with alloc.reserve(10) as r:
        alloc.allocate(3, reservation=r)
        r.release(2)
        assert r.remaining == 5
        assert alloc.statistics().reserved == 5
    assert r.remaining == 0
    stats = alloc.statistics()
    assert (stats.reserved, stats.free, stats.allocated) == (0, 61, 3)
    assert repr(r) == "<Reservation remaining=0>"
    finish(alloc)


# -- deferred frees and commits ------------------------------------------------------


def test_deferred_frees_are_not_reused_before_commit_durable() -> None:
    alloc = Allocator(16)
    runs = alloc.allocate(16)
    alloc.free(4, 4)
    assert alloc.statistics().deferred == 4
    assert not alloc.is_free(4)
    assert alloc.is_used(4, 4)
    with pytest.raises(NoSpace):
        alloc.allocate(1)
    token = alloc.commit_begin()
    assert token.runs == ((4, 4),)
    with pytest.raises(NoSpace):
        alloc.allocate(1)
    alloc.commit_durable(token)
    assert alloc.is_free(4)
    assert alloc.allocate(4) == [(4, 4)]
    assert runs == [(0, 16)]
    finish(alloc)


def test_frees_after_commit_begin_wait_for_the_next_commit() -> None:
    alloc = Allocator(16)
    alloc.allocate(16)
    alloc.free(0, 2)
    token = alloc.commit_begin()
    alloc.free(8, 2)
    assert alloc.statistics().committing == 2
    assert alloc.statistics().deferred == 4
    alloc.commit_durable(token)
    assert alloc.is_free(0)
    assert not alloc.is_free(8)
    assert alloc.statistics().deferred == 2
    token = alloc.commit_begin()
    alloc.commit_durable(token)
    assert alloc.is_free(8)
    finish(alloc)


def test_abandoned_commit_keeps_frees_for_the_next() -> None:
    alloc = Allocator(16)
    alloc.allocate(16)
    alloc.free(0, 2)
    token = alloc.commit_begin()
    alloc.free(8, 2)
    alloc.commit_abandoned(token)
    assert not alloc.is_free(0)
    assert alloc.statistics().deferred == 4
    alloc.check()
    token = alloc.commit_begin()
    assert sorted(token.runs) == [(0, 2), (8, 2)]
    alloc.commit_durable(token)
    assert alloc.statistics().free == 4
    finish(alloc)


def test_reclaim_sequence_names_the_commit_that_releases_every_free() -> None:
    alloc = Allocator(16)
    alloc.allocate(16)
    assert (alloc.reclaim_sequence(), alloc.durable_sequence) == (None, 0)
    empty = alloc.commit_begin()  # a commit that frees nothing: nothing to wait for
    assert alloc.reclaim_sequence() is None
    alloc.commit_durable(empty)
    alloc.free(0, 2)
    assert alloc.reclaim_sequence() == 2  # the next commit to begin
    token = alloc.commit_begin()
    assert alloc.reclaim_sequence() == 2  # the one in flight
    alloc.free(8, 2)
    assert alloc.reclaim_sequence() == 3  # frees after it began: the next one
    alloc.commit_abandoned(token)
    assert (alloc.reclaim_sequence(), alloc.durable_sequence) == (3, 1)
    token = alloc.commit_begin()
    assert alloc.reclaim_sequence() == 3
    alloc.commit_durable(token)
    assert (alloc.reclaim_sequence(), alloc.durable_sequence) == (None, 3)
    assert alloc.statistics().free == 4
    finish(alloc)


def test_commit_token_misuse() -> None:
    alloc = Allocator(16)
    token = alloc.commit_begin()
    with pytest.raises(RuntimeError, match="in flight"):
        alloc.commit_begin()
    alloc.commit_durable(token)
    with pytest.raises(RuntimeError, match="not the one in flight"):
        alloc.commit_durable(token)
    with pytest.raises(RuntimeError, match="not the one in flight"):
        alloc.commit_abandoned(token)
    assert alloc.commit_begin().sequence == 2
    finish(alloc)


def test_double_free_detected() -> None:
    alloc = Allocator(16)
    alloc.allocate(8)
    alloc.free(0, 2)
    with pytest.raises(RuntimeError, match=r"block 1, which is freed \(deferred\)"):
        alloc.free(1, 2)
    token = alloc.commit_begin()
    with pytest.raises(RuntimeError, match=r"block 0, which is freed \(committing\)"):
        alloc.free_now(0, 1)
    alloc.commit_durable(token)
    with pytest.raises(RuntimeError, match="block 0, which is free"):
        alloc.free(0, 1)
    with pytest.raises(RuntimeError, match="block 8, which is free"):
        alloc.free(6, 4)
    with pytest.raises(ValueError, match="outside the data area"):
        alloc.free(15, 2)
    # Nothing changed on the failed calls.
    stats = alloc.statistics()
    assert (stats.free, stats.allocated, stats.deferred) == (10, 6, 0)
    finish(alloc)


def test_free_now_returns_blocks_immediately() -> None:
    alloc = Allocator(8)
    alloc.allocate(8)
    alloc.free_now(2, 3)
    assert alloc.statistics().free == 3
    assert alloc.allocate(3) == [(2, 3)]
    finish(alloc)


# -- loading and encoding ------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    alloc = Allocator(200, first_data=3)
    alloc.allocate(50)
    alloc.free_now(10, 5)
    alloc.free(30, 4)
    alloc.allocate(7, hint=150)
    data = alloc.encode()
    again = Allocator.decode(data)
    again.check()
    # Deferred blocks are still referenced by the last durable checkpoint: used.
    assert again.used_runs() == alloc.used_runs() == [(3, 7), (15, 38), (150, 7)]
    assert again.encode() == data
    stats = again.statistics()
    assert (stats.device_blocks, stats.first_data, stats.allocated, stats.deferred) == (
        200,
        3,
        52,
        0,
    )


def test_encode_for_a_commit_leaves_out_what_it_frees() -> None:
    alloc = Allocator(100)
    alloc.allocate(20)
    alloc.free(0, 5)
    token = alloc.commit_begin()
    alloc.free(10, 2)  # after the snapshot: the checkpoint still maps these
    assert alloc.used_runs(token) == [(5, 15)]
    assert alloc.used_runs() == [(0, 20)]
    assert Allocator.decode(alloc.encode(token)).used_runs() == [(5, 15)]
    alloc.commit_durable(token)
    with pytest.raises(RuntimeError, match="not the one in flight"):
        alloc.encode(token)
    finish(alloc)


def test_from_used_and_mark_used() -> None:
    alloc = Allocator.from_used(100, 4, [(4, 6), (50, 10)])
    assert alloc.used_runs() == [(4, 6), (50, 10)]
    assert alloc.statistics().allocated == 16
    assert alloc.allocate(3) == [(10, 3)]
    with pytest.raises(Corrupt, match="block 54 marked used twice"):
        alloc.mark_used(54, 4)
    with pytest.raises(Corrupt, match="outside the data area"):
        alloc.mark_used(2, 1)
    with pytest.raises(Corrupt, match="outside the data area"):
        Allocator.from_used(100, 4, [(99, 2)])
    finish(alloc)


def test_mark_used_respects_reservations() -> None:
    alloc = Allocator(10)
    alloc.reserve(9)
    with pytest.raises(RuntimeError, match="reservations"):
        alloc.mark_used(0, 2)
    alloc.mark_used(0, 1)
    finish(alloc)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:10], "truncated"),
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x07" + d[5:], "version"),
        (lambda d: d[:5] + b"\x03" + d[6:], "width"),
        (lambda d: d + b"\0", "length"),
        # The second run (start 40) rewritten to start inside the first.
        (lambda d: d[:40] + (12).to_bytes(4, "little") + d[44:], "out of order"),
        # The first run's length made to reach past the device end.
        (lambda d: d[:36] + (1000).to_bytes(4, "little") + d[40:], "outside the data area"),
    ],
)
def test_decode_rejects_damage(damage: Callable[[bytes], bytes], message: str) -> None:
    alloc = Allocator.from_used(100, 0, [(10, 5), (40, 5)])
    data = alloc.encode()
    with pytest.raises(Corrupt, match=message):
        Allocator.decode(damage(data))


def test_wide_encoding_decodes() -> None:
    # Devices past 2**32 blocks are encoded with 8-byte numbers; build such a map by
    # hand (with a small device) to check that decode reads the wide form too.
    head = alloc_mod._HEADER.pack(b"FSAL", 1, 8, 64, 2, 2)
    data = head + struct.pack("<4Q", 2, 3, 10, 4)
    assert Allocator.decode(data).used_runs() == [(2, 3), (10, 4)]
    assert len(Allocator.decode(data).encode()) == alloc_mod._HEADER.size + 16


def test_bad_geometry() -> None:
    with pytest.raises(ValueError, match="geometry"):
        Allocator(10, first_data=11)
    with pytest.raises(ValueError, match="geometry"):
        Allocator(-1)
    empty = Allocator(4, first_data=4)
    assert empty.statistics().total == 0
    with pytest.raises(NoSpace):
        empty.allocate(1)
    assert empty.allocate(0) == []
    finish(empty)


def test_check_detects_damage() -> None:
    alloc = Allocator(32)
    alloc.allocate(4)
    alloc._map[20] = alloc_mod.USED
    with pytest.raises(RuntimeError, match="check failed"):
        alloc.check()


def test_repr_and_statistics() -> None:
    alloc = Allocator(32, first_data=2)
    r = alloc.reserve(5)
    alloc.allocate(3)
    alloc.free(2, 1)
    stats = alloc.statistics()
    assert (stats.total, stats.free, stats.reserved, stats.allocated, stats.deferred) == (
        30,
        22,
        5,
        2,
        1,
    )
    assert stats.reservations == 1
    assert not stats.commit_in_flight
    assert repr(alloc) == (
        "<Allocator total=30 free=22 reserved=5 allocated=2 deferred=1 "
        "commit_in_flight=False cursor=5>"
    )
    r.release()
    finish(alloc)


# -- fault sites -------------------------------------------------------------------


def test_fault_sites() -> None:
    sites = {name: REGISTRY.site(name) for name in ("alloc_allocate", "alloc_reserve")}
    assert {site.cls for site in sites.values()} == {"error"}
    assert sites["alloc_allocate"].func == "Allocator.allocate"
    alloc = Allocator(16)
    REGISTRY.control("name alloc_allocate oneshot; name alloc_reserve oneshot")
    try:
        with pytest.raises(NoSpace, match="injected"):
            alloc.allocate(2)
        with pytest.raises(NoSpace, match="injected"):
            alloc.reserve(2)
        # An injected failure leaves nothing behind, and oneshot fired once.
        assert alloc.statistics().free == 16
        alloc.check()
        r = alloc.reserve(2)
        assert sum(n for _, n in alloc.allocate(2, reservation=r)) == 2
    finally:
        REGISTRY.control("name alloc_allocate disable; name alloc_reserve disable")
    assert REGISTRY.site("alloc_allocate").fired == sites["alloc_allocate"].fired + 1
    finish(alloc)


# -- scale ---------------------------------------------------------------------------


def test_large_device_is_quick() -> None:
    t0 = time.perf_counter()
    nblocks = 1 << 22
    alloc = Allocator(nblocks, first_data=16)
    runs: list[Run] = []
    for _ in range(2000):
        runs += alloc.allocate(256)
    assert len(runs) == 2000
    assert runs[0] == (16, 256)
    assert runs[-1][0] == 16 + 1999 * 256
    for pblk, n in runs[::2]:
        alloc.free(pblk, n)
    alloc.commit_durable(alloc.commit_begin())
    # Fragmented: 1000 holes of 256 behind the cursor; a big request still fits
    # in one run ahead of it, a hinted one lands in a hole.
    assert len(alloc.allocate(1 << 20)) == 1
    assert alloc.allocate(200, hint=16) == [(16, 200)]
    # Use up the tail so the next large request must gather the holes.
    rest = alloc.statistics().free
    big = alloc.allocate(rest - 999 * 256 - 56)
    assert len(big) == 1
    scattered = alloc.allocate(999 * 256 + 56)
    assert len(scattered) == 1000
    assert alloc.statistics().free == 0
    data = alloc.encode()
    again = Allocator.decode(data)
    assert again.statistics().allocated == alloc.statistics().allocated
    alloc.check()
    again.check()
    assert time.perf_counter() - t0 < 5


# -- the model -------------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against sets of blocks.

    Model: ``free`` (free on the map), ``held`` (allocated, owned by the test),
    ``deferred`` (freed since the last commit_begin), ``committing`` (freed before the
    commit in flight), and each live reservation's remaining count.
    """

    held_runs = Bundle("held_runs")
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = Allocator(1)
        self.lo = 0
        self.free: set[int] = set()
        self.held: set[int] = set()
        self.deferred: set[int] = set()
        self.committing: set[int] = set()
        self.reserved: dict[Reservation, int] = {}
        self.token: alloc_mod.CommitToken | None = None

    @initialize(device=st.integers(1, 48), first=st.integers(0, 4))
    def setup(self, device: int, first: int) -> None:
        first = min(first, device)
        self.alloc = Allocator(device, first)
        self.lo = first
        self.free = set(range(first, device))

    def available(self) -> int:
        return len(self.free) - sum(self.reserved.values())

    def take(self, runs: list[Run], n: int) -> list[Run]:
        got = blocks_of(runs)
        assert len(got) == n == len(set(got))
        assert all(c > 0 for _, c in runs)
        assert set(got) <= self.free
        self.free -= set(got)
        self.held |= set(got)
        return runs

    @rule(target=held_runs, n=st.integers(0, 12), hint=st.none() | st.integers(-2, 52))
    def allocate(self, n: int, hint: int | None) -> list[Run]:
        if n > self.available():
            with pytest.raises(NoSpace):
                self.alloc.allocate(n, hint=hint)
            return []
        return self.take(self.alloc.allocate(n, hint=hint), n)

    @rule(target=held_runs, r=reservations, data=st.data())
    def allocate_reserved(self, r: Reservation, data: st.DataObject) -> list[Run]:
        have = self.reserved.get(r, 0)
        n = data.draw(st.integers(0, have + 1))
        if n > have:
            with pytest.raises(RuntimeError):
                self.alloc.allocate(n, reservation=r)
            return []
        runs = self.take(self.alloc.allocate(n, reservation=r), n)
        self.set_reserved(r, have - n)
        return runs

    def set_reserved(self, r: Reservation, n: int) -> None:
        if n:
            self.reserved[r] = n
        else:
            self.reserved.pop(r, None)
        assert r.remaining == n

    @rule(target=reservations, n=st.integers(0, 20))
    def reserve(self, n: int) -> Reservation:
        if n > self.available():
            with pytest.raises(NoSpace):
                self.alloc.reserve(n)
            return self.alloc.reserve(0)
        r = self.alloc.reserve(n)
        self.set_reserved(r, n)
        return r

    @rule(r=reservations, n=st.integers(0, 10))
    def grow(self, r: Reservation, n: int) -> None:
        have = self.reserved.get(r, 0)
        if n > self.available():
            with pytest.raises(NoSpace):
                r.add(n)
        else:
            r.add(n)
            self.set_reserved(r, have + n)

    @rule(r=reservations, data=st.data())
    def release(self, r: Reservation, data: st.DataObject) -> None:
        have = self.reserved.get(r, 0)
        n = data.draw(st.none() | st.integers(0, have + 1))
        if n is not None and n > have:
            with pytest.raises(RuntimeError):
                r.release(n)
            return
        r.release(n)
        self.set_reserved(r, 0 if n is None else have - n)

    @rule(runs=consumes(held_runs), now=st.booleans(), data=st.data())
    def free_piece(self, runs: list[Run], now: bool, data: st.DataObject) -> None:
        # Free a piece of one run; what remains of it is simply leaked to the test.
        if not runs:
            return
        pblk, n = data.draw(st.sampled_from(runs))
        start = data.draw(st.integers(pblk, pblk + n - 1))
        count = data.draw(st.integers(1, pblk + n - start))
        piece = set(range(start, start + count))
        assert piece <= self.held
        self.held -= piece
        if now:
            self.alloc.free_now(start, count)
            self.free |= piece
        else:
            self.alloc.free(start, count)
            self.deferred |= piece

    @rule(data=st.data(), now=st.booleans())
    def bad_free(self, data: st.DataObject, now: bool) -> None:
        not_held = sorted(self.free | self.deferred | self.committing)
        if not not_held:
            return
        pblk = data.draw(st.sampled_from(not_held))
        before = self.alloc.statistics()
        with pytest.raises(RuntimeError, match=f"block {pblk}, which is"):
            (self.alloc.free_now if now else self.alloc.free)(pblk, 1)
        assert self.alloc.statistics() == before

    @precondition(lambda self: self.token is None)
    @rule()
    def commit_begin(self) -> None:
        self.token = self.alloc.commit_begin()
        assert set(blocks_of(list(self.token.runs))) == self.deferred
        self.committing, self.deferred = self.deferred, set()
        # The checkpoint of this commit records everything but what it frees.
        expect = self.held | self.deferred
        assert set(blocks_of(self.alloc.used_runs(self.token))) == expect

    @precondition(lambda self: self.token is not None)
    @rule(durable=st.booleans())
    def commit_end(self, durable: bool) -> None:
        assert self.token is not None
        if durable:
            self.alloc.commit_durable(self.token)
            self.free |= self.committing
        else:
            self.alloc.commit_abandoned(self.token)
            self.deferred |= self.committing
        self.committing = set()
        self.token = None

    @rule()
    def round_trip(self) -> None:
        again = Allocator.decode(self.alloc.encode())
        again.check()
        assert set(blocks_of(again.used_runs())) == self.held | self.deferred | self.committing

    @invariant()
    def consistent(self) -> None:
        self.alloc.check()
        s = self.alloc.statistics()
        assert s.free == self.available()
        assert s.reserved == sum(self.reserved.values())
        assert s.allocated == len(self.held)
        assert s.deferred == len(self.deferred) + len(self.committing)
        assert s.committing == len(self.committing)
        assert s.reservations == len(self.reserved)
        for pblk in range(s.device_blocks):
            assert self.alloc.is_free(pblk) == (pblk in self.free)


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_allocator_model = AllocatorMachine.TestCase
