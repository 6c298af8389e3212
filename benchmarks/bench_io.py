"""IO benchmark: fusefs against the null filesystem and a plain directory, in one run.

Three targets are set up side by side in a fresh temporary directory:

- ``fusefs``: a new 2 GiB image, made and mounted through the real command line
  (``fusefs mkfs``, ``fusefs mount``; ``fusefs umount`` at the end, whatever happens);
- ``nullfs``: `benchmarks.nullfs`, the ceiling of any pyfuse3 filesystem here;
- ``plain``: a directory of the local filesystem that holds the temporary directory.

fio (``ioengine=psync``, one job, parameters on the command line) runs each workload
on the targets it is compared across; a short Python loop measures metadata.  On
fusefs and nullfs every file is FUSE ``direct_io`` (DESIGN §2), so "buffered" there
means "through the filesystem's own cache, if it has one".

| workload | what | against | goal |
| --- | --- | --- | --- |
| warm_randread_4k | 4 KiB random reads, warm 48 MiB file (fits the cache) | nullfs | >= 0.9 |
| warm_seqread_1m | 1 MiB sequential reads of the warm file, looping | nullfs | >= 0.9 every round |
| randwrite_4k | 4 KiB random writes over the 48 MiB file | nullfs | >= 0.9 |
| seqwrite_1m | 1 MiB writes, new file > the cache, fsync at end | plain, nullfs | plain >= 1.0 |
| cold_seqread_1m | 1 MiB reads of that file, the caches dropped | plain, nullfs | plain >= 0.6 |
| direct_write_1m | O_DIRECT 1 MiB sequential writes | plain, nullfs | reported |
| direct_read_1m | O_DIRECT 1 MiB sequential reads | plain, nullfs | plain >= 0.8 |
| meta_10k | create + stat + unlink, 10,000 empty files (files/s) | plain, nullfs | nullfs >= 0.9 |
| cache_memory | RSS growth per byte of cache_size, the cache full | cache_size | <= 1.10 |

Each ratio is fusefs's number divided by the reference's; the first reference named is
the row's own (RESULT key ``<workload>``), the others get ``<workload>_vs_<target>``.
A goal names the reference it is judged against (`Goal`): meta_10k is reported against
the plain directory but judged against nullfs.  A goal is a lower bound, or an upper
bound (``<=``: cache_memory).  It is judged on the ratio of the best numbers, or, for an
``every round`` goal, on the worst round: round *i* of fusefs against round *i* of the
reference, the worst of those ratios (RESULT key ``<key>_worst_round``).

cache_memory runs on a fusefs of its own, mounted afresh for each round: the daemon's
VmRSS (from ``/proc/PID/status``, the pid from ``.fusefs/pid``) with the cache just
dropped; then full of clean pages (a file of twice ``.fusefs/cache_size`` written with an
fsync and read back once; ``.fusefs/stats`` must confirm the cache is full); then the
same again with ``cache_size`` raised four times through ``.fusefs/cache_size``.  Its
number is how RSS grows with the cache: the growth between the two full points against
the cache_size added (goal <= 1.10: at most 10% over the cached bytes themselves); the
details have the fixed base that slope leaves over (the daemon's cost at a cache of
zero: interpreter, request and readahead buffers, allocator slack), the first fill's
ratio against an empty cache, the overhead per cached 4 KiB page, and the RSS once half
the large cache's worth of new data has been written without an fsync (dirty pages, up
to the dirty limit).  A fresh daemon, since RSS does not come back down when pages are
dropped: the allocator keeps what was freed for the next pages.

"Dropping the caches" is, for fusefs, writing ``1`` to ``.fusefs/drop_caches`` (when
the file exists) and then dropping the host's page cache too -- the image is a file
on the local disk, and a read it serves from the host's page cache is not cold; for
the plain directory and nullfs, ``sync; echo 3 > /proc/sys/vm/drop_caches`` (nullfs
keeps no data, only the sizes writes extend files to).  The host's page cache is
dropped before fusefs's O_DIRECT reads as well, for the same reason, and before every
round of ``seqwrite_1m`` on every target: with the host's cache full, each new page of
the file (or of the image) costs reclaim first, and how full it is depends on what ran
before.  What was done is printed with the results.

Each number is the best of a few rounds (one with ``--quick``), the targets taking
turns, since these machines are shared: see `Plan`.  The RESULT has every round's
numbers (``raw.<workload>.rounds``) and every round's ratios, round against round
(``raw.<workload>.round_ratios``), so the spread is there to see.

Run: ``python -m benchmarks.bench_io [--quick] [--only W,..] [--keep]
[--fusefs-options OPTS] [--mount-cmd CMD] [--dir DIR]`` (or ``scripts/bench``).  Prints a table,
then one line ``RESULT {json}`` with every ratio, the raw numbers and ``targets_met``.
Exits 1 with a one-line message if a target cannot be mounted or a measurement fails;
unmet goals are results, not failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext, suppress
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

from benchmarks.targets import (
    CONTROL_DROP_CACHES,
    BenchError,
    Target,
    _last_line,
    daemon_pid,
    drop_fusefs_caches,
    drop_host_caches,
    fusefs_mounted,
    nullfs_mounted,
    o_direct_refusal,
    parse_stats,
    vm_rss,
)

MiB: Final = 1 << 20
MB: Final = 1_000_000  # MB/s are decimal, as fio's bw_bytes
CONTROL_CACHE_SIZE: Final = ".fusefs/cache_size"
CONTROL_STATS: Final = ".fusefs/stats"
CACHE_FULL: Final = 0.9  # cache_memory: the cache must hold this much of cache_size
LARGE_CACHE_FACTOR: Final = 4  # cache_memory's second point: 4 x cache_size
PATTERN: Final = bytes(range(256)) * (MiB // 256)  # what cache_memory writes

Unit = Literal["IOPS", "MB/s", "files/s", "MiB"]
Direction = Literal["read", "write"]

# the workloads:


@dataclasses.dataclass(frozen=True)
class Goal:
    """The ratio fusefs must reach against `against`: at least `bound`, or at most
    with `at_most`; on the best numbers, or with `every_round` on the worst round."""

    bound: float
    against: str  # a reference of the workload
    at_most: bool = False  # an upper bound: smaller is better
    every_round: bool = False

    @property
    def op(self) -> str:
        return "<=" if self.at_most else ">="

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return value <= self.bound if self.at_most else value >= self.bound

    def worst(self, ratios: Sequence[float | None]) -> float | None:
        """The worst of the rounds' ratios; None unless every round has one."""
        known = [r for r in ratios if r is not None]
        if not known or len(known) < len(ratios):
            return None
        return max(known) if self.at_most else min(known)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    unit: Unit
    targets: tuple[str, ...]  # where it runs; fusefs first
    reference: str  # the fusefs number is divided by this one's: a target, or cache_size
    goal: Goal | None  # None: reported only
    file: str | None  # the data file it uses, removed after its last user has run
    own_mount: bool = False  # on a fusefs mounted for it alone, afresh each round

    def __post_init__(self) -> None:
        if self.goal is not None and self.goal.against not in self.references:
            raise ValueError(f"{self.name}: a goal against {self.goal.against}, not a reference")

    @property
    def references(self) -> tuple[str, ...]:
        """What the fusefs number is divided by: `reference`, then the other targets."""
        others = [t for t in self.targets if t not in ("fusefs", self.reference)]
        return (self.reference, *others)

    def ratio_key(self, reference: str) -> str:
        """The RESULT key of the ratio against `reference`."""
        return self.name if reference == self.reference else f"{self.name}_vs_{reference}"

    @property
    def smaller_is_better(self) -> bool:
        return self.goal is not None and self.goal.at_most


WARM_FILE: Final = "warm.dat"
SUSTAINED_FILE: Final = "sustained.dat"
DIRECT_FILE: Final = "direct.dat"
CACHE_FILL_FILE: Final = "fill.dat"
CACHE_LARGE_FILE: Final = "fill-large.dat"
CACHE_DIRTY_FILE: Final = "dirty.dat"
CACHE_SIZE: Final = "cache_size"  # cache_memory's reference: the cache's limit, not a target

_WARM: Final = ("fusefs", "nullfs")
_SUSTAINED: Final = ("fusefs", "plain", "nullfs")
WORKLOADS: Final = (
    Workload("warm_randread_4k", "IOPS", _WARM, "nullfs", Goal(0.9, "nullfs"), WARM_FILE),
    Workload(
        "warm_seqread_1m",
        "MB/s",
        _WARM,
        "nullfs",
        Goal(0.9, "nullfs", every_round=True),
        WARM_FILE,
    ),
    Workload("randwrite_4k", "IOPS", _WARM, "nullfs", Goal(0.9, "nullfs"), WARM_FILE),
    Workload("seqwrite_1m", "MB/s", _SUSTAINED, "plain", Goal(1.0, "plain"), SUSTAINED_FILE),
    Workload("cold_seqread_1m", "MB/s", _SUSTAINED, "plain", Goal(0.6, "plain"), SUSTAINED_FILE),
    Workload("direct_write_1m", "MB/s", _SUSTAINED, "plain", None, DIRECT_FILE),
    Workload("direct_read_1m", "MB/s", _SUSTAINED, "plain", Goal(0.8, "plain"), DIRECT_FILE),
    Workload("meta_10k", "files/s", _SUSTAINED, "plain", Goal(0.9, "nullfs"), None),
    Workload(
        "cache_memory",
        "MiB",
        ("fusefs",),
        CACHE_SIZE,
        Goal(1.10, CACHE_SIZE, at_most=True),
        None,
        own_mount=True,
    ),
)
BY_NAME: Final = {w.name: w for w in WORKLOADS}
TARGET_ORDER: Final = ("fusefs", "baseline", "nullfs", "plain")
BASELINE: Final = "baseline"  # --baseline-cmd: another fusefs build, measured beside this one


@dataclasses.dataclass(frozen=True)
class Plan:
    """How big and how long.  Each number is the best of `rounds` rounds, the targets
    taking turns within a round, so that load from other processes on these shared
    machines hits them alike and the best round filters most of it out."""

    warm_bytes: int  # must fit fusefs's 64 MiB default cache
    runtime_s: int  # of each time-based workload
    sustained_bytes: int  # several times the cache
    direct_bytes: int
    meta_files: int
    rounds: int


FULL: Final = Plan(48 * MiB, 5, 512 * MiB, 512 * MiB, 10_000, rounds=3)
QUICK: Final = Plan(48 * MiB, 2, 256 * MiB, 256 * MiB, 10_000, rounds=1)


# fio's JSON:


class MeasurementError(Exception):
    """A measurement gave no usable number: reported, and the run goes on."""


class FioError(MeasurementError):
    """fio ran but did not produce a usable result."""


@dataclasses.dataclass(frozen=True)
class FioResult:
    bw_bytes: float  # bytes per second, fsync at end included (end_fsync)
    iops: float
    io_bytes: int
    runtime_ms: int

    def value(self, unit: Unit) -> float:
        if unit == "IOPS":
            return self.iops
        if unit == "MB/s":
            return self.bw_bytes / MB
        raise ValueError(f"fio measures no {unit}")


def parse_fio(text: str, direction: Direction) -> FioResult:
    """The `direction` numbers of the one job in fio's ``--output-format=json`` output.

    fio may print notes before the JSON (and, rarely, after it): they are skipped.
    """
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if start == 0 and not text.startswith("{"):
        raise FioError("no JSON in fio's output")
    try:
        data, _ = json.JSONDecoder().raw_decode(text, start)
        job = data["jobs"][0]
        error = int(job["error"])
        numbers = job[direction]
        result = FioResult(
            bw_bytes=float(numbers["bw_bytes"]),
            iops=float(numbers["iops"]),
            io_bytes=int(numbers["io_bytes"]),
            runtime_ms=int(numbers["runtime"]),
        )
    except (ValueError, LookupError, TypeError) as e:
        raise FioError(f"unexpected fio JSON: {type(e).__name__}: {e}") from None
    if error:
        name = errno.errorcode.get(error, str(error))
        raise FioError(f"fio job failed with {name} ({os.strerror(error)})")
    if result.io_bytes == 0:
        raise FioError(f"fio did no {direction}s")
    return result


# results:


@dataclasses.dataclass
class Outcome:
    """One workload's numbers: fusefs's and its references', best and per round."""

    workload: Workload
    values: dict[str, float | None] = dataclasses.field(default_factory=dict)  # the best
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra raw numbers
    errors: list[str] = dataclasses.field(default_factory=list)
    # Each round's number, by target (and by a reference that is no target, which
    # the workload's step records itself).
    rounds: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def comparisons(outcome: Outcome) -> list[tuple[str, str, float | None]]:
    """(ratio key, reference, ratio) of an outcome: fusefs against each reference."""
    w = outcome.workload
    fusefs = outcome.values.get("fusefs")
    return [(w.ratio_key(r), r, ratio(fusefs, outcome.values.get(r))) for r in w.references]


def round_ratios(outcome: Outcome, reference: str) -> list[float | None]:
    """fusefs against `reference` round by round: round i against round i.  A round
    that one of them failed or missed has none."""
    pairs = itertools.zip_longest(
        outcome.rounds.get("fusefs", []), outcome.rounds.get(reference, [])
    )
    return [ratio(ours, theirs) for ours, theirs in pairs]


def judged(outcome: Outcome) -> tuple[str, str, float | None] | None:
    """(ratio key, reference, ratio) that the workload's goal is judged on, if it has one:
    the ratio of the best numbers, or the worst round's (key ``..._worst_round``)."""
    w = outcome.workload
    if w.goal is None:
        return None
    against = w.goal.against
    if not w.goal.every_round:
        best = ratio(outcome.values.get("fusefs"), outcome.values.get(against))
        return w.ratio_key(against), against, best
    worst = w.goal.worst(round_ratios(outcome, against))
    return f"{w.ratio_key(against)}_worst_round", against, worst


def ratio_rows(outcome: Outcome) -> list[tuple[str, str, float | None]]:
    """Every ratio of an outcome, as its rows in the table and its keys in RESULT."""
    rows = comparisons(outcome)
    goal_row = judged(outcome)
    if goal_row is not None and goal_row[0] not in {key for key, _, _ in rows}:
        rows.append(goal_row)
    return rows


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def summarize(outcomes: Sequence[Outcome], **context: Any) -> dict[str, Any]:
    """The RESULT object: `context` (plan, notes, ...), then ratios, goals, raw numbers."""
    ratios: dict[str, float | None] = {}
    references: dict[str, str] = {}
    bounds: dict[str, float] = {}
    goals: dict[str, dict[str, Any]] = {}
    met: dict[str, bool] = {}
    raw: dict[str, dict[str, Any]] = {}
    for outcome in outcomes:
        w = outcome.workload
        for key, reference, value in ratio_rows(outcome):
            ratios[key] = _rounded(value, 3)
            references[key] = reference
        goal_row = judged(outcome)
        if w.goal is not None and goal_row is not None:
            bounds[w.name] = w.goal.bound
            goals[w.name] = {"ratio": goal_row[0], "op": w.goal.op, "bound": w.goal.bound}
            met[w.name] = w.goal.met(ratios[goal_row[0]])
        numbers = {t: _rounded(v, 1) for t, v in outcome.values.items()}
        raw[w.name] = {
            "unit": w.unit,
            **numbers,
            "rounds": {t: [_rounded(v, 1) for v in vs] for t, vs in outcome.rounds.items()},
            "round_ratios": {
                w.ratio_key(r): [_rounded(v, 3) for v in round_ratios(outcome, r)]
                for r in w.references
            },
            **outcome.details,
        }
    return {
        "benchmark": "io",
        **context,
        "ratios": ratios,
        "references": references,
        "targets": bounds,
        "goals": goals,
        "targets_met": met,
        "raw": raw,
    }


# the memory row:


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """One round of cache_memory: the daemon's VmRSS with its cache empty, full at
    ``cache_size``, and full again at ``large_size``.  How RSS grows with the cache is
    the slope between the two full points; what it costs whatever the cache's size
    (the interpreter, request and readahead buffers, the allocator's slack) is the
    fixed base the slope leaves over."""

    cache_size: int  # the first limit (.fusefs/cache_size as mounted)
    large_size: int  # the second, set through .fusefs/cache_size
    base_rss: int  # the cache just dropped
    full_rss: int  # full of clean pages at cache_size
    large_rss: int  # full of clean pages at large_size
    cache_bytes: int  # what the cache held at cache_size (.fusefs/stats)
    cache_pages: int
    large_bytes: int  # ... and at large_size
    large_pages: int
    dirty_rss: int  # after writing large_size / 2 more without fsync
    dirty_pages: int  # then

    @property
    def growth(self) -> int:
        """RSS growth between the two full caches."""
        return self.large_rss - self.full_rss

    @property
    def added(self) -> int:
        """cache_size added between them."""
        return self.large_size - self.cache_size

    @property
    def ratio(self) -> float:
        """The goal's figure: RSS growth per byte of cache_size."""
        return self.growth / self.added

    @property
    def fixed_base(self) -> float:
        """RSS the slope does not account for: the daemon's cost at a cache of 0."""
        return self.full_rss - self.ratio * self.cache_size

    @property
    def first_ratio(self) -> float:
        """Growth from the empty cache to the first full one, per byte of cache_size
        (a fresh daemon's first fill also pays its working buffers once)."""
        return (self.full_rss - self.base_rss) / self.cache_size

    @property
    def overhead_per_page(self) -> float | None:
        """The RSS growth beyond the cached bytes themselves, per cached 4 KiB page."""
        pages = self.large_pages - self.cache_pages
        cached = self.large_bytes - self.cache_bytes
        return (self.growth - cached) / pages if pages > 0 else None

    def details(self) -> dict[str, Any]:
        per_page = self.overhead_per_page
        return {
            **dataclasses.asdict(self),
            "ratio": round(self.ratio, 3),
            "first_ratio": round(self.first_ratio, 3),
            "fixed_base_rss": round(self.fixed_base),
            "overhead_bytes_per_page": None if per_page is None else round(per_page),
        }


def record_cache_memory(outcome: Outcome, memory: CacheMemory, target: str = "fusefs") -> float:
    """Put one round of cache_memory into `outcome`: its details (under "memory", or
    "memory_<target>" for the baseline), and for fusefs the cache_size added between
    the two full points (the reference, in MiB as the fusefs number).  Returns the
    number: the RSS growth in MiB, so that fusefs ÷ cache_size is `CacheMemory.ratio`."""
    if target == "fusefs":
        outcome.rounds.setdefault(CACHE_SIZE, []).append(memory.added / MiB)
        key = "memory"
    else:
        key = f"memory_{target}"
    outcome.details.setdefault(key, []).append(memory.details())
    return memory.growth / MiB


def cache_stats(mountpoint: Path) -> tuple[int, int, int]:
    """The page cache's (pages, bytes, dirty pages), from ``.fusefs/stats``."""
    stats = parse_stats((mountpoint / CONTROL_STATS).read_text())
    try:
        return int(stats["cache_pages"]), int(stats["cache_bytes"]), int(stats["cache_dirty"])
    except (KeyError, ValueError) as e:
        raise MeasurementError(f"{CONTROL_STATS}: no usable {e}") from None


# running:


class Bench:
    """Runs workloads on mounted targets and collects their outcomes.  A workload with
    `Workload.own_mount` gets a fusefs from `fresh_fusefs(label)` for each round."""

    def __init__(
        self,
        targets: dict[str, Target],
        plan: Plan,
        notes: list[str],
        progress: Callable[[str], None],
        fresh_fusefs: Callable[[str], AbstractContextManager[Target]],
    ) -> None:
        self.targets = targets
        self.plan = plan
        self.notes = notes
        self.progress = progress
        self.fresh_fusefs = fresh_fusefs

    def fio(
        self,
        target: Target,
        filename: str,
        rw: str,
        bs: str,
        size: int,
        *,
        timed: bool = False,
        direct: bool = False,
        end_fsync: bool = False,
    ) -> FioResult:
        argv = [
            "fio",
            f"--name={rw}_{bs}",
            f"--filename={target.path(filename)}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--size={size}",
            "--ioengine=psync",
            "--numjobs=1",
            f"--direct={int(direct)}",
            "--fallocate=none",  # preallocation would change what the plain dir measures
            "--output-format=json",
        ]
        if timed:  # loops over the file for the whole runtime
            argv += ["--time_based", f"--runtime={self.plan.runtime_s}"]
        if rw.startswith("rand"):
            argv.append("--norandommap")
        if end_fsync:
            argv.append("--end_fsync=1")
        timeout = 120 + (self.plan.runtime_s if timed else 0) + size / (2 * MB)
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise FioError(f"fio did not finish in {timeout:.0f} s") from None
        if done.returncode != 0:
            reason = _last_line(done.stderr) or _last_line(done.stdout)
            raise FioError(f"fio exit status {done.returncode}: {reason}")
        return parse_fio(done.stdout, "write" if "write" in rw else "read")

    def run(self, workloads: Sequence[Workload]) -> list[Outcome]:
        outcomes = []
        for index, workload in enumerate(workloads):
            outcomes.append(self.measure(workload))
            later = {w.file for w in workloads[index + 1 :]}
            if workload.file is not None and workload.file not in later:
                for name in workload.targets:
                    with suppress(OSError):  # a dead mount has been reported already
                        self.targets[name].path(workload.file).unlink(missing_ok=True)
        return outcomes

    def measure(self, workload: Workload) -> Outcome:
        outcome = Outcome(workload)
        step: Callable[[Target, Outcome], float | None] = getattr(self, workload.name)
        for name in workload.targets:
            outcome.rounds[name] = []
        for round_ in range(1, self.plan.rounds + 1):
            tag = f" (round {round_})" if self.plan.rounds > 1 else ""
            for name in workload.targets:
                if name in outcome.values:  # failed in an earlier round
                    continue
                try:
                    with self._target(workload, name, round_) as target:
                        value = step(target, outcome)
                except (MeasurementError, OSError) as e:
                    outcome.errors.append(f"{workload.name} on {name}{tag}: {e}")
                    outcome.values[name] = None
                    outcome.rounds[name].append(None)
                    self.progress(f"{workload.name:<17} {name:<7} FAILED{tag}: {e}")
                    continue
                outcome.rounds[name].append(value)
                shown = "n/a" if value is None else _number(value, workload.unit)
                self.progress(f"{workload.name:<17} {name:<7} {shown}{tag}")
        best = min if workload.smaller_is_better else max
        for name, values in outcome.rounds.items():
            if name not in outcome.values:
                numbers = [v for v in values if v is not None]
                outcome.values[name] = best(numbers) if numbers else None
        return outcome

    def _target(self, workload: Workload, name: str, round_: int) -> AbstractContextManager[Target]:
        if workload.own_mount:
            label = f"{workload.name}-{round_}"
            return self.fresh_fusefs(label if name == "fusefs" else f"{name}-{label}")
        return nullcontext(self.targets[name])

    # cache speed, a file that fits fusefs's cache, against nullfs:

    def warm(self, target: Target) -> None:
        """Lay the file out (first time only: fio does it) and read it once."""
        self.fio(target, WARM_FILE, "read", "1m", self.plan.warm_bytes)

    def warm_randread_4k(self, target: Target, outcome: Outcome) -> float:
        self.warm(target)
        result = self.fio(target, WARM_FILE, "randread", "4k", self.plan.warm_bytes, timed=True)
        return result.iops

    def warm_seqread_1m(self, target: Target, outcome: Outcome) -> float:
        self.warm(target)
        result = self.fio(target, WARM_FILE, "read", "1m", self.plan.warm_bytes, timed=True)
        return result.value("MB/s")

    def randwrite_4k(self, target: Target, outcome: Outcome) -> float:
        self.warm(target)  # overwrite a laid out, cached file
        result = self.fio(target, WARM_FILE, "randwrite", "4k", self.plan.warm_bytes, timed=True)
        return result.iops

    # sustained, a file several times the cache, against the plain directory and nullfs:

    def seqwrite_1m(self, target: Target, outcome: Outcome) -> float:
        target.path(SUSTAINED_FILE).unlink(missing_ok=True)
        # Every target starts from the same host memory: dirty pages written
        # out and the page cache emptied.  With the host's cache full, every
        # new page of the file (or of the image) costs reclaim first -- 265 MB/s
        # for plain pwrite() of a new file here, against 1.7 GB/s after a drop.
        dropped = drop_host_caches()
        self.notes.append(f"seqwrite_1m on {target.name}: before each round {dropped}")
        size = self.plan.sustained_bytes
        return self.fio(target, SUSTAINED_FILE, "write", "1m", size, end_fsync=True).value("MB/s")

    def cold_seqread_1m(self, target: Target, outcome: Outcome) -> float:
        size = self.plan.sustained_bytes
        path = target.path(SUSTAINED_FILE)
        if not path.exists() or path.stat().st_size != size:  # seqwrite_1m did not run
            self.fio(target, SUSTAINED_FILE, "write", "1m", size, end_fsync=True)
        fusefs = target.fusefs
        # nullfs keeps no data, only the size: the host's drop is all there is to do.
        dropped = drop_fusefs_caches(target.root) if fusefs else drop_host_caches()
        self.notes.append(f"cold_seqread_1m on {target.name}: {dropped}")
        return self.fio(target, SUSTAINED_FILE, "read", "1m", size).value("MB/s")

    # O_DIRECT, beside the plain directory and nullfs:

    def _check_o_direct(self, target: Target) -> bool:
        """False (and a note) if a reference refuses O_DIRECT: it then has no number.
        fusefs is the one measured: its refusal is fio's error.  nullfs's files are
        FUSE direct_io, which take O_DIRECT; the probe makes sure."""
        if target.fusefs:
            return True
        refusal = o_direct_refusal(target.root)
        if refusal is not None:
            self.notes.append(f"{target.name} refuses O_DIRECT: {refusal}")
        return refusal is None

    def direct_write_1m(self, target: Target, outcome: Outcome) -> float | None:
        if not self._check_o_direct(target):
            return None
        target.path(DIRECT_FILE).unlink(missing_ok=True)
        size = self.plan.direct_bytes
        return self.fio(target, DIRECT_FILE, "write", "1m", size, direct=True).value("MB/s")

    def direct_read_1m(self, target: Target, outcome: Outcome) -> float | None:
        if not self._check_o_direct(target):
            return None
        size = self.plan.direct_bytes
        path = target.path(DIRECT_FILE)
        if not path.exists() or path.stat().st_size != size:  # direct_write_1m did not run
            self.fio(target, DIRECT_FILE, "write", "1m", size, direct=True)
        if target.fusefs:
            # Else the image file's blocks come from the host's page cache, which the
            # plain directory's O_DIRECT reads never see.
            self.notes.append(f"direct_read_1m on fusefs: first {drop_host_caches()}")
        return self.fio(target, DIRECT_FILE, "read", "1m", size, direct=True).value("MB/s")

    # metadata:

    def meta_10k(self, target: Target, outcome: Outcome) -> float:
        """Create, then stat, then unlink `meta_files` empty files in a new directory."""
        n = self.plan.meta_files
        seconds = create_stat_unlink(target.path("meta"), n)
        phases = {phase: n / s for phase, s in seconds.items()}
        per_target = outcome.details.setdefault("phases_per_s", {})
        per_target.setdefault(target.name, []).append({k: round(v) for k, v in phases.items()})
        outcome.details["files"] = n
        return n / sum(seconds.values())

    # memory, on a fusefs of its own:

    def cache_memory(self, target: Target, outcome: Outcome) -> float:
        """The daemon's RSS with the cache dropped, full at its cache_size, full at
        four times that, then with dirty pages too (see the module's docstring)."""
        root = target.root
        pid = daemon_pid(root)
        cache_size = int((root / CONTROL_CACHE_SIZE).read_text())
        large_size = LARGE_CACHE_FACTOR * cache_size
        (root / CONTROL_DROP_CACHES).write_text("1\n")
        base_rss = vm_rss(pid)
        pages, cached = self._fill_cache(root, target.path(CACHE_FILL_FILE), cache_size)
        full_rss = vm_rss(pid)
        (root / CONTROL_CACHE_SIZE).write_text(f"{large_size}\n")
        large_pages, large_cached = self._fill_cache(
            root, target.path(CACHE_LARGE_FILE), large_size
        )
        large_rss = vm_rss(pid)
        write_file(target.path(CACHE_DIRTY_FILE), large_size // 2, fsync=False)
        _, _, dirty = cache_stats(root)
        self.notes.append(
            "cache_memory: a fusefs mounted afresh each round; base RSS after "
            f"echo 1 > {CONTROL_DROP_CACHES}; full RSS after writing 2 x cache_size "
            f"(fsync) and reading it back once, at cache_size and at {LARGE_CACHE_FACTOR} x "
            "cache_size; the ratio is the RSS growth between the two over the cache_size added"
        )
        memory = CacheMemory(
            cache_size,
            large_size,
            base_rss,
            full_rss,
            large_rss,
            cached,
            pages,
            large_cached,
            large_pages,
            vm_rss(pid),
            dirty,
        )
        return record_cache_memory(outcome, memory, target.name)

    def _fill_cache(self, root: Path, path: Path, cache_size: int) -> tuple[int, int]:
        """Fill the cache with clean pages: write twice ``cache_size`` to ``path``
        (fsync), read it back once.  Returns the cache's (pages, bytes) then."""
        write_file(path, 2 * cache_size, fsync=True)
        read_through(path)  # the cache's pages are now the file's last cache_size, clean
        pages, cached, _ = cache_stats(root)
        if cached < CACHE_FULL * cache_size:
            raise MeasurementError(
                f"the cache holds {cached} bytes after reading {2 * cache_size}, "
                f"not about its cache_size of {cache_size}"
            )
        return pages, cached


def write_file(path: Path, size: int, *, fsync: bool) -> None:
    """`size` bytes (not zeros) in 1 MiB writes."""
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            f.write(PATTERN[: min(MiB, size - offset)])
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_through(path: Path) -> None:
    """Read the whole file once, in 1 MiB reads."""
    buffer = bytearray(MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def create_stat_unlink(directory: Path, files: int) -> dict[str, float]:
    """Seconds to create, then stat, then unlink `files` empty files in a new
    `directory` (removed after)."""
    directory.mkdir()
    paths = [str(directory / f"f{i}") for i in range(files)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    t0 = time.perf_counter()
    for path in paths:
        os.close(os.open(path, flags, 0o644))
    t1 = time.perf_counter()
    for path in paths:
        os.stat(path)
    t2 = time.perf_counter()
    for path in paths:
        os.unlink(path)
    t3 = time.perf_counter()
    directory.rmdir()
    return {"create": t1 - t0, "stat": t2 - t1, "unlink": t3 - t2}


# output:


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("MB/s", "MiB"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def print_report(
    outcomes: Sequence[Outcome], result: dict[str, Any], title: str, notes: Sequence[str]
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 112)
    table = Table(title=title)
    for column in ("workload", "fusefs", "reference", "ratio", "target", "met?"):
        table.add_column(column, justify="left" if column == "workload" else "right")
    for outcome in outcomes:
        w = outcome.workload
        fusefs = _number(outcome.values.get("fusefs"), w.unit)
        goal_key = result["goals"].get(w.name, {}).get("ratio")
        for key, reference, value in ratio_rows(outcome):
            if key.endswith("_worst_round"):
                reference_text = f"{reference}, round by round"
            else:
                reference_text = f"{reference} {_number(outcome.values.get(reference), w.unit)}"
            if w.goal is None or key != goal_key:
                target_text, met = "—", "—"
            else:
                target_text = f"{'≤' if w.goal.at_most else '≥'} {w.goal.bound:.2f}"
                met = "yes" if result["targets_met"][w.name] else "NO"
            ratio_text = "—" if value is None else f"{value:.2f}"
            table.add_row(key, fusefs, reference_text, ratio_text, target_text, met)
            fusefs = ""  # once per workload
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True)


# the command:


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like ^C: every mount is undone


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _only(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload {', '.join(unknown) or '(none)'}; choose from {', '.join(BY_NAME)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_io",
        description="fusefs IO benchmark against a null pyfuse3 filesystem and a plain dir.",
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller files")
    parser.add_argument("--only", type=_only, metavar="W[,W..]", help="run only these workloads")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--fusefs-options", default="", metavar="OPTS", help="passed to fusefs mount as -o OPTS"
    )
    parser.add_argument(
        "--mount-cmd",
        default=None,
        metavar="CMD",
        help="the fusefs command line to use, e.g. 'fusefs' or '/other/python -m fusefs.cli'"
        " (mkfs, mount and umount are appended); default: this python -m fusefs.cli",
    )
    parser.add_argument(
        "--baseline-cmd",
        default=None,
        metavar="CMD",
        help="another fusefs build's command line (as --mount-cmd), measured beside this one in"
        " every round of every workload: ratios <workload>_vs_baseline",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to make the temporary directory ($TMPDIR)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench_io: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_io: interrupted", file=sys.stderr)
        return 130


def describe(plan: Plan, fio_version: str) -> list[str]:
    rounds = f"best of {plan.rounds} rounds" if plan.rounds > 1 else "one round"
    return [
        f"{fio_version}, ioengine=psync, numjobs=1; fusefs and nullfs files are FUSE direct_io",
        f"warm file {plan.warm_bytes // MiB} MiB, time-based runs {plan.runtime_s} s, "
        f"sustained file {plan.sustained_bytes // MiB} MiB, O_DIRECT file "
        f"{plan.direct_bytes // MiB} MiB, {plan.meta_files} files for meta; {rounds}",
    ]


def with_baseline(workload: Workload) -> Workload:
    """`workload` also run on the baseline build, right after fusefs in each round."""
    targets = (workload.targets[0], BASELINE, *workload.targets[1:])
    return dataclasses.replace(workload, targets=targets)


def run(args: argparse.Namespace) -> int:
    selected = [BY_NAME[n] for n in args.only] if args.only else list(WORKLOADS)
    selected.sort(key=WORKLOADS.index)
    baseline_cli = shlex.split(args.baseline_cmd) if args.baseline_cmd else None
    if baseline_cli is not None:
        selected = [with_baseline(w) for w in selected]
    shared = [w for w in selected if not w.own_mount]
    needed = [t for t in TARGET_ORDER if any(t in w.targets for w in shared)]
    plan = QUICK if args.quick else FULL
    cli = shlex.split(args.mount_cmd) if args.mount_cmd else [sys.executable, "-m", "fusefs.cli"]
    if shutil.which("fio") is None:
        raise BenchError("fio not found (scripts/setup installs it)")
    fio_version = subprocess.run(
        ["fio", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()

    notes: list[str] = []
    errors: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="fusefs-bench-", dir=args.dir)).resolve()
    with ExitStack() as stack:
        if args.keep:
            notes.append(f"kept {work} (images, logs, mount points)")
        else:
            stack.callback(shutil.rmtree, work, ignore_errors=True)  # last: after the unmounts
        targets: dict[str, Target] = {}
        for name in needed:
            _progress(f"setting up {name}")
            if name == "fusefs":
                mounted = fusefs_mounted(cli, work, args.fusefs_options, errors)
                targets[name] = stack.enter_context(mounted)
            elif name == BASELINE:
                assert baseline_cli is not None
                mounted = fusefs_mounted(
                    baseline_cli, work, args.fusefs_options, errors, name=name, target=name
                )
                targets[name] = stack.enter_context(mounted)
            elif name == "nullfs":
                targets[name] = stack.enter_context(nullfs_mounted(work))
            else:
                (work / "plain").mkdir()
                targets[name] = Target("plain", work / "plain")

        def fresh_fusefs(label: str) -> AbstractContextManager[Target]:
            if label.startswith(f"{BASELINE}-") and baseline_cli is not None:
                return fusefs_mounted(
                    baseline_cli, work, args.fusefs_options, errors, name=label, target=BASELINE
                )
            return fusefs_mounted(cli, work, args.fusefs_options, errors, name=f"fusefs-{label}")

        outcomes = Bench(targets, plan, notes, _progress, fresh_fusefs).run(selected)
    errors[:0] = [e for outcome in outcomes for e in outcome.errors]

    notes[:0] = describe(plan, fio_version)
    notes[:] = dict.fromkeys(notes)  # each round adds the same notes again
    notes += [f"ERROR: {e}" for e in errors]
    result = summarize(
        outcomes,
        quick=args.quick,
        fio=fio_version,
        fusefs_options=args.fusefs_options,
        baseline_cmd=args.baseline_cmd,
        plan=dataclasses.asdict(plan),
        notes=notes,
        errors=errors,
    )
    title = f"fusefs IO benchmark{' (quick)' if args.quick else ''}"
    print_report(outcomes, result, title, notes)
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        print(f"bench_io: {errors[0]}{more}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
