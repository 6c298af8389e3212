"""SEEK_DATA / SEEK_HOLE through a fusefs mount against a plain directory, in one run.

Two files of 100,000 extents each, laid out the same way on both targets:

- ``sparse``: one written block every other block (blocks 0, 2, 4, ... 199,998):
  100,000 data extents between 100,000 holes (781 MiB long, 391 MiB of data);
- ``prealloc``: one *preallocated* (unwritten) block every other block, then one
  written block at block 200,000: 100,000 unwritten extents that SEEK_DATA must
  pass over (unwritten extents are holes to lseek) before the data at the end.

On fusefs both are written in-process before the mount (`Filesystem` driven
directly: 100,000 FUSE requests would only slow the set-up), then read through a
real mount (``fusefs mount``); on the plain directory with pwrite(2) and
fallocate(2).  Timed, best of ``--rounds`` rounds, the targets taking turns:

- ``walk``: the whole ``sparse`` file walked as ``cp --sparse`` does (SEEK_DATA,
  then SEEK_HOLE from where it ended, and so on): 200,000 lseek(2) calls;
- ``random``: SEEK_DATA and SEEK_HOLE from 2,000 random offsets of ``sparse``;
- ``prealloc``: SEEK_DATA from 0 in ``prealloc``: the whole extent map in one call;
- ``pread_1``: a 1-byte pread of a cached page (on fusefs one FUSE round trip):
  what any request costs, for reference.

Each is µs per call.  The walk must find the 100,000 runs on both targets, and the mount's
``seek_data``/``seek_hole`` counters must have grown by exactly the number of
calls made (every one reached fusefs: none answered by the kernel from the size).

Run: ``python -m benchmarks.bench_seek [--rounds N] [--dir DIR]``.  Prints a table,
then ``RESULT {json}`` with the ratios (fusefs / plain, per call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from benchmarks import run_main
from benchmarks.targets import BenchError, fusefs_mounted
from fusefs.cli import fallocate_fd
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.namespace import ROOT_INO

BS: Final = 4096
EXTENTS: Final = 100_000
RANDOM_OFFSETS: Final = 2_000
PREALLOC_CALLS: Final = 20
BATCH: Final = 1024  # blocks written per in-process call (every other one written)


# the files:


async def _fill_fusefs(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    try:
        block = b"d" * BS
        fh, _ = await fs.create(ROOT_INO, b"sparse", 0o644, os.O_RDWR, 0, 0)
        for i in range(EXTENTS):
            await fs.write(fh, 2 * i * BS, block)
            if i % BATCH == BATCH - 1:
                await fs.fsync(fh, True)  # keep the dirty pages within the cache
        await fs.fsync(fh, False)
        await fs.release(fh)
        fh, attr = await fs.create(ROOT_INO, b"prealloc", 0o644, os.O_RDWR, 0, 0)
        for i in range(EXTENTS):
            await fs.fallocate(attr.ino, 0, 2 * i * BS, BS)
        await fs.write(fh, 2 * EXTENTS * BS, block)
        await fs.fsync(fh, False)
        await fs.release(fh)
    finally:
        await fs.unmount()


def fill_fusefs(image: Path) -> None:
    trio.run(_fill_fusefs, image)


def fill_plain(root: Path) -> None:
    block = b"d" * BS
    fd = os.open(root / "sparse", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(EXTENTS):
            os.pwrite(fd, block, 2 * i * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(root / "prealloc", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(EXTENTS):
            fallocate_fd(fd, 0, 2 * i * BS, BS)
        os.pwrite(fd, block, 2 * EXTENTS * BS)
        os.fsync(fd)
    finally:
        os.close(fd)


# the measurements (µs per call):


def walk(fd: int) -> tuple[float, int, int]:
    """(µs per lseek, lseek calls, data runs found) of one whole-file walk."""
    calls = runs = 0
    pos = 0
    start = time.perf_counter()
    while True:
        calls += 1
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        calls += 1
        pos = os.lseek(fd, data, os.SEEK_HOLE)
        runs += 1
    return (time.perf_counter() - start) / calls * 1e6, calls, runs


def random_seeks(fd: int, size: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    offsets = [rng.randrange(size) for _ in range(RANDOM_OFFSETS)]
    start = time.perf_counter()
    for off in offsets:
        os.lseek(fd, off, os.SEEK_HOLE)
        with contextlib.suppress(OSError):  # ENXIO: no data after off
            os.lseek(fd, off, os.SEEK_DATA)
    return (time.perf_counter() - start) / (2 * len(offsets)) * 1e6, 2 * len(offsets)


def prealloc_seek(fd: int) -> tuple[float, int]:
    start = time.perf_counter()
    for _ in range(PREALLOC_CALLS):
        found = os.lseek(fd, 0, os.SEEK_DATA)
    elapsed = time.perf_counter() - start
    if found != 2 * EXTENTS * BS:
        raise BenchError(f"SEEK_DATA over the preallocated file found {found}")
    return elapsed / PREALLOC_CALLS * 1e6, PREALLOC_CALLS


def pread_one(fd: int) -> float:
    os.pread(fd, 1, 0)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        os.pread(fd, 1, 0)
    return (time.perf_counter() - start) / n * 1e6


def measure(root: Path, seed: int) -> tuple[dict[str, float], int]:
    """One round on one target: µs per call of each measurement, and lseek calls made."""
    out: dict[str, float] = {}
    calls = 0
    fd = os.open(root / "sparse", os.O_RDONLY)
    try:
        out["walk"], n, runs = walk(fd)
        calls += n
        if runs != EXTENTS:
            raise BenchError(f"{root}: the walk found {runs} data runs, not {EXTENTS}")
        out["random"], n = random_seeks(fd, os.fstat(fd).st_size, seed)
        calls += n
        out["pread_1"] = pread_one(fd)
    finally:
        os.close(fd)
    fd = os.open(root / "prealloc", os.O_RDONLY)
    try:
        out["prealloc"], n = prealloc_seek(fd)
        calls += n
    finally:
        os.close(fd)
    return out, calls


def seek_requests(mountpoint: Path) -> int:
    total = 0
    for line in (mountpoint / ".fusefs" / "stats").read_text().splitlines():
        key, _, value = line.partition(": ")
        if key in ("seek_data", "seek_hole"):
            total += int(value)
    return total


def run(args: argparse.Namespace) -> int:
    cli = [sys.executable, "-m", "fusefs.cli"]
    errors: list[str] = []
    best: dict[str, dict[str, float]] = {"fusefs": {}, "plain": {}}
    with tempfile.TemporaryDirectory(prefix="bench-seek-", dir=args.dir) as tmp:
        work = Path(tmp)
        plain = work / "plain"
        plain.mkdir()
        print("setting up: 2 x 100,000 extents on each target", file=sys.stderr)
        fill_plain(plain)
        with fusefs_mounted(cli, work, "", errors, prepare=fill_fusefs) as target:
            reached = 0
            made = 0
            for round_ in range(args.rounds):
                for name, root in (("fusefs", target.root), ("plain", plain)):
                    before = seek_requests(target.root) if name == "fusefs" else 0
                    times, calls = measure(root, round_)
                    if name == "fusefs":
                        reached += seek_requests(target.root) - before
                        made += calls
                    for key, value in times.items():
                        best[name][key] = min(best[name].get(key, value), value)
    if errors:
        print(f"bench_seek: {'; '.join(errors)}", file=sys.stderr)
        return 1
    ratios = {k: round(best["fusefs"][k] / best["plain"][k], 2) for k in best["fusefs"]}
    print(f"{'per call (µs)':14s} {'fusefs':>10s} {'plain':>10s} {'ratio':>7s}")
    for key in ("walk", "random", "prealloc", "pread_1"):
        f, p = best["fusefs"][key], best["plain"][key]
        print(f"{key:14s} {f:10.1f} {p:10.2f} {ratios[key]:7.1f}")
    print(f"lseek calls on fusefs: {made}; SEEK_DATA/SEEK_HOLE requests that reached it: {reached}")
    result = {
        "extents": EXTENTS,
        "rounds": args.rounds,
        "us_per_call": best,
        "ratio": ratios,
        "lseek_calls": made,
        "lseek_reached_fusefs": reached,
        "all_reached": made == reached,
        "machine": platform.platform(),
    }
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_seek", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best counts (default 3)")
    p.add_argument("--dir", default=None, help="where the image and the plain files go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv, (BenchError, OSError))


if __name__ == "__main__":
    sys.exit(main())
