"""ENOSPC only when space is really gone: commit to reclaim deferred frees.

A block freed by unlink, truncate, punch or collapse stays unusable until the
commit that frees it is durable (DESIGN §6, `fusefs.alloc`): the last durable
checkpoint still maps it.  So right after ``rm`` of a large file on a full
filesystem, the allocator has no free block although the space is as good as
free -- it only waits for a commit, which the periodic commit gives some seconds
later.  btrfs has the same shape (pinned extents, released at transaction
commit) and the same answer: a reservation or allocation that fails while space
is pinned commits the transaction and tries once more.

`Reclaimer.reclaim` is that step, for every path that can run out of space:

* buffered writes, whose pages over holes take a reservation (`io.buffered`);
* writeback of a page over a hole that holds no reservation (`io.writeback`);
* direct writes (`io.direct`) and fallocate's allocate and zero modes
  (`io.fallocate`), through `Reclaimer.allocate`.

Nothing else takes blocks: namespace operations, truncate (up or down), punch,
collapse and insert change the metadata only, and the checkpoint's own blocks
come from the committer's standing reservation.

Policy.  A caller that got `NoSpace` asks `reclaim`; it answers at once with
False -- give the caller its ENOSPC -- when no freed block waits for a commit
(`Allocator.reclaim_sequence` is None), when the filesystem is read-only, or when
the ``nospace_commit_retry`` fault site fires.  Otherwise it returns True once
the commit that releases every block freed before the failure is durable, and
the caller tries **once** more: a second `NoSpace` is the caller's ENOSPC.  A
real ENOSPC therefore costs at most one commit, and none when nothing is
deferred, never a loop.  A commit that fails turns the filesystem read-only and
its `IOFailure` (EIO) reaches the task that ran it; tasks waiting for it see a
read-only filesystem and get their ENOSPC.

Sharing.  Tasks that run out of space together share commits: while one
reclaim commit runs, the others wait for it rather than queue commits of their
own.  A waiter whose frees that commit does not release (they came after it
began) starts, or waits for, the next one -- so a task waits for at most two
commits.  Any commit counts, the periodic one or an fsync's too: a task is done
as soon as `Allocator.durable_sequence` reaches its target.

Locks.  A task may reclaim while it holds inode locks (either mode), either
side of pagecache locks, and pages under writeback: a commit takes the
committer lock alone and waits for nothing but device IO -- no inode lock, no
pagecache lock, no page, no writeback -- so no task can hold something that the
commit waits for, and a task waiting for another's reclaim commit waits for that
commit only.  The one thing a reclaiming task must not hold is the committer
lock itself: nothing may reclaim from inside a commit (a commit that wrote back
dirty pages before its snapshot would break that rule: it would wait for
itself).  docs/concurrency.md has the rule with the other lock rules.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import final

import trio

from fusefs.alloc import Allocator, Run
from fusefs.errors import NoSpace
from fusefs.faults import dynamic_fault

__all__ = ["ReclaimStatistics", "Reclaimer"]

log = logging.getLogger(__name__)


@final
@dataclass(frozen=True)
class ReclaimStatistics:
    """A snapshot of a `Reclaimer`'s counters."""

    commits: int
    """Commits run because an allocation or reservation ran out of space."""
    retries: int
    """Times a caller was told to try again after the frees it waited for were released."""
    refused: int
    """Times a caller got its ENOSPC at once: nothing deferred, read-only, or the fault site."""
    waiting: int
    """Tasks inside `Reclaimer.reclaim` now."""
    commit_in_flight: bool
    """A reclaim commit is running."""


@final
class Reclaimer:
    """Commits on behalf of tasks that ran out of space, one commit for all of them.

    ``commit`` is the filesystem's commit (`Filesystem.commit`); ``writable`` says
    whether it may run.
    """

    def __init__(
        self,
        alloc: Allocator,
        commit: Callable[[], Awaitable[None]],
        writable: Callable[[], bool],
    ) -> None:
        self._alloc = alloc
        self._commit = commit
        self._writable = writable
        # Set when the reclaim commit in flight ends, however it ends.
        self._in_flight: trio.Event | None = None
        self._waiting = 0
        self._commits = 0
        self._retries = 0
        self._refused = 0

    def statistics(self) -> ReclaimStatistics:
        return ReclaimStatistics(
            commits=self._commits,
            retries=self._retries,
            refused=self._refused,
            waiting=self._waiting,
            commit_in_flight=self._in_flight is not None,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        state = "committing" if s.commit_in_flight else "idle"
        return f"<Reclaimer {state}, {s.waiting} waiting, commits={s.commits}>"

    async def reclaim(self) -> bool:
        """After `NoSpace`: make every block freed so far reusable, committing if need be.

        True when the caller should try once more; False when no commit can help
        and the caller's `NoSpace` stands.  Raises the commit's `IOFailure` if the
        commit this task ran failed (the filesystem is read-only then).
        """
        target = self._alloc.reclaim_sequence()
        if target is None or not self._writable():
            self._refused += 1
            return False
        if dynamic_fault("nospace_commit_retry", cls="error"):
            log.info("reclaim: injected failure, ENOSPC without a commit")
            self._refused += 1
            return False
        self._waiting += 1
        try:
            while self._alloc.durable_sequence < target:
                if not self._writable():
                    self._refused += 1
                    return False
                if self._in_flight is not None:
                    # One commit for everyone: wait for the one running, then look
                    # again (it may have begun before this task's frees).
                    await self._in_flight.wait()
                    continue
                done = self._in_flight = trio.Event()
                try:
                    self._commits += 1
                    # Shielded: other tasks wait for this commit, and a
                    # cancelled one would leave them (and the filesystem's
                    # dirty flag) behind.  It is bounded by device IO.
                    with trio.CancelScope(shield=True):
                        await self._commit()
                finally:
                    self._in_flight = None
                    done.set()
        finally:
            self._waiting -= 1
        self._retries += 1
        return True

    async def allocate(self, n: int, *, hint: int | None = None) -> list[Run]:
        """`Allocator.allocate` without a reservation, reclaiming once on `NoSpace`.

        The caller must be able to take the ``await`` in the middle: whatever it
        looked up before (the holes the blocks are for) must stay true across a
        commit -- as it does under the inode lock and BLOCK with the range's pages
        dropped, or for pages under writeback.
        """
        try:
            return self._alloc.allocate(n, hint=hint)
        except NoSpace:
            if not await self.reclaim():
                raise
        return self._alloc.allocate(n, hint=hint)
