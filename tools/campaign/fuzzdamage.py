"""The damage of image fuzzing: what is done to a base image, deterministic per seed.

Every damage function takes the image's bytes and a seeded ``random.Random``
and returns the damaged bytes and a one-line recipe of what it did; the same
base, kind and seed always give the same image.  Kinds:

* ``bitflip``, ``zero-blocks``, ``swap-blocks``, ``truncate``: raw damage, aimed
  at metadata blocks (superblocks, the journal's live entries, the checkpoint)
  two times out of three;
* ``torn-superblock``: a superblock copy rewritten with a valid checksum but
  wrong fields (a sequence number that wins, a stale checkpoint, a moved
  journal tail, another size or uuid);
* ``torn-checkpoint``, ``torn-journal``: 512-byte sectors of checkpoint or
  journal blocks replaced (a write torn by a power cut), or a journal entry
  that looks valid but is not (a header whose payload fails, a damaged entry
  with valid ones after it);
* ``meta-checkpoint``, ``meta-index``, ``meta-journal``: *valid checksums*,
  inconsistent metadata -- a chunk, the index or a journal entry decoded,
  changed (double-mapped blocks, wrong link counts, loops in the tree, entries
  naming missing inodes, extents past the device or into the superblocks,
  journal or checkpoint, negative or huge sizes, wrong types) and re-encoded
  with every checksum up to the superblock made right;
* ``combined``: one of the torn or changed kinds, then raw damage or a changed
  journal entry on top.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from fusefs.format import (
    JOURNAL_HEADER_SIZE,
    JOURNAL_START,
    SUPERBLOCK_BLOCKS,
    CheckpointHeader,
    JournalEntryHeader,
    Superblock,
    crc32,
    decode_blob,
    encode_blob,
)

SECTOR: Final = 512
Run = tuple[int, int]


@dataclass
class Entry:
    pos: int  # ring position
    seq: int
    blocks: int
    payload: Any


@dataclass
class Layout:
    """What the image holds, decoded without fusefs's loader (which may be what
    is under test): superblock, checkpoint, chunks, journal entries."""

    bs: int
    sb: Superblock
    copy: int
    header: CheckpointHeader
    index: dict[str, Any]
    chunks: list[list[dict[str, Any]]]
    chunk_runs: list[list[Run]]
    entries: list[Entry]
    head: int  # ring position after the last live entry
    next_seq: int
    free: list[int]  # data blocks nothing uses

    @property
    def metadata_blocks(self) -> list[int]:
        out = list(SUPERBLOCK_BLOCKS)
        ring = self.sb.journal_blocks
        for e in self.entries:
            out += [JOURNAL_START + (e.pos + i) % ring for i in range(e.blocks)]
        out.append(self.sb.checkpoint)
        for pblk, n in self.header.runs:
            out += range(pblk, pblk + n)
        for runs in self.chunk_runs:
            for pblk, n in runs:
                out += range(pblk, pblk + n)
        return out

    def records(self) -> list[dict[str, Any]]:
        return [r for chunk in self.chunks for r in chunk]


def _read(img: bytes | bytearray, bs: int, pblk: int, n: int = 1) -> bytes:
    return bytes(img[pblk * bs : (pblk + n) * bs])


def _read_runs(img: bytes | bytearray, bs: int, runs: list[Run]) -> bytes:
    return b"".join(_read(img, bs, p, n) for p, n in runs)


def parse(img: bytes | bytearray) -> Layout:
    """Decode a healthy base image."""
    best: tuple[Superblock, int] | None = None
    bs0 = Superblock.unpack(bytes(img[:1024])).block_size  # copy A is at 0, B one block on
    for c, blk in enumerate(SUPERBLOCK_BLOCKS):
        sb = Superblock.unpack(bytes(img[blk * bs0 : blk * bs0 + bs0]))
        if best is None or sb.seq > best[0].seq:
            best = (sb, c)
    assert best is not None
    sb, c = best
    bs = sb.block_size
    header = CheckpointHeader.unpack(
        _read(img, bs, sb.checkpoint), sb.first_data_block, sb.device_blocks
    )
    index = decode_blob(_read_runs(img, bs, list(header.runs))[: header.length], "index")
    chunks, chunk_runs = [], []
    for runs, length, _crc in index["chunks"]:
        rl = [(int(p), int(n)) for p, n in runs]
        chunk_runs.append(rl)
        chunks.append(decode_blob(_read_runs(img, bs, rl)[:length], "chunk"))
    entries = []
    ring, seed = sb.journal_blocks, sb.seed
    pos, seq, used = sb.tail_pos, sb.tail_seq, 0
    while used < ring:
        head = JournalEntryHeader.unpack(_read(img, bs, JOURNAL_START + pos), seed)
        if head is None or head.seq != seq or used + head.blocks > ring:
            break
        raw = _ring_read(img, sb, pos, head.blocks)
        payload = raw[JOURNAL_HEADER_SIZE : JOURNAL_HEADER_SIZE + head.length]
        if crc32(payload, seed) != head.crc:
            break
        entries.append(Entry(pos, seq, head.blocks, decode_blob(payload, "entry")))
        pos = (pos + head.blocks) % ring
        used += head.blocks
        seq += 1
    used_blocks: set[int] = set()
    for rec in [r for ch in chunks for r in ch]:
        for _l, p, n, _u in rec.get("extents", ()):
            used_blocks.update(range(p, p + n))
    for e in entries:
        for _ino, _lo, _hi, runs in e.payload["extents"]:
            for _l, p, n, _u in runs:
                used_blocks.update(range(p, p + n))
    layout = Layout(bs, sb, c, header, index, chunks, chunk_runs, entries, pos, seq, [])
    used_blocks.update(layout.metadata_blocks)
    layout.free = [b for b in range(sb.first_data_block, sb.device_blocks) if b not in used_blocks]
    return layout


def _ring_read(img: bytes | bytearray, sb: Superblock, pos: int, count: int) -> bytes:
    bs, ring = sb.block_size, sb.journal_blocks
    return b"".join(_read(img, bs, JOURNAL_START + (pos + i) % ring) for i in range(count))


def _write(img: bytearray, bs: int, pblk: int, data: bytes) -> None:
    img[pblk * bs : pblk * bs + len(data)] = data


# targets:


def _target_block(layout: Layout, nblocks: int, rng: random.Random) -> int:
    """A block to damage: metadata two times out of three."""
    if rng.random() < 2 / 3:
        return rng.choice(layout.metadata_blocks)
    return rng.randrange(nblocks)


# raw damage:


def bitflip(img: bytearray, layout: Layout, rng: random.Random) -> str:
    bs = layout.bs
    blk = _target_block(layout, len(img) // bs, rng)
    flips = []
    for _ in range(rng.randint(1, 8)):
        # Most flips near the block's start, where headers and compressed streams are.
        off = rng.randrange(min(bs, 256) if rng.random() < 0.6 else bs)
        bit = rng.randrange(8)
        img[blk * bs + off] ^= 1 << bit
        flips.append(f"{off}.{bit}")
    return f"flip bits {','.join(flips)} of block {blk}"


def zero_blocks(img: bytearray, layout: Layout, rng: random.Random) -> str:
    bs = layout.bs
    blks = sorted({_target_block(layout, len(img) // bs, rng) for _ in range(rng.randint(1, 3))})
    for blk in blks:
        _write(img, bs, blk, bytes(bs))
    return f"zero blocks {blks}"


def swap_blocks(img: bytearray, layout: Layout, rng: random.Random) -> str:
    bs = layout.bs
    a = _target_block(layout, len(img) // bs, rng)
    b = rng.randrange(len(img) // bs) if rng.random() < 0.5 else rng.choice(layout.metadata_blocks)
    da, db = _read(img, bs, a), _read(img, bs, b)
    _write(img, bs, a, db)
    _write(img, bs, b, da)
    return f"swap blocks {a} and {b}"


def truncate(img: bytearray, layout: Layout, rng: random.Random) -> str:
    bs = layout.bs
    nblocks = len(img) // bs
    choice = rng.random()
    if choice < 0.15:
        size = rng.randrange(0, 2 * bs + 1)
    elif choice < 0.3:
        size = len(img) - rng.randint(1, bs)
    elif choice < 0.65:
        size = rng.randrange(layout.sb.first_data_block, nblocks) * bs
    else:
        size = rng.randrange(0, len(img))
    del img[size:]
    return f"truncate the image to {size} bytes"


# torn writes:


def _tear(img: bytearray, bs: int, blk: int, rng: random.Random, other: bytes) -> str:
    sectors = bs // SECTOR
    torn = sorted(rng.sample(range(sectors), rng.randint(1, sectors - 1)))
    for s in torn:
        off = blk * bs + s * SECTOR
        img[off : off + SECTOR] = other[s * SECTOR : (s + 1) * SECTOR]
    return f"sectors {torn} of block {blk}"


def _other_content(img: bytearray, layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    bs = layout.bs
    r = rng.random()
    if r < 0.3:
        return bytes(bs), "zeros"
    if r < 0.6 and layout.free:
        blk = rng.choice(layout.free)
        return _read(img, bs, blk), f"free block {blk}"
    blk = rng.choice(layout.metadata_blocks)
    return _read(img, bs, blk), f"block {blk}"


def torn_superblock(img: bytearray, layout: Layout, rng: random.Random) -> str:
    sb, bs = layout.sb, layout.bs
    changes: dict[str, Any] = {}
    what = rng.choice(
        ["stale-checkpoint", "tail", "journal-size", "device-size", "uuid", "crc", "seq", "tear"]
    )
    if what == "tear":
        other, whence = _other_content(img, layout, rng)
        copy_ = rng.randrange(2)
        return f"superblock copy {copy_}: " + _tear(img, bs, copy_, rng, other) + f" from {whence}"
    if what == "stale-checkpoint":
        stale = [b for b, _ in layout.header.runs] + [r[0][0] for r in layout.chunk_runs]
        changes["checkpoint"] = rng.choice(
            stale + rng.sample(layout.free, min(2, len(layout.free)))
        )
    elif what == "tail":
        changes["tail_pos"] = rng.randrange(sb.journal_blocks)
        changes["tail_seq"] = sb.tail_seq + rng.choice([-1, 0, 1, 2, 1 << 40])
    elif what == "journal-size":
        changes["journal_blocks"] = max(8, sb.journal_blocks + rng.choice([-4, -1, 1, 3, 50]))
    elif what == "device-size":
        changes["device_blocks"] = sb.device_blocks + rng.choice([-30, -1, 1, 1000, 1 << 33])
    elif what == "uuid":
        changes["uuid"] = rng.randbytes(16)
    elif what == "crc":
        changes["checkpoint_crc"] = rng.getrandbits(32)
    else:
        changes["seq"] = sb.seq + rng.choice([1, 5]) if rng.random() < 0.5 else 0
    new = dataclasses.replace(sb, **changes)
    # Written to the copy that does not hold the current state, with a sequence
    # number that wins -- or over the current copy.
    target = rng.randrange(2)
    if target != layout.copy and "seq" not in changes:
        new = dataclasses.replace(new, seq=sb.seq + 1)
    _write(img, bs, SUPERBLOCK_BLOCKS[target], new.pack(bs))
    return f"superblock copy {target}: {what} {changes}"


def torn_checkpoint(img: bytearray, layout: Layout, rng: random.Random) -> str:
    bs = layout.bs
    blocks = [layout.sb.checkpoint, *(b for p, n in layout.header.runs for b in range(p, p + n))]
    for runs in layout.chunk_runs:
        blocks += [b for p, n in runs for b in range(p, p + n)]
    blk = rng.choice(blocks)
    other, whence = _other_content(img, layout, rng)
    return "checkpoint " + _tear(img, bs, blk, rng, other) + f" from {whence}"


def _entry_raw(layout: Layout, seq: int, payload: bytes, blocks: int | None = None) -> bytes:
    seed, bs = layout.sb.seed, layout.bs
    n = blocks or -(-(JOURNAL_HEADER_SIZE + len(payload)) // bs)
    head = JournalEntryHeader(seq, n, len(payload), crc32(payload, seed))
    return (head.pack(seed) + payload).ljust(n * bs, b"\0")


def _ring_write(img: bytearray, layout: Layout, pos: int, raw: bytes) -> None:
    bs, ring = layout.bs, layout.sb.journal_blocks
    for i in range(len(raw) // bs):
        _write(img, bs, JOURNAL_START + (pos + i) % ring, raw[i * bs : (i + 1) * bs])


def torn_journal(img: bytearray, layout: Layout, rng: random.Random) -> str:
    bs = layout.bs
    what = rng.choice(["tear", "bad-payload-at-head", "huge-entry", "damaged-middle"])
    if what == "tear" and layout.entries:
        e = rng.choice(layout.entries)
        blk = JOURNAL_START + (e.pos + rng.randrange(e.blocks)) % layout.sb.journal_blocks
        other, whence = _other_content(img, layout, rng)
        return f"journal entry {e.seq}: " + _tear(img, bs, blk, rng, other) + f" from {whence}"
    if what == "damaged-middle" and len(layout.entries) >= 2:
        e = rng.choice(layout.entries[:-1])
        blk = JOURNAL_START + e.pos
        off = JOURNAL_HEADER_SIZE + rng.randrange(8)
        img[blk * bs + off] ^= 0xFF
        return f"journal entry {e.seq}: payload byte {off} inverted, later entries valid"
    payload = encode_blob(
        {"next_ino": 2, "inodes": [], "dirents": [], "extents": [], "deleted": []}
    )
    raw = bytearray(_entry_raw(layout, layout.next_seq, payload))
    if what == "huge-entry":
        seed = layout.sb.seed
        n = layout.sb.journal_blocks + rng.choice([0, 1, 1000])
        head = JournalEntryHeader(layout.next_seq, n, len(payload), crc32(payload, seed))
        raw[:JOURNAL_HEADER_SIZE] = head.pack(seed)
    else:
        raw[JOURNAL_HEADER_SIZE + rng.randrange(len(payload))] ^= 0x5A
    _ring_write(img, layout, layout.head, bytes(raw[:bs]))
    return f"journal: {what} entry {layout.next_seq} at ring position {layout.head}"


# valid checksums, wrong metadata:


_WEIRD: Final[tuple[Any, ...]] = (
    "7",
    "x",
    None,
    [],
    {},
    1.5,
    True,
    -1,
    -(1 << 70),
    1 << 70,
    1 << 64,
    [1, 2],
    {"a": 1},
)


@dataclass
class Ctx:
    layout: Layout
    rng: random.Random

    @property
    def bad_pblks(self) -> list[int]:
        sb = self.layout.sb
        return [
            0,
            1,
            JOURNAL_START,
            sb.first_data_block - 1,
            sb.checkpoint,
            self.layout.header.runs[0][0],
            self.layout.chunk_runs[0][0][0],
            sb.device_blocks - 1,
            sb.device_blocks,
            sb.device_blocks + 3,
            -5,
            1 << 46,
            1 << 50,
            1 << 64,
        ]

    def used_pblks(self) -> list[int]:
        out = []
        for rec in self.layout.records():
            for run in rec.get("extents", ()):
                out.append(run[1])
        return out or [self.layout.sb.first_data_block]


def _of_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    def ok(r: dict[str, Any]) -> bool:
        mode = r.get("mode", 0)
        if not isinstance(mode, int):
            return False
        fmt = mode & 0o170000
        return {"dir": fmt == 0o040000, "reg": fmt == 0o100000, "lnk": fmt == 0o120000}[kind]

    return [r for r in records if ok(r)]


def mutate_record(records: list[dict[str, Any]], ctx: Ctx, *, whole: bool) -> str:
    """Change one inode record of ``records`` in place (``whole``: a checkpoint
    record, with entries and extents; else a journal ``inodes`` record)."""
    rng = ctx.rng
    dirs, files = _of_kind(records, "dir"), _of_kind(records, "reg")
    links = _of_kind(records, "lnk")
    # Three changes in four keep every field's type (only the checks of the
    # tree, the counts and the blocks can catch them); the rest are garbage.
    sound = ["nlink", "size", "type", "duplicate", "remove"]
    garbage = ["types", "ino", "xattrs"]
    if whole and files:
        sound += ["double-map", "extent-bad-place"] * 2
        garbage.append("extent-bad-shape")
    if whole and dirs:
        sound += ["loop", "dangling", "parent"] * 2
        garbage.append("entries-type")
    if links:
        sound.append("target")
    op = rng.choice(sound) if rng.random() < 0.75 else rng.choice(garbage)
    if op == "double-map":
        rec = rng.choice(files)
        runs = rec.setdefault("extents", [])
        pblk = rng.choice(ctx.used_pblks())
        if runs and rng.random() < 0.5:
            runs[rng.randrange(len(runs))][1] = pblk
        else:
            end = max((r[0] + r[2] for r in runs), default=0)
            runs.append([end + rng.randint(0, 3), pblk, rng.randint(1, 4), False])
        return f"inode {rec['ino']}: extent onto block {pblk}, mapped already"
    if op == "extent-bad-place":
        rec = rng.choice(files)
        pblk = rng.choice(ctx.bad_pblks)
        n = rng.randint(1, 8)
        runs = rec.setdefault("extents", [])
        if runs and rng.random() < 0.5:
            runs[rng.randrange(len(runs))][1] = pblk
        else:
            runs.append([rng.choice([0, 100, 1 << 20]), pblk, n, rng.random() < 0.2])
        return f"inode {rec['ino']}: extent at block {pblk}"
    if op == "extent-bad-shape":
        rec = rng.choice(files)
        runs = rec.setdefault("extents", [])
        shape = rng.choice(["len0", "lenneg", "lblkneg", "lblkhuge", "overlap", "arity", "type"])
        pblk = rng.choice(ctx.layout.free or [ctx.layout.sb.first_data_block])
        bad: Any = {
            "len0": [0, pblk, 0, False],
            "lenneg": [0, pblk, -3, False],
            "lblkneg": [-4, pblk, 2, False],
            "lblkhuge": [(1 << 40) - 1, pblk, 4, False],
            "overlap": [runs[0][0] if runs else 0, pblk, 2, False],
            "arity": [0, pblk, 1],
            "type": rng.choice([[0, "x", 1, False], "run", [0, pblk, 1.5, False], None]),
        }[shape]
        runs.append(bad)
        return f"inode {rec['ino']}: extent run {bad!r} ({shape})"
    if op == "loop":
        d = rng.choice(dirs)
        target = rng.choice([1, d["ino"], rng.choice(dirs)["ino"]])
        if rng.random() < 0.5 and len(dirs) >= 2:
            # Two directories holding each other, nowhere else.
            a, b = rng.sample(dirs, 2)
            for rec in dirs:
                ents = rec.get("entries", {})
                for k in [k for k, v in ents.items() if v in (a["ino"], b["ino"])]:
                    del ents[k]
            a.setdefault("entries", {})["loopb"] = b["ino"]
            b.setdefault("entries", {})["loopa"] = a["ino"]
            return f"directories {a['ino']} and {b['ino']} hold each other, unreachable"
        d.setdefault("entries", {})[f"loop{rng.randrange(99)}"] = target
        return f"directory {d['ino']}: entry naming directory {target} (a loop)"
    if op == "dangling":
        d = rng.choice(dirs)
        top = max((r["ino"] for r in records if isinstance(r.get("ino"), int)), default=1)
        ino = rng.choice([top + 50, top + 1, 1 << 40, 0])
        d.setdefault("entries", {})["dangling"] = ino
        return f"directory {d['ino']}: entry naming inode {ino!r}"
    if op == "entries-type":
        d = rng.choice(dirs)
        d["entries"] = rng.choice([[], "x", None, 5, [["a", 2]]])
        return f"directory {d['ino']}: entries {d['entries']!r}"
    if op == "parent":
        d = rng.choice(dirs)
        d["parent"] = rng.choice([d["ino"], 0, 99999, rng.choice(dirs)["ino"]])
        return f"directory {d['ino']}: parent {d['parent']!r}"
    rec = rng.choice(records)
    ino = rec.get("ino")
    if op == "nlink":
        n = rec.get("nlink", 1) if isinstance(rec.get("nlink"), int) else 1
        rec["nlink"] = rng.choice([0, n + rng.randint(1, 3), max(0, n - 1), 1 << 31])
        return f"inode {ino}: nlink {rec['nlink']}"
    if op == "size":
        rec["size"] = rng.choice([0, 1, 1 << 44, 1 << 62, (1 << 63) - 1, 4095])
        return f"inode {ino}: size {rec['size']}"
    if op == "type":
        perm = 0o644
        rec["mode"] = rng.choice(
            [0o040000 | perm, 0o100000 | perm, 0o120000 | perm, 0o140000 | perm, 0o020000 | perm]
        )
        return f"inode {ino}: mode {rec['mode']:o}"
    if op == "types":
        key = rng.choice(
            ["ino", "mode", "uid", "gid", "nlink", "size", "atime", "mtime", "ctime", "rdev", "gen"]
        )
        rec[key] = rng.choice([*_WEIRD, 0, 1 << 40] if key == "mode" else _WEIRD)
        return f"inode {ino}: {key} = {rec[key]!r}"
    if op == "duplicate":
        dup = copy.deepcopy(rec)
        records.insert(rng.randrange(len(records) + 1), dup)
        return f"inode {ino}: record twice"
    if op == "ino":
        rec["ino"] = rng.choice([0, -1, 1, 1 << 63, 1 << 70])
        return f"inode {ino}: renumbered {rec['ino']}"
    if op == "xattrs":
        rec["xattrs"] = rng.choice(
            [{"user.a": "zz"}, {"user.a": 5}, ["x"], "x", {"": ""}, {"user.a": "ab" * 40000}]
        )
        return f"inode {ino}: xattrs {str(rec['xattrs'])[:40]}"
    if op == "target":
        lnk = rng.choice(links)
        lnk["target"] = rng.choice(["", "x" * 5000, "/", "../" * 300, "\udcff"])
        return f"symlink {lnk['ino']}: target {str(lnk['target'])[:20]!r}"
    records.remove(rec)
    return f"inode {ino}: record removed"


def _allocate(layout: Layout, n: int, rng: random.Random) -> list[Run]:
    """``n`` free blocks for rewritten metadata (taken from the layout's free list)."""
    if len(layout.free) < n:
        raise ValueError("no room for the rewritten metadata")
    start = rng.randrange(len(layout.free) - n + 1)
    blocks = layout.free[start : start + n]
    del layout.free[start : start + n]
    runs: list[Run] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _write_blob(img: bytearray, layout: Layout, blob: bytes, rng: random.Random) -> list[Run]:
    bs = layout.bs
    runs = _allocate(layout, max(1, -(-len(blob) // bs)), rng)
    padded = blob.ljust(sum(n for _, n in runs) * bs, b"\0")
    pos = 0
    for pblk, n in runs:
        _write(img, bs, pblk, padded[pos : pos + n * bs])
        pos += n * bs
    return runs


def write_index(img: bytearray, layout: Layout, index: Any, rng: random.Random) -> None:
    """``index`` as the current checkpoint's, every checksum up to the superblock right."""
    bs, sb = layout.bs, layout.sb
    blob = encode_blob(index)
    runs = _write_blob(img, layout, blob, rng)
    header = CheckpointHeader(layout.header.seq, len(blob), crc32(blob), tuple(runs))
    raw = header.pack(bs)
    _write(img, bs, sb.checkpoint, raw)
    new_sb = dataclasses.replace(sb, checkpoint_crc=crc32(raw))
    _write(img, bs, SUPERBLOCK_BLOCKS[layout.copy], new_sb.pack(bs))


def replace_chunk(img: bytearray, layout: Layout, i: int, records: Any, rng: random.Random) -> None:
    """Chunk ``i`` of the checkpoint replaced by ``records``, every checksum right."""
    blob = encode_blob(records)
    runs = _write_blob(img, layout, blob, rng)
    index = copy.deepcopy(layout.index)
    index["chunks"][i] = [[list(r) for r in runs], len(blob), crc32(blob)]
    write_index(img, layout, index, rng)


def meta_checkpoint(img: bytearray, layout: Layout, rng: random.Random) -> str:
    ctx = Ctx(layout, rng)
    i = rng.randrange(len(layout.chunks))
    records = copy.deepcopy(layout.chunks[i])
    what = mutate_record(records, ctx, whole=True)
    # Sometimes a few changes at once; a later one may find a record an earlier
    # one made unusable for it, and is then left out.
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        try:
            what += "; " + mutate_record(records, ctx, whole=True)
        except (TypeError, AttributeError, IndexError, ValueError, KeyError):
            break
    replace_chunk(img, layout, i, records, rng)
    return f"checkpoint chunk {i}: {what}"


def meta_index(img: bytearray, layout: Layout, rng: random.Random) -> str:
    index = copy.deepcopy(layout.index)
    sb = layout.sb
    what = rng.choice(["next_ino", "format", "chunk-runs", "chunk-twice", "chunk-length", "fields"])
    if what == "next_ino":
        index["next_ino"] = rng.choice([0, 1, 2, -5, "9", None, 1 << 70])
        desc = f"next_ino {index['next_ino']!r}"
    elif what == "format":
        index["format"] = rng.choice([1, 3, "2", None])
        desc = f"format {index['format']!r}"
    elif what == "chunk-runs":
        c = rng.randrange(len(index["chunks"]))
        bad = rng.choice(
            [
                [[0, 1]],
                [[JOURNAL_START, 2]],
                [[sb.device_blocks - 1, 4]],
                [[sb.checkpoint, 1]],
                [[5, -1]],
                "x",
                [[1 << 64, 1]],
            ]
        )
        index["chunks"][c][0] = bad
        desc = f"chunk {c} runs {bad!r}"
    elif what == "chunk-twice":
        c = rng.randrange(len(index["chunks"]))
        index["chunks"].append(copy.deepcopy(index["chunks"][c]))
        desc = f"chunk {c} listed twice"
    elif what == "chunk-length":
        c = rng.randrange(len(index["chunks"]))
        index["chunks"][c][1] = rng.choice([-1, 0, 1 << 40, "5"])
        desc = f"chunk {c} length {index['chunks'][c][1]!r}"
    else:
        choices: list[Any] = [
            [],
            "x",
            {"format": 2},
            {"format": 2, "next_ino": 2, "chunks": "x"},
            {"format": 2, "next_ino": 2, "chunks": [[1, 2]]},
        ]
        index = rng.choice(choices)
        desc = f"index {str(index)[:40]}"
    write_index(img, layout, index, rng)
    return f"checkpoint index: {desc}"


def mutate_payload(payload: dict[str, Any], ctx: Ctx) -> str:
    """Change one journal entry's records in place."""
    rng = ctx.rng
    records = ctx.layout.records()
    dirs = [r["ino"] for r in _of_kind(records, "dir")] or [1]
    files = [r["ino"] for r in _of_kind(records, "reg")] or [1]
    op = rng.choice(
        ["inode", "dirent", "dirent", "extent", "extent", "deleted", "next_ino", "shape"]
    )
    if op == "inode":
        recs = payload["inodes"]
        if not recs:
            src = copy.deepcopy(rng.choice(records))
            src.pop("entries", None)
            src.pop("extents", None)
            recs.append(src)
        return "inodes: " + mutate_record(recs, ctx, whole=False)
    if op == "dirent":
        d = rng.choice(dirs)
        ino = rng.choice([1, d, rng.choice(dirs), 1 << 40, -1, "x", rng.choice(files)])
        name = rng.choice(["fz", "", ".", "..", "a/b", 5, None])
        payload["dirents"].append([rng.choice([d, d, -1, "1", None]), name, ino])
        return f"dirent {payload['dirents'][-1]!r}"
    if op == "extent":
        ino = rng.choice(files)
        pblk = rng.choice([*ctx.bad_pblks, *ctx.used_pblks()])
        lo = rng.choice([0, 0, 5, -1, 1 << 41])
        hi = rng.choice([lo + 8, lo + 8, lo, lo - 1, 1 << 42])
        n = rng.choice([1, 4, 0, -2])
        rec = [ino, lo, hi, [[lo, pblk, n, False]]]
        payload["extents"].append(rec)
        return f"extents {rec!r}"
    if op == "deleted":
        victim = rng.choice([1, rng.choice(dirs), rng.choice(files), "1", None])
        payload["deleted"].append(victim)
        return f"deleted {victim!r}"
    if op == "next_ino":
        payload["next_ino"] = rng.choice([0, -1, "3", None, 1 << 70])
        return f"next_ino {payload['next_ino']!r}"
    key = rng.choice(["inodes", "dirents", "extents", "deleted"])
    payload[key] = rng.choice(["x", 5, None, [5], [[1]], {"a": 1}])
    return f"{key} = {payload[key]!r}"


def empty_payload(layout: Layout) -> dict[str, Any]:
    """A journal payload that changes nothing."""
    last = layout.entries[-1].payload if layout.entries else layout.index
    return {"next_ino": last["next_ino"], "inodes": [], "dirents": [], "extents": [], "deleted": []}


def add_entry(img: bytearray, layout: Layout, payload: Any) -> str:
    """``payload`` as a valid journal entry after the last one -- or, when the
    ring has no room for it, in place of the last one."""
    blob = encode_blob(payload)
    raw = _entry_raw(layout, layout.next_seq, blob)
    used = sum(e.blocks for e in layout.entries)
    if used + len(raw) // layout.bs <= layout.sb.journal_blocks:
        _ring_write(img, layout, layout.head, raw)
        return f"journal entry {layout.next_seq} added"
    if not layout.entries:
        return "journal full, nothing changed"
    last = layout.entries[-1]
    raw = _entry_raw(layout, last.seq, blob)
    if len(raw) // layout.bs > last.blocks + layout.sb.journal_blocks - used:
        return "journal full, nothing changed"
    _ring_write(img, layout, last.pos, raw)
    return f"journal entry {last.seq} replaced"


def meta_journal(img: bytearray, layout: Layout, rng: random.Random) -> str:
    """An entry's records changed: an existing entry rewritten in place (when it
    still fits its blocks), or a new entry after the last one."""
    ctx = Ctx(layout, rng)
    if layout.entries and rng.random() < 0.5:
        e = rng.choice(layout.entries)
        payload = copy.deepcopy(e.payload)
        what = mutate_payload(payload, ctx)
        blob = encode_blob(payload)
        if JOURNAL_HEADER_SIZE + len(blob) <= e.blocks * layout.bs:
            _ring_write(img, layout, e.pos, _entry_raw(layout, e.seq, blob, e.blocks))
            return f"journal entry {e.seq} rewritten: {what}"
    payload = empty_payload(layout)
    what = mutate_payload(payload, ctx)
    return f"{add_entry(img, layout, payload)}: {what}"


def combined(img: bytearray, layout: Layout, rng: random.Random) -> str:
    """Two damages at once: a torn or changed piece of metadata and raw damage."""
    first = rng.choice([torn_superblock, torn_journal, meta_checkpoint, meta_journal])
    second = rng.choice([bitflip, zero_blocks, swap_blocks, torn_checkpoint, meta_journal])
    done = first(img, layout, rng)
    return f"{done}; then {second(img, layout, rng)}"


Damage = Callable[[bytearray, Layout, random.Random], str]

KINDS: Final[dict[str, Damage]] = {
    "bitflip": bitflip,
    "zero-blocks": zero_blocks,
    "swap-blocks": swap_blocks,
    "truncate": truncate,
    "torn-superblock": torn_superblock,
    "torn-checkpoint": torn_checkpoint,
    "torn-journal": torn_journal,
    "meta-checkpoint": meta_checkpoint,
    "meta-index": meta_index,
    "meta-journal": meta_journal,
    "combined": combined,
}


def damage(base: bytes, kind: str, seed: int) -> tuple[bytes, str]:
    """``base`` damaged by ``kind``, deterministically for ``seed``."""
    rng = random.Random(f"{kind}:{seed}")
    for _ in range(20):
        img = bytearray(base)
        recipe = KINDS[kind](img, parse(img), rng)
        # A tear from the same bytes, a block swapped with itself: draw again.
        if img != base or "nothing changed" in recipe:
            break
    return bytes(img), recipe


__all__ = [
    "KINDS",
    "Layout",
    "add_entry",
    "damage",
    "empty_payload",
    "mutate_payload",
    "mutate_record",
    "parse",
    "replace_chunk",
    "write_index",
]
