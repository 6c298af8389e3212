"""How long commits and checkpoints hold the trio loop, as the filesystem grows.

In-process (no FUSE: what is measured is the core's own stall, which a request
arriving meanwhile would wait out).  For each size N the script builds N small
files in directories of 1,000 on a sparse 1 TiB image, then, while a ticker task
wakes every millisecond and records how late it was woken:

- a background checkpoint of the whole filesystem (the fuzzy one a half-full
  journal starts), its wall time and bytes;
- 200 commits of one 4 KiB write each (`fsync`).

The figure that matters is the longest stall (the ticker's worst lateness): the
issue's bound is 50 ms at 1,000,000 inodes.  Mount time and the daemon-side
memory of the loaded table are printed too.  Ends with ``RESULT {json}``.

Run: ``python -m benchmarks.bench_checkpoint [--sizes 100000,1000000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.namespace import ROOT_INO

OPTS = MountOptions(commit_interval=3600)
PER_DIR = 1000


async def worst_stall(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """Run ``work`` beside a 1 ms ticker; (seconds it took, worst lateness)."""
    worst = 0.0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await trio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.01)
        start = time.perf_counter()
        await work()
        took = time.perf_counter() - start
        done.set()
    return took, worst


async def populate(fs: Filesystem, n: int) -> float:
    start = time.perf_counter()
    made = 0
    d = 0
    while made < n:
        dd = await fs.mkdir(ROOT_INO, f"d{d}".encode(), 0o755, 0, 0)
        for i in range(min(PER_DIR, n - made)):
            fh, _ = await fs.create(dd.ino, f"f{i}".encode(), 0o644, os.O_RDWR, 0, 0)
            await fs.release(fh)
        made += min(PER_DIR, n - made)
        d += 1
        if d % 50 == 0:
            await fs.commit()
    await fs.commit()
    return time.perf_counter() - start


async def measure(n: int, work_dir: Path) -> dict[str, Any]:
    image = work_dir / f"bench-{n}.img"
    mkfs(image, 1 << 40, force=True)
    fs = await Filesystem.mount(image, OPTS)
    build = await populate(fs, n)
    gc.collect()
    gc.freeze()  # as the daemon does after mount
    took, stall = await worst_stall(lambda: fs.committer.checkpoint(fs.ns))
    out: dict[str, Any] = {
        "inodes": len(fs.ns.inodes),
        "build_s": round(build, 1),
        "checkpoint_s": round(took, 2),
        "checkpoint_bytes": fs.committer.last_checkpoint_bytes,
        "checkpoint_worst_stall_ms": round(stall * 1000, 1),
    }
    fh, _ = await fs.create(ROOT_INO, b"target", 0o644, os.O_RDWR, 0, 0)
    latencies: list[float] = []

    async def commits() -> None:
        for _ in range(200):
            await fs.write(fh, 0, os.urandom(4096))
            start = time.perf_counter()
            await fs.fsync(fh, False)
            latencies.append(time.perf_counter() - start)

    _, stall = await worst_stall(commits)
    latencies.sort()
    out["fsync_median_ms"] = round(latencies[len(latencies) // 2] * 1000, 2)
    out["fsync_worst_stall_ms"] = round(stall * 1000, 1)
    await fs.release(fh)
    await fs.unmount()
    gc.unfreeze()
    del fs
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fs = await Filesystem.mount(image, OPTS)
    out["mount_s"] = round(time.perf_counter() - start, 2)
    out["max_rss_mib"] = round(
        max(rss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    )
    await fs.unmount()
    image.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated inode counts")
    parser.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in sizes:
            r = trio.run(measure, n, Path(tmp))
            results.append(r)
            print(
                f"{r['inodes']:>9} inodes: checkpoint {r['checkpoint_s']} s "
                f"({r['checkpoint_bytes'] >> 10} KiB), "
                f"worst stall {r['checkpoint_worst_stall_ms']} ms; "
                f"fsync median {r['fsync_median_ms']} ms, "
                f"worst stall {r['fsync_worst_stall_ms']} ms; "
                f"mount {r['mount_s']} s; build {r['build_s']} s",
                flush=True,
            )
    print("RESULT " + json.dumps({"bench": "checkpoint", "sizes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
