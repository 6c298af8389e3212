"""Metadata benchmark (issue 13): fusefs at 100,000 files and more, beside a plain
directory and the null pyfuse3 filesystem, in one run.

Targets, mounted with `benchmarks.targets`' `fusefs_mounted` and `nullfs_mounted`:

- ``fusefs``: a new 2 GiB image through the real command line, mounted with
  ``-o cache_size=1M`` (``--fusefs-options``) so that the daemon's memory is
  metadata, not cached pages; a second one stays empty, for the fsync figure;
- ``nullfs``: `benchmarks.nullfs`, for the operations it has;
- ``plain``: a directory of the local filesystem that holds the temporary
  directory; a second one stays empty, for the fsync figure.

What is measured, and the targets of issue 13:

- fsync latency: 4 KiB ``pwrite`` + ``fsync`` of one file, median and p90 of the
  samples, with ``--files`` small files present ÷ on an empty fusefs mounted beside
  it, the two measured in turns (target: median ≤ 2);
- listdir: ``os.listdir`` of a 20,000-entry directory ÷ of a 10,000-entry one, best
  of 5 each, the two in turns (target ≤ 2.5: linear);
- RSS per file: the daemon's VmRSS after populating minus before, ÷ files, each
  read after ``.fusefs/drop_caches`` on top of the small cache (target ≤ 1 KiB);
- create, stat, unlink: files/s over a new directory of empty files, on the empty
  and on the populated filesystem, ÷ plain and ÷ nullfs;
- mixed: 4 processes, each looping create / 4 KiB write / fsync / read / rename /
  unlink in its own directory, loops/s ÷ plain;
- mount and fsck: 1 TiB sparse images built in-process (the `Filesystem` core API)
  with ``--files`` and ``--big`` empty files in directories of 1,000; ``fusefs
  mount`` until the daemon says it is ready, the daemon's RSS then, ``fusefs
  umount``, ``fusefs fsck`` (time, exit code, peak RSS).

The small files (``--files``, 100 bytes each, directories of 1,000) are written
through the mount by several processes, and into the plain directory the same way.
nullfs has no rename (ENOSYS) and its fsync does nothing: it is left out of the
fsync and mixed figures.  Mount and fsck have no plain-directory counterpart.

Run: ``python -m benchmarks.bench_meta [--quick] [--files N] [--big N] [--no-scale]
[--keep] [--fusefs-options OPTS] [--dir DIR]``.  Prints a table, then one line ``RESULT
{json}`` with every number, the ratios and ``targets_met``.  Exits 1 if a
measurement failed; unmet targets are results, not failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

from benchmarks.bench_io import _on_sigterm, create_stat_unlink, ratio
from benchmarks.targets import (
    CONTROL_DROP_CACHES,
    ROOT,
    BenchError,
    KiB,
    Target,
    _read_line,
    daemon_pid,
    fusefs_mounted,
    fusefs_umount,
    nullfs_mounted,
    vm_rss,
)

BIG_IMAGE_SIZE: Final = 1 << 40
FILES_PER_DIR: Final = 1000
SMALL_FILE: Final = b"m" * 100
FSYNC_BLOCK: Final = b"f" * 4096
FSYNC_WARMUP: Final = 3  # not counted, each round: the first commit after populating is larger
FSYNC_ROUNDS: Final = 5
LISTDIR_ROUNDS: Final = 5
BUILD_TIMEOUT: Final = 3600.0
FSCK_TIMEOUT: Final = 3600.0
MOUNT_TIMEOUT: Final = 3600.0  # `fusefs mount` itself waits 120 s: see `daemon_mounted`
DEFAULT_FUSEFS_OPTIONS: Final = "cache_size=1M"
TARGET_NAMES: Final = ("fusefs", "nullfs", "plain")

# Targets: (result key, bound); the figure must be at most the bound.
TARGETS: Final = {
    "fsync_p50_populated_vs_empty": 2.0,
    "listdir_large_vs_small": 2.5,
    "rss_bytes_per_file": 1024.0,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    files: int  # small files populated through the mount
    big: int  # files in the large in-process image
    fsync_samples: int
    listdir_small: int
    listdir_large: int
    rate_files: int  # create/stat/unlink
    mixed_loops: int  # per process
    mixed_procs: int = 4
    populate_procs: int = 4


FULL: Final = Plan(100_000, 1_000_000, 50, 10_000, 20_000, 10_000, 250)
QUICK: Final = Plan(5_000, 20_000, 20, 2_000, 4_000, 1_000, 25)


# the arithmetic (pure; tests/unit/test_bench_meta.py):


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `samples`, linear between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latency(samples_s: Sequence[float]) -> dict[str, float]:
    """Median, p90 and max in milliseconds, and the sample count."""
    return {
        "median_ms": round(statistics.median(samples_s) * 1000, 3),
        "p90_ms": round(percentile(samples_s, 90) * 1000, 3),
        "max_ms": round(max(samples_s) * 1000, 3),
        "n": len(samples_s),
    }


def replayed_entries(log_text: str) -> int:
    """Journal entries that the last mount logged in a daemon log replayed (0: none)."""
    last_mount = log_text[log_text.rfind("starting: ") + 1 :]
    found = re.findall(r"mount: replayed (\d+) journal entr", last_mount)
    return int(found[-1]) if found else 0


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _r(value: float | None, reference: float | None) -> float | None:
    out = ratio(value, reference)
    return None if out is None else round(out, 3)


def ratios(raw: dict[str, Any]) -> dict[str, float | None]:
    """Every ratio the RESULT line carries, from the raw numbers (missing: None)."""
    out: dict[str, float | None] = {}
    for target in ("fusefs", "plain"):
        for stat in ("median_ms", "p90_ms"):
            key = f"fsync_{stat[:-3].replace('median', 'p50')}_populated_vs_empty"
            key = key if target == "fusefs" else f"plain_{key}"
            out[key] = _r(
                _get(raw, "fsync", target, "populated", stat),
                _get(raw, "fsync", target, "empty", stat),
            )
    for state in ("empty", "populated"):
        out[f"fsync_p50_{state}_vs_plain"] = _r(
            _get(raw, "fsync", "fusefs", state, "median_ms"),
            _get(raw, "fsync", "plain", state, "median_ms"),
        )
    for target in ("fusefs", "nullfs", "plain"):
        key = "listdir_large_vs_small" if target == "fusefs" else f"{target}_listdir_large_vs_small"
        out[key] = _r(
            _get(raw, "listdir", target, "large_s"), _get(raw, "listdir", target, "small_s")
        )
    out["listdir_large_vs_plain"] = _r(
        _get(raw, "listdir", "fusefs", "large_s"), _get(raw, "listdir", "plain", "large_s")
    )
    out["rss_bytes_per_file"] = _get(raw, "rss", "per_file_bytes")
    for op in ("create", "stat", "unlink"):
        for state in ("empty", "populated"):
            fusefs = _get(raw, "rates", f"fusefs_{state}", op)
            out[f"{op}_{state}_vs_plain"] = _r(fusefs, _get(raw, "rates", f"plain_{state}", op))
            out[f"{op}_{state}_vs_nullfs"] = _r(fusefs, _get(raw, "rates", "nullfs_empty", op))
    out["mixed_vs_plain"] = _r(
        _get(raw, "mixed", "fusefs", "loops_per_s"), _get(raw, "mixed", "plain", "loops_per_s")
    )
    return out


def summarize(raw: dict[str, Any], **context: Any) -> dict[str, Any]:
    """The RESULT object: `context`, the ratios, the targets and whether each is met."""
    out = ratios(raw)
    met = {}
    for key, bound in TARGETS.items():
        value = out.get(key)
        met[key] = value is not None and value <= bound
    return {
        "benchmark": "meta",
        **context,
        "ratios": out,
        "targets": {key: f"<= {bound:g}" for key, bound in TARGETS.items()},
        "targets_met": met,
        "raw": raw,
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value < 100:
        text = f"{value:.3g}" if value < 10 else f"{value:.1f}"
    else:
        text = f"{value:,.0f}"
    return f"{text} {unit}".strip()


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, fusefs, nullfs, plain, ratio/target) rows of the report."""
    raw, out, met = result["raw"], result["ratios"], result["targets_met"]

    def target(key: str) -> str:
        value = _fmt(out.get(key))
        if key in TARGETS:
            return f"{value} (≤ {TARGETS[key]:g}: {'met' if met[key] else 'MISSED'})"
        return value

    rows: list[tuple[str, str, str, str, str]] = []
    files = _get(raw, "plan", "files")
    for state, label in (("empty", "empty"), ("populated", f"{files:,} files")):
        for stat, name in (("median_ms", "p50"), ("p90_ms", "p90")):
            rows.append(
                (
                    f"fsync 4 KiB {name}, {label}",
                    _fmt(_get(raw, "fsync", "fusefs", state, stat), "ms"),
                    "n/a",
                    _fmt(_get(raw, "fsync", "plain", state, stat), "ms"),
                    "",
                )
            )
    rows.append(("fsync p50 populated ÷ empty", "", "", "", target("fsync_p50_populated_vs_empty")))
    rows.append(("fsync p90 populated ÷ empty", "", "", "", target("fsync_p90_populated_vs_empty")))
    small, large = _get(raw, "plan", "listdir_small"), _get(raw, "plan", "listdir_large")
    for key, n in (("small_s", small), ("large_s", large)):
        fusefs, nullfs, plain = (_fmt(_get(raw, "listdir", t, key), "s") for t in TARGET_NAMES)
        rows.append((f"listdir {n:,} entries", fusefs, nullfs, plain, ""))
    rows.append(
        (
            f"listdir {large:,} ÷ {small:,}",
            _fmt(out.get("listdir_large_vs_small")),
            _fmt(out.get("nullfs_listdir_large_vs_small")),
            _fmt(out.get("plain_listdir_large_vs_small")),
            target("listdir_large_vs_small"),
        )
    )
    rss = raw.get("rss") or {}
    rows.append(
        (
            f"daemon RSS before → after {files:,} files",
            f"{_fmt(_mib(rss.get('before_bytes')), 'MiB')} → "
            f"{_fmt(_mib(rss.get('after_bytes')), 'MiB')}",
            "",
            "",
            "",
        )
    )
    rows.append(("daemon RSS per file (bytes)", "", "", "", target("rss_bytes_per_file")))
    for state in ("empty", "populated"):
        for op in ("create", "stat", "unlink"):
            rows.append(
                (
                    f"{op}/s, {state}",
                    _fmt(_get(raw, "rates", f"fusefs_{state}", op)),
                    _fmt(_get(raw, "rates", "nullfs_empty", op)) if state == "empty" else "",
                    _fmt(_get(raw, "rates", f"plain_{state}", op)),
                    f"÷plain {_fmt(out.get(f'{op}_{state}_vs_plain'))}, "
                    f"÷nullfs {_fmt(out.get(f'{op}_{state}_vs_nullfs'))}",
                )
            )
    rows.append(
        (
            "mixed loops/s (4 procs)",
            _fmt(_get(raw, "mixed", "fusefs", "loops_per_s")),
            "n/a",
            _fmt(_get(raw, "mixed", "plain", "loops_per_s")),
            f"÷plain {_fmt(out.get('mixed_vs_plain'))}",
        )
    )
    for n, scale in sorted((raw.get("scale") or {}).items(), key=lambda kv: int(kv[0])):
        label = f"{int(n):,} files"
        rows.append((f"build in-process, {label}", _fmt(scale.get("build_s"), "s"), "", "", ""))
        rows.append((f"mount, {label}", _fmt(scale.get("mount_s"), "s"), "", "", ""))
        rows.append(
            (
                f"daemon RSS after mount, {label}",
                _fmt(_mib(scale.get("rss_bytes")), "MiB"),
                "",
                "",
                "",
            )
        )
        rows.append((f"umount, {label}", _fmt(scale.get("umount_s"), "s"), "", "", ""))
        fsck = f"{_fmt(scale.get('fsck_s'), 's')} (exit {scale.get('fsck_exit', '—')})"
        rows.append((f"fsck, {label}", fsck, "", "", ""))
        rows.append(
            (
                f"fsck max RSS, {label}",
                _fmt(_mib(scale.get("fsck_maxrss_bytes")), "MiB"),
                "",
                "",
                "",
            )
        )
    return rows


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value / (1 << 20), 1)


def format_table(rows: Sequence[tuple[str, ...]]) -> str:
    header = ("figure", "fusefs", "nullfs", "plain", "ratio / target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for index, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# the workloads, run in this process or in worker processes:


def _populate(directory: str, first: int, count: int) -> None:
    os.makedirs(directory, exist_ok=True)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    for i in range(first, first + count):
        fd = os.open(os.path.join(directory, f"f{i:05d}"), flags, 0o644)
        try:
            os.write(fd, SMALL_FILE)
        finally:
            os.close(fd)


def populate(root: Path, files: int, procs: int, prefix: str = "d") -> float:
    """`files` small files in directories of `FILES_PER_DIR`, by `procs` processes;
    the seconds it took."""
    jobs = [
        (str(root / f"{prefix}{d:04d}"), 0, min(FILES_PER_DIR, files - d * FILES_PER_DIR))
        for d in range(-(-files // FILES_PER_DIR))
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
        for future in [pool.submit(_populate, *job) for job in jobs]:
            future.result()
    return time.perf_counter() - t0


def fsync_samples(path: Path, samples: int) -> list[float]:
    """Seconds of each 4 KiB pwrite + fsync of one file, after `FSYNC_WARMUP` uncounted."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    out = []
    try:
        for i in range(FSYNC_WARMUP + samples):
            t0 = time.perf_counter()
            os.pwrite(fd, FSYNC_BLOCK, (i % 16) * len(FSYNC_BLOCK))
            os.fsync(fd)
            if i >= FSYNC_WARMUP:
                out.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return out


def fsync_rounds(
    files: dict[tuple[str, str], Path], samples: int, rounds: int
) -> dict[tuple[str, str], list[float]]:
    """`fsync_samples` of each file in turn, `rounds` times, `samples` in all for
    each: a change in the host's own fsync latency (other work on the machine, the
    host filesystem's journal) then lands on every file alike, not on whichever
    was measured at the time."""
    out: dict[tuple[str, str], list[float]] = {key: [] for key in files}
    per_round = -(-samples // rounds)
    for _ in range(rounds):
        for key, path in files.items():
            out[key] += fsync_samples(path, per_round)
    return out


def rates(root: Path, files: int) -> dict[str, float]:
    """create, stat and unlink of `files` empty files in a new directory, per second."""
    seconds = create_stat_unlink(root / "rates", files)
    return {phase: round(files / s) for phase, s in seconds.items()}


def _mixed_worker(directory: str, loops: int) -> tuple[float, float]:
    """create / write 4 KiB / fsync / read / rename / unlink, `loops` times; the
    (start, end) on the system-wide monotonic clock."""
    os.mkdir(directory)
    t0 = time.monotonic()
    for i in range(loops):
        a = os.path.join(directory, f"a{i}")
        b = os.path.join(directory, f"b{i}")
        fd = os.open(a, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, FSYNC_BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(a, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if len(os.read(fd, len(FSYNC_BLOCK))) != len(FSYNC_BLOCK):
                raise OSError(f"{a}: short read")
        finally:
            os.close(fd)
        os.rename(a, b)
        os.unlink(b)
    t1 = time.monotonic()
    os.rmdir(directory)
    return t0, t1


def mixed(root: Path, procs: int, loops: int) -> dict[str, float]:
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_mixed_worker, str(root / f"mixed{p}"), loops) for p in range(procs)]
        spans = [f.result() for f in futures]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    total = procs * loops
    return {"loops": total, "seconds": round(wall, 3), "loops_per_s": round(total / wall, 1)}


def listdir_best(directories: Sequence[Path], rounds: int) -> list[float]:
    """Best of `rounds` ``os.listdir`` of each directory, taking them in turns (as
    `fsync_rounds`, so that the machine's load lands on each alike)."""
    best = [float("inf")] * len(directories)
    counts: list[int | None] = [None] * len(directories)
    for _ in range(rounds):
        for i, directory in enumerate(directories):
            t0 = time.perf_counter()
            n = len(os.listdir(directory))
            best[i] = min(best[i], time.perf_counter() - t0)
            if counts[i] not in (None, n):
                raise OSError(f"{directory}: {counts[i]} entries, then {n}")
            counts[i] = n
    return best


def make_entries(directory: Path, count: int) -> None:
    """`count` empty files in a new `directory`."""
    directory.mkdir()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    for i in range(count):
        os.close(os.open(directory / f"e{i:06d}", flags, 0o644))


# the daemon:


def daemon_rss(mountpoint: Path, *, drop: bool = True) -> int:
    """The daemon's VmRSS in bytes, after ``.fusefs/drop_caches`` when `drop`."""
    if drop:
        (mountpoint / CONTROL_DROP_CACHES).write_text("1\n")
    return vm_rss(daemon_pid(mountpoint))


# the large images:


async def _build(image: str, files: int) -> dict[str, Any]:
    import trio

    from fusefs.filesystem import Filesystem, MountOptions
    from fusefs.format import mkfs
    from fusefs.namespace import ROOT_INO

    uid, gid = os.getuid(), os.getgid()
    mkfs(image, BIG_IMAGE_SIZE)
    t0 = time.perf_counter()
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)  # background checkpoints, as in the daemon
        for d in range(-(-files // FILES_PER_DIR)):
            parent = await fs.mkdir(ROOT_INO, b"d%04d" % d, 0o755, uid, gid)
            for i in range(min(FILES_PER_DIR, files - d * FILES_PER_DIR)):
                fh, _ = await fs.create(parent.ino, b"f%05d" % i, 0o644, os.O_RDWR, uid, gid)
                await fs.release(fh)
            if d % 20 == 19:  # a commit every 20,000 files, as periodic commits would
                await fs.commit()
        await fs.sync()
        committer = fs.committer
        stats = {
            "inodes": len(fs.ns.inodes),
            "journal_entries": committer.entries,
            "checkpoints": committer.checkpoints,
            "full_checkpoints": committer.full_checkpoints,
        }
        await fs.unmount()
    return {"build_s": round(time.perf_counter() - t0, 2), **stats}


def build_image(image: str, files: int) -> None:
    """Entry of the ``--build-image`` subprocess: prints its JSON line."""
    import trio

    print(json.dumps(trio.run(_build, image, files)), flush=True)


def run_with_rusage(argv: Sequence[str], timeout: float) -> tuple[int, int]:
    """Run `argv` (stdout discarded); its (exit code, max RSS in bytes), killed after
    `timeout`."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode == -signal.SIGKILL:
        raise BenchError(f"{shlex.join(argv)}: not done after {timeout:g} s")
    return proc.returncode, usage.ru_maxrss * KiB


@contextmanager
def daemon_mounted(
    cli: Sequence[str], image: Path, mountpoint: Path, options: str, errors: list[str]
) -> Iterator[float]:
    """`image` mounted by ``fusefs mount --foreground --ready-fd``, what ``fusefs
    mount`` runs in the background, waited for up to `MOUNT_TIMEOUT` rather than
    the 120 s ``fusefs mount`` gives its daemon; yields the seconds until ready.
    ``fusefs umount`` after."""
    argv = [*cli, "mount", "--foreground", "--log", f"{image}.log", "-o", options]
    read_fd, write_fd = os.pipe()
    argv += ["--ready-fd", str(write_fd), "--", str(image), str(mountpoint)]
    with open(f"{image}.log", "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=ROOT, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    os.close(write_fd)
    try:
        line = _read_line(read_fd, time.monotonic() + MOUNT_TIMEOUT)
        elapsed = time.perf_counter() - t0
        if line != "ok":
            raise BenchError(f"mounting {image.name}: {line or 'the daemon died'}")
        yield elapsed
    finally:
        os.close(read_fd)
        fusefs_umount(cli, image, mountpoint, errors)
        if proc.poll() is None:
            proc.terminate()
        proc.wait()


def scale(
    cli: Sequence[str], work: Path, files: int, options: str, errors: list[str]
) -> dict[str, Any]:
    """Build an image of `files` files in-process, then time mount and fsck."""
    image = work / f"scale-{files}.img"
    mountpoint = work / f"mnt-scale-{files}"
    mountpoint.mkdir()
    argv = [sys.executable, "-m", "benchmarks.bench_meta", "--build-image", str(image)]
    argv += ["--files", str(files)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=BUILD_TIMEOUT)
    if proc.returncode != 0:
        raise BenchError(f"building the {files}-file image: exit status {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["image_allocated_bytes"] = os.stat(image).st_blocks * 512
    with daemon_mounted(cli, image, mountpoint, options, errors) as mount_s:
        result["mount_s"] = round(mount_s, 3)
        result["rss_bytes"] = daemon_rss(mountpoint, drop=False)
        result["root_entries"] = len(os.listdir(mountpoint))
        t1 = time.perf_counter()
    result["umount_s"] = round(time.perf_counter() - t1, 3)
    log = Path(f"{image}.log")
    result["replayed_entries"] = replayed_entries(log.read_text(errors="replace"))
    t2 = time.perf_counter()
    fsck = run_with_rusage([*cli, "fsck", str(image)], FSCK_TIMEOUT)
    result["fsck_exit"], result["fsck_maxrss_bytes"] = fsck
    result["fsck_s"] = round(time.perf_counter() - t2, 3)
    if result["fsck_exit"] != 0:
        errors.append(f"fsck of the {files}-file image: exit status {result['fsck_exit']}")
    image.unlink()
    return result


# the run:


class Run:
    """The measurements, each recorded in `raw` as it completes; a failure is
    recorded in `errors` and the run goes on with the next figure."""

    def __init__(self, plan: Plan, progress: Callable[[str], None]) -> None:
        self.plan = plan
        self.progress = progress
        self.raw: dict[str, Any] = {"plan": dataclasses.asdict(plan)}
        self.errors: list[str] = []
        self.notes: list[str] = []

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.progress(what)
        t0 = time.perf_counter()
        try:
            yield
        except (OSError, BenchError, ValueError) as e:
            self.errors.append(f"{what}: {e}")
            self.progress(f"{what}: FAILED: {e}")
        else:
            self.progress(f"{what}: {time.perf_counter() - t0:.1f} s")

    def put(self, value: Any, *keys: str) -> None:
        data = self.raw
        for key in keys[:-1]:
            data = data.setdefault(key, {})
        data[keys[-1]] = value

    def fsync(self, targets: dict[str, Target]) -> None:
        """Latency on the populated targets and on their empty twins, in turns."""
        files = {
            (name, state): targets[twin].path("fsync.dat")
            for name in ("fusefs", "plain")
            for state, twin in (("empty", f"{name}_empty"), ("populated", name))
        }
        with self.step("fsync latency, empty and populated in turns"):
            samples = fsync_rounds(files, self.plan.fsync_samples, FSYNC_ROUNDS)
            for (name, state), values in samples.items():
                self.put(latency(values), "fsync", name, state)

    def rates(self, targets: dict[str, Target], state: str) -> None:
        names = ("fusefs", "nullfs", "plain") if state == "empty" else ("fusefs", "plain")
        for name in names:
            with self.step(f"create/stat/unlink, {state}, {name}"):
                self.put(
                    rates(targets[name].root, self.plan.rate_files), "rates", f"{name}_{state}"
                )

    def mounted(self, targets: dict[str, Target]) -> None:
        plan, fusefs = self.plan, targets["fusefs"].root
        self.rates(targets, "empty")
        with self.step("daemon RSS, empty"):
            self.put(daemon_rss(fusefs), "rss", "before_bytes")
        for name in ("fusefs", "plain"):
            with self.step(f"populate {plan.files:,} files, {name}"):
                seconds = populate(targets[name].root, plan.files, plan.populate_procs)
                self.put(round(plan.files / seconds), "populate_files_per_s", name)
        # The host's own writeback of what populating wrote (the image, the plain
        # files) would otherwise land in the fsync samples of both.
        os.sync()
        self.fsync(targets)
        with self.step("daemon RSS, populated"):
            after = daemon_rss(fusefs)
            before = self.raw["rss"]["before_bytes"]
            self.put(after, "rss", "after_bytes")
            self.put(plan.files, "rss", "files")
            self.put(round((after - before) / plan.files, 1), "rss", "per_file_bytes")
        self.rates(targets, "populated")
        for name in ("fusefs", "plain"):
            with self.step(f"mixed, {plan.mixed_procs} processes, {name}"):
                result = mixed(targets[name].root, plan.mixed_procs, plan.mixed_loops)
                self.put(result, "mixed", name)
        counts = (plan.listdir_small, plan.listdir_large)
        for name in ("fusefs", "nullfs", "plain"):
            with self.step(f"listdir {counts[0]:,} and {counts[1]:,} entries, {name}"):
                directories = [targets[name].path(f"list{count}") for count in counts]
                for directory, count in zip(directories, counts, strict=True):
                    make_entries(directory, count)
                small, large = listdir_best(directories, LISTDIR_ROUNDS)
                self.put(round(small, 4), "listdir", name, "small_s")
                self.put(round(large, 4), "listdir", name, "large_s")


def _progress(message: str) -> None:
    print(f"bench_meta: {message}", file=sys.stderr, flush=True)


def _count(text: str) -> int:
    value = int(text.replace(",", "").replace("_", ""))
    if value < FILES_PER_DIR:
        raise argparse.ArgumentTypeError(f"at least {FILES_PER_DIR}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_meta",
        description="fusefs metadata benchmark at scale, beside nullfs and a plain directory.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (under 3 minutes)")
    parser.add_argument("--files", type=_count, help="small files populated (default 100,000)")
    parser.add_argument("--big", type=_count, help="files in the large image (default 1,000,000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-scale", action="store_true", help="skip the mount/fsck images")
    parser.add_argument(
        "--fusefs-options",
        default=DEFAULT_FUSEFS_OPTIONS,
        metavar="OPTS",
        help=f"fusefs mount -o OPTS (default {DEFAULT_FUSEFS_OPTIONS})",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to make the temp dir")
    parser.add_argument("--build-image", metavar="IMAGE", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.build_image:
        build_image(args.build_image, args.files or FULL.files)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench_meta: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_meta: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, files=args.files or plan.files, big=args.big or plan.big)
    cli = [sys.executable, "-m", "fusefs.cli"]
    bench = Run(plan, _progress)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="fusefs-bench-meta-", dir=args.dir)).resolve()
    started = time.perf_counter()
    try:
        with ExitStack() as mounts:
            _progress("mounting fusefs (twice), nullfs; plain directories")
            # The fsync figures compare each populated target with an empty twin,
            # measured in the same minutes (`fsync_rounds`).
            (work / "empty").mkdir()
            targets = {
                "fusefs": mounts.enter_context(
                    fusefs_mounted(cli, work, args.fusefs_options, bench.errors)
                ),
                "fusefs_empty": mounts.enter_context(
                    fusefs_mounted(cli, work / "empty", args.fusefs_options, bench.errors)
                ),
                "nullfs": mounts.enter_context(nullfs_mounted(work)),
                "plain": Target("plain", work / "plain"),
                "plain_empty": Target("plain", work / "plain-empty"),
            }
            for name in ("plain", "plain_empty"):
                targets[name].root.mkdir()
            bench.mounted(targets)
        if not args.no_scale:
            for files in dict.fromkeys((plan.files, plan.big)):
                with bench.step(f"mount and fsck, {files:,} files"):
                    result = scale(cli, work, files, args.fusefs_options, bench.errors)
                    bench.put(result, "scale", str(files))
        report(bench, args, load_before, time.perf_counter() - started)
    finally:
        if args.keep:
            print(f"bench_meta: kept {work} (images, logs, mount points)", file=sys.stderr)
        else:
            # After the report: with a discarding host filesystem, removing the
            # plain directory's files takes minutes.
            _progress(f"removing {work}")
            shutil.rmtree(work, ignore_errors=True)
    return 1 if bench.errors else 0


def report(bench: Run, args: argparse.Namespace, load_before: float, seconds: float) -> None:
    plan = bench.plan
    bench.notes += [
        f"fusefs mounted with -o {args.fusefs_options}; RSS read after "
        f"{CONTROL_DROP_CACHES}, so it is metadata, not cached pages",
        "nullfs: no rename (ENOSYS) and a no-op fsync, so no fsync or mixed figure; "
        "its readdir copies the whole directory on every call",
        f"populated files: {len(SMALL_FILE)} bytes each, {FILES_PER_DIR} a directory, "
        f"{plan.populate_procs} processes; large images: empty files, {FILES_PER_DIR} a "
        "directory, 1 TiB sparse, built in-process",
        f"fsync: a host sync(2) after populating, then the populated target and an empty "
        f"twin (a second fusefs mount, a second plain directory) in {FSYNC_ROUNDS} turns "
        f"of {-(-plan.fsync_samples // FSYNC_ROUNDS)} samples, {FSYNC_WARMUP} uncounted "
        f"first each; listdir: best of {LISTDIR_ROUNDS}, the two directories in turns",
        f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end, on {os.cpu_count()} cores",
    ]
    result = summarize(
        bench.raw,
        quick=args.quick,
        fusefs_options=args.fusefs_options,
        seconds=round(seconds, 1),
        loadavg_1min={"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        notes=bench.notes,
        errors=bench.errors,
    )
    title = f"fusefs metadata benchmark{' (quick)' if args.quick else ''}"
    print(title)
    print(format_table(table_rows(result)))
    for note in [*bench.notes, *(f"ERROR: {e}" for e in bench.errors)]:
        print(f"note: {note}")
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
