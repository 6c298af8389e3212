"""fsx, the pure part: stamped data, operations and their text form, the model of
what the file must hold, operation generation, lineage of a byte, and the
delta-debugging minimizer.  Nothing here touches a file; `tools.fsx` runs it.

Data.  Every byte fsx writes is part of a 16-byte *cell* aligned to the file
offset it was written at: ``f5 WW OO OO OO OO OO OO`` then the cell's logical
offset as a little-endian u64, where ``WW`` is the writer (0 for the single
sequence, 1.. for the writers of ``--procs``) and ``OO`` the operation number
that wrote it (48 bits).  So a write's bytes follow from its op line alone
(``write 12288 4096 stamp=17``: op 17 of writer 0), a replay reproduces them
exactly, and any 16 bytes read back say who wrote them and where: a stale page
shows up as "op 12's data from offset 20480", not as noise.  Collapse and
insert move data by whole blocks, which keeps cells aligned.  Building a run of
cells is two slice assignments into an ``array('Q')``: about 25 ns a cell.

Operations.  One op per line, the first word its kind::

    read OFF LEN                 dread OFF LEN            (O_DIRECT)
    write OFF LEN stamp=N        dwrite OFF LEN stamp=N   (O_DIRECT)
    readahead OFF LEN CHUNK      (sequential buffered reads of CHUNK bytes)
    truncate SIZE
    fallocate MODE OFF LEN       MODE: alloc keep_size punch zero zero,keep_size
                                       collapse insert
    fsync   fdatasync   reopen   drop_caches   check

``check`` reads the whole file and compares it; it is what a failure found by
``-X`` turns into in a written op list, so that the list alone reproduces it.

The model is a `bytearray` that every op changes as Linux documents it
(fallocate(2), truncate(2)); a replayed op that no longer fits the model (a
collapse reaching EOF after the minimizer removed the write that made the file
long) is skipped, as xfstests fsx logs ``SKIPPED``.  Beside the bytes it keeps
the state of every block (data, preallocated, hole) as fusefs keeps it, so
that it can say what lseek(2) SEEK_DATA/SEEK_HOLE must answer (`Model.blocks`).
"""

from __future__ import annotations

import random
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

BS: Final = 4096  # the block size: collapse/insert and O_DIRECT alignment
CELL: Final = 16
MAGIC: Final = 0xF5
MAX_STAMP: Final = (1 << 48) - 1

# stamped data:


def _cell_word(writer: int, stamp: int) -> int:
    return MAGIC | (writer & 0xFF) << 8 | (stamp & MAX_STAMP) << 16


def stamp_bytes(writer: int, stamp: int, offset: int, length: int) -> bytes:
    """The bytes op ``stamp`` of ``writer`` writes at ``offset``."""
    if length <= 0:
        return b""
    first = offset // CELL
    last = -(-(offset + length) // CELL)
    n = last - first
    words = array("Q", bytes(16 * n))
    words[0::2] = array("Q", [_cell_word(writer, stamp)]) * n
    words[1::2] = array("Q", range(first * CELL, last * CELL, CELL))
    if sys.byteorder == "big":
        words.byteswap()
    skip = offset - first * CELL
    return words.tobytes()[skip : skip + length]


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a cell says about itself: who wrote it, and at which file offset."""

    writer: int
    op: int
    offset: int

    def __str__(self) -> str:
        who = f"writer {self.writer} " if self.writer else ""
        return f"{who}op {self.op} (written at offset {self.offset})"


def decode_cell(cell: bytes) -> Stamp | None:
    """The stamp of a whole 16-byte cell, or None if it is not one."""
    if len(cell) != CELL or cell[0] != MAGIC:
        return None
    word = int.from_bytes(cell[:8], "little")
    offset = int.from_bytes(cell[8:], "little")
    if offset % CELL:
        return None
    return Stamp(word >> 8 & 0xFF, word >> 16, offset)


def describe_at(data: bytes, pos: int, base: int = 0) -> str:
    """What the bytes around ``data[pos]`` are (``base`` is data[0]'s file offset)."""
    if pos >= len(data):
        return "nothing (past the end)"
    start = pos - (base + pos) % CELL
    cell = data[start : start + CELL] if start >= 0 else b""
    if cell and not any(cell):
        return "zeros"
    stamp = decode_cell(cell) if len(cell) == CELL else None
    if stamp is None:
        return "unrecognised bytes (not a stamp)"
    here = base + start
    if stamp.offset == here:
        return f"{stamp}"
    return f"{stamp}, now at offset {here}: moved or stale"


def hexdump(data: bytes, base: int) -> str:
    return f"{base:#08x}: " + " ".join(f"{b:02x}" for b in data)


# operations:

FALLOC_MODES: Final = (
    "alloc",
    "keep_size",
    "punch",
    "zero",
    "zero,keep_size",
    "collapse",
    "insert",
)
# Generation names (the -F -H -z -C -I switches turn these off) → fallocate modes.
FALLOC_KINDS: Final = {
    "alloc": "alloc",
    "keep_size": "keep_size",
    "punch": "punch",
    "zero": "zero",
    "zero_keep": "zero,keep_size",
    "collapse": "collapse",
    "insert": "insert",
}
_RANGE_KINDS: Final = ("read", "dread", "write", "dwrite")
_BARE_KINDS: Final = ("fsync", "fdatasync", "reopen", "drop_caches", "check")
MUTATING: Final = frozenset({"write", "dwrite", "truncate", "fallocate"})


class OpSyntaxError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Op:
    """One operation.  ``offset`` is the new size for ``truncate``; ``arg`` is the
    fallocate mode or the readahead chunk; ``stamp`` the op number whose data a
    write carries."""

    kind: str
    offset: int = 0
    length: int = 0
    arg: str = ""
    stamp: int = 0

    def __str__(self) -> str:
        if self.kind in ("write", "dwrite"):
            return f"{self.kind} {self.offset} {self.length} stamp={self.stamp}"
        if self.kind in ("read", "dread"):
            return f"{self.kind} {self.offset} {self.length}"
        if self.kind == "readahead":
            return f"readahead {self.offset} {self.length} {self.arg}"
        if self.kind == "truncate":
            return f"truncate {self.offset}"
        if self.kind == "fallocate":
            return f"fallocate {self.arg} {self.offset} {self.length}"
        return self.kind

    @property
    def end(self) -> int:
        return self.offset + self.length

    def pretty(self) -> str:
        """The op with its range in hex, as fsx's log shows it."""
        text = str(self)
        if self.kind in ("truncate",) or self.kind in _BARE_KINDS:
            return text
        return f"{text}  [{self.offset:#x}..{max(self.end - 1, self.offset):#x}]"


def _int(word: str, line: str) -> int:
    try:
        value = int(word, 0)
    except ValueError:
        raise OpSyntaxError(f"not a number: {word!r} in {line!r}") from None
    if value < 0:
        raise OpSyntaxError(f"negative number {word!r} in {line!r}")
    return value


def parse_op(line: str) -> Op:
    words = line.split()
    if not words:
        raise OpSyntaxError("empty op line")
    kind, args = words[0], words[1:]

    def want(n: int) -> None:
        if len(args) != n:
            raise OpSyntaxError(f"{kind} takes {n} argument(s): {line!r}")

    if kind in ("read", "dread"):
        want(2)
        return Op(kind, _int(args[0], line), _int(args[1], line))
    if kind in ("write", "dwrite"):
        want(3)
        key, eq, value = args[2].partition("=")
        if key != "stamp" or not eq:
            raise OpSyntaxError(f"{kind} needs stamp=N: {line!r}")
        stamp = _int(value, line)
        if stamp > MAX_STAMP:
            raise OpSyntaxError(f"stamp too large: {line!r}")
        return Op(kind, _int(args[0], line), _int(args[1], line), stamp=stamp)
    if kind == "readahead":
        want(3)
        chunk = _int(args[2], line)
        if chunk <= 0:
            raise OpSyntaxError(f"readahead chunk must be positive: {line!r}")
        return Op(kind, _int(args[0], line), _int(args[1], line), arg=str(chunk))
    if kind == "truncate":
        want(1)
        return Op(kind, _int(args[0], line))
    if kind == "fallocate":
        want(3)
        if args[0] not in FALLOC_MODES:
            raise OpSyntaxError(f"unknown fallocate mode {args[0]!r} (one of {FALLOC_MODES})")
        length = _int(args[2], line)
        if length <= 0:
            raise OpSyntaxError(f"fallocate length must be positive: {line!r}")
        return Op(kind, _int(args[1], line), length, arg=args[0])
    if kind in _BARE_KINDS:
        want(0)
        return Op(kind)
    raise OpSyntaxError(f"unknown op {kind!r}")


OPS_HEADER: Final = "# fusefs-fsx ops v1"


def format_ops(ops: Iterable[Op], comments: Sequence[str] = ()) -> str:
    lines = [OPS_HEADER, *(f"# {c}" for c in comments), *(str(op) for op in ops)]
    return "\n".join(lines) + "\n"


def parse_ops(text: str) -> list[Op]:
    """An op list: one op a line; blank lines and ``#`` comments ignored."""
    ops = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        try:
            ops.append(parse_op(line))
        except OpSyntaxError as e:
            raise OpSyntaxError(f"line {number}: {e}") from None
    return ops


# the model:


def why_invalid(op: Op, size: int) -> str | None:
    """Why ``op`` cannot run on a file of ``size`` bytes (the filesystem would
    refuse it), or None.  fsx never issues such an op; a replay skips it."""
    if op.kind in ("dread", "dwrite") and (op.offset % BS or op.length % BS):
        return "O_DIRECT range not block aligned"
    if op.kind != "fallocate":
        return None
    if op.arg in ("collapse", "insert") and (op.offset % BS or op.length % BS):
        return f"{op.arg} range not block aligned"
    if op.arg == "collapse" and op.end >= size:
        return f"collapse reaches EOF (size {size})"
    if op.arg == "insert" and op.offset >= size:
        return f"insert at or past EOF (size {size})"
    return None


DATA: Final = "D"  # a written block, or one a write has dirtied
UNWRITTEN: Final = "U"  # preallocated (allocate, keep_size, zero range): a hole to lseek


@dataclass
class Model:
    """What the file must contain, byte for byte, and where fusefs must say its
    data and holes are (`seek_data`, `seek_hole`).

    ``blocks`` follows fusefs's extent map and page cache block by block
    (fusefs/io/seek.py, fusefs/io/fallocate.py): a block a write touched is
    data (dirty over a hole, then written back: data either way); allocate and
    keep_size make the holes of the blocks they touch unwritten; zero range
    makes its whole blocks unwritten and the holes of its partial edge blocks
    too; punch unmaps its whole blocks; truncate down unmaps every block past
    the new EOF (preallocated ones too); collapse and insert shift every block
    after the range, past EOF included.  A partial edge block of a punch or
    zero range keeps its state: a written block whose bytes are zeroed is still
    data.  Blocks absent from the dict are holes.
    """

    data: bytearray = field(default_factory=bytearray)
    writer: int = 0
    blocks: dict[int, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    def _grow(self, size: int) -> None:
        if size > len(self.data):
            self.data.extend(bytes(size - len(self.data)))

    def _zero(self, offset: int, end: int) -> None:
        end = min(end, len(self.data))
        if end > offset:
            self.data[offset:end] = bytes(end - offset)

    def apply(self, op: Op) -> None:
        """Change the model as ``op`` changes the file (reads change nothing)."""
        self._apply_blocks(op, len(self.data))
        kind = op.kind
        if kind in ("write", "dwrite"):
            if op.length:
                self._grow(op.offset)
                self.data[op.offset : op.end] = stamp_bytes(
                    self.writer, op.stamp, op.offset, op.length
                )
        elif kind == "truncate":
            if op.offset < len(self.data):
                del self.data[op.offset :]
            else:
                self._grow(op.offset)
        elif kind == "fallocate":
            mode = op.arg
            if mode == "alloc":
                self._grow(op.end)
            elif mode == "punch":
                self._zero(op.offset, op.end)
            elif mode == "zero":
                self._zero(op.offset, op.end)
                self._grow(op.end)
            elif mode == "zero,keep_size":
                self._zero(op.offset, op.end)
            elif mode == "collapse":
                del self.data[op.offset : op.end]
            elif mode == "insert":
                self.data[op.offset : op.offset] = bytes(op.length)
            # keep_size: preallocation past EOF, nothing visible

    def _apply_blocks(self, op: Op, size: int) -> None:
        kind = op.kind
        blocks = self.blocks
        first, end = op.offset // BS, -(-op.end // BS)  # every block the range touches
        inner = range(-(-op.offset // BS), op.end // BS)  # the whole blocks
        if kind in ("write", "dwrite"):
            for b in range(first, end):
                blocks[b] = DATA
        elif kind == "truncate":
            if op.offset < size:  # up: blocks preallocated past EOF stay
                keep = -(-op.offset // BS)
                for b in [b for b in blocks if b >= keep]:
                    del blocks[b]
        elif kind != "fallocate":
            return
        elif op.arg in ("alloc", "keep_size"):
            for b in range(first, end):
                blocks.setdefault(b, UNWRITTEN)
        elif op.arg == "punch":
            for b in inner:
                blocks.pop(b, None)
        elif op.arg in ("zero", "zero,keep_size"):
            for b in range(first, end):
                if b in inner:
                    blocks[b] = UNWRITTEN
                else:
                    blocks.setdefault(b, UNWRITTEN)
        elif op.arg == "collapse":
            n = op.length // BS
            self.blocks = {
                (b - n if b >= first + n else b): s
                for b, s in blocks.items()
                if not first <= b < first + n
            }
        elif op.arg == "insert":
            n = op.length // BS
            self.blocks = {(b + n if b >= first else b): s for b, s in blocks.items()}

    def expect_read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    # lseek(2) SEEK_DATA / SEEK_HOLE, as fusefs answers them: block-granular,
    # never before ``offset``, never past EOF; None stands for ENXIO.

    def seek_data(self, offset: int) -> int | None:
        size = self.size
        if not 0 <= offset < size:
            return None
        for b in range(offset // BS, -(-size // BS)):
            if self.blocks.get(b) == DATA:
                return min(max(offset, b * BS), size)
        return None

    def seek_hole(self, offset: int) -> int | None:
        size = self.size
        if not 0 <= offset < size:
            return None
        for b in range(offset // BS, -(-size // BS)):
            if self.blocks.get(b) != DATA:
                return min(max(offset, b * BS), size)
        return size

    def data_segments(self) -> list[tuple[int, int]]:
        """[start, end) of every run of data, as a SEEK_DATA/SEEK_HOLE walk from 0 finds them."""
        return seek_walk(self.seek_data, self.seek_hole)


def seek_walk(
    seek_data: Callable[[int], int | None], seek_hole: Callable[[int], int | None]
) -> list[tuple[int, int]]:
    """The data runs of a file found by alternating SEEK_DATA and SEEK_HOLE from
    offset 0 (None: ENXIO), as ``cp --sparse`` walks a file."""
    out: list[tuple[int, int]] = []
    pos = 0
    while True:
        start = seek_data(pos)
        if start is None:
            return out
        end = seek_hole(start)
        if end is None or end <= start:
            raise ValueError(f"SEEK_HOLE from data at {start} answered {end}")
        out.append((start, end))
        pos = end


def size_after(op: Op, size: int) -> int:
    """The file size after ``op`` on a file of ``size`` bytes (`Model.apply`'s)."""
    if op.kind in ("write", "dwrite"):
        return max(size, op.end) if op.length else size
    if op.kind == "truncate":
        return op.offset
    if op.kind == "fallocate":
        if op.arg in ("alloc", "zero"):
            return max(size, op.end)
        if op.arg == "collapse":
            return size - op.length
        if op.arg == "insert":
            return size + op.length
    return size


def first_difference(want: bytes, got: bytes) -> int | None:
    """The first index where the two differ (a length difference counts)."""
    if want == got:
        return None
    n = min(len(want), len(got))
    # Halve the range while the prefixes match: bytes compare in C.
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if want[lo : mid + 1] == got[lo : mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def bad_range(want: bytes, got: bytes, first: int, base: int = 0) -> tuple[int, int]:
    """(end of the run of differing 16-byte cells from ``first``'s cell on — a
    stale or shifted block differs in every cell though not in every byte —,
    the number of bytes that differ in all).  ``base`` is want[0]'s file offset."""
    n = min(len(want), len(got))
    pos = first - (base + first) % CELL
    while pos < n:
        nxt = min(pos + CELL - (base + pos) % CELL, n)
        if want[pos:nxt] == got[pos:nxt]:
            break
        pos = nxt
    differing = sum(1 for a, b in zip(want, got, strict=False) if a != b)
    return max(pos, first + 1), differing + abs(len(want) - len(got))


# history and lineage:


@dataclass(frozen=True, slots=True)
class Step:
    """One executed op: its number in the run and the file size before it."""

    number: int
    op: Op
    size_before: int
    skipped: str | None = None


def touching(history: Sequence[Step], pos: int, limit: int = 8) -> list[tuple[Step, str]]:
    """The last ops that touched the byte now at ``pos``, latest first, each with
    what it did to it — following the byte back through collapses and inserts
    (which move it) to the op that created it."""
    out: list[tuple[Step, str]] = []
    for step in reversed(history):
        if len(out) >= limit or pos < 0:
            break
        op = step.op
        if step.skipped or op.kind not in MUTATING:
            continue
        before = step.size_before
        if op.kind in ("write", "dwrite"):
            if op.offset <= pos < op.end:
                out.append((step, f"wrote it (offset {pos})"))
            elif before <= pos < op.offset:
                out.append((step, "extended the file over it: zeros"))
                break
        elif op.kind == "truncate":
            if before <= pos < op.offset:
                out.append((step, "truncated up over it: zeros"))
                break
        elif op.arg == "collapse":
            if pos >= op.offset:
                out.append((step, f"moved it down from offset {pos + op.length}"))
                pos += op.length
        elif op.arg == "insert":
            if op.offset <= pos < op.end:
                out.append((step, "inserted it: zeros"))
                break
            if pos >= op.end:
                out.append((step, f"moved it up from offset {pos - op.length}"))
                pos -= op.length
        elif op.arg in ("punch", "zero", "zero,keep_size") and op.offset <= pos < op.end:
            if pos >= before:
                out.append((step, f"{op.arg} extended the file over it: zeros"))
                break
            out.append((step, f"{op.arg}: zeroed it"))
        elif op.arg == "alloc" and before <= pos < op.end:
            out.append((step, "allocated past EOF: zeros"))
            break
    return out


# generation:


@dataclass(frozen=True)
class GenConfig:
    """What to generate: sizes and boundaries as xfstests fsx (-l -o -r -w -t)."""

    maxlen: int = 256 * 1024
    maxoplen: int = 64 * 1024
    readbdy: int = 1
    writebdy: int = 1
    truncbdy: int = 1
    fallocbdy: int = 1  # --procs keeps every size a whole number of blocks
    kinds: frozenset[str] = frozenset()
    weights: tuple[tuple[str, int], ...] = ()  # (kind, weight) over WEIGHTS (--weights)


WEIGHTS: Final = {
    "read": 8,
    "write": 8,
    "dread": 3,
    "dwrite": 3,
    "readahead": 2,
    "truncate": 2,
    "alloc": 1,
    "keep_size": 1,
    "punch": 2,
    "zero": 1,
    "zero_keep": 1,
    "collapse": 2,
    "insert": 2,
    "fsync": 1,
    "fdatasync": 1,
    "reopen": 1,
    "drop_caches": 1,
}
ALL_KINDS: Final = frozenset(WEIGHTS)


def parse_weights(text: str) -> tuple[tuple[str, int], ...]:
    """``truncate=8,write=12``: op kinds and their weights (0 turns a kind off);
    ``only:read=8,write=8,truncate=4``: those kinds and no other.  ValueError
    names what is wrong."""
    out = []
    only, colon, rest = text.partition(":")
    if colon:
        if only.strip() != "only":
            raise ValueError(f"{text!r}: the one prefix is 'only:'")
        out = [(kind, 0) for kind in sorted(WEIGHTS)]
        text = rest
    for item in filter(None, (w.strip() for w in text.split(","))):
        kind, eq, value = item.partition("=")
        if kind not in WEIGHTS:
            raise ValueError(f"unknown op kind {kind!r} (kinds: {', '.join(sorted(WEIGHTS))})")
        if not eq or not value.isdigit():
            raise ValueError(f"{item!r}: expected KIND=N with N >= 0")
        out.append((kind, int(value)))
    return tuple(out)


def _down(value: int, bdy: int) -> int:
    return value - value % bdy


class Generator:
    """The op sequence of one seed.  The next op depends only on the seed, the
    config and the model's size, so one seed gives one sequence."""

    def __init__(self, seed: int, config: GenConfig) -> None:
        self.rng = random.Random(seed)
        self.config = config
        self._kinds = sorted(config.kinds & ALL_KINDS)
        if not self._kinds:
            raise ValueError("no operation left to generate")
        weights = {**WEIGHTS, **dict(config.weights)}
        self._kinds = [k for k in self._kinds if weights[k] > 0]
        if not self._kinds:
            raise ValueError("no operation left to generate")
        self._weights = [weights[k] for k in self._kinds]

    def next(self, number: int, size: int) -> Op:
        for _ in range(100):
            (kind,) = self.rng.choices(self._kinds, self._weights)
            op = self._make(kind, number, size)
            if op is not None:
                return op
        return Op("read", 0, min(size, self.config.maxoplen))

    def _len(self, bdy: int) -> int:
        return max(bdy, _down(self.rng.randint(1, self.config.maxoplen), bdy))

    def _make(self, kind: str, number: int, size: int) -> Op | None:
        c = self.config
        rng = self.rng
        if kind == "read":
            if size == 0:
                return None
            off = _down(rng.randrange(size), c.readbdy)
            return Op("read", off, min(self._len(c.readbdy), size - off))
        if kind == "dread":
            if size == 0:
                return None
            off = _down(rng.randrange(size), BS)
            return Op("dread", off, self._len(BS))
        if kind == "readahead":
            if size <= BS:
                return None
            off = _down(rng.randrange(size // 2), BS)
            total = min(rng.randint(4, 64) * BS, size - off)
            return Op("readahead", off, total, arg=str(rng.choice((BS, BS, 2 * BS, 16384))))
        if kind in ("write", "dwrite"):
            bdy = c.writebdy if kind == "write" else BS
            off = _down(rng.randrange(c.maxlen), bdy)
            length = min(self._len(bdy), _down(c.maxlen - off, bdy))
            if length <= 0:
                return None
            return Op(kind, off, length, stamp=number)
        if kind == "truncate":
            return Op("truncate", _down(rng.randrange(c.maxlen + 1), c.truncbdy))
        if kind in FALLOC_KINDS:
            return self._falloc(FALLOC_KINDS[kind], size)
        return Op(kind)

    def _falloc(self, mode: str, size: int) -> Op | None:
        c = self.config
        rng = self.rng
        if mode == "collapse":
            if size < 2 * BS + 1:
                return None
            off = _down(rng.randrange(size - BS), BS)
            length = min(self._len(BS), _down(size - 1 - off, BS))
            return Op("fallocate", off, length, "collapse") if length > 0 else None
        if mode == "insert":
            if size == 0:
                return None
            off = _down(rng.randrange(size), BS)
            length = min(self._len(BS), _down(c.maxlen - size, BS))
            return Op("fallocate", off, length, "insert") if length > 0 else None
        if mode == "punch":
            if size == 0:
                return None
            off = _down(rng.randrange(size), c.fallocbdy)
        else:
            off = _down(rng.randrange(c.maxlen), c.fallocbdy)
        length = min(self._len(c.fallocbdy), _down(c.maxlen - off, c.fallocbdy))
        return Op("fallocate", off, length, mode) if length > 0 else None


# minimization:


@dataclass
class MinimizeResult:
    ops: list[Op]
    tests: int
    seconds: float
    stopped: str | None = None  # why it stopped early (budget), or None


def ddmin(
    ops: Sequence[Op],
    fails: Callable[[list[Op]], bool],
    *,
    max_tests: int = 2000,
    max_seconds: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
) -> MinimizeResult:
    """Zeller's delta debugging: a 1-minimal sub-list of ``ops`` (order kept) for
    which ``fails`` still holds — removing any single op makes it pass — unless
    the budget runs out first.  ``fails(ops)`` must hold for the input."""
    start = time.monotonic()
    seen: dict[tuple[int, ...], bool] = {}
    tests = 0
    items = list(range(len(ops)))
    stopped: str | None = None

    def test(candidate: list[int]) -> bool:
        nonlocal tests, stopped
        key = tuple(candidate)
        if key in seen:
            return seen[key]
        if tests >= max_tests:
            stopped = f"test budget ({max_tests}) used up"
            return False
        if time.monotonic() - start > max_seconds:
            stopped = f"time budget ({max_seconds:.0f} s) used up"
            return False
        tests += 1
        result = fails([ops[i] for i in candidate])
        seen[key] = result
        if progress is not None:
            progress(tests, len(items))
        return result

    # Cheap first: most of a long failing run is usually irrelevant, and the
    # failure needs only a short tail or head: try halving from each side.
    n = 2
    while len(items) >= 2 and stopped is None:
        chunk = -(-len(items) // n)
        parts = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        reduced = False
        if n > 2:  # with two parts, each complement is the other part
            for part in parts:
                if test(part):
                    items, n, reduced = part, 2, True
                    break
        if not reduced:
            for i in range(len(parts)):
                rest = [x for j, p in enumerate(parts) if j != i for x in p]
                if test(rest):
                    items, n, reduced = rest, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    return MinimizeResult([ops[i] for i in items], tests, time.monotonic() - start, stopped)
