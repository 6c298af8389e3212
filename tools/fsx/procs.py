"""fsx --procs N: readers racing writers on one file, every block attributed.

Roles.  W writer processes (``--writers``, default N // 4, at least 1) change
the file: buffered and O_DIRECT writes, truncates, every fallocate mode, fsync,
``drop_caches``.  The other N - W processes read it without pause: buffered
reads of 1-16 blocks, sequential one-block bursts that drive readahead, and
O_DIRECT reads, one style per reader in turn.  Everything is block aligned, so
the file is always a whole number of blocks and each block holds exactly one
thing: zeros, or the data of one write.

Stamps.  Every written block carries, in each of its 16-byte cells, the
writer, the operation number and the block's logical offset at write time
(`tools.fsx.model.stamp_bytes`).  A reader decodes each block it reads into that
stamp (or ``0`` for zeros) on the spot and logs it with the read's start and
end time; a block that is not one stamp throughout is logged cell by cell.

History.  The writers take turns under one lock, so their operations form one
sequence 1..M; each is logged with its number and the CLOCK_MONOTONIC times
just before and after its syscall.  Replaying that sequence on a block model
gives state S_k of the file after op k, and for each block the list of values
it took.

The check.  A read that started at ``rs`` and ended at ``re`` can only have seen
states S_lo..S_hi: lo = the ops finished by ``rs``, hi = the ops started
before ``re``.  Reads are not atomic across blocks, so each block is checked on
its own: the value the reader saw must be a value that block had in one of
those states (zeros also where the block was past EOF in one of them and
inside it in another: a read racing a truncate).  Anything else — a stale
block the file no longer held when the read began, data from another offset,
bytes that are no stamp at all, data past EOF — is an **anomaly**, reported
with the ops involved: the op that wrote what the reader saw, the op that
replaced it in that block, and the ops that ran during the read.  Finally the
whole file is read once more and must equal S_M exactly.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO

from tools.fsx.model import (
    BS,
    CELL,
    GenConfig,
    Generator,
    Op,
    decode_cell,
    parse_op,
    size_after,
    stamp_bytes,
)
from tools.fsx.target import Capabilities, Target

if TYPE_CHECKING:
    from tools.fsx.cli import Options

WRITER_KINDS: Final = frozenset(
    {"write", "dwrite", "truncate", "alloc", "keep_size", "punch", "zero", "zero_keep"}
    | {"collapse", "insert", "fsync", "fdatasync", "drop_caches"}
)
ZERO: Final = "0"
READ_STYLES: Final = ("buffered", "readahead", "direct")


class SharedInt(Protocol):
    """A ``multiprocessing`` Value without its own lock (ours guards it)."""

    value: int


@dataclass(frozen=True)
class ProcsConfig:
    path: str
    caps: Capabilities
    seed: int
    mutations: int
    duration: float | None
    gen: GenConfig
    log_dir: str
    name: str

    def log(self, role: str) -> str:
        return os.path.join(self.log_dir, f"{self.name}.{role}.log")


# the writers:


def _execute(target: Target, op: Op, writer: int, number: int) -> None:
    kind = op.kind
    if kind in ("write", "dwrite"):
        data = stamp_bytes(writer, number, op.offset, op.length)
        (target.dwrite if kind == "dwrite" else target.write)(op.offset, data)
    elif kind == "truncate":
        target.truncate(op.offset)
    elif kind == "fallocate":
        target.fallocate(op.arg, op.offset, op.length)
    elif kind == "fsync":
        target.fsync()
    elif kind == "fdatasync":
        target.fdatasync()
    elif kind == "drop_caches":
        target.drop_caches()


def writer_main(
    cfg: ProcsConfig,
    writer: int,
    lock: Any,
    counter: SharedInt,
    size: SharedInt,
    errors: SharedInt,
) -> None:
    """Writer ``writer`` (1..W): ops under the shared lock until M are done."""
    target = Target(cfg.path, cfg.caps, truncate=False, buffer_size=cfg.gen.maxoplen)
    gen = Generator(cfg.seed * 7919 + writer, cfg.gen)
    deadline = time.monotonic() + cfg.duration if cfg.duration else None
    with open(cfg.log(f"w{writer}"), "w", encoding="utf-8") as log:
        while not errors.value:
            with lock:
                number = counter.value + 1
                if deadline is None and number > cfg.mutations:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                op = gen.next(number, size.value)
                t0 = time.monotonic_ns()
                try:
                    _execute(target, op, writer, number)
                except OSError as e:
                    errors.value = 1
                    print(
                        f"E {number} {t0} {time.monotonic_ns()} {writer} {e.errno} {op}", file=log
                    )
                    break
                t1 = time.monotonic_ns()
                counter.value = number
                size.value = size_after(op, size.value)
            print(f"{number} {t0} {t1} {writer} {op}", file=log)
    target.close()


# the readers:


def block_value(block: bytes) -> str:
    """``0``, ``W:OP:OFF`` (one stamp throughout), ``T`` + the stamps of a block
    torn between several, or ``?`` + its first bytes in hex."""
    if block.count(0) == len(block):
        return ZERO
    stamp = decode_cell(block[:CELL])
    if stamp is not None and block == stamp_bytes(stamp.writer, stamp.op, stamp.offset, len(block)):
        return f"{stamp.writer}:{stamp.op}:{stamp.offset}"
    parts = set()
    for i in range(0, len(block), CELL):
        cell = block[i : i + CELL]
        if cell.count(0) == len(cell):
            parts.add(ZERO)
            continue
        s = decode_cell(cell)
        if s is None or len(cell) != CELL:
            return "?" + cell.hex()
        parts.add(f"{s.writer}:{s.op}:{s.offset - i}")
    return "T" + "|".join(sorted(parts))


def _values(data: bytes) -> str:
    return " ".join(block_value(data[i : i + BS]) for i in range(0, len(data), BS))


def reader_main(cfg: ProcsConfig, reader: int, size: SharedInt, stop: Any) -> None:
    """Reader ``reader``: read, decode, log, until told to stop."""
    style = READ_STYLES[reader % len(READ_STYLES)]
    if style == "direct" and not cfg.caps.direct:
        style = "buffered"
    rng = random.Random(cfg.seed * 7919 + 1000 + reader)
    fd = os.open(cfg.path, os.O_RDONLY | (os.O_DIRECT if style == "direct" else 0))
    buf = mmap.mmap(-1, 16 * BS)
    with open(cfg.log(f"r{reader}"), "w", encoding="utf-8") as log:

        def read(offset: int, length: int) -> None:
            t0 = time.monotonic_ns()
            if style == "direct":
                view = memoryview(buf)[:length]
                n = os.preadv(fd, [view], offset)
                data = bytes(view[:n])
                view.release()
            else:
                data = os.pread(fd, length, offset)
            t1 = time.monotonic_ns()
            print(f"{style} {t0} {t1} {offset} {length} {len(data)} {_values(data)}", file=log)

        while not stop.is_set():
            blocks = max(1, size.value // BS)
            start = rng.randrange(blocks)
            if style == "readahead":
                pos = 0 if rng.random() < 0.3 else start * BS
                for _ in range(rng.randint(8, 32)):
                    read(pos, BS)
                    pos += BS
            else:
                read(start * BS, rng.randint(1, 16) * BS)
    os.close(fd)
    buf.close()


# the history of the writers' ops:


@dataclass(frozen=True)
class Mutation:
    number: int
    t0: int
    t1: int
    writer: int
    op: Op


def parse_writer_log(text: str) -> tuple[list[Mutation], list[str]]:
    muts, errors = [], []
    for line in text.splitlines():
        if line.startswith("E "):
            errors.append(line)
            continue
        number, t0, t1, writer, op = line.split(" ", 4)
        muts.append(Mutation(int(number), int(t0), int(t1), int(writer), parse_op(op)))
    return muts, errors


def _apply_blocks(blocks: list[str], m: Mutation) -> None:
    op = m.op
    first, last = op.offset // BS, op.end // BS
    if op.kind in ("write", "dwrite"):
        if len(blocks) < last:
            blocks.extend([ZERO] * (last - len(blocks)))
        for b in range(first, last):
            blocks[b] = f"{m.writer}:{m.number}:{b * BS}"
    elif op.kind == "truncate":
        n = op.offset // BS
        del blocks[n:]
        blocks.extend([ZERO] * (n - len(blocks)))
    elif op.kind == "fallocate":
        mode = op.arg
        if mode in ("punch", "zero", "zero,keep_size"):
            for b in range(first, min(last, len(blocks))):
                blocks[b] = ZERO
        if mode in ("alloc", "zero") and len(blocks) < last:
            blocks.extend([ZERO] * (last - len(blocks)))
        elif mode == "collapse":
            del blocks[first:last]
        elif mode == "insert":
            blocks[first:first] = [ZERO] * (last - first)


class History:
    """Every state S_0..S_M of the file, block by block."""

    def __init__(self, muts: Sequence[Mutation]) -> None:
        self.muts = list(muts)
        self.t0s = [m.t0 for m in muts]
        self.t1s = [m.t1 for m in muts]
        self.sizes = [0]
        # per block: the op numbers at which it changed, and its values then
        self.ks: list[list[int]] = []
        self.vals: list[list[str | None]] = []
        blocks: list[str] = []
        for k, m in enumerate(self.muts, 1):
            before = list(blocks)
            _apply_blocks(blocks, m)
            self.sizes.append(len(blocks) * BS)
            for b in range(max(len(before), len(blocks))):
                old = before[b] if b < len(before) else None
                new = blocks[b] if b < len(blocks) else None
                if old != new:
                    self._change(b, k, new)
        self.final = blocks

    def _change(self, b: int, k: int, value: str | None) -> None:
        while len(self.ks) <= b:
            self.ks.append([0])
            self.vals.append([None])
        self.ks[b].append(k)
        self.vals[b].append(value)

    def window(self, rs: int, re: int) -> tuple[int, int]:
        """The states a read from ``rs`` to ``re`` (ns) can have seen."""
        return bisect.bisect_right(self.t1s, rs), bisect.bisect_left(self.t0s, re)

    def values(self, b: int, lo: int, hi: int) -> list[str | None]:
        if b >= len(self.ks):
            return [None]
        ks, vals = self.ks[b], self.vals[b]
        i = bisect.bisect_right(ks, lo) - 1
        j = bisect.bisect_right(ks, hi)
        return vals[i:j]

    def held(self, b: int, *values: str | None) -> list[tuple[int, int]]:
        """The op ranges [from, to) during which block ``b`` held one of ``values``."""
        if b >= len(self.ks):
            return []
        ks, vals = self.ks[b], self.vals[b]
        out = []
        for i, v in enumerate(vals):
            if v in values:
                out.append((ks[i], ks[i + 1] if i + 1 < len(ks) else len(self.muts) + 1))
        return out


def allowed(seen: str, values: list[str | None]) -> bool:
    if seen.startswith("T"):
        return all(allowed(part, values) for part in seen[1:].split("|"))
    if seen == ZERO:
        return ZERO in values or (None in values and any(v is not None for v in values))
    return seen in values


@dataclass(frozen=True)
class Read:
    """One read as a reader logged it: times (ns), range, bytes got, block values."""

    who: str
    style: str
    rs: int
    re: int
    offset: int
    length: int
    got: int
    values: tuple[str, ...]


def parse_read(who: str, line: str) -> Read:
    style, rs, re, off, req, n, *values = line.split()
    return Read(who, style, int(rs), int(re), int(off), int(req), int(n), tuple(values))


@dataclass
class Anomaly:
    read: Read
    block: int
    seen: str
    lo: int  # the states the read can have seen: S_lo..S_hi
    hi: int
    what: str = ""


def describe_value(v: str | None) -> str:
    if v is None:
        return "past EOF"
    if v == ZERO:
        return "zeros"
    if v.startswith("?"):
        return f"bytes that are no stamp ({v[1:33]}...)"
    if v.startswith("T"):
        return "a torn block: " + ", ".join(describe_value(p) for p in v[1:].split("|"))
    w, op, off = v.split(":")
    return f"writer {w} op {op}'s data (written at offset {off})"


def check_read(history: History, r: Read, anomalies: list[Anomaly]) -> None:
    lo, hi = history.window(r.rs, r.re)
    sizes = history.sizes[lo : hi + 1]
    if r.got < r.length and min(sizes) > r.offset + r.got:
        what = f"short read: {r.got} bytes, the file was longer throughout"
        anomalies.append(Anomaly(r, r.offset // BS, "", lo, hi, what))
    if r.got and max(sizes) < r.offset + r.got:
        what = f"read {r.got} bytes past EOF: the file was never that long"
        anomalies.append(Anomaly(r, r.offset // BS, "", lo, hi, what))
    for i, seen in enumerate(r.values):
        b = r.offset // BS + i
        if not allowed(seen, history.values(b, lo, hi)):
            anomalies.append(Anomaly(r, b, seen, lo, hi))


def check_reads(history: History, who: str, text: str, anomalies: list[Anomaly]) -> int:
    """Check one reader's log; returns the number of blocks checked."""
    checked = 0
    for line in text.splitlines():
        r = parse_read(who, line)
        check_read(history, r, anomalies)
        checked += len(r.values)
    return checked


def explain(history: History, a: Anomaly) -> list[str]:
    muts = history.muts
    span = f"ops {a.lo + 1}..{a.hi}" if a.hi > a.lo else f"no op (after op {a.lo})"
    r = a.read
    lines = [f"{r.who} ({r.style}) read {r.offset}+{r.length} -> {r.got} bytes during {span}:"]
    if a.what:
        lines.append(f"  {a.what}")
        return lines
    b = a.block
    held = ", ".join(describe_value(v) for v in dict.fromkeys(history.values(b, a.lo, a.hi)))
    lines.append(f"  block {b} (offset {b * BS}) returned {describe_value(a.seen)}")
    lines.append(f"  but it held only: {held}")
    involved: dict[int, str] = {}
    if ":" in a.seen and not a.seen.startswith(("T", "?")):
        number = int(a.seen.split(":")[1])
        involved[number] = "wrote the data the reader saw"
        spans = history.held(b, a.seen)
        if spans:
            start, end = spans[-1]
            lines.append(f"  block {b} held it from op {start} until op {end}: stale data")
            if end <= len(muts):
                involved[end] = "replaced it in this block before the read began"
        else:
            where = [
                (other, history.held(other, a.seen))
                for other in range(len(history.ks))
                if other != b
            ]
            where = [(o, s) for o, s in where if s][:3]
            for other, s in where:
                lines.append(
                    f"  it was in block {other} (ops {s[-1][0]}..{s[-1][1]}), never in {b}"
                )
                if s[-1][1] <= len(muts):
                    involved[s[-1][1]] = f"moved or dropped it from block {other}"
    elif a.seen == ZERO:
        spans = [(s, e) for s, e in history.held(b, ZERO, None) if e <= a.lo]
        if spans:
            start, end = spans[-1]
            lines.append(f"  block {b} was zeros (or past EOF) until op {end}: stale zeros")
            involved[end] = "put data in this block before the read began"
    for k in range(a.lo + 1, a.hi + 1):
        involved.setdefault(k, "ran during the read")
    lines.append("  ops involved:")
    for k in sorted(involved)[:12]:
        m = muts[k - 1]
        lines.append(f"    {k:6d} writer {m.writer}: {m.op}  -- {involved[k]}")
    return lines


# the parent:


def run_procs(opts: Options, out: TextIO) -> int:
    from tools.fsx.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Display

    args = opts.args
    nprocs = args.procs
    writers = args.writers or max(1, nprocs // 4)
    readers = nprocs - writers
    if nprocs < 2 or readers < 1:
        print("fusefs-fsx: --procs needs at least one reader and one writer", file=out)
        return EXIT_USAGE
    maxlen = max(2 * BS, args.maxlen - args.maxlen % BS)
    maxoplen = max(BS, args.maxoplen - args.maxoplen % BS)
    gen = GenConfig(maxlen, maxoplen, BS, BS, BS, BS, opts.kinds & WRITER_KINDS)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg = ProcsConfig(
        os.path.abspath(args.file),
        opts.caps,
        opts.seed,
        args.numops,
        args.duration,
        gen,
        str(log_dir),
        os.path.basename(args.file),
    )
    if not args.quiet:
        print(
            f"fsx: seed {opts.seed}; --procs {nprocs}: {writers} writer(s), {readers} reader(s)",
            file=out,
        )
        for note in opts.notes:
            print(f"fsx: {note}", file=out)
    os.close(os.open(cfg.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))

    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    counter = ctx.Value("q", 0, lock=False)
    size = ctx.Value("q", 0, lock=False)
    errors = ctx.Value("i", 0, lock=False)
    stop = ctx.Event()
    procs = [ctx.Process(target=reader_main, args=(cfg, r, size, stop)) for r in range(readers)]
    wprocs = [
        ctx.Process(target=writer_main, args=(cfg, w, lock, counter, size, errors))
        for w in range(1, writers + 1)
    ]
    total = None if args.duration else args.numops
    display = Display(out.isatty() and not args.quiet, total, "fsx --procs")
    start = time.monotonic()
    for p in procs + wprocs:
        p.start()
    try:
        while any(p.is_alive() for p in wprocs):
            display.update(counter.value, size.value)
            # Back as soon as a writer ends, else after one display refresh.
            multiprocessing.connection.wait([p.sentinel for p in wprocs], timeout=0.05)
        display.update(counter.value, size.value, final=True)
    finally:
        seconds = time.monotonic() - start
        stop.set()
        for p in wprocs + procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        display.close()
    failed = [p for p in procs + wprocs if p.exitcode != 0]

    muts: list[Mutation] = []
    writer_errors: list[str] = []
    for w in range(1, writers + 1):
        m, e = parse_writer_log(Path(cfg.log(f"w{w}")).read_text())
        muts += m
        writer_errors += e
    muts.sort(key=lambda m: m.number)
    history = History(muts)
    anomalies: list[Anomaly] = []
    checked = 0
    for r in range(readers):
        checked += check_reads(
            history, f"reader {r}", Path(cfg.log(f"r{r}")).read_text(), anomalies
        )
    final = _final_check(cfg, history, anomalies)

    lines = [f"fsx --procs {nprocs} seed {opts.seed}: {len(muts)} ops by {writers} writer(s)"]
    lines += [f"writer error: {e}" for e in writer_errors]
    lines += [f"process {p.name} exited with {p.exitcode}" for p in failed]
    for a in anomalies[:10]:
        lines += explain(history, a)
    report = log_dir / f"{cfg.name}.fsxprocs"
    with open(report, "w", encoding="utf-8") as f:
        for mut in muts:
            print(f"{mut.number:6d} {mut.t0} {mut.t1} writer {mut.writer}: {mut.op}", file=f)
        print("\n".join(lines), file=f)
        for a in anomalies[10:]:
            print("\n".join(explain(history, a)), file=f)
    rate = len(muts) / max(seconds, 1e-9)
    summary = (
        f"{len(muts)} ops in {seconds:.2f} s ({rate:.0f} ops/s); readers checked "
        f"{checked} blocks; final size {history.sizes[-1]}{final}"
    )
    if anomalies or writer_errors or failed:
        print("\n".join(lines[1:]), file=out)
        print(f"fsx: FAILED: {len(anomalies)} anomalies, {summary}", file=out)
        print(f"fsx: wrote {report} and the per-process logs in {log_dir}", file=out)
        return EXIT_FAILED
    if not args.quiet:
        print(f"fsx: no anomaly: {summary}", file=out)
    for role in [f"w{w}" for w in range(1, writers + 1)] + [f"r{r}" for r in range(readers)]:
        with contextlib.suppress(OSError):
            os.unlink(cfg.log(role))
    return EXIT_OK


def _final_check(cfg: ProcsConfig, history: History, anomalies: list[Anomaly]) -> str:
    """The whole file, once more, after every writer stopped: it must be S_M."""
    with open(cfg.path, "rb") as f:
        data = f.read()
    t = time.monotonic_ns()
    values = tuple(_values(data).split())
    r = Read("final check", "buffered", t, t, 0, len(data) + BS, len(data), values)
    before = len(anomalies)
    check_read(history, r, anomalies)
    m = len(history.muts)
    if len(data) != history.sizes[-1]:
        what = f"file size {len(data)}, expected {history.sizes[-1]}"
        anomalies.append(Anomaly(r, 0, "", m, m, what))
    return "" if len(anomalies) == before else f"; final check: {len(anomalies) - before} bad"
