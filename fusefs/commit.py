"""Metadata commits: the journal, checkpoints, and loading them (DESIGN §6).

A **commit** (fsync, syncfs, the periodic commit):

1. ``alloc.commit_begin()`` and `fusefs.journal.collect` -- no await between
   them, so the records and the set of frees they make durable agree exactly;
2. a flush if anything was written since the last one: file data reaches the
   disk before the entry that maps it (data=ordered);
3. one journal entry -- header and compressed records, checksummed -- at the
   ring's head, then a flush;
4. only now are the frees of step 1 returned to the free pool.

It writes what changed since the last commit, so its cost does not grow with
the filesystem.  A torn entry fails its checksum and ends the journal at mount:
the commit it held did not happen, and fsync had not returned.

A **checkpoint** writes every inode into chunks, so that the journal's older
entries can be reused.  It starts when the journal is half full and runs in the
background: it notes the head (where replay will have to start), then writes the
chunks a few thousand inodes at a time, yielding to requests in between.  The
chunks are *fuzzy* -- each holds its inodes as they were when it was made, and
the filesystem changes between chunks -- which is sound because every journal
record sets a value (`fusefs.journal`): replaying from the noted head onto the
chunks ends in the current state.  When the chunks are down, a commit puts
everything changed meanwhile in the journal; then the index and header go out,
a flush, and the superblock copy that does not hold the current state names the
new checkpoint and the noted head as the journal's tail, then a flush.  The old
checkpoint's blocks and the journal before the tail are free from then on.

An entry too large for the room left in the ring (a huge burst on a small
image) makes that commit write a *full* checkpoint instead, serialized in one
go: its chunks are made before any is written, so they are one state.  It stalls
the loop for as long as serializing takes, which only a tiny journal makes
happen.

A failure anywhere leaves the previous superblock, and everything it names,
untouched on disk; the caller turns the filesystem read-only
(errors=remount-ro).  Checkpoint blocks come from a standing metadata
reservation, so a full filesystem can still commit and so free space.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

import trio

from fusefs.alloc import Allocator, Reservation
from fusefs.blockdev import BlockDevice
from fusefs.errors import Corrupt, ExtentError, FsError, IOFailure, NoSpace
from fusefs.faults import dynamic_fault
from fusefs.format import (
    JOURNAL_HEADER_SIZE,
    JOURNAL_START,
    SUPERBLOCK_BLOCKS,
    VERSION,
    CheckpointHeader,
    JournalEntryHeader,
    Superblock,
    check_run,
    crc32,
    decode_blob,
    encode_blob,
)
from fusefs.inode import Inode
from fusefs.journal import Changes, apply
from fusefs.namespace import ROOT_INO

log = logging.getLogger(__name__)

Run = tuple[int, int]

#: Inodes per checkpoint chunk, counting a directory's entries as inodes: what
#: one chunk costs to serialize is what a checkpoint stalls the loop for.
CHUNK_WEIGHT: Final = 2048


class Source(Protocol):
    """What commits and checkpoints read: the namespace, seen by the committer."""

    @property
    def next_ino(self) -> int: ...

    def collect(self) -> Changes:
        """The records of what changed since the last call (`fusefs.journal`)."""
        ...

    def inode_numbers(self) -> list[int]: ...

    def inode(self, ino: int) -> Inode | None: ...


@dataclass(frozen=True, slots=True)
class JournalState:
    """Where the journal stood after replay."""

    used: int  # blocks from the tail to the head
    next_seq: int
    entries: int  # entries replayed
    torn: bool  # an entry was found torn at the head, and dropped


@dataclass(slots=True)
class Loaded:
    """The state on an image: its checkpoint with the journal replayed."""

    superblock: Superblock
    copy: int  # the superblock copy (0 or 1) that holds it
    inodes: dict[int, Inode]
    next_ino: int
    runs: tuple[Run, ...]  # the checkpoint's blocks: header, index, chunks
    journal: JournalState

    @property
    def journal_run(self) -> Run:
        return (JOURNAL_START, self.superblock.journal_blocks)


def _read_superblocks(dev: BlockDevice) -> tuple[Superblock, int]:
    """The valid superblock copy with the highest sequence number, and which."""
    best: tuple[Superblock, int] | None = None
    reasons = []
    for copy, blk in enumerate(SUPERBLOCK_BLOCKS):
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
        if best is None or sb.seq > best[0].seq:
            best = (sb, copy)
    if best is None:
        raise Corrupt(reasons[0])
    return best


def _read_runs(dev: BlockDevice, runs: Iterable[Run]) -> bytes:
    return b"".join(dev.read_sync(pblk, count) for pblk, count in runs)


def _runs_of(value: Any, what: str, sb: Superblock) -> list[Run]:
    try:
        runs = [(int(p), int(c)) for p, c in value]
    except (TypeError, ValueError):
        raise Corrupt(f"{what}: bad run list") from None
    for pblk, count in runs:
        check_run(what, pblk, count, sb.first_data_block, sb.device_blocks)
    return runs


def load_checkpoint(dev: BlockDevice) -> Loaded:
    """Read and verify the current checkpoint, and replay the journal onto it
    (synchronous: mount and fsck)."""
    if dynamic_fault("mount_read_checkpoint", cls="error:mount"):
        raise IOFailure("mount: injected error reading the checkpoint")
    sb, copy = _read_superblocks(dev)
    raw_header = dev.read_sync(sb.checkpoint, 1)
    if crc32(raw_header) != sb.checkpoint_crc:
        raise Corrupt(f"checkpoint header (block {sb.checkpoint}) checksum mismatch")
    header = CheckpointHeader.unpack(raw_header, sb.first_data_block, sb.device_blocks)
    if header.seq != sb.seq:
        raise Corrupt(f"checkpoint sequence {header.seq} does not match superblock {sb.seq}")
    raw_index = _read_runs(dev, header.runs)[: header.length]
    if crc32(raw_index) != header.crc:
        raise Corrupt("checkpoint index checksum mismatch")
    index = decode_blob(raw_index, "checkpoint index")
    if not isinstance(index, dict) or index.get("format") != VERSION:
        raise Corrupt("checkpoint index: wrong format")
    runs: list[Run] = [(sb.checkpoint, 1), *header.runs]
    inodes: dict[int, Inode] = {}
    try:
        next_ino = int(index["next_ino"])
        chunks = list(index["chunks"])
    except (KeyError, TypeError, ValueError):
        raise Corrupt("checkpoint index: bad fields") from None
    for i, chunk in enumerate(chunks):
        what = f"checkpoint chunk {i}"
        try:
            chunk_runs, length, crc = chunk
        except (TypeError, ValueError):
            raise Corrupt(f"{what}: bad index entry") from None
        cruns = _runs_of(chunk_runs, what, sb)
        raw = _read_runs(dev, cruns)[: int(length)]
        if crc32(raw) != int(crc):
            raise Corrupt(f"{what}: checksum mismatch")
        records = decode_blob(raw, what)
        if not isinstance(records, list):
            raise Corrupt(f"{what}: not a list of inodes")
        for rec in records:
            try:
                inode = Inode.from_record(rec)
            except (FsError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise Corrupt(f"{what}: bad inode record ({e})") from None
            if inode.ino in inodes:
                raise Corrupt(f"{what}: inode {inode.ino} appears twice")
            inodes[inode.ino] = inode
        runs += cruns
    journal, replayed_next = _replay(dev, sb, inodes)
    if ROOT_INO not in inodes or not inodes[ROOT_INO].is_dir:
        raise Corrupt("checkpoint: no root directory")
    return Loaded(sb, copy, inodes, max(next_ino, replayed_next), tuple(runs), journal)


def _entry_blocks(dev: BlockDevice, sb: Superblock, pos: int, count: int) -> bytes:
    """``count`` ring blocks from position ``pos``, wrapping at the ring's end."""
    ring = sb.journal_blocks
    first = min(count, ring - pos)
    out = dev.read_sync(JOURNAL_START + pos, first)
    if first < count:
        out += dev.read_sync(JOURNAL_START, count - first)
    return out


def _replay(dev: BlockDevice, sb: Superblock, inodes: dict[int, Inode]) -> tuple[JournalState, int]:
    """Apply the entries from the tail on while their sequence numbers follow
    on and their checksums hold."""
    if dynamic_fault("journal_replay", cls="error:mount"):
        raise IOFailure("mount: injected error replaying the journal")
    ring, seed = sb.journal_blocks, sb.seed
    pos, seq, used, entries, next_ino = sb.tail_pos, sb.tail_seq, 0, 0, 0
    torn = False
    while used < ring:
        head = JournalEntryHeader.unpack(dev.read_sync(JOURNAL_START + pos, 1), seed)
        if head is None or head.seq != seq or used + head.blocks > ring:
            break
        raw = _entry_blocks(dev, sb, pos, head.blocks)
        payload = raw[JOURNAL_HEADER_SIZE : JOURNAL_HEADER_SIZE + head.length]
        if crc32(payload, seed) != head.crc:
            after = (pos + head.blocks) % ring
            following = JournalEntryHeader.unpack(dev.read_sync(JOURNAL_START + after, 1), seed)
            if following is not None and following.seq == seq + 1:
                raise Corrupt(f"journal entry {seq} is damaged and later entries follow it")
            torn = True
            break
        what = f"journal entry {seq}"
        try:
            next_ino = max(next_ino, apply(decode_blob(payload, what), inodes, what))
        except ExtentError as e:
            raise Corrupt(f"{what}: {e}") from None
        pos = (pos + head.blocks) % ring
        used += head.blocks
        seq += 1
        entries += 1
    if used < ring:
        _refuse_later_entries(dev, sb, pos, ring - used, seq)
    return JournalState(used, seq, entries, torn), next_ino


def _refuse_later_entries(dev: BlockDevice, sb: Superblock, pos: int, count: int, seq: int) -> None:
    """Replay stopped at ``seq``: raise Corrupt if a valid entry numbered after
    it lies in the rest of the ring.  Entries are written one after the other,
    each flushed before the next, so one can only follow a missing entry when
    that entry was destroyed -- and the next commit, written where replay
    stopped, would make the stale ones after it replayable."""
    raw = _entry_blocks(dev, sb, pos, count)
    bs, seed = sb.block_size, sb.seed
    for i in range(count):
        head = JournalEntryHeader.unpack(memoryview(raw)[i * bs : (i + 1) * bs], seed)
        if head is not None and seq < head.seq < seq + sb.journal_blocks:
            raise Corrupt(f"journal entry {seq} is damaged or missing and entry {head.seq} follows")


def _batches(source: Source, inos: list[int]) -> Iterator[list[int]]:
    """``inos`` cut into chunks of about `CHUNK_WEIGHT` (an inode counts one,
    plus one per directory entry)."""
    batch: list[int] = []
    weight = 0
    for ino in inos:
        inode = source.inode(ino)
        if inode is None:
            continue
        batch.append(ino)
        weight += 1 + (len(inode.entries) if inode.entries is not None else 0)
        if weight >= CHUNK_WEIGHT:
            yield batch
            batch, weight = [], 0
    if batch:
        yield batch


def _chunk_entry(runs: list[Run], blob: bytes) -> list[Any]:
    """A chunk's line in the checkpoint index: its runs, length and checksum."""
    return [[list(r) for r in runs], len(blob), crc32(blob)]


def _chunk(source: Source, batch: list[int]) -> bytes:
    records = []
    for ino in batch:
        inode = source.inode(ino)
        if inode is not None:
            records.append(inode.to_record())
    return encode_blob(records)


@final
class Committer:
    """Writes journal entries and checkpoints; one commit at a time."""

    def __init__(self, dev: BlockDevice, alloc: Allocator, loaded: Loaded) -> None:
        self.dev = dev
        self.alloc = alloc
        self.superblock = loaded.superblock
        self.copy = loaded.copy
        self.runs: tuple[Run, ...] = loaded.runs
        self.ring = loaded.superblock.journal_blocks
        self.seed = loaded.superblock.seed
        # Ring positions are counted from the tail at mount, without wrapping.
        self._base = loaded.superblock.tail_pos
        self._tail = 0
        self._head = loaded.journal.used
        self.next_seq = loaded.journal.next_seq
        self._lock = trio.Lock()
        self._epoch = 0  # checkpoints made: a background one notices it was overtaken
        self.checkpointing = False
        self.commits = 0
        self.entries = 0
        self.checkpoints = 0
        self.full_checkpoints = 0
        self.last_commit_bytes = 0
        self.last_checkpoint_bytes = 0
        self.meta_reserve: Reservation | None = None
        self.top_up_reserve()

    # the metadata reservation:

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

    def _allocate_meta(self, nblocks: int) -> list[Run]:
        reserve = self.meta_reserve
        if reserve is not None and reserve.remaining >= nblocks:
            return self.alloc.allocate(nblocks, reservation=reserve)
        return self.alloc.allocate(nblocks)

    # the journal:

    def locked(self) -> bool:
        return self._lock.locked()

    @property
    def journal_used(self) -> int:
        return self._head - self._tail

    @property
    def wants_checkpoint(self) -> bool:
        """The journal is half full: time for a background checkpoint."""
        return not self.checkpointing and 2 * self.journal_used > self.ring

    def _pos(self, counter: int) -> int:
        return (self._base + counter) % self.ring

    async def commit(self, source: Source) -> None:
        """Make every change so far durable: one journal entry."""
        async with self._lock:
            await self._commit_locked(source)

    async def _flush_data(self) -> None:
        """The flush that makes file data (and checkpoint chunks) durable before
        a journal entry or superblock names them.  The self-test site breaks
        that ordering on purpose, so that power-cut campaigns can show they
        catch it."""
        if self.dev.statistics().pending_writes and not dynamic_fault(
            "commit_skip_checkpoint_flush", cls="error:selftest"
        ):
            await self.dev.flush()

    async def _commit_locked(self, source: Source) -> None:
        token = self.alloc.commit_begin()
        try:
            changes = source.collect()
            await self._flush_data()
            if changes:
                await self._write_entry(source, changes)
            self.commits += 1
        except BaseException:
            self.alloc.commit_abandoned(token)
            raise
        self.alloc.commit_durable(token)
        self.top_up_reserve()

    async def _write_entry(self, source: Source, changes: Changes) -> None:
        bs = self.dev.block_size
        payload = encode_blob(changes.payload())
        nblocks = -(-(JOURNAL_HEADER_SIZE + len(payload)) // bs)
        if self.journal_used + nblocks > self.ring:
            log.info(
                "commit: %d records (%d blocks) do not fit the journal's %d free blocks; "
                "writing a full checkpoint",
                changes.records(),
                nblocks,
                self.ring - self.journal_used,
            )
            await self._full_checkpoint(source)
            return
        head = JournalEntryHeader(self.next_seq, nblocks, len(payload), crc32(payload, self.seed))
        raw = (head.pack(self.seed) + payload).ljust(nblocks * bs, b"\0")
        if dynamic_fault("commit_write_journal", cls="error:commit"):
            raise IOFailure("commit: injected error writing the journal")
        pos = self._pos(self._head)
        first = min(nblocks, self.ring - pos)
        await self.dev.write(JOURNAL_START + pos, raw[: first * bs])
        if first < nblocks:
            await self.dev.write(JOURNAL_START, raw[first * bs :])
        await self.dev.flush()
        self._head += nblocks
        self.next_seq += 1
        self.entries += 1
        self.last_commit_bytes = len(payload)

    # checkpoints:

    async def checkpoint(self, source: Source) -> bool:
        """Write a fuzzy checkpoint in the background (see the module
        docstring); False if another one was running or overtook it."""
        if self.checkpointing:
            return False
        self.checkpointing = True
        written: list[Run] = []
        named = False
        try:
            async with self._lock:
                epoch, start, start_seq = self._epoch, self._head, self.next_seq
            chunks = []
            total = 0
            for batch in _batches(source, source.inode_numbers()):
                blob = _chunk(source, batch)
                runs = await self._write_blob(blob, written)
                chunks.append(_chunk_entry(runs, blob))
                total += len(blob)
            async with self._lock:
                if self._epoch == epoch:
                    await self._commit_locked(source)
                if self._epoch != epoch:  # a full checkpoint came first
                    self._release(written)
                    return False
                named = True
                await self._finish_checkpoint(source, chunks, written, start, start_seq)
                self.last_checkpoint_bytes = total
            return True
        except BaseException:
            if not named:
                self._release(written)
            raise
        finally:
            self.checkpointing = False

    async def write_checkpoint(self, source: Source) -> None:
        """Write a full checkpoint of ``source`` now (fsck --repair)."""
        async with self._lock:
            token = self.alloc.commit_begin()
            try:
                await self._full_checkpoint(source)
            except BaseException:
                self.alloc.commit_abandoned(token)
                raise
            self.alloc.commit_durable(token)

    async def _full_checkpoint(self, source: Source) -> None:
        """A checkpoint of one state: every chunk made before any is written."""
        blobs = [_chunk(source, batch) for batch in _batches(source, source.inode_numbers())]
        written: list[Run] = []
        chunks = []
        try:
            for blob in blobs:
                runs = await self._write_blob(blob, written)
                chunks.append(_chunk_entry(runs, blob))
        except BaseException:
            self._release(written)
            raise
        await self._finish_checkpoint(source, chunks, written, self._head, self.next_seq)
        self.full_checkpoints += 1
        self.last_checkpoint_bytes = sum(len(b) for b in blobs)

    async def _write_blob(self, blob: bytes, written: list[Run]) -> list[Run]:
        bs = self.dev.block_size
        runs = self._allocate_meta(max(1, -(-len(blob) // bs)))
        written += runs
        if dynamic_fault("checkpoint_write_chunk", cls="error:commit"):
            raise IOFailure("checkpoint: injected error writing a chunk")
        padded = blob.ljust(sum(c for _, c in runs) * bs, b"\0")
        pos = 0
        for pblk, count in runs:
            await self.dev.write(pblk, padded[pos : pos + count * bs])
            pos += count * bs
        return runs

    def _release(self, runs: list[Run]) -> None:
        for pblk, count in runs:
            self.alloc.free_now(pblk, count)
        runs.clear()

    async def _finish_checkpoint(
        self,
        source: Source,
        chunks: list[list[Any]],
        written: list[Run],
        start: int,
        start_seq: int,
    ) -> None:
        """Index, header, flush, superblock, flush; then the old checkpoint's
        blocks and the journal before ``start`` are free.  Called locked."""
        bs = self.dev.block_size
        index = encode_blob({"format": VERSION, "next_ino": source.next_ino, "chunks": chunks})
        seq = self.superblock.seq + 1
        try:
            index_runs = await self._write_blob(index, written)
            if dynamic_fault("commit_write_checkpoint", cls="error:commit"):
                raise IOFailure("commit: injected error writing the checkpoint")
            header_runs = self._allocate_meta(1)
            written += header_runs
            header_blk = header_runs[0][0]
            header = CheckpointHeader(seq, len(index), crc32(index), tuple(index_runs))
            if len(index_runs) > CheckpointHeader.max_runs(bs):
                raise NoSpace("checkpoint: free space too fragmented for the index")
            raw_header = header.pack(bs)
            await self.dev.write(header_blk, raw_header)
            await self._flush_data()
        except BaseException:
            self._release(written)
            raise
        old = self.superblock
        sb = Superblock(
            bs,
            old.device_blocks,
            seq,
            header_blk,
            crc32(raw_header),
            old.uuid,
            old.created_ns,
            old.flags,
            old.journal_blocks,
            self._pos(start),
            start_seq,
        )
        if dynamic_fault("commit_write_superblock", cls="error:commit"):
            raise IOFailure("commit: injected error writing the superblock")
        copy = 1 - self.copy
        await self.dev.write(SUPERBLOCK_BLOCKS[copy], sb.pack(bs))
        await self.dev.flush()
        old_runs = self.runs
        self.superblock, self.copy = sb, copy
        self.runs = tuple(written)
        written.clear()
        self._tail = start
        self._epoch += 1
        self.checkpoints += 1
        for pblk, count in old_runs:
            self.alloc.free_now(pblk, count)
        self.top_up_reserve()


__all__ = ["CHUNK_WEIGHT", "Committer", "JournalState", "Loaded", "Source", "load_checkpoint"]
