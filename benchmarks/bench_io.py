"""IO benchmark: fusefs against the null filesystem and a plain directory, in one run.

Three targets are set up side by side in a fresh temporary directory:

- ``fusefs``: a new 2 GiB image, made and mounted through the real command line
  (``fusefs mkfs``, ``fusefs mount``; ``fusefs umount`` at the end, whatever happens);
- ``nullfs``: `benchmarks.nullfs`, the floor any pyfuse3 filesystem can reach here;
- ``plain``: a directory of the local filesystem that holds the temporary directory.

fio (``ioengine=psync``, one job, parameters on the command line) runs each workload
on the targets it is compared across; a short Python loop measures metadata.  On
fusefs and nullfs every file is FUSE ``direct_io`` (DESIGN §2), so "buffered" there
means "through the filesystem's own cache, if it has one".

| workload | what | against | goal |
| --- | --- | --- | --- |
| warm_randread_4k | 4 KiB random reads, warm 48 MiB file (fits the cache) | nullfs | >= 0.7 |
| warm_seqread_1m | 1 MiB sequential reads of the warm file, looping | nullfs | >= 0.5 |
| randwrite_4k | 4 KiB random writes over the 48 MiB file | nullfs | >= 0.5 |
| seqwrite_1m | 1 MiB writes, new file several times the cache, fsync at end | plain | >= 0.5 |
| cold_seqread_1m | 1 MiB reads of that file after dropping the caches | plain | >= 0.3 |
| direct_write_1m | O_DIRECT 1 MiB sequential writes | plain | reported |
| direct_read_1m | O_DIRECT 1 MiB sequential reads | plain | reported |
| meta_10k | create + stat + unlink of 10,000 empty files (files/s) | plain, nullfs | reported |

"Dropping the caches" is, for fusefs, writing ``1`` to ``.fusefs/drop_caches`` (when
the file exists) and then dropping the host's page cache too -- the image is a file
on the local disk, and a read it serves from the host's page cache is not cold; for
the plain directory, ``sync; echo 3 > /proc/sys/vm/drop_caches``.  The host's page
cache is dropped before fusefs's O_DIRECT reads as well, for the same reason, and
before every round of ``seqwrite_1m`` on every target: with the host's cache full,
each new page of the file (or of the image) costs reclaim first, and how full it is
depends on what ran before.  What was
done is printed with the results.

Each number is the best of a few rounds (one with ``--quick``), the targets taking
turns, since these machines are shared: see `Plan`.

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
import json
import mmap
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

ROOT: Final = Path(__file__).resolve().parent.parent
MiB: Final = 1 << 20
MB: Final = 1_000_000  # MB/s are decimal, as fio's bw_bytes
IMAGE_SIZE: Final = "2G"
MOUNT_TIMEOUT: Final = 150.0  # fusefs mount waits up to 120 s for its daemon
UMOUNT_TIMEOUT: Final = 120.0
NULLFS_READY_TIMEOUT: Final = 30.0
CONTROL_DROP_CACHES: Final = ".fusefs/drop_caches"
HOST_DROP_CACHES: Final = "/proc/sys/vm/drop_caches"

Unit = Literal["IOPS", "MB/s", "files/s"]
Direction = Literal["read", "write"]

# the workloads:


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    unit: Unit
    targets: tuple[str, ...]  # where it runs; fusefs first
    reference: str  # the fusefs number is divided by this target's
    goal: float | None  # the ratio to reach; None: reported only
    file: str | None  # the data file it uses, removed after its last user has run


WARM_FILE: Final = "warm.dat"
SUSTAINED_FILE: Final = "sustained.dat"
DIRECT_FILE: Final = "direct.dat"

WORKLOADS: Final = (
    Workload("warm_randread_4k", "IOPS", ("fusefs", "nullfs"), "nullfs", 0.7, WARM_FILE),
    Workload("warm_seqread_1m", "MB/s", ("fusefs", "nullfs"), "nullfs", 0.5, WARM_FILE),
    Workload("randwrite_4k", "IOPS", ("fusefs", "nullfs"), "nullfs", 0.5, WARM_FILE),
    Workload("seqwrite_1m", "MB/s", ("fusefs", "plain"), "plain", 0.5, SUSTAINED_FILE),
    Workload("cold_seqread_1m", "MB/s", ("fusefs", "plain"), "plain", 0.3, SUSTAINED_FILE),
    Workload("direct_write_1m", "MB/s", ("fusefs", "plain"), "plain", None, DIRECT_FILE),
    Workload("direct_read_1m", "MB/s", ("fusefs", "plain"), "plain", None, DIRECT_FILE),
    Workload("meta_10k", "files/s", ("fusefs", "plain", "nullfs"), "plain", None, None),
)
BY_NAME: Final = {w.name: w for w in WORKLOADS}
TARGET_ORDER: Final = ("fusefs", "nullfs", "plain")


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


class FioError(Exception):
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
    """One workload's numbers: fusefs's and its references'."""

    workload: Workload
    values: dict[str, float | None] = dataclasses.field(default_factory=dict)  # by target
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra raw numbers
    errors: list[str] = dataclasses.field(default_factory=list)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def comparisons(outcome: Outcome) -> list[tuple[str, str, float | None]]:
    """(ratio key, reference target, ratio) of an outcome: fusefs against each reference."""
    w = outcome.workload
    fusefs = outcome.values.get("fusefs")
    out = [(w.name, w.reference, ratio(fusefs, outcome.values.get(w.reference)))]
    for other in w.targets:
        if other not in ("fusefs", w.reference):
            out.append((f"{w.name}_vs_{other}", other, ratio(fusefs, outcome.values.get(other))))
    return out


def summarize(outcomes: Sequence[Outcome], **context: Any) -> dict[str, Any]:
    """The RESULT object: `context` (plan, notes, ...), then ratios, goals, raw numbers."""
    ratios: dict[str, float | None] = {}
    references: dict[str, str] = {}
    goals: dict[str, float] = {}
    met: dict[str, bool] = {}
    raw: dict[str, dict[str, Any]] = {}
    for outcome in outcomes:
        w = outcome.workload
        for key, reference, value in comparisons(outcome):
            ratios[key] = None if value is None else round(value, 3)
            references[key] = reference
        if w.goal is not None:
            goals[w.name] = w.goal
            value = ratios[w.name]
            met[w.name] = value is not None and value >= w.goal
        numbers = {t: None if v is None else round(v, 1) for t, v in outcome.values.items()}
        raw[w.name] = {"unit": w.unit, **numbers, **outcome.details}
    return {
        "benchmark": "io",
        **context,
        "ratios": ratios,
        "references": references,
        "targets": goals,
        "targets_met": met,
        "raw": raw,
    }


# targets:


class BenchError(Exception):
    """A failure that ends the run: one line for the user."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    root: Path  # the benchmark's files go here

    def path(self, name: str) -> Path:
        return self.root / name


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _log_tail(path: Path) -> str:
    try:
        return _last_line(path.read_text(errors="replace")) or f"(nothing in {path})"
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"


def _run_command(argv: Sequence[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no answer after {timeout:.0f} s") from None
    except OSError as e:
        raise BenchError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    if done.returncode != 0:
        reason = _last_line(done.stderr) or _last_line(done.stdout)
        if not reason.startswith(what):  # the fusefs CLI names itself already
            reason = f"{what}: {reason or f'exit status {done.returncode}'}"
        raise BenchError(reason)


def _lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


@contextmanager
def fusefs_mounted(
    cli: Sequence[str],
    work: Path,
    options: str,
    errors: list[str],
    *,
    prepare: Callable[[Path], None] | None = None,
) -> Iterator[Target]:
    """A fresh fusefs image mounted through the CLI; unmounted (and its daemon gone) after.
    ``prepare(image)`` runs between mkfs and mount (to fill the image in-process)."""
    image = work / "fusefs.img"
    mountpoint = work / "mnt-fusefs"
    mountpoint.mkdir()
    _run_command([*cli, "mkfs", str(image), "--size", IMAGE_SIZE], "fusefs mkfs", 120)
    if prepare is not None:
        prepare(image)
    mount = [*cli, "mount", str(image), str(mountpoint)]
    if options:
        mount += ["-o", options]
    try:
        _run_command(mount, "fusefs mount", MOUNT_TIMEOUT)
        if not os.path.ismount(mountpoint):
            raise BenchError(f"fusefs mount returned, but {mountpoint} is not a mount point")
        yield Target("fusefs", mountpoint)
    finally:
        fusefs_umount(cli, image, mountpoint, errors)


def fusefs_umount(cli: Sequence[str], image: Path, mountpoint: Path, errors: list[str]) -> None:
    """``fusefs umount`` if `mountpoint` is mounted, lazily if that fails (the error
    goes to `errors`)."""
    if os.path.ismount(mountpoint):
        try:
            _run_command([*cli, "umount", str(mountpoint)], "fusefs umount", UMOUNT_TIMEOUT)
        except BenchError as e:
            errors.append(f"{e} (daemon log: {image}.log)")
        if os.path.ismount(mountpoint):
            _lazy_unmount(mountpoint)


def _read_line(fd: int, deadline: float) -> str | None:
    """The first line on `fd`; "" at EOF without one; None at the deadline."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace")


@contextmanager
def nullfs_mounted(work: Path) -> Iterator[Target]:
    """`benchmarks.nullfs` in a subprocess, ready and mounted; stopped with SIGTERM after."""
    mountpoint = work / "mnt-nullfs"
    mountpoint.mkdir()
    log = work / "nullfs.log"
    argv = [sys.executable, "-m", "benchmarks.nullfs", str(mountpoint)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file
        )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + NULLFS_READY_TIMEOUT
        line = _read_line(proc.stdout.fileno(), deadline)
        if line != "ready":
            if line is None:
                raise BenchError(f"nullfs not ready after {NULLFS_READY_TIMEOUT:.0f} s")
            status = proc.wait(timeout=10)
            raise BenchError(f"nullfs exited ({status}) before it was ready: {_log_tail(log)}")
        while not os.path.ismount(mountpoint):  # "ready" follows the mount; belt and braces
            if proc.poll() is not None:
                raise BenchError(f"nullfs exited ({proc.returncode}): {_log_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"nullfs said ready, but {mountpoint} is not a mount point")
            time.sleep(0.01)
        yield Target("nullfs", mountpoint)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _lazy_unmount(mountpoint)
                proc.kill()
                proc.wait()
        if os.path.ismount(mountpoint):
            _lazy_unmount(mountpoint)
        proc.stdout.close()


# dropping caches:


def drop_host_caches() -> str:
    os.sync()
    try:
        with open(HOST_DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"sync done, but cannot drop the host page cache ({e.strerror}): NOT cold"
    return "sync; echo 3 > /proc/sys/vm/drop_caches"


def drop_fusefs_caches(mountpoint: Path) -> str:
    path = mountpoint / CONTROL_DROP_CACHES
    if not path.exists():
        fusefs = f"no {CONTROL_DROP_CACHES} (skipped)"
    else:
        try:
            with open(path, "w") as f:
                f.write("1\n")
            fusefs = f"echo 1 > {CONTROL_DROP_CACHES}"
        except OSError as e:
            fusefs = f"writing 1 to {CONTROL_DROP_CACHES} failed ({e.strerror})"
    return f"{fusefs}; then for the image file: {drop_host_caches()}"


def o_direct_refusal(directory: Path) -> str | None:
    """Why `directory`'s filesystem refuses O_DIRECT, or None if it takes it."""
    probe = directory / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    except OSError as e:
        return f"open(O_DIRECT): {e.strerror}"
    try:
        with mmap.mmap(-1, 4096) as aligned:  # page-aligned, as O_DIRECT wants
            os.write(fd, aligned)
    except OSError as e:
        return f"an aligned O_DIRECT write: {e.strerror}"
    finally:
        os.close(fd)
        probe.unlink()
    return None


# running:


class Bench:
    """Runs workloads on mounted targets and collects their outcomes."""

    def __init__(
        self,
        targets: dict[str, Target],
        plan: Plan,
        notes: list[str],
        progress: Callable[[str], None],
    ) -> None:
        self.targets = targets
        self.plan = plan
        self.notes = notes
        self.progress = progress

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
        runs: dict[str, list[float | None]] = {name: [] for name in workload.targets}
        for round_ in range(1, self.plan.rounds + 1):
            tag = f" (round {round_})" if self.plan.rounds > 1 else ""
            for name in workload.targets:
                if name in outcome.values:  # failed in an earlier round
                    continue
                try:
                    value = step(self.targets[name], outcome)
                except (FioError, OSError) as e:
                    outcome.errors.append(f"{workload.name} on {name}{tag}: {e}")
                    outcome.values[name] = None
                    self.progress(f"{workload.name:<17} {name:<7} FAILED{tag}: {e}")
                    continue
                runs[name].append(value)
                shown = "n/a" if value is None else _number(value, workload.unit)
                self.progress(f"{workload.name:<17} {name:<7} {shown}{tag}")
        for name, values in runs.items():
            if name not in outcome.values:
                numbers = [v for v in values if v is not None]
                outcome.values[name] = max(numbers) if numbers else None
        if self.plan.rounds > 1:
            outcome.details["rounds"] = {
                name: [None if v is None else round(v, 1) for v in values]
                for name, values in runs.items()
            }
        return outcome

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

    # sustained, a file several times the cache, against the plain directory:

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
        fusefs = target.name == "fusefs"
        dropped = drop_fusefs_caches(target.root) if fusefs else drop_host_caches()
        self.notes.append(f"cold_seqread_1m on {target.name}: {dropped}")
        return self.fio(target, SUSTAINED_FILE, "read", "1m", size).value("MB/s")

    # O_DIRECT, reported beside the plain directory:

    def _check_o_direct(self, target: Target) -> bool:
        if target.name != "plain":
            return True
        refusal = o_direct_refusal(target.root)
        if refusal is not None:
            self.notes.append(f"the plain directory's filesystem refuses O_DIRECT: {refusal}")
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
        if target.name == "fusefs":
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
    if unit == "MB/s":
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
        for key, reference, value in comparisons(outcome):
            reference_text = f"{reference} {_number(outcome.values.get(reference), w.unit)}"
            goal = w.goal if key == w.name else None
            if goal is None:
                target_text, met = "—", "—"
            else:
                target_text = f"≥ {goal:.2f}"
                met = "yes" if result["targets_met"][key] else "NO"
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


def run(args: argparse.Namespace) -> int:
    selected = [BY_NAME[n] for n in args.only] if args.only else list(WORKLOADS)
    selected.sort(key=WORKLOADS.index)
    needed = [t for t in TARGET_ORDER if any(t in w.targets for w in selected)]
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
            elif name == "nullfs":
                targets[name] = stack.enter_context(nullfs_mounted(work))
            else:
                (work / "plain").mkdir()
                targets[name] = Target("plain", work / "plain")
        outcomes = Bench(targets, plan, notes, _progress).run(selected)
    errors[:0] = [e for outcome in outcomes for e in outcome.errors]

    notes[:0] = describe(plan, fio_version)
    notes[:] = dict.fromkeys(notes)  # each round adds the same notes again
    notes += [f"ERROR: {e}" for e in errors]
    result = summarize(
        outcomes,
        quick=args.quick,
        fio=fio_version,
        fusefs_options=args.fusefs_options,
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
