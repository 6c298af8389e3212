"""The on-disk format: superblocks, the metadata journal, checkpoints, mkfs.

Layout of an image of N blocks (format version 2)::

    block 0, 1        superblock copies A and B: a checkpoint writes the copy
                      that does not hold the current state, so a torn superblock
                      write leaves the other one intact
    block 2 .. 2+J-1  the journal: a ring of J blocks holding one entry per
                      commit (`JournalEntryHeader` + a compressed payload of
                      what changed), sequence-numbered and checksummed
    block 2+J ...     data and checkpoint blocks, handed out by the allocator

A superblock names the current *checkpoint header* block and the journal's
*tail*: the ring position and sequence number of the first entry to replay on
top of that checkpoint.  The header lists the runs of blocks holding the
checkpoint *index* (its length and checksum); the index lists the checkpoint's
*chunks*, each a compressed JSON list of whole inode records (attributes,
xattrs, directory entries, symlink target, extent runs) with its own runs,
length and checksum.  Chunks are written a few thousand inodes at a time,
between requests, while the filesystem keeps changing: a checkpoint is *fuzzy*,
and what changed while it was written is in the journal from its tail on.

Every journal record sets a piece of state to its value at commit time (an
inode's attributes, one directory entry, a range of one file's extent map, an
inode's removal), never a difference, so replaying a record twice or on top of
a newer chunk gives the same result: mount loads the checkpoint, then applies
the entries from the tail while their sequence numbers follow on and their
checksums hold.  The first entry that fails either ends the journal (a torn
tail, dropped).  Checksums are CRC32 seeded with the filesystem's uuid, so an
entry left by an earlier filesystem on the same blocks never passes.
Block usage is not stored: it is the union of the extent maps and the
metadata blocks, rebuilt at mount.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

from fusefs.errors import Corrupt, Exists, InUse, InvalidArgument, NotFound

MAGIC = b"FUSEFS\x00\x01"
CHECKPOINT_MAGIC = b"FSCKPT\x00\x02"
JOURNAL_MAGIC = b"FSJRNL\x00\x02"
VERSION = 2
SUPERBLOCK_BLOCKS = (0, 1)
JOURNAL_START = 2

MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 65536
MIN_BLOCKS = 64
MAX_BLOCKS = 1 << 32
MIN_JOURNAL_BLOCKS = 8
MAX_JOURNAL_BYTES = 64 << 20

# magic, version, block size, device blocks, sequence, checkpoint header block,
# header checksum, uuid, creation time (ns), flags, journal blocks, journal tail
# position, journal tail sequence; then a CRC32 of all that.
_SB = struct.Struct("<8sIIQQQI16sQIIIQ")
_SB_CRC = struct.Struct("<I")
# magic, sequence, index length, index checksum, number of runs; runs follow.
_HDR = struct.Struct("<8sQQII")
_RUN = struct.Struct("<QI")
# magic, sequence, blocks, payload length, payload checksum; then the header's
# checksum.  The payload follows the header in the entry's first block.
_JE = struct.Struct("<8sQIII")
_JE_CRC = struct.Struct("<I")
JOURNAL_HEADER_SIZE = _JE.size + _JE_CRC.size


def crc32(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    return zlib.crc32(data, seed) & 0xFFFFFFFF


def journal_blocks_for(device_blocks: int, block_size: int) -> int:
    """The journal's size for a new image: 1/64 of it, at least
    `MIN_JOURNAL_BLOCKS`, at most 64 MiB, never more than a quarter of it."""
    want = max(device_blocks // 64, MIN_JOURNAL_BLOCKS)
    want = min(want, MAX_JOURNAL_BYTES // block_size, device_blocks // 4)
    return max(want, MIN_JOURNAL_BLOCKS)


@dataclass(frozen=True, slots=True)
class Superblock:
    block_size: int
    device_blocks: int
    seq: int
    checkpoint: int  # header block
    checkpoint_crc: int
    uuid: bytes
    created_ns: int
    flags: int = 0
    journal_blocks: int = MIN_JOURNAL_BLOCKS
    tail_pos: int = 0  # ring position (0 .. journal_blocks-1) of the first entry to replay
    tail_seq: int = 1  # its sequence number
    version: int = VERSION

    @property
    def first_data_block(self) -> int:
        return JOURNAL_START + self.journal_blocks

    @property
    def seed(self) -> int:
        """The checksum seed of this filesystem's journal entries."""
        return crc32(self.uuid)

    def pack(self, block_size: int) -> bytes:
        body = _SB.pack(
            MAGIC,
            self.version,
            self.block_size,
            self.device_blocks,
            self.seq,
            self.checkpoint,
            self.checkpoint_crc,
            self.uuid,
            self.created_ns,
            self.flags,
            self.journal_blocks,
            self.tail_pos,
            self.tail_seq,
        )
        body += _SB_CRC.pack(crc32(body))
        return body.ljust(block_size, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock:
        """Decode a superblock; raise Corrupt with the reason when it is not one."""
        if len(raw) < _SB.size + _SB_CRC.size:
            raise Corrupt("superblock: short read")
        if raw[: len(MAGIC)] != MAGIC:
            raise Corrupt("not a fusefs image (bad magic)")
        (version,) = struct.unpack_from("<I", raw, len(MAGIC))
        if version != VERSION:
            raise Corrupt(
                f"unsupported format version {version} (this fusefs reads version "
                f"{VERSION}; make a new image with fusefs mkfs)"
            )
        body = raw[: _SB.size]
        (stored,) = _SB_CRC.unpack_from(raw, _SB.size)
        if stored != crc32(body):
            raise Corrupt("superblock checksum mismatch")
        fields = _SB.unpack(body)
        _, version, bs, blocks, seq, cp, cp_crc, uid, created, flags, jblocks, tpos, tseq = fields
        if not (MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE) or bs & (bs - 1):
            raise Corrupt(f"superblock: bad block size {bs}")
        if jblocks < MIN_JOURNAL_BLOCKS or JOURNAL_START + jblocks >= blocks:
            raise Corrupt(f"superblock: journal of {jblocks} blocks does not fit the device")
        if not (JOURNAL_START + jblocks <= cp < blocks):
            raise Corrupt(f"superblock: checkpoint block {cp} outside the data area")
        if tpos >= jblocks:
            raise Corrupt(f"superblock: journal tail {tpos} outside the journal")
        return cls(bs, blocks, seq, cp, cp_crc, uid, created, flags, jblocks, tpos, tseq, version)


@dataclass(frozen=True, slots=True)
class CheckpointHeader:
    seq: int
    length: int
    crc: int
    runs: tuple[tuple[int, int], ...]

    @staticmethod
    def max_runs(block_size: int) -> int:
        return (block_size - _HDR.size) // _RUN.size

    def pack(self, block_size: int) -> bytes:
        if len(self.runs) > self.max_runs(block_size):
            raise InvalidArgument("checkpoint: too many runs for one header block")
        out = bytearray(
            _HDR.pack(CHECKPOINT_MAGIC, self.seq, self.length, self.crc, len(self.runs))
        )
        for pblk, count in self.runs:
            out += _RUN.pack(pblk, count)
        return bytes(out.ljust(block_size, b"\0"))

    @classmethod
    def unpack(cls, raw: bytes, first_data: int, device_blocks: int) -> CheckpointHeader:
        magic, seq, length, crc, nruns = _HDR.unpack_from(raw, 0)
        if magic != CHECKPOINT_MAGIC:
            raise Corrupt("checkpoint header: bad magic")
        if nruns > cls.max_runs(len(raw)):
            raise Corrupt("checkpoint header: run count out of range")
        runs = []
        for i in range(nruns):
            pblk, count = _RUN.unpack_from(raw, _HDR.size + i * _RUN.size)
            check_run("checkpoint header", pblk, count, first_data, device_blocks)
            runs.append((pblk, count))
        if length > sum(c for _, c in runs) * len(raw):
            raise Corrupt("checkpoint header: index longer than its blocks")
        return cls(seq, length, crc, tuple(runs))


def check_run(what: str, pblk: int, count: int, first_data: int, device_blocks: int) -> None:
    if pblk < first_data or count <= 0 or pblk + count > device_blocks:
        raise Corrupt(f"{what}: run {pblk}+{count} outside the data area")


@dataclass(frozen=True, slots=True)
class JournalEntryHeader:
    """The head of one journal entry (one commit)."""

    seq: int
    blocks: int  # blocks the entry covers, header included
    length: int  # payload bytes
    crc: int  # payload checksum (seeded)

    def pack(self, seed: int) -> bytes:
        body = _JE.pack(JOURNAL_MAGIC, self.seq, self.blocks, self.length, self.crc)
        return body + _JE_CRC.pack(crc32(body, seed))

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, seed: int) -> JournalEntryHeader | None:
        """The header at the start of ``raw``, or None if there is none (a block
        never written, an earlier lap's payload, a torn header)."""
        body = bytes(raw[: _JE.size])
        if body[: len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
            return None
        (stored,) = _JE_CRC.unpack_from(raw, _JE.size)
        if stored != crc32(body, seed):
            return None
        _, seq, blocks, length, crc = _JE.unpack(body)
        if blocks < 1 or length > blocks * len(raw) - JOURNAL_HEADER_SIZE:
            return None
        return cls(seq, blocks, length, crc)


def normalize_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted runs of blocks with adjacent runs merged (how block usage is stored)."""
    out: list[tuple[int, int]] = []
    for pblk, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] == pblk:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((pblk, n))
    return out


def encode_blob(obj: Any) -> bytes:
    """Serialize a checkpoint chunk, index or journal payload."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    return zlib.compress(text.encode("ascii"), 1)


def decode_blob(raw: bytes, what: str) -> Any:
    try:
        return json.loads(zlib.decompress(raw).decode("ascii"))
    except (zlib.error, UnicodeDecodeError, ValueError) as e:
        raise Corrupt(f"{what} undecodable: {e}") from None


def root_record(now_ns: int, uid: int, gid: int) -> dict[str, Any]:
    """The inode record of a new filesystem's empty root directory."""
    return {
        "ino": 1,
        "mode": 0o40755,
        "uid": uid,
        "gid": gid,
        "nlink": 2,
        "size": 0,
        "atime": now_ns,
        "mtime": now_ns,
        "ctime": now_ns,
        "rdev": 0,
        "gen": 1,
        "parent": 1,
        "entries": {},
    }


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64M``, ``1G``, ``2GiB``, ``512k``: binary multiples."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"bad size {text!r} (bytes, or with a unit: 512K, 64M, 1G, 2GiB)")
    number, unit = int(m.group(1)), m.group(2).lower()
    return number * (1 << (10 * "_kmgtpe".index(unit))) if unit else number


def format_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that divides it: ``256K``, ``1G``, ``1000``."""
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)


def min_image_size(block_size: int) -> int:
    """The smallest image mkfs makes with blocks of ``block_size`` bytes."""
    return MIN_BLOCKS * block_size


def mkfs(
    path: str | os.PathLike[str], size: int, block_size: int = 4096, force: bool = False
) -> None:
    """Make a new, empty filesystem in a sparse image file at ``path``.

    An existing file is overwritten only when it holds nothing (empty, or zeros
    only) or with ``force``; never while a fusefs process holds the image's lock
    (`fusefs.blockdev.BlockDevice` takes it for as long as the image is mounted or
    checked), which mkfs takes too before it changes a byte.
    """
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise InvalidArgument(
            f"block size must be a power of two in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
        )
    blocks = size // block_size
    if blocks < MIN_BLOCKS:
        least = min_image_size(block_size)
        raise InvalidArgument(
            f"size too small: at least {format_size(least)} ({least} bytes, "
            f"{MIN_BLOCKS} blocks of {block_size})"
        )
    if blocks > MAX_BLOCKS:
        raise InvalidArgument(f"size too large: at most {MAX_BLOCKS * block_size} bytes")
    path = os.fspath(path)
    fd = _open_locked(path)
    try:
        if not force:
            _refuse_to_overwrite(fd, path)
        now = time.time_ns()
        jblocks = journal_blocks_for(blocks, block_size)
        header_blk = JOURNAL_START + jblocks
        chunk = encode_blob([root_record(now, os.getuid(), os.getgid())])
        chunk_blocks = -(-len(chunk) // block_size)
        chunk_start = header_blk + 1
        index = encode_blob(
            {
                "format": VERSION,
                "next_ino": 2,
                "chunks": [[[[chunk_start, chunk_blocks]], len(chunk), crc32(chunk)]],
            }
        )
        index_blocks = -(-len(index) // block_size)
        index_start = chunk_start + chunk_blocks
        if index_start + index_blocks > blocks:
            raise InvalidArgument("size too small for the first checkpoint")
        header = CheckpointHeader(1, len(index), crc32(index), ((index_start, index_blocks),))
        hdr_raw = header.pack(block_size)
        sb = Superblock(
            block_size,
            blocks,
            1,
            header_blk,
            crc32(hdr_raw),
            uuid.uuid4().bytes,
            now,
            journal_blocks=jblocks,
        )
        os.ftruncate(fd, 0)
        os.ftruncate(fd, blocks * block_size)
        os.pwrite(fd, hdr_raw, header_blk * block_size)
        os.pwrite(fd, chunk.ljust(chunk_blocks * block_size, b"\0"), chunk_start * block_size)
        os.pwrite(fd, index.ljust(index_blocks * block_size, b"\0"), index_start * block_size)
        os.fsync(fd)
        # Both copies hold the first state: the first checkpoint overwrites one
        # of them, and the other must survive that write being torn.
        for blk in SUPERBLOCK_BLOCKS:
            os.pwrite(fd, sb.pack(block_size), blk * block_size)
        os.fsync(fd)
    except OSError as e:
        raise InvalidArgument(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _open_locked(path: str) -> int:
    """``path`` opened for writing (created if missing), with the image's lock
    held exclusively: a mounted image makes this fail with `InUse`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise InvalidArgument(f"{path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InUse(f"{path} is in use by a fusefs process (mounted?); unmount it first") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{path}: not a regular file")
    return fd


def _refuse_to_overwrite(fd: int, path: str) -> None:
    """Raise `Exists` if the file at ``fd`` holds a fusefs image or any data."""
    head = os.pread(fd, 2 * MAX_BLOCK_SIZE, 0)
    if _holds_superblock(head):
        raise Exists(f"{path} holds a fusefs image; use --force to overwrite it")
    size = os.fstat(fd).st_size
    if _holds_data(fd, size):
        raise Exists(
            f"{path} holds {size} bytes of data that is not a fusefs image; "
            f"use --force to overwrite it"
        )


def _holds_superblock(head: bytes) -> bool:
    return any(head[offset : offset + len(MAGIC)] == MAGIC for offset in _SUPERBLOCK_OFFSETS)


def _holds_data(fd: int, size: int) -> bool:
    """Whether any byte of the file is not zero (holes are skipped unread)."""
    offset = 0
    while offset < size:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past offset
                return False
            raise
        while offset < end:
            chunk = os.pread(fd, min(end - offset, 1 << 20), offset)
            if not chunk:
                return False
            if chunk.count(0) != len(chunk):
                return True
            offset += len(chunk)
    return False


# Copy A sits at offset 0; copy B at one block, which depends on the block size.
_SUPERBLOCK_OFFSETS = (0, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def probe_block_size(path: str | os.PathLike[str]) -> int:
    """Read the block size from whichever superblock copy is valid."""
    try:
        with open(path, "rb") as f:
            head = f.read(2 * MAX_BLOCK_SIZE)
    except FileNotFoundError:
        raise NotFound(f"{os.fspath(path)}: no such image file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{os.fspath(path)}: is a directory, not an image") from None
    except OSError as e:
        raise Corrupt(f"{os.fspath(path)}: {e.strerror}") from None
    reasons = []
    for offset in _SUPERBLOCK_OFFSETS:
        try:
            sb = Superblock.unpack(head[offset : offset + 256])
        except Corrupt as e:
            reasons.append(str(e))
            continue
        if offset in (0, sb.block_size):
            return sb.block_size
    raise Corrupt(reasons[0] if reasons else "not a fusefs image")
