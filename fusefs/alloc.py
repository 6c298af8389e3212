"""Block allocator: free space, reservations, and frees deferred until durable.

Free space is a byte map with one byte per device block, in one of four states:

* ``FREE``: nobody owns the block; it may be handed out.
* ``USED``: allocated (or loaded as used from the checkpoint).
* ``DEFERRED``: freed since the last `commit_begin`; still referenced by the last
  durable checkpoint, so it must not be reused yet.
* ``COMMITTING``: freed before the commit now in flight began; it becomes free when
  that commit is durable (`commit_durable`), or goes back to ``DEFERRED`` if the
  commit fails (`commit_abandoned`).

A byte per block rather than a bit costs 16 MiB for 2**24 blocks (64 GiB at 4 KiB),
and buys what a pure-Python bitmap cannot have: every search runs at C speed.
``map.find(bytes(n), pos)`` finds the first run of *n* free blocks at or after
``pos`` in one call (CPython's two-way/horspool substring search), ``map.find(0,
pos)`` the next free block, a precompiled ``[^\\x00]`` regex the end of a free
run, and ``bytearray.count`` keeps `check` cheap.  The four states also let a
double free be told apart from a free of a block that was never allocated, and
let `check` verify the deferred lists against the map.

Placement is next-fit: a rotating cursor remembers where the last allocation
ended, so sequential allocations are contiguous and freed blocks are not reused
until the cursor comes round again.  An explicit ``hint`` (the block after a
file's previous extent, say) starts the search there instead and leaves the
cursor alone.  A request is served by the first single run that fits, searching
from the start point and wrapping once; only if no free run is long enough does it
take free runs in order from the start point (several runs).  The fragmented path
takes small runs as it finds them rather than the largest ones first: it is
rare, its cost stays proportional to the number of runs returned, and the
trade-off is more fragmentation under pressure.

Accounting.  The first ``first_data`` blocks (superblocks and the like) are
marked ``USED`` in the map so that searches skip them, but they are not counted
anywhere: ``total = device_blocks - first_data`` is the number of allocatable
blocks, and at every moment::

    free + reserved + allocated + deferred == total

where ``free`` is free and *unreserved*, ``reserved`` is promised to
`Reservation` objects (reservations are counts, not tied to particular blocks:
``free + reserved`` blocks are ``FREE`` in the map), ``allocated`` is ``USED`` and
``deferred`` is ``DEFERRED`` plus ``COMMITTING``.  An allocation without a
reservation needs ``free >= n``; one drawn from a reservation cannot fail for
lack of space, since the reserved blocks are still ``FREE`` in the map.

The commit protocol (DESIGN.md §6), as `fusefs.commit` drives it::

    token = alloc.commit_begin()           # } one synchronous step: no await
    snapshot the metadata                  # } between these three, or blocks
    blob = alloc.encode(token)             # } freed/allocated meanwhile leak
    write the checkpoint, flush, flip the superblock, flush
    alloc.commit_durable(token)            # or alloc.commit_abandoned(token)

``encode(token)`` records the free map as it will be once that commit is
durable: the blocks the commit frees (the token's) are free in it; blocks freed
after ``commit_begin`` are still used, because the snapshot still maps them.  One
commit may be in flight at a time.

Commits are numbered from 1 in the order they begin (`CommitToken.sequence`), and
they end in that order, so `durable_sequence` (the last one made durable) says
which frees are reusable: `reclaim_sequence` names the commit whose durability
releases every block freed so far.  That is what a task that ran out of space
waits for (`fusefs.reclaim`), and what ``deferred`` in `statistics` counts.

Errors.  Running out of space raises `NoSpace`; data read from disk that makes
no sense (`decode`, `from_used`, `mark_used`) raises `Corrupt`.  Misuse is a bug
in the caller and raises `RuntimeError` for a wrong state (double free, drawing
more than a reservation holds, a stale commit token) and `ValueError` for a bad
argument (a negative count, a block outside the data area), after trio.

Concurrency.  Every method is synchronous, so each call is atomic with respect
to other trio tasks, and every method validates its arguments before changing
anything, so a call that raises leaves the allocator as it was.  What a caller
must not do is split a check from the action it guards by an ``await``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, final

from fusefs.errors import Corrupt, NoSpace
from fusefs.faults import dynamic_fault

__all__ = [
    "Allocator",
    "AllocatorStatistics",
    "CommitToken",
    "Reservation",
    "Run",
    "place_runs",
]

Run = tuple[int, int]
"""A run of physical blocks: ``(first block, count)``."""


def place_runs(holes: list[tuple[int, int]], runs: list[Run]) -> list[tuple[int, int, int]]:
    """Lay physical ``runs`` (as `Allocator.allocate` returns them) over logical
    ``holes`` (``(lblk, n)``, as `ExtentMap.holes` returns them), block for
    block: the ``(lblk, pblk, n)`` pieces to map.  The runs cover the holes."""
    out: list[tuple[int, int, int]] = []
    ri = 0
    rp, rn = runs[0] if runs else (0, 0)
    for lblk, n in holes:
        while n:
            take = min(n, rn)
            out.append((lblk, rp, take))
            lblk += take
            n -= take
            rp += take
            rn -= take
            if rn == 0 and ri + 1 < len(runs):
                ri += 1
                rp, rn = runs[ri]
    return out


# Block states, one byte each in Allocator._map.
FREE: Final = 0
USED: Final = 1
DEFERRED: Final = 2
COMMITTING: Final = 3

_STATE_NAMES: Final = {
    FREE: "free",
    USED: "in use",
    DEFERRED: "freed (deferred)",
    COMMITTING: "freed (committing)",
}

# The first block not in a given state; for FREE, the end of a free run.
_NOT_STATE: Final = {
    state: re.compile(b"[^" + re.escape(bytes([state])) + b"]")
    for state in (FREE, USED, DEFERRED, COMMITTING)
}
_NOT_FREE: Final = _NOT_STATE[FREE]

# Translation tables from block states to 0 (free) / 1 (used) for encoding.
_ALL_DEFERRED_USED: Final = bytes([0, 1, 1, 1]) + bytes(252)
_COMMITTING_FREE: Final = bytes([0, 1, 1, 0]) + bytes(252)

# encode(): magic, version, width of each number in the runs (4 or 8 bytes),
# device_blocks, first_data, number of runs; then (start, count) pairs.
_MAGIC: Final = b"FSAL"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("<4sBB2xQQQ")


def _check_count(what: str, n: int) -> None:
    if n < 0:
        raise ValueError(f"alloc: {what}: negative block count {n}")


@final
@dataclass(frozen=True)
class AllocatorStatistics:
    """A snapshot of an `Allocator`'s counters.

    ``free + reserved + allocated + deferred == total`` always holds.
    """

    device_blocks: int
    """Blocks on the device, including the ``first_data`` metadata blocks."""
    first_data: int
    """Blocks at the start of the device that are never allocatable."""
    total: int
    """Allocatable blocks: ``device_blocks - first_data``."""
    free: int
    """Free and not promised to any reservation."""
    reserved: int
    """Promised to live reservations (still free on the map)."""
    allocated: int
    """Handed out and not freed."""
    deferred: int
    """Freed but not yet reusable, including ``committing``."""
    committing: int
    """The part of ``deferred`` that the commit in flight will release."""
    reservations: int
    """Reservations that hold at least one block."""
    commit_in_flight: bool
    """Between `Allocator.commit_begin` and its durable or abandoned end."""


@final
@dataclass(frozen=True, eq=False)
class CommitToken:
    """The frees a commit releases when it is durable, from `Allocator.commit_begin`."""

    sequence: int
    """1 for the allocator's first commit, then counting up."""
    runs: tuple[Run, ...]
    """The runs freed before the commit began."""
    blocks: int
    """The number of blocks in ``runs``."""


@final
class Reservation:
    """A promise of ``remaining`` blocks from one `Allocator`.

    Made by `Allocator.reserve`; `Allocator.allocate` with ``reservation=`` draws on
    it.  The blocks are counted, not chosen: they are picked at allocation time.
    Whoever holds a reservation must `release` what it does not use (or use it as a
    context manager, which releases the rest on exit); a dropped reservation keeps
    its blocks reserved, and shows in `Allocator.statistics`.
    """

    __slots__ = ("_allocator", "_remaining")

    def __init__(self, allocator: Allocator) -> None:
        # Use Allocator.reserve(); a Reservation starts empty and is filled by it.
        self._allocator = allocator
        self._remaining = 0

    @property
    def remaining(self) -> int:
        """Blocks still promised by this reservation."""
        return self._remaining

    def add(self, n: int) -> None:
        """Grow the reservation by *n* blocks; `NoSpace` if they are not free."""
        self._allocator._reserve_into(self, n)

    def release(self, n: int | None = None) -> None:
        """Give back *n* unused blocks, or all of them when *n* is None."""
        if n is None:
            n = self._remaining
        _check_count("release", n)
        if n > self._remaining:
            raise RuntimeError(
                f"alloc: can't release {n} blocks from a reservation holding {self._remaining}"
            )
        self._allocator._unreserve(self, n)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Reservation remaining={self._remaining}>"


@final
class Allocator:
    """The free-space map of one device; see the module docstring."""

    def __init__(self, device_blocks: int, first_data: int = 0) -> None:
        if device_blocks < 0 or not 0 <= first_data <= device_blocks:
            raise ValueError(
                f"alloc: bad geometry: device_blocks={device_blocks} first_data={first_data}"
            )
        self._device_blocks = device_blocks
        self._first_data = first_data
        # One byte per block; the metadata blocks are USED so that searches skip them.
        self._map = bytearray(device_blocks)
        self._map[:first_data] = bytes([USED]) * first_data
        # Counters of the data area, by state; _nfree includes reserved blocks.
        self._nfree = device_blocks - first_data
        self._nallocated = 0
        self._ndeferred = 0  # DEFERRED only; COMMITTING is _inflight.blocks
        self._reserved = 0
        # Reservations holding blocks, so that check() can add them up.
        self._reservations: set[Reservation] = set()
        # Runs freed since the last commit_begin (state DEFERRED), in free order.
        self._deferred_runs: list[Run] = []
        self._inflight: CommitToken | None = None
        self._commits = 0  # commits begun
        self._durable = 0  # the sequence of the last commit made durable
        # Next-fit: where the next allocation without a hint starts looking.
        self._cursor = first_data

    # -- loading and saving --------------------------------------------------

    @classmethod
    def from_used(cls, device_blocks: int, first_data: int, used_runs: Iterable[Run]) -> Allocator:
        """An allocator whose data area is free except for *used_runs* (from disk).

        Raises `Corrupt` if a run is empty, leaves the data area, or overlaps another.
        """
        alloc = cls(device_blocks, first_data)
        for pblk, n in used_runs:
            alloc.mark_used(pblk, n)
        return alloc

    def mark_used(self, pblk: int, n: int) -> None:
        """Mark *n* free blocks at *pblk* as used, while loading from disk.

        Raises `Corrupt` if a block is outside the data area or already used (two
        owners of one block), and `RuntimeError` if taking the blocks would break a
        reservation's promise.
        """
        if n <= 0 or pblk < self._first_data or pblk + n > self._device_blocks:
            raise Corrupt(
                f"alloc: used run ({pblk}, {n}) outside the data area "
                f"[{self._first_data}, {self._device_blocks})"
            )
        if self._map.count(FREE, pblk, pblk + n) != n:
            bad = self._first_not(FREE, pblk, pblk + n)
            raise Corrupt(f"alloc: block {bad} marked used twice")
        if n > self._nfree - self._reserved:
            raise RuntimeError("alloc: mark_used would take blocks promised to reservations")
        self._map[pblk : pblk + n] = bytes([USED]) * n
        self._nfree -= n
        self._nallocated += n

    def used_runs(self, token: CommitToken | None = None) -> list[Run]:
        """The runs of used blocks in the data area, in block order.

        Every block that is not free counts, deferred ones included (the last durable
        checkpoint still references them) -- except that, given the *token* of the
        commit in flight, the blocks that commit frees count as free: this is the map
        that the commit's own checkpoint must record.
        """
        table = _ALL_DEFERRED_USED
        if token is not None:
            self._check_token("used_runs", token)
            table = _COMMITTING_FREE
        view = self._map.translate(table)
        runs: list[Run] = []
        hi = self._device_blocks
        pos = self._first_data
        while pos < hi:
            start = view.find(USED, pos)
            if start < 0:
                break
            end = view.find(FREE, start)
            if end < 0:
                end = hi
            runs.append((start, end - start))
            pos = end
        return runs

    def encode(self, token: CommitToken | None = None) -> bytes:
        """`used_runs` (with the same *token* rule) packed for the checkpoint."""
        runs = self.used_runs(token)
        wide = self._device_blocks > 0xFFFF_FFFF
        width = 8 if wide else 4
        head = _HEADER.pack(
            _MAGIC, _VERSION, width, self._device_blocks, self._first_data, len(runs)
        )
        flat = [x for run in runs for x in run]
        return head + struct.pack(f"<{len(flat)}{'Q' if wide else 'I'}", *flat)

    @classmethod
    def decode(cls, data: bytes) -> Allocator:
        """The allocator that `encode` described; `Corrupt` if *data* is not one.

        Everything recorded as used is ``USED``: nothing is deferred after a load.
        """
        if len(data) < _HEADER.size:
            raise Corrupt("alloc: free-space map truncated")
        magic, version, width, device_blocks, first_data, nruns = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise Corrupt("alloc: free-space map has a bad magic number")
        if version != _VERSION:
            raise Corrupt(f"alloc: free-space map version {version} is not {_VERSION}")
        if width not in (4, 8):
            raise Corrupt(f"alloc: free-space map has bad number width {width}")
        if first_data > device_blocks:
            raise Corrupt("alloc: free-space map has first_data past the device end")
        if len(data) != _HEADER.size + 2 * nruns * width:
            raise Corrupt("alloc: free-space map length does not match its run count")
        flat = struct.unpack_from(f"<{2 * nruns}{'Q' if width == 8 else 'I'}", data, _HEADER.size)
        alloc = cls(device_blocks, first_data)
        prev_end = -1
        for i in range(0, len(flat), 2):
            pblk, n = flat[i], flat[i + 1]
            # encode() writes sorted, non-empty, non-adjacent runs: anything else is damage.
            if pblk <= prev_end:
                raise Corrupt(f"alloc: free-space map runs out of order at block {pblk}")
            alloc.mark_used(pblk, n)
            prev_end = pblk + n
        return alloc

    # -- queries -------------------------------------------------------------

    def is_free(self, pblk: int) -> bool:
        """Whether *pblk* is free on the map (reserved or not); False outside it."""
        return 0 <= pblk < self._device_blocks and self._map[pblk] == FREE

    def is_used(self, pblk: int, n: int = 1) -> bool:
        """Whether none of the *n* blocks at *pblk* is free (deferred ones count as
        used, and so do the metadata blocks before ``first_data``)."""
        _check_count("is_used", n)
        if pblk < 0 or pblk + n > self._device_blocks:
            return False
        return self._map.find(FREE, pblk, pblk + n) < 0

    def largest_free_run(self) -> int:
        """The longest run of free blocks (reserved or not).  Scans the whole map."""
        best = 0
        pos = self._first_data
        hi = self._device_blocks
        while pos < hi - best:
            start = self._map.find(FREE, pos)
            if start < 0:
                break
            end = self._free_run_end(start, hi)
            best = max(best, end - start)
            pos = end
        return best

    @property
    def durable_sequence(self) -> int:
        """The sequence of the last commit made durable; 0 before the first."""
        return self._durable

    def reclaim_sequence(self) -> int | None:
        """The commit whose durability makes every block freed so far reusable.

        The next commit to begin when some frees wait in ``DEFERRED``; else the
        commit in flight, if it releases any; None when no freed block waits for a
        commit (then no commit can turn an allocation's `NoSpace` into success).
        """
        if self._ndeferred:
            return self._commits + 1
        if self._inflight is not None and self._inflight.blocks:
            return self._inflight.sequence
        return None

    def statistics(self) -> AllocatorStatistics:
        committing = self._inflight.blocks if self._inflight is not None else 0
        return AllocatorStatistics(
            device_blocks=self._device_blocks,
            first_data=self._first_data,
            total=self._device_blocks - self._first_data,
            free=self._nfree - self._reserved,
            reserved=self._reserved,
            allocated=self._nallocated,
            deferred=self._ndeferred + committing,
            committing=committing,
            reservations=len(self._reservations),
            commit_in_flight=self._inflight is not None,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Allocator total={s.total} free={s.free} reserved={s.reserved} "
            f"allocated={s.allocated} deferred={s.deferred} "
            f"commit_in_flight={s.commit_in_flight} cursor={self._cursor}>"
        )

    # -- reservations --------------------------------------------------------

    def reserve(self, n: int) -> Reservation:
        """A reservation of *n* blocks; `NoSpace` unless that many are free and unreserved."""
        reservation = Reservation(self)
        self._reserve_into(reservation, n)
        return reservation

    def _reserve_into(self, reservation: Reservation, n: int) -> None:
        self._check_reservation("reserve", reservation)
        _check_count("reserve", n)
        if n == 0:
            return
        available = self._nfree - self._reserved
        if n > available:
            raise NoSpace(f"alloc: can't reserve {n} blocks, {available} available")
        if dynamic_fault("alloc_reserve", cls="error"):
            raise NoSpace("alloc: injected reservation failure")
        reservation._remaining += n
        self._reserved += n
        self._reservations.add(reservation)

    def _unreserve(self, reservation: Reservation, n: int) -> None:
        # Caller checked 0 <= n <= reservation._remaining.
        self._check_reservation("release", reservation)
        reservation._remaining -= n
        self._reserved -= n
        if reservation._remaining == 0:
            self._reservations.discard(reservation)

    def _check_reservation(self, what: str, reservation: Reservation) -> None:
        if reservation._allocator is not self:
            raise RuntimeError(f"alloc: {what}: the reservation belongs to another allocator")

    # -- allocation ----------------------------------------------------------

    def allocate(
        self, n: int, *, reservation: Reservation | None = None, hint: int | None = None
    ) -> list[Run]:
        """Allocate *n* blocks, as runs ``(pblk, count)`` that add up to *n*.

        A single run when any free run is long enough (the first one at or after
        *hint*, or after the previous allocation when there is no hint, wrapping
        round); otherwise several runs.  *hint* is advisory: one outside the data
        area starts the search at its beginning.

        With a *reservation*, the blocks are drawn from it: *n* must not exceed
        ``reservation.remaining`` (`RuntimeError`), and the allocation cannot run out
        of space.  Without one, `NoSpace` unless *n* blocks are free and unreserved.
        The ``alloc_allocate`` fault site raises `NoSpace` in either case.
        """
        _check_count("allocate", n)
        if reservation is not None:
            self._check_reservation("allocate", reservation)
            if n > reservation._remaining:
                raise RuntimeError(
                    f"alloc: allocate of {n} blocks from a reservation holding "
                    f"{reservation._remaining}"
                )
        elif n > self._nfree - self._reserved:
            raise NoSpace(
                f"alloc: can't allocate {n} blocks, {self._nfree - self._reserved} available"
            )
        if dynamic_fault("alloc_allocate", cls="error"):
            raise NoSpace("alloc: injected allocation failure")
        if n == 0:
            return []

        if hint is None:
            start = self._cursor
        elif self._first_data <= hint < self._device_blocks:
            start = hint
        else:
            start = self._first_data
        runs = self._find_runs(n, start)
        used = bytes([USED])
        for pblk, count in runs:
            self._map[pblk : pblk + count] = used * count
        self._nfree -= n
        self._nallocated += n
        if reservation is not None:
            self._unreserve(reservation, n)
        if hint is None:
            last, count = runs[-1]
            self._cursor = last + count
            if self._cursor >= self._device_blocks:
                self._cursor = self._first_data
        return runs

    def _find_runs(self, n: int, start: int) -> list[Run]:
        # Caller checked that at least n blocks are FREE in the data area.
        m = self._map
        lo, hi = self._first_data, self._device_blocks
        needle = bytes(n)
        pblk = m.find(needle, start)
        if pblk < 0 and start > lo:
            # Wrap: a run that starts before `start` (it may run on past it).
            pblk = m.find(needle, lo, min(start + n - 1, hi))
        if pblk >= 0:
            return [(pblk, n)]

        # No free run is long enough: take free runs in order, [start, hi) then
        # [lo, start), so that a run straddling `start` is not taken twice.
        runs: list[Run] = []
        need = n
        for pos, end in ((start, hi), (lo, start)):
            while need and pos < end:
                pblk = m.find(FREE, pos, end)
                if pblk < 0:
                    break
                stop = self._free_run_end(pblk, min(pblk + need, end))
                runs.append((pblk, stop - pblk))
                need -= stop - pblk
                pos = stop
        if need:
            raise RuntimeError(f"alloc: counters say {n} blocks are free but the map disagrees")
        return runs

    def _free_run_end(self, pblk: int, limit: int) -> int:
        """The end of the free run at *pblk*, or *limit* if it runs on that far."""
        match = _NOT_FREE.search(self._map, pblk, limit)
        return limit if match is None else match.start()

    def _first_not(self, state: int, pblk: int, end: int) -> int:
        match = _NOT_STATE[state].search(self._map, pblk, end)
        return end if match is None else match.start()

    # -- freeing -------------------------------------------------------------

    def _check_freeable(self, what: str, pblk: int, n: int) -> None:
        _check_count(what, n)
        if pblk < self._first_data or pblk + n > self._device_blocks:
            raise ValueError(
                f"alloc: {what} of ({pblk}, {n}) outside the data area "
                f"[{self._first_data}, {self._device_blocks})"
            )
        if self._map.count(USED, pblk, pblk + n) != n:
            bad = self._first_not(USED, pblk, pblk + n)
            state = _STATE_NAMES.get(self._map[bad], "corrupt")
            raise RuntimeError(f"alloc: {what} of block {bad}, which is {state}")

    def free(self, pblk: int, n: int) -> None:
        """Free *n* allocated blocks at *pblk*, deferred until the next commit is durable.

        The blocks return to the free pool at the `commit_durable` of the first commit
        that begins after this call.  Freeing a block that is not allocated (free, or
        already freed) raises `RuntimeError`.
        """
        self._check_freeable("free", pblk, n)
        if n == 0:
            return
        self._map[pblk : pblk + n] = bytes([DEFERRED]) * n
        self._nallocated -= n
        self._ndeferred += n
        self._deferred_runs.append((pblk, n))

    def free_now(self, pblk: int, n: int) -> None:
        """Free *n* allocated blocks at *pblk* at once, for reuse by the next allocation.

        Safe only for blocks that no checkpoint that is, or could become, durable
        references: blocks allocated after the metadata snapshot of the last commit
        that began, and never exposed since -- for instance blocks allocated for a
        write that failed before anything mapped them.  Blocks that a failed commit
        wrote may be referenced by a superblock that reached the disk after all: free
        those with `free`.
        """
        self._check_freeable("free_now", pblk, n)
        if n == 0:
            return
        self._map[pblk : pblk + n] = bytes(n)
        self._nallocated -= n
        self._nfree += n

    # -- commits -------------------------------------------------------------

    def commit_begin(self) -> CommitToken:
        """Start a commit: the frees made so far are released when it is durable.

        Call it in the same synchronous step as the metadata snapshot and `encode`.
        Only one commit may be in flight (`RuntimeError`).
        """
        if self._inflight is not None:
            raise RuntimeError(
                f"alloc: commit_begin while commit {self._inflight.sequence} is in flight"
            )
        committing = bytes([COMMITTING])
        for pblk, n in self._deferred_runs:
            self._map[pblk : pblk + n] = committing * n
        self._commits += 1
        token = CommitToken(self._commits, tuple(self._deferred_runs), self._ndeferred)
        self._deferred_runs = []
        self._ndeferred = 0
        self._inflight = token
        return token

    def commit_durable(self, token: CommitToken) -> None:
        """The commit of *token* is on disk: its frees become free blocks."""
        self._check_token("commit_durable", token)
        for pblk, n in token.runs:
            self._map[pblk : pblk + n] = bytes(n)
        self._nfree += token.blocks
        self._inflight = None
        self._durable = token.sequence

    def commit_abandoned(self, token: CommitToken) -> None:
        """The commit of *token* failed: its frees wait for the next commit."""
        self._check_token("commit_abandoned", token)
        deferred = bytes([DEFERRED])
        for pblk, n in token.runs:
            self._map[pblk : pblk + n] = deferred * n
        self._deferred_runs[:0] = token.runs
        self._ndeferred += token.blocks
        self._inflight = None

    def _check_token(self, what: str, token: CommitToken) -> None:
        if token is not self._inflight:
            raise RuntimeError(f"alloc: {what}: commit {token.sequence} is not the one in flight")

    # -- consistency ---------------------------------------------------------

    def check(self) -> None:
        """Verify the counters against the map and each other; `RuntimeError` if wrong."""

        def fail(message: str) -> None:
            raise RuntimeError(f"alloc: check failed: {message} in {self!r}")

        m = self._map
        lo, hi = self._first_data, self._device_blocks
        total = hi - lo
        if len(m) != hi:
            fail(f"map has {len(m)} bytes for {hi} blocks")
        if m.count(USED, 0, lo) != lo:
            fail("a metadata block is not marked used")
        committing = self._inflight.blocks if self._inflight is not None else 0
        counts = {
            FREE: self._nfree,
            USED: self._nallocated,
            DEFERRED: self._ndeferred,
            COMMITTING: committing,
        }
        for state, expected in counts.items():
            actual = m.count(state, lo, hi)
            if actual != expected:
                fail(f"{actual} blocks are {_STATE_NAMES[state]} but the count is {expected}")
        if sum(counts.values()) != total:
            fail("the map holds a byte that is no block state")
        if not 0 <= self._reserved <= self._nfree:
            fail(f"{self._reserved} blocks reserved of {self._nfree} free")
        if any(r._remaining <= 0 for r in self._reservations):
            fail("an empty or negative reservation is listed")
        if sum(r._remaining for r in self._reservations) != self._reserved:
            fail("the reservations do not add up to the reserved count")
        stats = self.statistics()
        if stats.free + stats.reserved + stats.allocated + stats.deferred != stats.total:
            fail("free + reserved + allocated + deferred != total")
        lists: list[tuple[int, tuple[Run, ...] | list[Run], int]] = [
            (DEFERRED, self._deferred_runs, self._ndeferred)
        ]
        if self._inflight is not None:
            lists.append((COMMITTING, self._inflight.runs, self._inflight.blocks))
        for state, runs, blocks in lists:
            if sum(n for _, n in runs) != blocks:
                fail(f"the {_STATE_NAMES[state]} runs do not add up to {blocks}")
            prev_end = lo
            for pblk, n in sorted(runs):
                if n <= 0 or pblk < prev_end or m.count(state, pblk, pblk + n) != n:
                    fail(f"{_STATE_NAMES[state]} run ({pblk}, {n}) is bad or overlaps")
                prev_end = pblk + n
        if not lo <= self._cursor <= max(lo, hi - 1):
            fail(f"cursor {self._cursor} outside the data area")
