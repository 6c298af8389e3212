"""Atomic metadata commit and checkpoint loading (DESIGN §6).

A commit:

1. ``alloc.commit_begin()`` and a synchronous snapshot of the namespace — no
   await between them, so the snapshot and the set of frees it makes durable
   agree exactly;
2. the body and its header go to blocks that no durable checkpoint uses (they
   come from the allocator, which never hands out a block freed since the last
   durable commit), then a flush — which also makes durable every data block
   written before, so file data always reaches the disk before the commit that
   maps it;
3. the superblock copy that does *not* hold the current state gets the new
   sequence number, then a flush;
4. only now are the old checkpoint's blocks and the frees of step 1 returned to
   the free pool.

A failure anywhere leaves the previous superblock — and everything it names —
untouched on disk.  The caller then turns the filesystem read-only
(errors=remount-ro): the in-memory state is ahead of the disk and nothing else
may be built on it.

Checkpoint blocks come from a standing metadata reservation, so a full
filesystem can still commit (and so still free space by deleting files).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import trio

from fusefs.alloc import Allocator, Reservation
from fusefs.blockdev import BlockDevice
from fusefs.errors import Corrupt, IOFailure, NoSpace
from fusefs.faults import dynamic_fault
from fusefs.format import (
    FIRST_DATA_BLOCK,
    SUPERBLOCK_BLOCKS,
    CheckpointHeader,
    Superblock,
    crc32,
    decode_body,
    encode_body,
)

log = logging.getLogger(__name__)

Run = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Loaded:
    """A checkpoint read back from an image."""

    superblock: Superblock
    state: dict[str, Any]
    runs: tuple[Run, ...]  # the header block and the body runs


def _read_superblocks(dev: BlockDevice) -> Superblock:
    """The valid superblock copy with the highest sequence number."""
    best: Superblock | None = None
    reasons = []
    for blk in SUPERBLOCK_BLOCKS:
        try:
            sb = Superblock.unpack(dev.read_sync(blk, 1))
        except Corrupt as e:
            reasons.append(str(e))
            continue
        if sb.block_size != dev.block_size or sb.device_blocks > dev.blocks:
            reasons.append(
                f"superblock says {sb.device_blocks} blocks of {sb.block_size} B; "
                f"the image holds {dev.blocks} (truncated image?)"
            )
            continue
        if best is None or sb.seq > best.seq:
            best = sb
    if best is None:
        # Copy B of a new image is blank; report copy A's reason.
        raise Corrupt(reasons[0])
    return best


def load_checkpoint(dev: BlockDevice) -> Loaded:
    """Read and verify the current checkpoint (synchronous: mount and fsck)."""
    if dynamic_fault("mount_read_checkpoint", cls="error:mount"):
        raise IOFailure("mount: injected error reading the checkpoint")
    sb = _read_superblocks(dev)
    raw_header = dev.read_sync(sb.checkpoint, 1)
    if crc32(raw_header) != sb.checkpoint_crc:
        raise Corrupt(f"checkpoint header (block {sb.checkpoint}) checksum mismatch")
    header = CheckpointHeader.unpack(raw_header, sb.device_blocks)
    if header.seq != sb.seq:
        raise Corrupt(f"checkpoint sequence {header.seq} does not match superblock {sb.seq}")
    body = b"".join(dev.read_sync(pblk, count) for pblk, count in header.runs)[: header.length]
    if crc32(body) != header.crc:
        raise Corrupt("checkpoint body checksum mismatch")
    state = decode_body(body)
    return Loaded(sb, state, ((sb.checkpoint, 1), *header.runs))


@final
class Committer:
    """Writes checkpoints; one commit at a time."""

    def __init__(self, dev: BlockDevice, alloc: Allocator, loaded: Loaded) -> None:
        self.dev = dev
        self.alloc = alloc
        self.superblock = loaded.superblock
        self.runs: tuple[Run, ...] = loaded.runs
        self._lock = trio.Lock()
        self.commits = 0
        self.last_commit_bytes = 0
        self.meta_reserve: Reservation | None = None
        self.top_up_reserve()

    def _reserve_target(self) -> int:
        # Room for two checkpoints of the current size plus slack: the old one
        # stays on disk while the new one is written.
        current = sum(count for _, count in self.runs)
        return 2 * current + 16

    def top_up_reserve(self) -> None:
        """Keep the metadata reservation at its target, as far as space allows."""
        want = self._reserve_target()
        if self.meta_reserve is None:
            try:
                self.meta_reserve = self.alloc.reserve(min(want, self._available()))
            except NoSpace:
                self.meta_reserve = None
            return
        missing = want - self.meta_reserve.remaining
        if missing > 0:
            with contextlib.suppress(NoSpace):
                self.meta_reserve.add(min(missing, self._available()))

    def reserve_shortfall(self) -> int:
        """Blocks the metadata reservation lacks of its target: the next commit
        takes them first, so they are not free for data (`Filesystem.statfs`)."""
        have = self.meta_reserve.remaining if self.meta_reserve is not None else 0
        return max(0, self._reserve_target() - have)

    def _available(self) -> int:
        st = self.alloc.statistics()
        return st.free  # free already leaves out what is reserved

    def locked(self) -> bool:
        return self._lock.locked()

    async def commit(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Write a new checkpoint of ``snapshot()`` and make it current."""
        async with self._lock:
            await self._commit_locked(snapshot)

    def _allocate_checkpoint(self, nblocks: int) -> list[Run]:
        reserve = self.meta_reserve
        if reserve is not None and reserve.remaining >= nblocks:
            return self.alloc.allocate(nblocks, reservation=reserve)
        return self.alloc.allocate(nblocks)

    async def _commit_locked(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        bs = self.dev.block_size
        token = self.alloc.commit_begin()
        try:
            state = snapshot()
            body = encode_body(state)
            nbody = max(1, -(-len(body) // bs))
            runs = self._allocate_checkpoint(nbody + 1)
            seq = self.superblock.seq + 1
            header_blk, body_runs = _split_header(runs)
            header = CheckpointHeader(seq, len(body), crc32(body), tuple(body_runs))
            raw_header = header.pack(bs)
            padded = body.ljust(nbody * bs, b"\0")
            if dynamic_fault("commit_write_checkpoint", cls="error:commit"):
                raise IOFailure("commit: injected error writing the checkpoint")
            pos = 0
            for pblk, count in body_runs:
                await self.dev.write(pblk, padded[pos : pos + count * bs])
                pos += count * bs
            await self.dev.write(header_blk, raw_header)
            # The flush that makes the checkpoint (and all data) durable before
            # the superblock names it.  The self-test site breaks that ordering
            # on purpose, so that power-cut campaigns can show they catch it.
            if not dynamic_fault("commit_skip_checkpoint_flush", cls="error:selftest"):
                await self.dev.flush()
            sb = Superblock(
                bs,
                self.superblock.device_blocks,
                seq,
                header_blk,
                crc32(raw_header),
                self.superblock.uuid,
                self.superblock.created_ns,
                self.superblock.flags,
            )
            if dynamic_fault("commit_write_superblock", cls="error:commit"):
                raise IOFailure("commit: injected error writing the superblock")
            await self.dev.write(SUPERBLOCK_BLOCKS[seq % 2], sb.pack(bs))
            await self.dev.flush()
        except BaseException:
            self.alloc.commit_abandoned(token)
            raise
        old_runs = self.runs
        self.superblock = sb
        self.runs = ((header_blk, 1), *body_runs)
        for pblk, count in old_runs:
            self.alloc.free_now(pblk, count)
        self.alloc.commit_durable(token)
        self.commits += 1
        self.last_commit_bytes = len(body)
        self.top_up_reserve()


def _split_header(runs: list[Run]) -> tuple[int, list[Run]]:
    """The first allocated block holds the header; the rest the body."""
    first, count = runs[0]
    body = [(first + 1, count - 1)] if count > 1 else []
    return first, body + list(runs[1:])


def checkpoint_blocks_ok(runs: tuple[Run, ...], device_blocks: int) -> bool:
    return all(p >= FIRST_DATA_BLOCK and p + c <= device_blocks for p, c in runs)


__all__ = ["Committer", "Loaded", "load_checkpoint"]
