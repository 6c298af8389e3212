"""Per-inode locks.

`InodeLock` is the kernel's ``i_rwsem`` for one inode: shared for paths that
read the mapping and must keep it from being freed underneath them (direct
read), exclusive for paths that change the size or the mapping (write,
truncate, fallocate).

It is fair: waiters are served in arrival order, and a reader that arrives
while a writer waits queues behind that writer, so a stream of readers cannot
starve a writer and vice versa.  Consecutive readers at the head of the queue
are admitted together.  A reader may take the lock again without queueing (a
writer may not); a reader asking to become a writer would wait for itself, so
that raises `RuntimeError`.

Every acquire is a trio checkpoint on every path: `checkpoint_if_cancelled()`
first, then either park or `cancel_shielded_checkpoint()`.  A task cancelled
while parked leaves the queue as if it had never arrived; if it was granted the
lock in the same instant it was cancelled, the grant is handed back before the
cancellation propagates, so nothing leaks.

Lock order: inode lock → pagecache lock → page.  Two inodes: by inode number.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import final

import trio


@dataclass(frozen=True, slots=True)
class InodeLockStatistics:
    readers: int
    writer: trio.lowlevel.Task | None
    waiting_readers: int
    waiting_writers: int


@final
class _Waiter:
    __slots__ = ("event", "exclusive", "granted", "task")

    def __init__(self, exclusive: bool, task: trio.lowlevel.Task) -> None:
        self.exclusive = exclusive
        self.task = task
        self.granted = False
        self.event = trio.Event()


@final
class InodeLock:
    """A fair reader/writer lock (the kernel's i_rwsem)."""

    def __init__(self) -> None:
        self._readers: dict[trio.lowlevel.Task, int] = {}
        self._writer: trio.lowlevel.Task | None = None
        # Created by the first waiter, dropped when the last leaves: most
        # inodes' locks never see one, and an empty deque costs 760 bytes.
        self._queue: deque[_Waiter] | None = None

    def __repr__(self) -> str:
        if self._writer is not None:
            state = f"write-locked by {self._writer.name}"
        elif self._readers:
            state = f"read-locked by {sum(self._readers.values())}"
        else:
            state = "unlocked"
        return f"<InodeLock {state}, {len(self._queue or ())} waiting>"

    def statistics(self) -> InodeLockStatistics:
        return InodeLockStatistics(
            readers=sum(self._readers.values()),
            writer=self._writer,
            waiting_readers=sum(1 for w in self._queue or () if not w.exclusive),
            waiting_writers=sum(1 for w in self._queue or () if w.exclusive),
        )

    @property
    def locked_exclusive(self) -> bool:
        return self._writer is not None

    def _can_grant(self, exclusive: bool) -> bool:
        if exclusive:
            return self._writer is None and not self._readers
        return self._writer is None

    def _grant(self, exclusive: bool, task: trio.lowlevel.Task) -> None:
        if exclusive:
            self._writer = task
        else:
            self._readers[task] = self._readers.get(task, 0) + 1

    async def _acquire(self, exclusive: bool) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        if self._writer is task:
            raise RuntimeError("InodeLock: task already holds this lock exclusively")
        if exclusive and task in self._readers:
            # Waiting for ourselves to leave would never end.
            raise RuntimeError("InodeLock: can't upgrade a shared hold to exclusive")
        if not exclusive and task in self._readers:
            # A nested shared acquire must not queue behind a writer that waits
            # for this very task: admit it (no writer holds: we do).
            self._grant(False, task)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if not self._queue and self._can_grant(exclusive):
            self._grant(exclusive, task)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(exclusive, task)
        if self._queue is None:
            self._queue = deque()
        self._queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release(exclusive, task)
            else:
                assert self._queue is not None
                self._queue.remove(waiter)
                self._wake()
            raise

    def _release(self, exclusive: bool, task: trio.lowlevel.Task) -> None:
        if exclusive:
            if self._writer is not task:
                raise RuntimeError("InodeLock: can't release a write lock you don't own")
            self._writer = None
        else:
            count = self._readers.get(task, 0)
            if count == 0:
                raise RuntimeError("InodeLock: can't release a read lock you don't hold")
            if count == 1:
                del self._readers[task]
            else:
                self._readers[task] = count - 1
        self._wake()

    def _wake(self) -> None:
        while self._queue and self._can_grant(self._queue[0].exclusive):
            waiter = self._queue.popleft()
            self._grant(waiter.exclusive, waiter.task)
            waiter.granted = True
            waiter.event.set()
            if waiter.exclusive:
                break
        if not self._queue:
            self._queue = None

    async def acquire_shared(self) -> None:
        await self._acquire(False)

    async def acquire_exclusive(self) -> None:
        await self._acquire(True)

    def idle(self) -> bool:
        """Nobody holds or waits for it: a task that takes it next takes it
        without a yield before the grant, so dropping it now is safe."""
        return self._writer is None and not self._readers and not self._queue

    def acquire_exclusive_nowait(self) -> bool:
        """Take the write lock if nobody holds or waits for it (trio's
        ``acquire_nowait``): no checkpoint, no queueing.  For hot paths that
        checkpoint elsewhere; on False they fall back to `acquire_exclusive`."""
        task = trio.lowlevel.current_task()
        if self._writer is task:
            raise RuntimeError("InodeLock: task already holds this lock exclusively")
        if self._queue or not self._can_grant(True):
            return False
        self._grant(True, task)
        return True

    def release_shared(self) -> None:
        self._release(False, trio.lowlevel.current_task())

    def release_exclusive(self) -> None:
        self._release(True, trio.lowlevel.current_task())

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        await self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


# pagecache add lock:

ADD = 1
BLOCK = -1
_SIDE_NAMES = {ADD: "add", BLOCK: "block"}


@dataclass(frozen=True, slots=True)
class PagecacheLockStatistics:
    enabled: bool
    add_holders: int
    block_holders: int
    add_waiting: int
    block_waiting: int
    add_waits: int
    block_waits: int
    add_wait_seconds: float
    block_wait_seconds: float
    tryget_failures: int


@final
class _SideWaiter:
    __slots__ = ("event", "granted", "side", "since", "task")

    def __init__(self, side: int, task: trio.lowlevel.Task) -> None:
        self.side = side
        self.task = task
        self.granted = False
        self.event = trio.Event()
        self.since = trio.current_time()


@final
class PagecacheLock:
    """The pagecache add lock: two sides, ADD and BLOCK, each shared, never together.

    After bcachefs ``two_state_shared_lock.h``: whatever may put pages into the
    page cache holds ADD (buffered read, readahead, buffered write); whatever
    must remove pages and *keep them removed* while it changes the mapping
    underneath holds BLOCK (direct write, truncate, fallocate).  Many tasks may
    hold one side at once; the two sides never overlap.

    Fair where the kernel's is not: waiters queue in arrival order, and once a
    task waits for one side, later arrivals for the other side — and for the
    side now held — queue behind it; when the holders drain, the head of the
    queue and every waiter for the same side directly behind it are admitted
    together.  So a stream of readers cannot starve truncate, and a stream of
    direct writes cannot starve readers.

    A task that holds one side and asks for the other on the same lock would
    wait for itself forever: that raises `RuntimeError` instead.  A task that
    holds a side may take the same side again (nested), without queueing.

    `add_tryget` is for readahead: it succeeds only when ADD could be had
    without waiting and nobody waits for BLOCK — speculative work gives way.

    ``enabled = False`` turns the lock into a no-op (every get succeeds at
    once).  It exists only to demonstrate the races the lock closes.  Gets
    made while it is off are remembered per task and side, uncounted, and the
    matching puts are ignored even if it was switched on in between; holds
    taken while it was on are released normally whatever the switch says.
    Statistics therefore show only tracked holders.

    A waiter cancelled at the head of the queue lets the waiters behind it in
    at once if they want the side now held; one cancelled in the instant it is
    granted hands the grant back before the cancellation propagates.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._side = 0  # ADD, BLOCK, or 0 when free
        self._count = 0  # holders of self._side
        self._holders: dict[trio.lowlevel.Task, tuple[int, int]] = {}
        # The queue and the wait counters are created by the first waiter (and
        # the queue dropped when the last leaves): most inodes' locks never see one.
        self._queue: deque[_SideWaiter] | None = None
        self._waits: dict[int, int] | None = None
        self._wait_time: dict[int, float] | None = None
        self._tryget_failures = 0
        # Gets granted while the lock was off, per task and side: their puts must
        # not touch the counters even if the lock was switched on in between.
        self._untracked: dict[tuple[trio.lowlevel.Task, int], int] = {}

    def __repr__(self) -> str:
        if not self.enabled:
            state = "off"
        elif self._count:
            state = f"{_SIDE_NAMES[self._side]} x{self._count}"
        else:
            state = "free"
        return f"<PagecacheLock {state}, {len(self._queue or ())} waiting>"

    def statistics(self) -> PagecacheLockStatistics:
        waits = self._waits or {}
        wait_time = self._wait_time or {}
        return PagecacheLockStatistics(
            enabled=self.enabled,
            add_holders=self._count if self._side == ADD else 0,
            block_holders=self._count if self._side == BLOCK else 0,
            add_waiting=sum(1 for w in self._queue or () if w.side == ADD),
            block_waiting=sum(1 for w in self._queue or () if w.side == BLOCK),
            add_waits=waits.get(ADD, 0),
            block_waits=waits.get(BLOCK, 0),
            add_wait_seconds=wait_time.get(ADD, 0.0),
            block_wait_seconds=wait_time.get(BLOCK, 0.0),
            tryget_failures=self._tryget_failures,
        )

    def idle(self) -> bool:
        """Nobody holds it (tracked or not) or waits for it."""
        return self._count == 0 and not self._queue and not self._holders and not self._untracked

    def held_by_current_task(self) -> int:
        """ADD, BLOCK or 0: the side the current task holds."""
        held = self._holders.get(trio.lowlevel.current_task())
        return held[0] if held else 0

    def _take(self, side: int, task: trio.lowlevel.Task) -> None:
        self._side = side
        self._count += 1
        held = self._holders.get(task)
        self._holders[task] = (side, held[1] + 1 if held else 1)

    def _check_other_side(self, side: int, task: trio.lowlevel.Task) -> tuple[int, int] | None:
        held = self._holders.get(task)
        if held is not None and held[0] != side:
            raise RuntimeError(
                f"PagecacheLock: task {task.name} holds {_SIDE_NAMES[held[0]]} and asked for "
                f"{_SIDE_NAMES[side]}: that would deadlock"
            )
        return held

    def _get_nowait(self, side: int, task: trio.lowlevel.Task) -> bool:
        if self._check_other_side(side, task) is not None:
            self._take(side, task)  # nested: never queue behind a waiter for the other side
            return True
        if not self._queue and (self._count == 0 or self._side == side):
            self._take(side, task)
            return True
        return False

    async def _get(self, side: int) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        if not self.enabled:
            self._untracked[task, side] = self._untracked.get((task, side), 0) + 1
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._get_nowait(side, task):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _SideWaiter(side, task)
        if self._queue is None:
            self._queue = deque()
        if self._waits is None or self._wait_time is None:
            self._waits = {ADD: 0, BLOCK: 0}
            self._wait_time = {ADD: 0.0, BLOCK: 0.0}
        self._queue.append(waiter)
        self._waits[side] += 1
        wait_time = self._wait_time
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._put(side, task)
            else:
                assert self._queue is not None
                self._queue.remove(waiter)
                self._wake()
            raise
        finally:
            wait_time[side] += trio.current_time() - waiter.since

    def _put(self, side: int, task: trio.lowlevel.Task) -> None:
        untracked = self._untracked.get((task, side), 0)
        if untracked:
            if untracked == 1:
                del self._untracked[task, side]
            else:
                self._untracked[task, side] = untracked - 1
            return
        held = self._holders.get(task)
        if held is None or held[0] != side:
            raise RuntimeError(
                f"PagecacheLock: can't release the {_SIDE_NAMES[side]} side you don't hold"
            )
        if held[1] == 1:
            del self._holders[task]
        else:
            self._holders[task] = (side, held[1] - 1)
        self._count -= 1
        if self._count == 0:
            self._side = 0
            self._wake()

    def _wake(self) -> None:
        # Admit the head of the queue and every waiter for the same side behind it:
        # when the lock is free, or when a cancelled waiter for the other side
        # left the head and uncovered waiters for the side that holds it.
        if not self._queue:
            return
        side = self._queue[0].side
        if self._count and self._side != side:
            return
        while self._queue and self._queue[0].side == side:
            waiter = self._queue.popleft()
            self._take(side, waiter.task)
            waiter.granted = True
            waiter.event.set()
        if not self._queue:
            self._queue = None

    # the bcachefs names:

    async def add_get(self) -> None:
        await self._get(ADD)

    def add_put(self) -> None:
        self._put(ADD, trio.lowlevel.current_task())

    def add_tryget(self) -> bool:
        """Take ADD only if that needs no wait and no BLOCK holder waits; no checkpoint."""
        task = trio.lowlevel.current_task()
        if not self.enabled:
            self._untracked[task, ADD] = self._untracked.get((task, ADD), 0) + 1
            return True
        if any(w.side == BLOCK for w in self._queue or ()):
            self._tryget_failures += 1
            return False
        if self._get_nowait(ADD, task):
            return True
        self._tryget_failures += 1
        return False

    def add_get_nowait(self) -> bool:
        """Take ADD if that needs no wait (trio's ``acquire_nowait``); no checkpoint.

        For callers that have just passed a checkpoint (taking the inode lock)
        and want to spare a second scheduler round trip; on False they fall
        back to `add_get`.  Fairness holds: it fails when anyone waits.
        """
        task = trio.lowlevel.current_task()
        if not self.enabled:
            self._untracked[task, ADD] = self._untracked.get((task, ADD), 0) + 1
            return True
        return self._get_nowait(ADD, task)

    async def block_get(self) -> None:
        await self._get(BLOCK)

    def block_put(self) -> None:
        self._put(BLOCK, trio.lowlevel.current_task())

    @asynccontextmanager
    async def add(self) -> AsyncIterator[None]:
        await self.add_get()
        try:
            yield
        finally:
            self.add_put()

    @asynccontextmanager
    async def block(self) -> AsyncIterator[None]:
        await self.block_get()
        try:
            yield
        finally:
            self.block_put()
