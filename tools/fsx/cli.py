"""fusefs-fsx: xfstests-style fsx for fusefs (and any other directory).

One file, a random sequence of operations from a seed, a byte-exact model of
what the file must contain, and on the first disagreement: a non-zero exit, the
first bad offset with the expected and actual bytes (each decoded: which op
wrote them, at which offset), the ops that touched that byte, and in the log
directory the log, the expected image, the actual image and the replayable op
list.  ``--minimize`` shrinks a failing op list by delta debugging;
``--procs N`` runs readers against writers in N processes and checks every block
every reader saw (`tools.fsx.procs`).  docs/fsx.md has the whole story; the
pieces are `tools.fsx.model` (pure: data, ops, model, generator, minimizer) and
`tools.fsx.target` (syscalls, fallocate backends, the control directory).

`run` takes an argv and returns the exit status (0 passed, 1 the filesystem
failed, 2 bad usage or setup); `main` is the console script.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from tools import pressure
from tools.fsx.model import (
    ALL_KINDS,
    BS,
    DATA,
    FALLOC_KINDS,
    GenConfig,
    Generator,
    Model,
    Op,
    OpSyntaxError,
    Step,
    bad_range,
    ddmin,
    describe_at,
    first_difference,
    format_ops,
    hexdump,
    parse_ops,
    parse_weights,
    seek_walk,
    size_after,
    stamp_bytes,
    touching,
    why_invalid,
)
from tools.fsx.sweep import merge_main, run_sweep
from tools.fsx.target import (
    ROUTES,
    Capabilities,
    MountSettings,
    RaceReaders,
    RouteError,
    Target,
    probe,
)
from tools.pressure import Pressure, PressureError, PressureSpec, parse_kinds

# The ops after which SEEK_DATA/SEEK_HOLE are checked at the edges of their range.
SEEK_CHECKED: Final = frozenset({"write", "dwrite", "fallocate", "truncate"})
RACE_SITES: Final = ("buffered_read_before_insert", "readahead_before_insert")
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

# The demonstration the demo runs (docs/fsx.md, "The lock-off failure"): two
# race readers while the sequence collapses, inserts, punches, truncates and
# writes O_DIRECT, a 5 ms window at every buffered-read and readahead insert,
# and a full check after every op.  With the lock off seed 7 fails within a few
# dozen ops (op 16 or 30 in most runs); with it on the same seed passes.
RACE_FLAGS: Final = ("-l", "256K", "-o", "64K", "-X", "--race-readers", "2", "--race-window", "5")
RACE_DEMO_ARGS: Final = ("-S", "7", "-N", "400", *RACE_FLAGS)


# Stress for the demo: buffered and O_DIRECT IO on two descriptors, every
# fallocate mode, drop_caches, readahead bursts, a full check after every op, all
# under other processes' pressure (a stream, a drop loop, a 1 MiB cache) and with
# every race window opened at random.
DEMO_STRESS_ARGS: Final = ("-S", "7", "-N", "2000", "-X", "--pressure", "--chaos", "0.05")


def race_demo_argv(file: str, lock: str, log_dir: str) -> list[str]:
    """The argv of one side of the lock-off / lock-on demonstration."""
    return [*RACE_DEMO_ARGS, "--pagecache-lock", lock, "-P", log_dir, file]


def demo(
    mountpoint: str,
    log_dir: str,
    *,
    minimize: bool = True,
    say: Callable[[str], None] = lambda line: None,
) -> bool:
    """fsx's part of ``scripts/demo`` on a mounted fusefs: the stress run, then
    seed 7 with the lock off (must fail; minimized) and on (must pass).  True
    when all three came out so.  ``say`` gets a line before each run and after
    the lock-off one, so that its failure report reads as the expected result."""
    stress = os.path.join(mountpoint, "fsx-stress")
    race = os.path.join(mountpoint, "fsx-race")
    say(
        "stress: 2000 ops, buffered and O_DIRECT, every fallocate mode, under other processes' "
        "pressure on the cache and chaos windows; must pass"
    )
    passed = run([*DEMO_STRESS_ARGS, "-P", log_dir, stress]) == EXIT_OK
    extra = ["--minimize"] if minimize else []
    say("seed 7 with the pagecache add lock OFF: must fail -- the report below is expected")
    failed_off = run([*race_demo_argv(race, "off", log_dir), *extra]) == EXIT_FAILED
    say("the lock-off run failed, as expected" if failed_off else "the lock-off run PASSED")
    say("the same seed with the lock ON: must pass")
    passed_on = run(race_demo_argv(race, "on", log_dir)) == EXIT_OK
    return passed and failed_off and passed_on


# options:


def _size(text: str) -> int:
    """``4096``, ``0x1000``, ``64k``, ``1M``, ``2b`` (512-byte units, as fsx)."""
    units = {"b": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    try:
        value = int(t, 0)  # first, so that 0x1b is hex, not 0x1 blocks
    except ValueError:
        t = t.removesuffix("ib")
        try:
            value = int(t[:-1], 0) * units[t[-1:]]
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return value


def _positive(text: str) -> int:
    value = _size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusefs-fsx",
        description="fsx-style stress with a byte-exact model (flags as xfstests fsx).",
        epilog="docs/fsx.md describes the op list format, the report and --procs.",
    )
    p.add_argument("file", help="the file to exercise (created, truncated)")
    p.add_argument("-N", dest="numops", type=_size, default=10000, help="ops (default 10000)")
    p.add_argument("-S", dest="seed", type=int, default=1, help="seed (0 = random, printed)")
    p.add_argument("-l", dest="maxlen", type=_positive, default=256 * 1024, help="max file size")
    p.add_argument("-o", dest="maxoplen", type=_positive, default=64 * 1024, help="max op size")
    p.add_argument("-r", dest="readbdy", type=_positive, default=1, help="read alignment")
    p.add_argument("-w", dest="writebdy", type=_positive, default=1, help="write alignment")
    p.add_argument("-t", dest="truncbdy", type=_positive, default=1, help="truncate alignment")
    p.add_argument("-Z", dest="direct_only", action="store_true", help="all IO O_DIRECT")
    p.add_argument("-F", dest="no_alloc", action="store_true", help="no fallocate allocate")
    p.add_argument("-K", dest="no_keep", action="store_true", help="no KEEP_SIZE modes")
    p.add_argument("-H", dest="no_punch", action="store_true", help="no punch hole")
    p.add_argument("-z", dest="no_zero", action="store_true", help="no zero range")
    p.add_argument("-C", dest="no_collapse", action="store_true", help="no collapse range")
    p.add_argument("-I", dest="no_insert", action="store_true", help="no insert range")
    p.add_argument("-X", dest="check_every", action="store_true", help="full check after each op")
    p.add_argument("-n", dest="no_size_checks", action="store_true", help="no file size checks")
    p.add_argument("-d", dest="debug", action="store_true", help="print every op")
    p.add_argument("-q", dest="quiet", action="store_true", help="quieter")
    p.add_argument("-P", dest="log_dir", default=".", help="log dir (default .)")
    p.add_argument(
        "--record-ops",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="write the op list also on success (default FILE: NAME.fsxops)",
    )
    p.add_argument("--replay-ops", metavar="FILE", help="run exactly the ops of FILE")
    p.add_argument("--duration", type=float, help="stop after SECONDS (ignores -N)")
    p.add_argument("--no-direct", action="store_true", help="no O_DIRECT descriptor")
    p.add_argument(
        "--fallocate-route",
        choices=ROUTES,
        default="auto",
        help="fusefs: fallocate(2) (kernel), .fusefs/fallocate (control), or fallocate(2) "
        "for the modes the kernel forwards and the control file for the rest (auto, default)",
    )
    p.add_argument(
        "--no-seek-check",
        action="store_true",
        help="no SEEK_DATA/SEEK_HOLE check against the model",
    )
    p.add_argument("--skip", default="", metavar="KINDS", help="op kinds not to generate (a,b)")
    p.add_argument(
        "--weights",
        default="",
        metavar="KIND=N,...",
        help="op mix: relative weights of op kinds (docs/fsx.md lists the defaults)",
    )
    g = p.add_argument_group("beyond fsx")
    g.add_argument(
        "--seeds",
        metavar="A-B",
        help="a sweep: one run per seed (A-B, A, or a list of them), each logged in "
        "-P DIR/seed-S; the report is DIR/sweep.json and DIR/sweep.md",
    )
    g.add_argument(
        "--shard",
        metavar="K/N",
        help="with --seeds: run shard K of N (from 1) of the seeds; "
        "'fusefs-fsx merge DIR...' folds the shards' reports",
    )
    g.add_argument("--minimize", action="store_true", help="shrink a failing op list")
    g.add_argument(
        "--minimize-tries",
        type=int,
        default=0,
        metavar="N",
        help="replays per candidate (default 1, 3 with race readers)",
    )
    g.add_argument("--minimize-budget", type=float, default=300.0, metavar="SECONDS")
    g.add_argument(
        "--procs", type=int, default=0, metavar="N", help="N processes (readers + writers)"
    )
    g.add_argument("--writers", type=int, default=0, metavar="W", help="writers of --procs")
    g.add_argument(
        "--race-readers",
        type=int,
        default=0,
        metavar="N",
        help="threads reading the file while the sequence runs",
    )
    g.add_argument(
        "--race-window",
        type=float,
        default=0.0,
        metavar="MS",
        help="fusefs: hold the read/readahead insert windows open MS ms",
    )
    g.add_argument("--race-probability", type=float, default=1.0, metavar="P")
    g.add_argument("--pagecache-lock", choices=("on", "off"), help="fusefs: switch the lock")
    pressure.add_arguments(g)
    g.add_argument(
        "--pressure-cache",
        type=_size,
        default=1 << 20,
        metavar="SIZE",
        help="fusefs: cache size for --pressure cache (default 1M)",
    )
    g.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="fusefs: a dynamic_fault command for the run (undone after)",
    )
    return p


@dataclass
class Options:
    args: argparse.Namespace
    caps: Capabilities
    kinds: frozenset[str]
    seed: int
    notes: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    pressure: PressureSpec | None = None
    weights: tuple[tuple[str, int], ...] = ()

    @property
    def gen(self) -> GenConfig:
        a = self.args
        return GenConfig(
            maxlen=a.maxlen,
            maxoplen=a.maxoplen,
            readbdy=a.readbdy,
            writebdy=a.writebdy,
            truncbdy=a.truncbdy,
            kinds=self.kinds,
            weights=self.weights,
        )


def choose_kinds(args: argparse.Namespace, caps: Capabilities) -> tuple[set[str], list[str]]:
    """The op kinds to generate, and a note for each turned off by the target."""
    kinds = set(ALL_KINDS)
    notes = list(caps.notes)
    if args.no_direct or not caps.direct:
        kinds -= {"dread", "dwrite"}
    if args.direct_only:
        kinds -= {"read", "write", "readahead"}
    if not caps.fusefs:
        kinds.discard("drop_caches")
    switched = {
        "no_alloc": ("alloc", "keep_size"),
        "no_keep": ("keep_size", "zero_keep"),
        "no_punch": ("punch",),
        "no_zero": ("zero", "zero_keep"),
        "no_collapse": ("collapse",),
        "no_insert": ("insert",),
    }
    for flag, names in switched.items():
        if getattr(args, flag):
            kinds -= set(names)
    for kind, mode in FALLOC_KINDS.items():
        if mode not in caps.falloc:
            kinds.discard(kind)
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}
    unknown = skip - ALL_KINDS
    if unknown:
        raise SystemExit(f"fusefs-fsx: --skip: unknown op kinds {sorted(unknown)}")
    kinds -= skip
    if not kinds:
        raise SystemExit("fusefs-fsx: every op kind is turned off")
    return kinds, notes


# one sequence:


@dataclass
class Failure:
    number: int  # the op that found it
    op: Op
    what: str  # read, readahead, check, size, error
    message: str
    offset: int | None = None  # first bad file offset
    want: bytes = b""
    got: bytes = b""
    base: int = 0  # file offset of want[0]

    @property
    def mismatch(self) -> bool:
        return self.what != "error"


@dataclass
class Outcome:
    history: list[Step]
    failure: Failure | None
    seconds: float
    model: Model
    reader_reads: int = 0
    reader_errors: list[str] = field(default_factory=list)

    @property
    def ops(self) -> int:
        return len(self.history)

    def op_list(self) -> list[Op]:
        """The ops up to the failure; a failure an op's read did not show
        itself becomes a final ``check`` so the list alone reproduces it."""
        ops = [s.op for s in self.history]
        f = self.failure
        if f is not None and f.what in ("check", "size") and f.op.kind != "check":
            ops.append(Op("check"))
        return ops


class SequenceRun:
    """Runs ops against a `Target` and the `Model`, stopping at the first failure."""

    def __init__(self, target: Target, opts: Options, out: TextIO, debug: bool) -> None:
        self.target = target
        self.opts = opts
        self.model = Model()
        self.history: list[Step] = []
        self.out = out
        self.debug = debug
        self.direct_only = bool(opts.args.direct_only)
        self.seek_check = opts.caps.seek and not opts.args.no_seek_check
        # fusefs's answers follow from the model block by block; any other
        # filesystem may call holes data (docs/fsx.md, "The seek check").
        self.exact_seek = opts.caps.fusefs

    def _compare(
        self, number: int, op: Op, what: str, base: int, want: bytes, got: bytes
    ) -> Failure | None:
        pos = first_difference(want, got)
        if pos is None:
            return None
        label = "full check after" if what == "check" else what
        if len(got) != len(want) and pos == min(len(got), len(want)):
            message = f"{label} op {number}: got {len(got)} bytes, expected {len(want)}"
        else:
            message = f"{label} op {number}: bad data at file offset {base + pos}"
        return Failure(number, op, what, message, base + pos, want, got, base)

    def _read_check(self, number: int, op: Op, got: bytes) -> Failure | None:
        want = self.model.expect_read(op.offset, op.length)
        return self._compare(number, op, "read", op.offset, want, got)

    def full_check(self, number: int, op: Op, what: str = "check") -> Failure | None:
        got = self.target.read_all(direct=self.direct_only)
        failure = self._compare(number, op, what, 0, bytes(self.model.data), got)
        if failure is None and self.seek_check:
            failure = self._seek_walk(number, op)
        return failure

    # SEEK_DATA / SEEK_HOLE (docs/fsx.md, "The seek check"):

    def _seek_failure(self, number: int, op: Op, message: str) -> Failure:
        return Failure(number, op, "seek", f"seek after op {number}: {message}")

    def _block_says(self, offset: int) -> str:
        if offset >= self.model.size:
            return "EOF"
        state = self.model.blocks.get(offset // BS)
        name = {DATA: "data", None: "hole"}.get(state, "unwritten (a hole)")
        return f"block {offset // BS} is {name}"

    def _seek_points(self, number: int, op: Op) -> Failure | None:
        """SEEK_DATA and SEEK_HOLE from the edges of ``op``'s range (and from
        the start of the file), each compared with the model."""
        size = self.model.size
        start = op.offset if op.kind != "truncate" else max(op.offset - 1, 0)
        points = sorted({0, start, op.end, max(start - BS, 0)} & set(range(size)))
        for pos in points:
            for whence, name in ((os.SEEK_DATA, "SEEK_DATA"), (os.SEEK_HOLE, "SEEK_HOLE")):
                got = self.target.seek(pos, whence)
                if self.exact_seek:
                    want = (
                        self.model.seek_data if whence == os.SEEK_DATA else self.model.seek_hole
                    )(pos)
                    if got != want:
                        return self._seek_failure(
                            number,
                            op,
                            f"{name} from {pos} gave {_enxio(got)}, the model says {_enxio(want)} "
                            f"({self._block_says(pos)}; size {size})",
                        )
                else:
                    problem = self._seek_sound(pos, whence, got)
                    if problem is not None:
                        return self._seek_failure(number, op, f"{name} from {pos}: {problem}")
        return None

    def _seek_sound(self, pos: int, whence: int, got: int | None) -> str | None:
        """What is wrong with ``got`` on a filesystem whose holes may be reported as
        data (any but fusefs): every byte it calls a hole must read as zeros."""
        size = self.model.size
        data = self.model.data
        if whence == os.SEEK_DATA:
            end = size if got is None else got
            if got is not None and not pos <= got <= size:
                return f"gave {got}, outside [{pos}, {size}]"
            hole = (pos, end)
        else:
            if got is None or not pos <= got <= size:
                return f"gave {_enxio(got)}, outside [{pos}, {size}]"
            after = self.target.seek(got, os.SEEK_DATA) if got < size else size
            if after is not None and after <= got < size:
                return f"gave {got}, but SEEK_DATA from {got} gave {after}"
            hole = (got, size if after is None else after)
        if any(data[hole[0] : hole[1]]):
            first = next(i for i in range(*hole) if data[i])
            return f"calls [{hole[0]}, {hole[1]}) a hole, but the model has data at {first}"
        return None

    def _seek_walk(self, number: int, op: Op) -> Failure | None:
        """The whole file's data runs, walked as ``cp --sparse`` does."""
        try:
            got = seek_walk(
                lambda o: self.target.seek(o, os.SEEK_DATA),
                lambda o: self.target.seek(o, os.SEEK_HOLE),
            )
        except ValueError as e:
            return self._seek_failure(number, op, str(e))
        if self.exact_seek:
            want = self.model.data_segments()
            if got != want:
                return self._seek_failure(
                    number, op, f"data runs {_runs(got)}, the model says {_runs(want)}"
                )
            return None
        data = self.model.data
        pos = 0
        for start, end in [*got, (self.model.size, self.model.size)]:
            if any(data[pos:start]):
                return self._seek_failure(
                    number, op, f"data runs {_runs(got)}: [{pos}, {start}) is not zeros"
                )
            pos = end
        return None

    def step(self, number: int, op: Op) -> Failure | None:
        size = self.model.size
        skipped = why_invalid(op, size)
        if skipped is None and op.kind in ("dread", "dwrite") and self.target.dfd < 0:
            skipped = "no O_DIRECT descriptor"
        if skipped is None and op.kind == "drop_caches" and self.target.control is None:
            skipped = "not a fusefs mount"
        if self.debug:
            print(
                f"{number:6d} {op.pretty()}{'  SKIPPED: ' + skipped if skipped else ''}",
                file=self.out,
            )
        self.history.append(Step(number, op, size, skipped))
        if skipped:
            return None
        try:
            failure = self._execute(number, op)
        except OSError as e:
            return self._error(number, op, f"op {number} ({op})", e)
        if failure is not None:
            return failure
        try:
            return self._checks(number, op)
        except OSError as e:
            return self._error(number, op, f"checking after op {number} ({op})", e)

    def _error(self, number: int, op: Op, what: str, e: OSError) -> Failure:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        return Failure(number, op, "error", f"{what} failed: {name}: {e.strerror}")

    def _checks(self, number: int, op: Op) -> Failure | None:
        """The size (fstat) after every op unless -n; everything with -X."""
        if not self.opts.args.no_size_checks:
            actual = self.target.size()
            if actual != self.model.size:
                f = self.full_check(number, op, "size")
                message = f"after op {number}: file size {actual}, expected {self.model.size}"
                if f is None:
                    return Failure(number, op, "size", message, None, b"", b"")
                f.message = message
                return f
        if self.opts.args.check_every or op.kind == "check":
            return self.full_check(number, op)
        if self.seek_check and op.kind in SEEK_CHECKED:
            return self._seek_points(number, op)
        return None

    def _execute(self, number: int, op: Op) -> Failure | None:
        t = self.target
        kind = op.kind
        if kind == "read":
            return self._read_check(number, op, t.read(op.offset, op.length))
        if kind == "dread":
            return self._read_check(number, op, t.dread(op.offset, op.length))
        if kind == "readahead":
            chunk = int(op.arg)
            pos = op.offset
            while pos < op.end:
                n = min(chunk, op.end - pos)
                got = t.read(pos, n)
                want = self.model.expect_read(pos, n)
                f = self._compare(number, op, "readahead", pos, want, got)
                if f is not None or not got:
                    return f
                pos += len(got)
            return None
        if kind in ("write", "dwrite"):
            data = stamp_bytes(0, op.stamp, op.offset, op.length)
            if kind == "dwrite":
                t.dwrite(op.offset, data)
            else:
                t.write(op.offset, data)
        elif kind == "truncate":
            t.truncate(op.offset)
        elif kind == "fallocate":
            t.fallocate(op.arg, op.offset, op.length)
        elif kind == "fsync":
            t.fsync()
        elif kind == "fdatasync":
            t.fdatasync()
        elif kind == "reopen":
            t.reopen()
        elif kind == "drop_caches":
            t.drop_caches()
        self.model.apply(op)
        return None


def run_sequence(
    path: str,
    opts: Options,
    ops: Iterator[Op] | Sequence[Op],
    *,
    out: TextIO,
    debug: bool = False,
    on_op: Callable[[int, int], None] | None = None,
    duration: float | None = None,
) -> Outcome:
    """One run on a fresh (truncated) ``path``: generated or given ops, until
    the first failure, their end, or ``duration`` seconds."""
    args = opts.args
    target = Target(path, opts.caps, truncate=True, buffer_size=max(args.maxoplen, BS))
    seq = SequenceRun(target, opts, out, debug)
    failure = None
    start = time.monotonic()
    deadline = start + duration if duration else None
    readers = RaceReaders(path, args.race_readers, opts.seed, lambda: seq.model.size)
    try:
        with readers:
            for number, op in enumerate(ops, 1):
                failure = seq.step(number, op)
                if on_op is not None:
                    on_op(number, seq.model.size)
                if failure is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
    finally:
        target.close()
    return Outcome(
        seq.history,
        failure,
        time.monotonic() - start,
        seq.model,
        readers.reads,
        readers.errors,
    )


def _enxio(offset: int | None) -> str:
    return "ENXIO" if offset is None else str(offset)


def _runs(runs: list[tuple[int, int]]) -> str:
    shown = " ".join(f"[{a},{b})" for a, b in runs[:8])
    return (shown + f" ... ({len(runs)} runs)") if len(runs) > 8 else shown or "none"


def generated(opts: Options) -> Iterator[Op]:
    """The seed's op sequence (-N ops, or endless with --duration)."""
    gen = Generator(opts.seed, opts.gen)
    size = 0
    number = 0
    limit = None if opts.args.duration else opts.args.numops
    while limit is None or number < limit:
        number += 1
        op = gen.next(number, size)
        size = size_after(op, size)
        yield op


# reporting:


def report(failure: Failure, outcome: Outcome, out: TextIO) -> None:
    print(f"fsx: FAILED: {failure.message}", file=out)
    if failure.offset is not None:
        pos = failure.offset - failure.base
        start = max(0, pos - pos % 16)
        for label, data in (("expected", failure.want), ("actual", failure.got)):
            line = hexdump(data[start : start + 16], failure.base + start)
            print(f"  {label:8s} {line}", file=out)
            print(f"  {'':8s} = {describe_at(data, pos, failure.base)}", file=out)
        if pos < min(len(failure.want), len(failure.got)):
            end, differing = bad_range(failure.want, failure.got, pos, failure.base)
            print(
                f"  bad run: file offsets {failure.offset:#x}..{failure.base + end - 1:#x} "
                f"({end - pos} bytes); {differing} bytes differ in all",
                file=out,
            )
        touched = touching(outcome.history, failure.offset)
        if touched:
            print(f"  ops that touched offset {failure.offset}, latest first:", file=out)
            for step, what in touched:
                print(f"    {step.number:6d} {step.op}: {what}", file=out)
        else:
            print(f"  no op touched offset {failure.offset}: it must read as zeros", file=out)
    print("  last operations:", file=out)
    for step in outcome.history[-12:]:
        note = f"  (skipped: {step.skipped})" if step.skipped else ""
        print(f"    {step.number:6d} {step.op.pretty()}{note}", file=out)


def write_logs(
    name: str, log_dir: Path, outcome: Outcome, header: list[str], actual: bytes | None
) -> dict[str, Path]:
    """NAME.fsxlog, .fsxgood (expected image), .fsxbad (actual), .fsxops."""
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: log_dir / f"{name}.{ext}" for ext in ("fsxlog", "fsxgood", "fsxbad", "fsxops")}
    with open(paths["fsxlog"], "w", encoding="utf-8") as f:
        for line in header:
            print(f"# {line}", file=f)
        for step in outcome.history:
            note = f"  SKIPPED: {step.skipped}" if step.skipped else ""
            print(f"{step.number:6d} size={step.size_before:<8d} {step.op.pretty()}{note}", file=f)
        if outcome.failure is not None:
            report(outcome.failure, outcome, f)
    paths["fsxgood"].write_bytes(bytes(outcome.model.data))
    if actual is not None:
        paths["fsxbad"].write_bytes(actual)
    else:
        del paths["fsxbad"]
    paths["fsxops"].write_text(format_ops(outcome.op_list(), header), encoding="utf-8")
    return paths


def read_back(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


# the progress display:


class Display:
    """ops done, ops/s and file size on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, total: int | None, label: str) -> None:
        self._progress = None
        self._start = time.monotonic()
        self._last = 0.0
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.0f} ops/s"),
            TextColumn("size {task.fields[size]:>8d}"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task(label, total=total, rate=0.0, size=0)
        self._progress.start()

    def update(self, done: int, size: int, *, final: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last < 0.05 and not final:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        self._progress.update(self._task, completed=done, rate=rate, size=size)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# minimizing:


def minimize(
    path: str,
    opts: Options,
    failing: list[Op],
    failure: Failure,
    out: TextIO,
    settings: MountSettings | None,
) -> list[Op]:
    """Delta-debug ``failing`` down to a short list that still fails the same
    way (a mismatch, or an error), replaying each candidate on ``PATH.min``
    with the run's flags and its fault commands sent again."""
    tries = opts.args.minimize_tries or (3 if opts.args.race_readers else 1)
    want_mismatch = failure.mismatch
    scratch = f"{path}.min"

    def fails(ops: list[Op]) -> bool:
        for _ in range(tries):
            if settings is not None:
                settings.rearm()
            o = run_sequence(scratch, opts, ops, out=out)
            if o.failure is not None and o.failure.mismatch == want_mismatch:
                return True
        return False

    try:
        if not fails(failing):
            print(
                f"fsx: the failure did not come back in {tries} replay(s): not minimized", file=out
            )
            return failing
        display = Display(out.isatty() and not opts.args.quiet, None, "minimize")
        try:
            result = ddmin(
                failing,
                fails,
                max_seconds=opts.args.minimize_budget,
                progress=lambda tests, n: display.update(tests, n),
            )
        finally:
            display.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
    note = f" ({result.stopped})" if result.stopped else ""
    print(
        f"fsx: minimized {len(failing)} ops to {len(result.ops)} in {result.tests + 1} replays, "
        f"{result.seconds:.1f} s{note}",
        file=out,
    )
    return result.ops


# the command:


def _setup(args: argparse.Namespace, argv: list[str]) -> tuple[Options, MountSettings | None]:
    seed = args.seed or random.SystemRandom().randrange(1, 1 << 31)
    try:
        caps = probe(args.file, args.fallocate_route)
    except RouteError as e:
        raise SystemExit(f"fusefs-fsx: {e}") from None
    kinds, notes = choose_kinds(args, caps)
    opts = Options(args, caps, frozenset(kinds), seed, notes, argv)
    try:
        opts.weights = parse_weights(args.weights)
    except ValueError as e:
        raise SystemExit(f"fusefs-fsx: --weights: {e}") from None
    if not any(dict(opts.weights).get(k, 1) for k in kinds):
        raise SystemExit("fusefs-fsx: --weights: every op kind left has weight 0")
    if args.pressure is not None:
        try:
            opts.pressure = PressureSpec(
                parse_kinds(args.pressure),
                cache_size=args.pressure_cache,
                interval=args.pressure_interval / 1000,
            )
        except ValueError as e:
            raise SystemExit(f"fusefs-fsx: --pressure: {e}") from None
    if args.chaos is not None and not 0 < args.chaos <= 1:
        raise SystemExit(f"fusefs-fsx: --chaos needs a probability in (0, 1], got {args.chaos}")
    needs_mount = args.race_window or args.pagecache_lock or args.fault or args.chaos
    if args.direct_only and args.no_direct:
        raise SystemExit("fusefs-fsx: -Z and --no-direct exclude each other")
    if args.direct_only and not caps.direct:
        raise SystemExit("fusefs-fsx: -Z: O_DIRECT does not work here")
    if not caps.fusefs:
        if needs_mount:
            raise SystemExit(
                "fusefs-fsx: --race-window, --pagecache-lock, --chaos and --fault need a "
                "fusefs mount"
            )
        return opts, None
    assert caps.control_root is not None
    from tools.fsx.target import Control

    settings = MountSettings(Control(caps.control_root))
    try:
        if args.pagecache_lock:
            settings.lock(args.pagecache_lock)
        if args.race_window:
            p = args.race_probability
            for site in RACE_SITES:
                settings.fault(f"name {site} probability {p} delay {args.race_window}")
        if args.chaos:
            settings.chaos(seed, args.chaos, args.chaos_delay)
        for spec in args.fault:
            settings.fault(spec)
    except OSError as e:
        settings.restore()
        raise SystemExit(f"fusefs-fsx: setting up the mount: {e.strerror}") from None
    return opts, settings


def run(argv: Sequence[str]) -> int:
    """Run fusefs-fsx with ``argv`` (without the program name); the exit status."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.seeds:
        return run_sweep(args, argv, run)
    if args.shard:
        print("fusefs-fsx: --shard splits a --seeds sweep", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout
    try:
        replay = parse_ops(Path(args.replay_ops).read_text()) if args.replay_ops else None
    except (OSError, OpSyntaxError) as e:
        print(f"fusefs-fsx: --replay-ops {args.replay_ops}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        opts, settings = _setup(args, list(argv))
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"fusefs-fsx: {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _pressure(opts, out) as pressure:
            if args.procs:
                from tools.fsx.procs import run_procs

                status = run_procs(opts, out)
            else:
                status = _run_single(opts, replay, out, settings)
        if pressure is not None:
            if not args.quiet or pressure.problems:
                print(f"fsx: pressure ({pressure.spec.describe()}): {pressure.summary()}", file=out)
            for problem in pressure.problems:
                print(f"fsx: FAILED: {problem}", file=out)
            if pressure.problems:
                return EXIT_FAILED
        return status
    except PressureError as e:
        print(f"fusefs-fsx: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except OSError as e:
        # Opening or reopening the file, or reading it back for the logs.
        print(f"fusefs-fsx: {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if settings is not None:
            settings.restore()


@contextlib.contextmanager
def _pressure(opts: Options, out: TextIO) -> Iterator[Pressure | None]:
    """The run's `Pressure`, started before its first op and stopped after its
    last (replays of --minimize included), or None without --pressure."""
    if opts.pressure is None:
        yield None
        return
    directory = os.path.dirname(os.path.abspath(opts.args.file))
    with Pressure(opts.pressure, directory, opts.caps.control_root) as pressure:
        if not opts.args.quiet:
            print(f"fsx: pressure: {opts.pressure.describe()}", file=out)
        yield pressure
        pressure.check()


def _describe_target(opts: Options) -> str:
    caps = opts.caps
    where = f"fusefs mount {caps.control_root}" if caps.fusefs else "plain directory"
    return f"{opts.args.file} on a {where}"


def _run_single(
    opts: Options, replay: list[Op] | None, out: TextIO, settings: MountSettings | None
) -> int:
    args = opts.args
    quiet = args.quiet
    if not quiet:
        what = f"replaying {args.replay_ops}" if replay is not None else f"seed {opts.seed}"
        print(f"fsx: {what}; {_describe_target(opts)}", file=out)
        for note in opts.notes:
            print(f"fsx: {note}", file=out)
    ops: Iterator[Op] | list[Op] = replay if replay is not None else generated(opts)
    total = len(replay) if replay is not None else (None if args.duration else args.numops)
    display = Display(out.isatty() and not (quiet or args.debug), total, "fsx")
    try:
        outcome = run_sequence(
            args.file,
            opts,
            ops,
            out=out,
            debug=args.debug,
            on_op=display.update,
            duration=args.duration if replay is None else None,
        )
        display.update(outcome.ops, outcome.model.size, final=True)
    finally:
        display.close()
    name = os.path.basename(args.file)
    header = [
        f"fusefs-fsx seed {opts.seed}: {_describe_target(opts)}",
        "argv: " + shlex.join(opts.argv),
    ]
    rate = outcome.ops / max(outcome.seconds, 1e-9)
    failure = outcome.failure
    if outcome.reader_errors:
        errors = sorted(set(outcome.reader_errors))
        print(f"fsx: race readers met {len(outcome.reader_errors)} errors: {errors[:3]}", file=out)
    if failure is None:
        if not quiet:
            extra = f"; race readers did {outcome.reader_reads} reads" if args.race_readers else ""
            print(
                f"fsx: all {outcome.ops} ops passed in {outcome.seconds:.2f} s "
                f"({rate:.0f} ops/s), final size {outcome.model.size}{extra}",
                file=out,
            )
        if args.record_ops is not None:
            dest = Path(args.record_ops or Path(args.log_dir) / f"{name}.fsxops")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(format_ops(outcome.op_list(), header), encoding="utf-8")
        return EXIT_OK
    report(failure, outcome, out)
    paths = write_logs(name, Path(args.log_dir), outcome, header, read_back(args.file))
    print(f"fsx: failed at op {failure.number} ({rate:.0f} ops/s); seed {opts.seed}", file=out)
    print("fsx: wrote " + " ".join(str(p) for p in paths.values()), file=out)
    if args.record_ops:
        Path(args.record_ops).write_text(format_ops(outcome.op_list(), header), encoding="utf-8")
    if args.minimize:
        failing = outcome.op_list()
        small = minimize(args.file, opts, failing, failure, out, settings)
        dest = Path(args.log_dir) / f"{name}.min.fsxops"
        comment = [*header, f"minimized from {len(failing)} ops to {len(small)}"]
        dest.write_text(format_ops(small, comment), encoding="utf-8")
        print(f"fsx: minimized op list: {dest}", file=out)
        for op in small[:40]:
            print(f"    {op}", file=out)
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["merge"]:  # a file called merge is ./merge
        return merge_main(raw[1:])
    try:
        return run(raw)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
