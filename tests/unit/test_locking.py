"""The per-inode locks: one shared suite run against every lock and every side.

Like trio's ``generic_lock_test``: each test takes a `Side` (InodeLock shared or
exclusive, PagecacheLock ADD or BLOCK) or a pair of conflicting sides of one lock,
and forces its interleaving with `trio.testing.Sequencer`,
`trio.testing.wait_all_tasks_blocked` and the autojump clock.  Every test runs
under ``trio.fail_after``: with the autojump clock a deadlock turns into a quick
`trio.TooSlowError` instead of a hang.  The tests specific to the pagecache add
lock (``add_tryget``, exact statistics, ``enabled=False``) follow the suite.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
from trio.testing import (
    Sequencer,
    assert_checkpoints,
    assert_no_checkpoints,
    wait_all_tasks_blocked,
)

from fusefs.locking import ADD, BLOCK, InodeLock, PagecacheLock, PagecacheLockStatistics

DEADLINE = 1000.0  # virtual seconds: only ever reached by a deadlock


@dataclass(frozen=True, eq=False)
class Side:
    """One way of taking one lock, as the suite sees it."""

    name: str
    lock: InodeLock | PagecacheLock
    get: Callable[[], Awaitable[None]]
    put: Callable[[], None]
    holders: Callable[[], int]  # acquisitions held, nested ones included
    waiting: Callable[[], int]  # tasks queued for this side
    shared: bool  # many tasks may hold it at once
    nestable: bool  # a holder may take it again

    def __repr__(self) -> str:
        return f"<Side {self.name}>"


def inode_sides(lock: InodeLock) -> dict[str, Side]:
    return {
        "shared": Side(
            "inode-shared",
            lock,
            lock.acquire_shared,
            lock.release_shared,
            lambda: lock.statistics().readers,
            lambda: lock.statistics().waiting_readers,
            shared=True,
            nestable=True,
        ),
        "exclusive": Side(
            "inode-exclusive",
            lock,
            lock.acquire_exclusive,
            lock.release_exclusive,
            lambda: int(lock.statistics().writer is not None),
            lambda: lock.statistics().waiting_writers,
            shared=False,
            nestable=False,
        ),
    }


def pagecache_sides(lock: PagecacheLock) -> dict[str, Side]:
    return {
        "add": Side(
            "pagecache-add",
            lock,
            lock.add_get,
            lock.add_put,
            lambda: lock.statistics().add_holders,
            lambda: lock.statistics().add_waiting,
            shared=True,
            nestable=True,
        ),
        "block": Side(
            "pagecache-block",
            lock,
            lock.block_get,
            lock.block_put,
            lambda: lock.statistics().block_holders,
            lambda: lock.statistics().block_waiting,
            shared=True,
            nestable=True,
        ),
    }


def make_sides(kind: str) -> dict[str, Side]:
    return inode_sides(InodeLock()) if kind == "inode" else pagecache_sides(PagecacheLock())


SIDES = ["inode:shared", "inode:exclusive", "pagecache:add", "pagecache:block"]
# (mine, other): each side with the side it conflicts with.  An exclusive side
# conflicts with itself too.
PAIRS = [
    "inode:shared/exclusive",
    "inode:exclusive/shared",
    "inode:exclusive/exclusive",
    "pagecache:add/block",
    "pagecache:block/add",
]


@pytest.fixture(params=SIDES)
def side(request: pytest.FixtureRequest) -> Side:
    kind, name = str(request.param).split(":")
    return make_sides(kind)[name]


@pytest.fixture(params=PAIRS)
def pair(request: pytest.FixtureRequest) -> tuple[Side, Side]:
    kind, names = str(request.param).split(":")
    mine, other = names.split("/")
    sides = make_sides(kind)
    return sides[mine], sides[other]


def same_side(a: Side, b: Side) -> bool:
    return a.name == b.name


def total_waiting(lock: InodeLock | PagecacheLock) -> int:
    if isinstance(lock, InodeLock):
        st = lock.statistics()
        return st.waiting_readers + st.waiting_writers
    pst = lock.statistics()
    return pst.add_waiting + pst.block_waiting


def total_holders(lock: InodeLock | PagecacheLock) -> int:
    if isinstance(lock, InodeLock):
        st = lock.statistics()
        return st.readers + (st.writer is not None)
    pst = lock.statistics()
    return pst.add_holders + pst.block_holders


def assert_idle(lock: InodeLock | PagecacheLock) -> None:
    assert total_holders(lock) == 0, lock
    assert total_waiting(lock) == 0, lock


class Holder:
    """A task that takes one side, logs the moment, and holds it until `release` is set.

    Only the acquire runs inside `scope`, so cancelling it tests cancellation of
    a waiter and nothing else.
    """

    def __init__(self, side: Side, name: str, log: list[str] | None = None) -> None:
        self.side = side
        self.name = name
        self.log = log if log is not None else []
        self.scope = trio.CancelScope()
        self.release = trio.Event()
        self._acquired = False
        self._cancelled = False
        self._released = False

    def __repr__(self) -> str:
        return f"<Holder {self.name} {self.side.name}>"

    # Methods, not attributes: mypy would narrow an attribute across the awaits
    # that change it.
    def acquired(self) -> bool:
        return self._acquired

    def cancelled(self) -> bool:
        return self._cancelled

    def released(self) -> bool:
        return self._released

    async def run(self, seq: Sequencer | None = None, position: int = 0) -> None:
        if seq is not None:
            # Arrival order: nothing yields between leaving the sequence point and
            # queueing on the lock (the acquire checkpoints only after that).
            async with seq(position):
                pass
        with self.scope:
            await self.side.get()
        if self.scope.cancelled_caught:
            self._cancelled = True
            return
        self._acquired = True
        self.log.append(self.name)
        await self.release.wait()
        self.side.put()
        self._released = True


async def arrive(nursery: trio.Nursery, side: Side, name: str, log: list[str]) -> Holder:
    """Start a holder and let it run until it holds the side or waits for it."""
    holder = Holder(side, name, log)
    nursery.start_soon(holder.run)
    await wait_all_tasks_blocked()
    return holder


async def let_go(holder: Holder) -> None:
    holder.release.set()
    await wait_all_tasks_blocked()
    assert holder.released()


# exclusion:


async def test_sides_never_overlap(pair: tuple[Side, Side], autojump_clock: object) -> None:
    """Random holders of both sides: never both at once, never two on an exclusive side."""
    mine, other = pair
    inside = {mine.name: 0, other.name: 0}
    most = {mine.name: 0, other.name: 0}
    rng = random.Random(1234)

    async def worker(plan: list[tuple[Side, float, float]]) -> None:
        for s, before, held in plan:
            await trio.sleep(before)
            await s.get()
            inside[s.name] += 1
            most[s.name] = max(most[s.name], inside[s.name])
            for name, n in inside.items():
                if name != s.name:
                    assert n == 0, f"{s.name} and {name} held at once"
            if not s.shared:
                assert inside[s.name] == 1, f"{s.name} held twice"
            await trio.sleep(held)
            inside[s.name] -= 1
            s.put()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(12):
                plan: list[tuple[Side, float, float]] = [
                    (rng.choice(pair), rng.choice((0, 0.5, 1, 2)), rng.choice((0, 1, 3)))
                    for _ in range(10)
                ]
                nursery.start_soon(worker, plan)
    for s in pair:
        assert most[s.name] >= 1
        if s.shared:
            assert most[s.name] > 1, "the test never overlapped holders of a shared side"
    assert_idle(mine.lock)


async def test_conflicting_side_waits_for_the_holder(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    mine, other = pair
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            a = await arrive(nursery, mine, "a", log)
            b = await arrive(nursery, other, "b", log)
            assert a.acquired()
            assert not b.acquired()
            assert other.waiting() == 1
            await let_go(a)
            assert b.acquired()
            assert other.waiting() == 0
            assert mine.holders() == (1 if same_side(mine, other) else 0)
            await let_go(b)
    assert log == ["a", "b"]
    assert_idle(mine.lock)


async def test_holders_of_one_side(side: Side, autojump_clock: object) -> None:
    """Many holders at once on a shared side; exactly one, the others queued, otherwise."""
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            holders = [await arrive(nursery, side, f"t{i}", log) for i in range(5)]
            if side.shared:
                assert all(h.acquired() for h in holders)
                assert side.holders() == 5
                assert side.waiting() == 0
            else:
                assert [h.acquired() for h in holders] == [True] + [False] * 4
                assert side.holders() == 1
                assert side.waiting() == 4
            for h in holders:
                await let_go(h)
    assert log == [f"t{i}" for i in range(5)]
    assert_idle(side.lock)


async def test_inode_writer_excludes_readers_and_writers(autojump_clock: object) -> None:
    lock = InodeLock()
    sides = inode_sides(lock)
    shared, exclusive = sides["shared"], sides["exclusive"]
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            w1 = await arrive(nursery, exclusive, "w1", log)
            r1 = await arrive(nursery, shared, "r1", log)
            w2 = await arrive(nursery, exclusive, "w2", log)
            r2 = await arrive(nursery, shared, "r2", log)
            assert log == ["w1"]
            st = lock.statistics()
            assert isinstance(st.writer, trio.lowlevel.Task)
            assert (st.readers, st.waiting_readers, st.waiting_writers) == (0, 2, 1)
            await let_go(w1)
            assert log == ["w1", "r1"]  # r2 is behind w2
            await let_go(r1)
            assert log == ["w1", "r1", "w2"]
            await let_go(w2)
            await let_go(r2)
    assert log == ["w1", "r1", "w2", "r2"]
    assert_idle(shared.lock)


# fairness:


async def test_waiter_for_the_other_side_blocks_later_arrivals(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    """Arrivals a(mine, gets in), b(other), c(mine), d(mine), e(other), f(mine):
    c waits behind b although mine is held; c and d are admitted as one batch;
    f waits behind e."""
    mine, other = pair
    log: list[str] = []
    seq = Sequencer()
    plan = [("a", mine), ("b", other), ("c", mine), ("d", mine), ("e", other), ("f", mine)]
    holders = {name: Holder(s, name, log) for name, s in plan}
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for position, (name, _) in enumerate(plan):
                nursery.start_soon(holders[name].run, seq, position)
            await wait_all_tasks_blocked()
            assert log == ["a"]
            assert total_waiting(mine.lock) == 5
            await let_go(holders["a"])
            assert log == ["a", "b"]  # c, d and f stay queued although b is "other"
            await let_go(holders["b"])
            if mine.shared:
                # The batch at the head, together (trio runs the two in either order).
                assert log[:2] == ["a", "b"]
                assert sorted(log[2:]) == ["c", "d"]
                assert mine.holders() == 2
                await let_go(holders["c"])
                await let_go(holders["d"])
            else:
                assert log == ["a", "b", "c"]
                await let_go(holders["c"])
                assert log == ["a", "b", "c", "d"]
                await let_go(holders["d"])
            assert log[4:] == ["e"]  # f is behind e
            await let_go(holders["e"])
            await let_go(holders["f"])
    assert log[4:] == ["e", "f"]
    assert_idle(mine.lock)


async def test_batch_at_the_head_is_admitted_together(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    """Granted in the releasing task itself, before anything else runs."""
    mine, other = pair
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await other.get()
            waiters = [await arrive(nursery, mine, f"w{i}", log) for i in range(4)]
            late = await arrive(nursery, other, "late", log)
            assert total_waiting(mine.lock) == 5
            with assert_no_checkpoints():
                other.put()
                granted = 4 if mine.shared else 1
                assert mine.holders() == granted
                assert total_waiting(mine.lock) == 5 - granted
            await wait_all_tasks_blocked()
            # Admitted together: trio runs them in any order.
            assert sorted(log) == [w.name for w in waiters[:granted]]
            for w in waiters:
                await let_go(w)
            await let_go(late)
    assert sorted(log[:4]) == ["w0", "w1", "w2", "w3"]
    assert log[4] == "late"
    assert_idle(mine.lock)


async def test_stream_of_holders_cannot_starve_the_other_side(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    """A holder of `mine` arrives every second and holds for 2.5 s (on a shared side
    they overlap, so the side is never free); `other` arrives at 5.5 s.  It gets in
    before any holder that arrived after it, i.e. within a bounded time."""
    mine, other = pair
    arrived_after_other: list[int] = []
    got_in: list[str] = []
    other_waits_since = trio.Event()
    other_in = trio.Event()
    t0 = trio.current_time()

    async def stream_holder(i: int) -> None:
        late = other_waits_since.is_set()
        await mine.get()
        got_in.append(f"m{i}")
        if late and not other_in.is_set():
            arrived_after_other.append(i)
        await trio.sleep(2.5)
        mine.put()

    async def other_task() -> None:
        await trio.sleep(5.5)
        other_waits_since.set()
        await other.get()
        other_in.set()
        got_in.append("other")
        await trio.sleep(1)
        other.put()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            for i in range(20):
                nursery.start_soon(stream_holder, i)
                await trio.sleep(1)
    assert arrived_after_other == []
    # "other" arrived at 5.5 behind at most the holders that arrived before it.
    assert got_in.index("other") <= 6
    if mine.shared and not same_side(mine, other):
        # m5 got in at 5.0 and holds until 7.5: that is when "other" gets in.
        assert got_in[: got_in.index("other")] == [f"m{i}" for i in range(6)]
    assert trio.current_time() - t0 < 60
    assert_idle(mine.lock)


# checkpoints and cancellation:


async def test_every_acquire_is_a_checkpoint(side: Side) -> None:
    with assert_checkpoints():
        await side.get()
    if side.nestable:
        with assert_checkpoints():
            await side.get()
        with assert_no_checkpoints():
            side.put()
    with assert_no_checkpoints():
        side.put()
    assert_idle(side.lock)


async def test_acquire_in_a_cancelled_scope_takes_nothing(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    mine, other = pair
    with trio.CancelScope() as scope:
        scope.cancel()
        await mine.get()  # uncontended: still raises Cancelled
    assert scope.cancelled_caught
    assert_idle(mine.lock)
    await other.get()
    with trio.CancelScope() as scope:
        scope.cancel()
        await mine.get()  # contended
    assert scope.cancelled_caught
    assert mine.waiting() == 0
    other.put()
    assert_idle(mine.lock)


async def test_cancelled_waiter_leaves_nothing_behind(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    mine, other = pair
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            a = await arrive(nursery, other, "a", log)
            b = await arrive(nursery, mine, "b", log)
            c = await arrive(nursery, mine, "c", log)
            assert total_waiting(mine.lock) == 2
            b.scope.cancel()
            await wait_all_tasks_blocked()
            assert b.cancelled()
            assert not b.acquired()
            assert total_waiting(mine.lock) == 1
            await let_go(a)
            assert c.acquired()  # the next waiter gets the lock
            await let_go(c)
    assert log == ["a", "c"]
    assert_idle(mine.lock)


async def test_cancelled_head_waiter_lets_compatible_waiters_in(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    """a holds mine, b waits for other, c waits for mine behind b.  When b is
    cancelled, c is compatible with a and must get in at once — not when a leaves."""
    mine, other = pair
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            a = await arrive(nursery, mine, "a", log)
            b = await arrive(nursery, other, "b", log)
            c = await arrive(nursery, mine, "c", log)
            assert log == ["a"]
            b.scope.cancel()
            await wait_all_tasks_blocked()
            assert b.cancelled()
            assert c.acquired() == mine.shared
            assert total_waiting(mine.lock) == (0 if mine.shared else 1)
            await let_go(a)
            assert c.acquired()
            await let_go(c)
    assert log == ["a", "c"]
    assert_idle(mine.lock)


async def test_waiter_cancelled_as_it_is_granted_hands_the_grant_back(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    """The cancel reaches b first (b is rescheduled with Cancelled but still
    queued), then the holder leaves and grants b in the same instant: b must hand
    the grant back and c, behind it, must get the lock."""
    mine, other = pair
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await other.get()
            b = await arrive(nursery, mine, "b", log)
            c = await arrive(nursery, mine, "c", log)
            with assert_no_checkpoints():
                b.scope.cancel()
                other.put()
            # b was granted (with c if the side is shared) ...
            assert mine.holders() == (2 if mine.shared else 1)
            await wait_all_tasks_blocked()
            # ... and handed it back on seeing the cancellation.
            assert b.cancelled()
            assert not b.acquired()
            assert c.acquired()
            assert mine.holders() == 1
            assert total_waiting(mine.lock) == 0
            await let_go(c)
    assert log == ["c"]
    assert_idle(mine.lock)


# misuse:


async def test_asking_for_the_other_side_while_holding_raises(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    mine, other = pair
    with trio.fail_after(DEADLINE):
        await mine.get()
        with pytest.raises(RuntimeError):
            await other.get()
        assert mine.holders() == 1
        assert total_waiting(mine.lock) == 0
        async with trio.open_nursery() as nursery:
            # Still raises (rather than queueing) with a waiter for the other side.
            waiter = await arrive(nursery, other, "waiter", [])
            with pytest.raises(RuntimeError):
                await other.get()
            assert total_waiting(mine.lock) == 1
            mine.put()
            await wait_all_tasks_blocked()
            assert waiter.acquired()
            await let_go(waiter)
    assert_idle(mine.lock)


async def test_nested_acquire_does_not_queue_behind_a_waiter(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    mine, other = pair
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await mine.get()
            waiter = await arrive(nursery, other, "waiter", log)
            if not mine.nestable:
                with pytest.raises(RuntimeError):
                    await mine.get()
                assert mine.holders() == 1
            else:
                await mine.get()  # must not wait for "waiter", which waits for us
                await mine.get()
                assert mine.holders() == 3
                mine.put()
                mine.put()
            assert total_waiting(mine.lock) == 1
            assert log == []
            mine.put()
            await wait_all_tasks_blocked()
            assert waiter.acquired()
            await let_go(waiter)
    assert_idle(mine.lock)


async def test_releasing_what_you_do_not_hold_raises(
    pair: tuple[Side, Side], autojump_clock: object
) -> None:
    mine, other = pair
    with pytest.raises(RuntimeError):
        mine.put()
    await mine.get()
    if not same_side(mine, other):
        with pytest.raises(RuntimeError):
            other.put()
    async with trio.open_nursery() as nursery:
        # Another task can't release our hold.
        nursery.start_soon(_put_expecting_runtime_error, mine)
    assert mine.holders() == 1
    mine.put()
    with pytest.raises(RuntimeError):
        mine.put()
    assert_idle(mine.lock)


async def _put_expecting_runtime_error(side: Side) -> None:
    with pytest.raises(RuntimeError):
        side.put()


async def test_inode_lock_repr_and_context_managers(autojump_clock: object) -> None:
    lock = InodeLock()
    assert repr(lock) == "<InodeLock unlocked, 0 waiting>"
    async with lock.shared():
        async with lock.shared():
            assert repr(lock) == "<InodeLock read-locked by 2, 0 waiting>"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.acquire_exclusive)
            await wait_all_tasks_blocked()
            assert repr(lock) == "<InodeLock read-locked by 1, 1 waiting>"
            nursery.cancel_scope.cancel()
    assert lock.statistics().writer is None
    async with lock.exclusive():
        assert lock.locked_exclusive
        name = trio.lowlevel.current_task().name
        assert repr(lock) == f"<InodeLock write-locked by {name}, 0 waiting>"
    assert repr(lock) == "<InodeLock unlocked, 0 waiting>"


# the pagecache add lock: add_tryget


def zero_stats(*, enabled: bool = True, **changes: float) -> PagecacheLockStatistics:
    fields: dict[str, float] = {
        "add_holders": 0,
        "block_holders": 0,
        "add_waiting": 0,
        "block_waiting": 0,
        "add_waits": 0,
        "block_waits": 0,
        "add_wait_seconds": 0.0,
        "block_wait_seconds": 0.0,
        "tryget_failures": 0,
    }
    fields.update(changes)
    return PagecacheLockStatistics(enabled=enabled, **fields)  # type: ignore[arg-type]


async def test_add_tryget(autojump_clock: object) -> None:
    lock = PagecacheLock()
    with assert_no_checkpoints():
        assert lock.add_tryget()  # free
        assert lock.add_tryget()  # nested
    assert lock.held_by_current_task() == ADD
    assert lock.statistics() == zero_stats(add_holders=2)
    lock.add_put()
    lock.add_put()
    assert lock.held_by_current_task() == 0

    async def holds(get: Callable[[], Awaitable[None]], put: Callable[[], None]) -> None:
        await get()
        await release.wait()
        put()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            # ADD held by someone else and nobody waiting: joins.
            release = trio.Event()
            nursery.start_soon(holds, lock.add_get, lock.add_put)
            await wait_all_tasks_blocked()
            with assert_no_checkpoints():
                assert lock.add_tryget()
            lock.add_put()
            # ADD held and a BLOCK waiter: gives way.
            nursery.start_soon(holds, lock.block_get, lock.block_put)
            await wait_all_tasks_blocked()
            with assert_no_checkpoints():
                assert not lock.add_tryget()
            assert lock.statistics() == zero_stats(
                add_holders=1, block_waiting=1, block_waits=1, tryget_failures=1
            )
            # BLOCK held: fails.
            release.set()
            await wait_all_tasks_blocked()
            release = trio.Event()
            nursery.start_soon(holds, lock.block_get, lock.block_put)
            await wait_all_tasks_blocked()
            assert lock.statistics().block_holders == 1
            with assert_no_checkpoints():
                assert not lock.add_tryget()
            assert lock.statistics().tryget_failures == 2
            release.set()
    # Free again: succeeds.
    assert lock.add_tryget()
    lock.add_put()
    # Holding BLOCK and trying ADD is the same misuse as add_get.
    await lock.block_get()
    with pytest.raises(RuntimeError):
        lock.add_tryget()
    lock.block_put()
    st = lock.statistics()
    assert (st.add_holders, st.block_holders, st.add_waiting, st.block_waiting) == (0, 0, 0, 0)
    assert st.tryget_failures == 2


# the pagecache add lock: statistics and repr


async def test_statistics_are_exact(autojump_clock: object) -> None:
    lock = PagecacheLock()
    sides = pagecache_sides(lock)
    add, block = sides["add"], sides["block"]
    t0 = trio.current_time()
    log: list[str] = []
    assert lock.statistics() == zero_stats()
    async with trio.open_nursery() as nursery:
        a1 = await arrive(nursery, add, "a1", log)
        a2 = await arrive(nursery, add, "a2", log)  # joins: no wait
        b1 = await arrive(nursery, block, "b1", log)
        a3 = await arrive(nursery, add, "a3", log)
        b2 = await arrive(nursery, block, "b2", log)
        assert lock.statistics() == zero_stats(
            add_holders=2, add_waiting=1, block_waiting=2, add_waits=1, block_waits=2
        )
        assert not lock.add_tryget()
        await trio.sleep(1)
        b2.scope.cancel()  # waited 1 s
        await wait_all_tasks_blocked()
        await trio.sleep(2)
        await let_go(a1)
        await let_go(a2)  # t0+3: b1 gets BLOCK after 3 s
        assert lock.statistics() == zero_stats(
            block_holders=1,
            add_waiting=1,
            add_waits=1,
            block_waits=2,
            block_wait_seconds=4.0,
            tryget_failures=1,
        )
        await trio.sleep(2)
        await let_go(b1)  # t0+5: a3 gets ADD after 5 s
        await let_go(a3)
    assert trio.current_time() - t0 == 5.0
    assert log == ["a1", "a2", "b1", "a3"]
    assert lock.statistics() == zero_stats(
        add_waits=1,
        block_waits=2,
        add_wait_seconds=5.0,
        block_wait_seconds=4.0,
        tryget_failures=1,
    )


async def test_pagecache_lock_repr(autojump_clock: object) -> None:
    lock = PagecacheLock()
    assert repr(lock) == "<PagecacheLock free, 0 waiting>"
    async with lock.add(), lock.add():
        assert repr(lock) == "<PagecacheLock add x2, 0 waiting>"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.block_get)
            await wait_all_tasks_blocked()
            assert repr(lock) == "<PagecacheLock add x2, 1 waiting>"
            nursery.cancel_scope.cancel()
    async with lock.block():
        assert repr(lock) == "<PagecacheLock block x1, 0 waiting>"
    lock.enabled = False
    assert repr(lock) == "<PagecacheLock off, 0 waiting>"


def test_side_constants() -> None:
    assert {ADD, BLOCK} == {1, -1}


# the pagecache add lock: enabled=False


async def test_disabled_lock_grants_everything_and_counts_nothing(
    autojump_clock: object,
) -> None:
    lock = PagecacheLock(enabled=False)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for get, put in [(lock.add_get, lock.add_put), (lock.block_get, lock.block_put)] * 3:
                nursery.start_soon(_hold_for, get, put, 5.0)
            await wait_all_tasks_blocked()
            # Both sides "held" at once, by six tasks: nothing shows.
            assert lock.statistics() == zero_stats(enabled=False)
            with assert_checkpoints():
                await lock.add_get()
            with assert_checkpoints():
                await lock.block_get()  # the other side in the same task: no RuntimeError
            with assert_no_checkpoints():
                assert lock.add_tryget()
            lock.add_put()
            lock.block_put()
            lock.add_put()
    assert lock.statistics() == zero_stats(enabled=False)
    assert lock.held_by_current_task() == 0
    with pytest.raises(RuntimeError):
        lock.add_put()  # never got: still misuse


async def _hold_for(get: Callable[[], Awaitable[None]], put: Callable[[], None], t: float) -> None:
    await get()
    await trio.sleep(t)
    put()


async def test_switching_off_and_on_with_holders(autojump_clock: object) -> None:
    """Gets made while off are not counted and their puts are ignored; holds made
    while on are released normally whatever the switch says by then."""
    lock = PagecacheLock()
    sides = pagecache_sides(lock)
    add, block = sides["add"], sides["block"]
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            tracked = await arrive(nursery, add, "tracked", log)  # ADD, counted
            queued = await arrive(nursery, block, "queued", log)  # waits for BLOCK
            assert lock.statistics().block_waiting == 1
            lock.enabled = False
            untracked = await arrive(nursery, block, "untracked", log)  # at once
            assert untracked.acquired()
            assert lock.statistics() == zero_stats(
                enabled=False, add_holders=1, block_waiting=1, block_waits=1
            )
            lock.enabled = True
            await let_go(untracked)  # ignored
            assert lock.statistics() == zero_stats(add_holders=1, block_waiting=1, block_waits=1)
            await let_go(tracked)  # counted: hands over to the queued waiter
            assert queued.acquired()
            assert lock.statistics().block_holders == 1
            lock.enabled = False
            await let_go(queued)  # a hold made while on is released while off
            lock.enabled = True
    assert lock.statistics() == zero_stats(block_waits=1)
    assert log == ["tracked", "untracked", "queued"]


async def test_puts_of_gets_made_while_off_are_ignored_per_side(
    autojump_clock: object,
) -> None:
    """A task holds ADD from while the lock was off; after it is switched on the
    task takes BLOCK (the lock cannot know of the ADD) and lets both go: the
    BLOCK put must release BLOCK, the ADD put must be the ignored one."""
    lock = PagecacheLock(enabled=False)
    await lock.add_get()
    lock.enabled = True
    await lock.block_get()
    assert lock.statistics().block_holders == 1
    lock.block_put()
    assert lock.statistics().block_holders == 0
    lock.add_put()
    assert lock.statistics() == zero_stats()
    # The lock is usable by others afterwards.
    await lock.add_get()
    lock.add_put()
    assert lock.statistics() == zero_stats()


async def test_grant_handed_back_by_a_task_with_an_untracked_hold(
    autojump_clock: object,
) -> None:
    """A task holding ADD from while the lock was off asks for ADD again after it
    is switched on, waits behind a BLOCK holder and is cancelled as it is granted:
    the grant it hands back is the tracked one, not its untracked hold."""
    lock = PagecacheLock(enabled=False)
    scope = trio.CancelScope()
    seq = Sequencer()

    async def nested_reader() -> None:
        async with seq(0):
            await lock.add_get()  # untracked
            lock.enabled = True
        async with seq(2):
            pass
        with scope:
            await lock.add_get()  # tracked: waits for BLOCK
        assert scope.cancelled_caught
        lock.add_put()  # the untracked hold: ignored

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nested_reader)
            async with seq(1):
                await lock.block_get()  # the lock knows of no ADD holder
            await wait_all_tasks_blocked()
            assert lock.statistics() == zero_stats(block_holders=1, add_waiting=1, add_waits=1)
            with assert_no_checkpoints():
                scope.cancel()
                lock.block_put()
    assert lock.statistics() == zero_stats(add_waits=1)
    # Nothing leaked: BLOCK is free for the taking.
    with assert_no_checkpoints():
        assert lock.add_tryget()
    lock.add_put()
    with trio.fail_after(1):
        await lock.block_get()
    lock.block_put()
