"""Pressure on the page cache from *other processes*, for the stress tools.

A consistency check whose only load is its own sequence never meets the races
that live in eviction, ``drop_caches`` and the writeback they force: its pages
stay cached and its writes stay dirty until it fsyncs.  ``--pressure`` (in
``fusefs-fsx`` and ``fusefs-campaign``) runs the check under three kinds of it:

``stream``
    a process that writes a file several times the cache's size in 1 MiB
    writes, overwriting it in place, then reads it back in 1 MiB reads, over
    and over (``dd`` then ``cat`` in a loop): clean pages of every other file
    are evicted, dirty ones hit the dirty limits and are written back by the
    flusher and by throttled writers.  Overwriting in place allocates nothing
    after the first pass, so the stream never fills the filesystem.
``drop``
    a process writing ``1`` to ``.fusefs/drop_caches`` in a loop (every dirty
    page written back, every clean one dropped), ``--pressure-interval`` apart;
    on another filesystem ``/proc/sys/vm/drop_caches`` (root only).
``cache``
    the mount's cache shrunk to ``--pressure-cache`` (default 1M, the
    smallest) through ``.fusefs/cache_size`` for the run, and put back after:
    every other kind then bites far more often.  fusefs only.

`Pressure` starts and stops them around a run (a context manager) and says
what they did (`Pressure.summary`); a pressure process that dies is reported,
not ignored.  ``python -m tools.pressure stream|drop ...`` is the process side.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Final

KINDS: Final = ("stream", "drop", "cache")
READY: Final = "ready"
CHUNK: Final = 1 << 20
DEFAULT_CACHE: Final = 1 << 20
PROC_DROP_CACHES: Final = "/proc/sys/vm/drop_caches"


def parse_kinds(text: str) -> frozenset[str]:
    """``all`` or a comma-separated subset of `KINDS`; ValueError otherwise."""
    words = {w.strip() for w in text.split(",") if w.strip()}
    if words == {"all"}:
        return frozenset(KINDS)
    unknown = words - set(KINDS)
    if unknown or not words:
        raise ValueError(
            f"unknown pressure kind(s) {sorted(unknown)}: use all or some of {', '.join(KINDS)}"
        )
    return frozenset(words)


@dataclass(frozen=True)
class PressureSpec:
    kinds: frozenset[str]
    cache_size: int = DEFAULT_CACHE
    stream_size: int | None = None  # default: 4x the cache limit, at least 4 MiB
    interval: float = 0.0  # seconds between drops

    def describe(self) -> str:
        parts = []
        for kind in KINDS:
            if kind not in self.kinds:
                continue
            if kind == "cache":
                parts.append(f"cache {self.cache_size >> 10}K")
            elif kind == "drop" and self.interval:
                parts.append(f"drop every {self.interval * 1000:g} ms")
            else:
                parts.append(kind)
        return ", ".join(parts)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """``--pressure``, ``--pressure-interval``, ``--chaos`` and ``--chaos-delay``,
    as fusefs-fsx and fusefs-campaign take them."""
    group.add_argument(
        "--pressure",
        nargs="?",
        const="all",
        metavar="KINDS",
        help="other processes' pressure on the cache while the run goes on: all (the "
        "default) or some of stream,drop,cache (tools/pressure.py)",
    )
    group.add_argument(
        "--pressure-interval",
        type=float,
        default=0.0,
        metavar="MS",
        help="mean pause between drops of --pressure drop (default 0: back to back)",
    )
    group.add_argument(
        "--chaos",
        type=float,
        metavar="P",
        help="fusefs: arm every race site with probability P and a window drawn from "
        "--chaos-delay, seeded by the run's seed",
    )
    group.add_argument(
        "--chaos-delay",
        default="0-2",
        metavar="MIN-MAX",
        help="window of --chaos in ms, drawn on each fire (default 0-2)",
    )


class PressureError(Exception):
    """The pressure could not be set up (a kind that needs fusefs, no root)."""


class Pressure:
    """The processes and settings of one `PressureSpec`, around a run.

    ``directory`` is where the stream file goes (the target's own directory:
    the same filesystem); ``control_root`` the fusefs mount's root, or None.
    """

    def __init__(
        self,
        spec: PressureSpec,
        directory: str,
        control_root: str | None,
        *,
        stop_timeout: float = 60.0,
    ) -> None:
        self.spec = spec
        self.stop_timeout = stop_timeout
        self.directory = os.path.abspath(directory)
        self.control_root = None if control_root is None else os.path.abspath(control_root)
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._cache_before: str | None = None
        self._stream_path = os.path.join(self.directory, f".pressure-{os.getpid()}")
        self.counts: dict[str, str] = {}
        self.problems: list[str] = []

    def _control(self, name: str) -> str:
        assert self.control_root is not None
        return os.path.join(self.control_root, ".fusefs", name)

    def __enter__(self) -> Pressure:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _start(self) -> None:
        kinds = self.spec.kinds
        fusefs = self.control_root is not None
        if "cache" in kinds:
            if not fusefs:
                raise PressureError("--pressure cache needs a fusefs mount")
            with open(self._control("cache_size")) as f:
                self._cache_before = f.read().strip()
            _write(self._control("cache_size"), str(self.spec.cache_size))
        if "drop" in kinds:
            target = self._control("drop_caches") if fusefs else PROC_DROP_CACHES
            if not fusefs and not os.access(PROC_DROP_CACHES, os.W_OK):
                raise PressureError(f"--pressure drop: {PROC_DROP_CACHES} is not writable")
            self._spawn("drop", [target, str(self.spec.interval)])
        if "stream" in kinds:
            size = self.spec.stream_size or max(4 * CHUNK, 4 * self._cache_limit())
            self._spawn("stream", [self._stream_path, str(size)])

    def _cache_limit(self) -> int:
        """The mount's cache limit; 64 MiB (the default) where it cannot be read."""
        try:
            if self.control_root is not None:
                with open(self._control("cache_size")) as f:
                    return int(f.read())
        except (OSError, ValueError):
            pass
        return 64 * CHUNK

    def _spawn(self, kind: str, args: list[str]) -> None:
        """Start one pressure process and wait until it is under way (its SIGTERM
        handler installed: a run shorter than its start-up still stops it cleanly)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.pressure", kind, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._procs[kind] = proc
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first != READY:
            rest = proc.communicate()[0]
            self.counts[kind] = "died"
            raise PressureError(f"{kind} pressure did not start: {(first + ' ' + rest).strip()}")

    def check(self) -> None:
        """Record a pressure process that died while the run was going on."""
        for kind, proc in self._procs.items():
            if proc.poll() is not None and kind not in self.counts:
                out = proc.stdout.read() if proc.stdout else ""
                self.counts[kind] = "died"
                self.problems.append(f"{kind} pressure exited {proc.returncode}: {out.strip()}")

    def _stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for kind, proc in self._procs.items():
            try:
                out, _ = proc.communicate(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if kind in self.counts:
                continue
            last = out.strip().splitlines()[-1:] if out else []
            if proc.returncode == 0 and last:
                self.counts[kind] = last[0]
            else:
                self.counts[kind] = "died"
                self.problems.append(f"{kind} pressure exited {proc.returncode}: {out.strip()}")
        self._procs.clear()
        with contextlib.suppress(OSError):
            os.unlink(self._stream_path)
        if self._cache_before is not None:
            with contextlib.suppress(OSError):
                _write(self._control("cache_size"), self._cache_before)
            self.counts["cache"] = f"{self.spec.cache_size >> 10}K"
            self._cache_before = None

    def summary(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# the processes:


class _Stop:
    """SIGTERM sets it; the loops look at it between their syscalls."""

    def __init__(self) -> None:
        self._stopped = False
        signal.signal(signal.SIGTERM, self._handler)
        print(READY, flush=True)  # the parent waits for this before the run starts

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._stopped = True

    def is_set(self) -> bool:
        return self._stopped


def _stream(path: str, size: int) -> str:
    stop = _Stop()
    buf = bytearray(CHUNK)
    passes = written = read = enospc = 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while not stop.is_set():
            passes += 1
            buf[:8] = passes.to_bytes(8, "little")  # each pass writes new bytes
            for pos in range(0, size, CHUNK):
                if stop.is_set():
                    break
                try:
                    written += os.pwrite(fd, buf, pos)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    # The run under test filled the filesystem before this pass
                    # allocated its blocks: read back what there is, try again
                    # next pass.
                    enospc += 1
                    break
            for pos in range(0, size, CHUNK):
                if stop.is_set():
                    break
                read += len(os.pread(fd, CHUNK, pos))
    finally:
        os.close(fd)
    full = f", {enospc} ENOSPC" if enospc else ""
    return f"{passes} passes, {written >> 20} MiB written, {read >> 20} MiB read{full}"


def _drop(path: str, interval: float) -> str:
    """Drops at random times, ``interval`` seconds apart on average (exponential
    gaps: some back to back, some after a long pause, so that pages are both
    dropped while being changed and left dirty long enough to be changed
    again); back to back with an interval of 0."""
    stop = _Stop()
    rng = random.Random(os.getpid())
    drops = 0
    while not stop.is_set():
        _write(path, "3" if path == PROC_DROP_CACHES else "1")
        drops += 1
        if interval:
            time.sleep(rng.expovariate(1 / interval))
    return f"{drops} drops"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.pressure", description=__doc__)
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("stream", help="write and read back a file in a loop")
    s.add_argument("path")
    s.add_argument("size", type=int)
    d = sub.add_parser("drop", help="drop caches in a loop")
    d.add_argument("control")
    d.add_argument("interval", type=float)
    args = p.parse_args(argv)
    try:
        if args.kind == "stream":
            print(_stream(args.path, args.size), flush=True)
        else:
            print(_drop(args.control, args.interval), flush=True)
    except OSError as e:
        print(f"{args.kind}: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
