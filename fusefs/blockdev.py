"""The block device: an image file read and written in whole blocks.

Every read, write and flush runs in a worker thread (``trio.to_thread``) so the
trio loop never blocks on the disk; runs of adjacent blocks go down as one
``preadv``/``pwrite`` so readahead and writeback can merge pages into large IOs.
Each call is a fault site of class ``io`` (``blockdev_read``, ``blockdev_write``,
``blockdev_flush``): a fired fault fails the call with EIO before it touches the
image, exactly as a failing disk would from the filesystem's point of view.

Direct reads add two things: `read_runs` reads several runs straight into
slices of one buffer, and `prefetch_sync` asks the host to start reading runs
the next reads will want (``posix_fadvise(WILLNEED)``: the image goes through
the host's page cache, whose own readahead lags a stream of O_DIRECT reads).

The synchronous twins (``read_sync`` ...) serve mkfs and fsck, which run
outside trio.

Durability model: a write is durable once a later ``flush`` (fsync of the image)
has returned.  `pending_writes` counts the writes issued since the last flush,
which is what a power cut would lose.

Power cuts are simulated by `fusefs.powercut.PowerCut`, armed by the environment
(``FUSEFS_POWERCUT``) of the process that opens the device read-write: it stands
in for the three system calls below (``self._pread``, ``self._pwrite``,
``self._fdatasync``, which are otherwise ``os``'s own), so the checks and fault
sites here run unchanged and the device without a simulator pays nothing.

``blockdev_corrupt_write`` (class ``io:selftest``) exists to test the tools that
test the filesystem: when fired, the write goes down with one sector of its first
block scrambled and reports success -- silent corruption, which a fault campaign
must report as such.  Campaigns leave ``selftest`` sites out unless asked.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Final, TypeAlias, final

import trio

from fusefs.errors import FsError, InUse, InvalidArgument, IOFailure, OutOfMemory
from fusefs.faults import dynamic_fault
from fusefs.powercut import CutPlan, PowerCut, record_path_for

IOV_MAX: Final = os.sysconf("SC_IOV_MAX")  # buffers one preadv takes
Buffer: TypeAlias = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class BlockDeviceStatistics:
    block_size: int
    blocks: int
    reads: int
    writes: int
    flushes: int
    bytes_read: int
    bytes_written: int
    pending_writes: int


@final
class BlockDevice:
    """An image file of ``blocks`` blocks of ``block_size`` bytes."""

    def __init__(self, path: str | os.PathLike[str], block_size: int, *, read_only: bool = False):
        self.path = os.fspath(path)
        self.block_size = block_size
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        try:
            # One daemon (or fsck --repair) per image at a time.
            kind = fcntl.LOCK_SH if read_only else fcntl.LOCK_EX
            fcntl.flock(self._fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise InUse(f"{self.path}: image in use by another fusefs process") from None
        self.blocks = os.fstat(self._fd).st_size // block_size
        # The system calls, replaced by the power-cut simulator's when it is armed.
        self._pread: Callable[[int, int, int], bytes] = os.pread
        self._pwrite: Callable[[int, bytes | bytearray | memoryview, int], int] = os.pwrite
        self._fdatasync: Callable[[int], None] = os.fdatasync
        self.powercut: PowerCut | None = None
        if not read_only:
            try:
                plan = CutPlan.from_environment()
            except InvalidArgument:
                os.close(self._fd)
                raise
            if plan is not None:
                self.arm_powercut(PowerCut(self._fd, block_size, plan))
        # Counters are touched from worker threads.
        self._stat_lock = threading.Lock()
        self._reads = 0
        self._writes = 0
        self._flushes = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._pending = 0
        # At most this many device calls in flight: the machine has few cores and
        # more threads only queue in the kernel.
        self._limiter = trio.CapacityLimiter(8)

    def __repr__(self) -> str:
        return f"<BlockDevice {self.path!r} blocks={self.blocks} bs={self.block_size}>"

    def statistics(self) -> BlockDeviceStatistics:
        return BlockDeviceStatistics(
            block_size=self.block_size,
            blocks=self.blocks,
            reads=self._reads,
            writes=self._writes,
            flushes=self._flushes,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            pending_writes=self._pending,
        )

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            if self.powercut is not None:
                self.powercut.close()
            os.close(self._fd)
            self._fd = -1

    def arm_powercut(self, powercut: PowerCut) -> None:
        """Route the device's IO through a power-cut simulator (before any IO)."""
        if powercut.record_path is None:
            powercut.record_path = record_path_for(self.path)
        self.powercut = powercut
        self._pread = powercut.pread
        self._pwrite = powercut.pwrite
        self._fdatasync = powercut.fdatasync

    # checks:

    def _check_range(self, pblk: int, count: int) -> None:
        if pblk < 0 or count < 0 or pblk + count > self.blocks:
            raise InvalidArgument(
                f"blockdev: blocks {pblk}+{count} outside the device ({self.blocks} blocks)"
            )

    # synchronous IO (worker threads, mkfs, fsck):

    def _before_read(self, pblk: int, count: int) -> None:
        self._check_range(pblk, count)
        if dynamic_fault("blockdev_read", cls="io:read"):
            raise IOFailure(f"blockdev: injected read error at block {pblk}")

    def _count_read(self, nbytes: int) -> None:
        with self._stat_lock:
            self._reads += 1
            self._bytes_read += nbytes

    def read_sync(self, pblk: int, count: int) -> bytes:
        self._before_read(pblk, count)
        want = count * self.block_size
        try:
            data = self._pread(self._fd, want, pblk * self.block_size)
        except OSError as e:
            raise IOFailure(f"blockdev: read of block {pblk}: {e.strerror}") from e
        except MemoryError:
            raise OutOfMemory(f"blockdev: no memory for a read of {want} bytes") from None
        if len(data) != want:
            raise IOFailure(f"blockdev: short read at block {pblk}")
        self._count_read(want)
        return data

    def read_runs_sync(self, runs: Sequence[tuple[int, memoryview]]) -> None:
        """Read each ``(pblk, view)`` -- ``view`` a whole number of blocks long --
        straight into ``view`` (`read_into_sync`): one ``preadv`` a run, no copy
        (direct reads gathering a fragmented range into one buffer)."""
        for pblk, view in runs:
            self.read_into_sync(pblk, [view])

    def prefetch_sync(self, runs: Sequence[tuple[int, int]]) -> None:
        """Ask the host to start reading the ``(pblk, count)`` runs into its page
        cache (``posix_fadvise(WILLNEED)``), without waiting for them.  A hint:
        it fails silently, and the blocks read later are the same either way."""
        bs = self.block_size
        for pblk, count in runs:
            if pblk < 0 or count <= 0 or pblk + count > self.blocks:
                continue
            with suppress(OSError):
                os.posix_fadvise(self._fd, pblk * bs, count * bs, os.POSIX_FADV_WILLNEED)

    def _read_and_prefetch(
        self, pblk: int, count: int, prefetch: Sequence[tuple[int, int]]
    ) -> bytes:
        data = self.read_sync(pblk, count)
        self.prefetch_sync(prefetch)
        return data

    def _read_runs_and_prefetch(
        self, runs: Sequence[tuple[int, memoryview]], prefetch: Sequence[tuple[int, int]]
    ) -> None:
        self.read_runs_sync(runs)
        self.prefetch_sync(prefetch)

    def read_into_sync(self, pblk: int, buffers: Sequence[bytearray | memoryview]) -> None:
        """Read consecutive blocks at ``pblk`` straight into the buffers (whole
        blocks each): one ``preadv``, no copy -- how fills land in pages."""
        want = sum(len(b) for b in buffers)
        count, partial = divmod(want, self.block_size)
        if partial:
            raise InvalidArgument("blockdev: read of a partial block")
        self._before_read(pblk, count)
        offset = pblk * self.block_size
        try:
            if self.powercut is None:
                done = _vectored(os.preadv, self._fd, buffers, offset)
            else:
                data = self._pread(self._fd, want, offset)
                done = len(data)
                pos = 0
                for buf in buffers:
                    view = memoryview(buf)
                    view[:] = data[pos : pos + len(view)]
                    pos += len(view)
        except OSError as e:
            raise IOFailure(f"blockdev: read of block {pblk}: {e.strerror}") from e
        if done != want:
            raise IOFailure(f"blockdev: short read at block {pblk}")
        self._count_read(want)

    def write_sync(self, pblk: int, data: Buffer | list[Buffer]) -> None:
        """Write whole blocks at ``pblk``: one buffer, or several written
        together in order (one ``pwritev``: writeback hands over the page
        buffers themselves, not a copy)."""
        parts = data if isinstance(data, list) else [data]
        size = sum(len(part) for part in parts)
        if size % self.block_size:
            raise InvalidArgument("blockdev: write of a partial block")
        self._check_range(pblk, size // self.block_size)
        if self.read_only:
            raise IOFailure("blockdev: device opened read-only")
        if dynamic_fault("blockdev_write", cls="io:write"):
            raise IOFailure(f"blockdev: injected write error at block {pblk}")
        if dynamic_fault("blockdev_corrupt_write", cls="io:selftest"):
            parts = [_scramble(b"".join(parts), self.block_size)]
        elif len(parts) > 1 and self.powercut is not None:
            parts = [b"".join(parts)]  # the simulator records single writes
        offset = pblk * self.block_size
        try:
            if len(parts) == 1:
                done = self._pwrite(self._fd, parts[0], offset)
            else:
                done = _vectored(os.pwritev, self._fd, parts, offset)
        except OSError as e:
            raise IOFailure(f"blockdev: write of block {pblk}: {e.strerror}") from e
        if done != size:
            raise IOFailure(f"blockdev: short write at block {pblk}")
        with self._stat_lock:
            self._writes += 1
            self._bytes_written += size
            self._pending += 1

    def write_many_sync(
        self, writes: Sequence[tuple[int, Buffer | list[Buffer]]]
    ) -> list[FsError | None]:
        """Each (pblk, data) written as by `write_sync`, in order; a failed one
        does not stop the others.  Returns each write's error, or None."""
        errors: list[FsError | None] = []
        for pblk, data in writes:
            try:
                self.write_sync(pblk, data)
            except FsError as e:
                errors.append(e)
            else:
                errors.append(None)
        return errors

    def flush_sync(self) -> None:
        if dynamic_fault("blockdev_flush", cls="io:flush"):
            raise IOFailure("blockdev: injected flush error")
        try:
            self._fdatasync(self._fd)
        except OSError as e:
            raise IOFailure(f"blockdev: flush: {e.strerror}") from e
        with self._stat_lock:
            self._flushes += 1
            self._pending = 0

    # asynchronous IO:

    async def read(
        self, pblk: int, count: int, *, prefetch: Sequence[tuple[int, int]] = ()
    ) -> bytes:
        """Read ``count`` blocks starting at ``pblk``; then, in the same worker
        call, ask the host for the ``prefetch`` runs (`prefetch_sync`)."""
        return await trio.to_thread.run_sync(
            self._read_and_prefetch, pblk, count, prefetch, limiter=self._limiter
        )

    async def read_runs(
        self, runs: Sequence[tuple[int, memoryview]], *, prefetch: Sequence[tuple[int, int]] = ()
    ) -> None:
        """`read_runs_sync` and then `prefetch_sync`, in one worker call."""
        await trio.to_thread.run_sync(
            self._read_runs_and_prefetch, runs, prefetch, limiter=self._limiter
        )

    async def read_into(self, pblk: int, buffers: Sequence[bytearray | memoryview]) -> None:
        """Read consecutive blocks starting at ``pblk`` into the buffers, in order."""
        await trio.to_thread.run_sync(self.read_into_sync, pblk, buffers, limiter=self._limiter)

    async def write(self, pblk: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks starting at ``pblk``."""
        await trio.to_thread.run_sync(self.write_sync, pblk, data, limiter=self._limiter)

    async def write_many(
        self, writes: Sequence[tuple[int, Buffer | list[Buffer]]]
    ) -> list[FsError | None]:
        """Several writes in one worker-thread call (writeback's batches): see
        `write_many_sync`."""
        return await trio.to_thread.run_sync(self.write_many_sync, writes, limiter=self._limiter)

    async def flush(self) -> None:
        """Make every write issued so far durable."""
        await trio.to_thread.run_sync(self.flush_sync, limiter=self._limiter)


def _vectored(
    call: Callable[[int, Sequence[Buffer], int], int],
    fd: int,
    buffers: Sequence[Buffer],
    offset: int,
) -> int:
    """``preadv`` or ``pwritev`` of ``buffers`` at ``offset``, at most IOV_MAX
    buffers a call; returns the bytes done (short at the first short call)."""
    done = 0
    for i in range(0, len(buffers), IOV_MAX):
        part = buffers[i : i + IOV_MAX]
        got = call(fd, part, offset + done)
        done += got
        if got != sum(len(b) for b in part):
            break
    return done


def _scramble(data: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """``data`` with the middle sector of its first block inverted (a self-test
    fault: the kind of damage only a checksum or a read-back can see)."""
    out = bytearray(data)
    start = block_size // 2 - 256 if block_size >= 1024 else 0
    for i in range(start, start + 512):
        out[i] ^= 0xFF
    return bytes(out)
