"""Benchmark directories: memory per entry, readdir cost per call, listdir scaling.

Run as ``python -m benchmarks.bench_dirents [--quick] [--only memory,readdir,listdir]``.
Every figure is measured in the same run beside its baseline; the last line is
``RESULT {json}`` with the numbers and whether each target is met:

* memory: bytes per entry of a 100,000-entry `Directory` beside the plain dict
  ``{name: ino}`` that directories were before, both built as mount builds them
  (fresh names and inode numbers); target: at most 1.5x the dict's, names and
  inode numbers included;
* readdir: one resumed readdir call (30 entries, after a cookie in the middle)
  of a 100,000-entry directory beside one of a 1,000-entry directory, and after
  the first half of the big one was unlinked; target: at most 2x (O(log n) +
  O(returned), not O(n)); also a whole scan, and a lookup beside a dict's;
* opendir: the bytes an open handle of a 100,000-entry directory holds (target
  under 1 KiB: no copy of the entries) and the time to open it, and a whole scan
  through `Filesystem.readdir_entries` in replies of 30; this one uses the
  `Filesystem` API only, so it also runs against older cores;
* listdir: ``os.listdir`` of a 20,000-entry directory on a fresh fusefs mount
  divided by that of a 10,000-entry one (target <= 2.5, linear), beside the same
  on a plain directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks.bench_extents import traced_bytes
from benchmarks.targets import BenchError, fusefs_mounted
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.namespace import ROOT_INO

N_MEMORY: Final = 100_000
N_READDIR: Final = 100_000
PAGE: Final = 30  # entries in one FUSE readdir reply of a 4 KiB buffer, about
INO_BASE: Final = 1_000_000  # inode numbers are not cached small ints


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest of ``repeat`` runs in wall-clock seconds, garbage collection off:
    a listing's time is mostly the daemon's, which this process's CPU time
    (`bench_extents.best_of`) would leave out."""
    times = []
    for _ in range(repeat):
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return min(times)


def entry_names(n: int) -> list[bytes]:
    return [f"file-{i:07d}.txt".encode() for i in range(n)]


# memory:


def bench_memory(n: int) -> dict[str, Any]:
    from fusefs.dirents import Directory

    def fresh() -> Iterator[tuple[bytes, int]]:
        # As `Inode.from_record` gets them: a new bytes and a new int an entry.
        for i in range(n):
            yield f"file-{i:07d}.txt".encode(), int(str(INO_BASE + i))

    _, dict_total = traced_bytes(lambda: dict(fresh()))
    _, dir_total = traced_bytes(lambda: Directory(fresh()))
    # The structures alone, beside names and inode numbers that exist anyway.
    pairs = list(fresh())
    _, dict_alone = traced_bytes(lambda: dict(pairs))
    _, dir_alone = traced_bytes(lambda: Directory(pairs))

    # Every other entry unlinked: half-full blocks, and a dict that does not shrink.
    def churned(make: Callable[[], MutableMapping[bytes, int]]) -> Callable[[], object]:
        def build() -> object:
            d = make()
            d.update(pairs)
            for name, _ in pairs[::2]:
                del d[name]
            return d

        return build

    _, dict_churned = traced_bytes(churned(dict))
    _, dir_churned = traced_bytes(churned(Directory))
    _, empty_dict = traced_bytes(dict)
    _, empty_dir = traced_bytes(Directory)
    out = {
        "entries": n,
        "dict_bytes_per_entry": round(dict_total / n, 1),
        "directory_bytes_per_entry": round(dir_total / n, 1),
        "ratio": round(dir_total / dict_total, 3),
        "dict_structure_bytes_per_entry": round(dict_alone / n, 1),
        "directory_structure_bytes_per_entry": round(dir_alone / n, 1),
        "dict_structure_bytes_per_entry_left_after_unlinking_half": round(
            dict_churned / (n // 2), 1
        ),
        "directory_structure_bytes_per_entry_left_after_unlinking_half": round(
            dir_churned / (n // 2), 1
        ),
        "empty_dict_bytes": empty_dict,
        "empty_directory_bytes": empty_dir,
    }
    out["target_met"] = out["ratio"] <= 1.5
    return out


# readdir:


def _page(directory: Any, cookie: int) -> int:
    """One readdir reply's worth: the cookie to resume from."""
    last = cookie
    for k, entry in enumerate(directory.after(cookie), 1):
        last = entry[2]
        if k == PAGE:
            break
    return last


def bench_readdir(n: int, repeat: int) -> dict[str, Any]:
    from fusefs.dirents import Directory

    def build(size: int) -> tuple[Directory, int]:
        d = Directory((name, INO_BASE + i) for i, name in enumerate(entry_names(size)))
        return d, d.cookie(f"file-{size // 2:07d}.txt".encode())

    small, small_mid = build(1_000)
    big, big_mid = build(n)
    calls = 1000

    def pages(d: Directory, cookie: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                _page(d, cookie)

        return run

    t_small = best_of(repeat, pages(small, small_mid)) / calls
    t_big = best_of(repeat, pages(big, big_mid)) / calls
    for name in entry_names(n // 2):  # the scan's first half unlinked
        del big[name]
    t_holes = best_of(repeat, pages(big, 0)) / calls
    # A whole scan, page by page, as ``ls`` makes the kernel do it.
    d, _ = build(n)

    def scan() -> None:
        cookie, seen = 0, 0
        while True:
            nxt = _page(d, cookie)
            if nxt == cookie:
                break
            cookie = nxt
            seen += PAGE
        assert seen >= n

    t_scan = best_of(repeat, scan)
    # A lookup by a name that comes from the kernel: equal, not the same object.
    probes = [bytes(bytearray(name)) for name in entry_names(n)[::97]]
    plain = dict(d.items())

    def lookups(m: Any) -> Callable[[], None]:
        def run() -> None:
            get = m.get
            for name in probes:
                get(name)

        return run

    t_dict_get = best_of(repeat, lookups(plain)) / len(probes)
    t_dir_get = best_of(repeat, lookups(d)) / len(probes)
    out = {
        "page": PAGE,
        "call_us_1000_entries": round(t_small * 1e6, 2),
        f"call_us_{n}_entries": round(t_big * 1e6, 2),
        f"call_us_{n}_after_unlinking_first_half": round(t_holes * 1e6, 2),
        "ratio_big_to_small": round(t_big / t_small, 2),
        "ratio_unlinked_to_small": round(t_holes / t_small, 2),
        f"whole_scan_ms_{n}_entries": round(t_scan * 1e3, 1),
        "lookup_ns_dict": round(t_dict_get * 1e9),
        "lookup_ns_directory": round(t_dir_get * 1e9),
    }
    out["target_met"] = out["ratio_big_to_small"] <= 2 and out["ratio_unlinked_to_small"] <= 2
    return out


# opendir and a whole scan through the core:


async def _core_scan(image: Path, n: int, repeat: int) -> dict[str, Any]:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    try:
        uid, gid = os.getuid(), os.getgid()
        d = (await fs.mkdir(ROOT_INO, b"d", 0o755, uid, gid)).ino
        for name in entry_names(n):
            await fs.mknod(d, name, stat.S_IFREG | 0o644, 0, uid, gid)

        handles: list[int] = []
        # Bytes an open handle holds, and the time to open one.
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            handles.append(await fs.opendir(d))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            handles.append(await fs.opendir(d))
            times.append(time.perf_counter() - t0)
        fh = handles[-1]
        t0 = time.perf_counter()
        cookie, seen = 0, 0
        while True:
            page = list(islice(fs.readdir_entries(fh, cookie), PAGE))
            if not page:
                break
            seen += len(page)
            cookie = page[-1][2]
        scan = time.perf_counter() - t0
        assert seen == n
        for h in handles:
            await fs.releasedir(h)
        return {
            "entries": n,
            "opendir_bytes_held": held,
            "opendir_us": round(min(times) * 1e6, 1),
            "scan_ms": round(scan * 1e3, 1),
        }
    finally:
        await fs.unmount()


def bench_opendir(n: int, repeat: int) -> dict[str, Any]:
    """Works on any fusefs core (it uses `Filesystem` only), to compare with older ones."""
    with tempfile.TemporaryDirectory(prefix="bench-dirents-") as tmp:
        image = Path(tmp) / "fs.img"
        mkfs(image, 256 << 20)
        out: dict[str, Any] = trio.run(_core_scan, image, n, repeat)
    out["target_met"] = out["opendir_bytes_held"] < 1024
    return out


# listdir on a mount:


def populate(directory: Path, n: int) -> None:
    directory.mkdir()
    for name in entry_names(n):
        os.close(os.open(directory / name.decode(), os.O_CREAT | os.O_WRONLY, 0o644))


def listdir_pair(root: Path, small: int, repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` listdir times of a ``small`` and a twice as large
    directory, measured alternately so drift in the machine's load hits both."""
    big = 2 * small
    populate(root / "small", small)
    populate(root / "big", big)
    times: dict[int, list[float]] = {small: [], big: []}
    for _ in range(repeat):
        for n in (small, big):
            directory = root / ("small" if n == small else "big")

            def run(directory: Path = directory, n: int = n) -> None:
                assert len(os.listdir(directory)) == n

            times[n].append(best_of(1, run))
    t_small, t_big = min(times[small]), min(times[big])
    return {
        f"listdir_s_{small}": round(t_small, 4),
        f"listdir_s_{big}": round(t_big, 4),
        "ratio": round(t_big / t_small, 2),
    }


def bench_listdir(small: int, repeat: int, cli: Sequence[str]) -> dict[str, Any]:
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-dirents-") as tmp:
        work = Path(tmp)
        plain = work / "plain"
        plain.mkdir()
        out: dict[str, Any] = {"plain": listdir_pair(plain, small, repeat)}
        shutil.rmtree(plain)
        with fusefs_mounted(cli, work, "", errors) as target:
            out["fusefs"] = listdir_pair(target.root, small, repeat)
    if errors:
        raise BenchError("; ".join(errors))
    out["target_met"] = out["fusefs"]["ratio"] <= 2.5
    return out


# the run:

BENCHES: Final = ("memory", "readdir", "opendir", "listdir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_dirents", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller directories")
    p.add_argument(
        "--only", default=",".join(BENCHES), help="comma-separated: " + ",".join(BENCHES)
    )
    p.add_argument(
        "--cli",
        default=f"{sys.executable} -m fusefs.cli",
        help="the fusefs command line (default: this Python's fusefs.cli)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = [b for b in args.only.split(",") if b]
    unknown = set(only) - set(BENCHES)
    if unknown:
        print(f"bench_dirents: unknown benchmark {sorted(unknown)}", file=sys.stderr)
        return 2
    repeat = 2 if args.quick else 3
    result: dict[str, Any] = {}
    try:
        if "memory" in only:
            result["memory"] = bench_memory(N_MEMORY)
            print("memory:", json.dumps(result["memory"]))
        if "readdir" in only:
            result["readdir"] = bench_readdir(N_READDIR // 10 if args.quick else N_READDIR, repeat)
            print("readdir:", json.dumps(result["readdir"]))
        if "opendir" in only:
            result["opendir"] = bench_opendir(N_READDIR // 10 if args.quick else N_READDIR, repeat)
            print("opendir:", json.dumps(result["opendir"]))
        if "listdir" in only:
            small = 2_000 if args.quick else 10_000
            result["listdir"] = bench_listdir(small, 2 * repeat + 1, args.cli.split())
            print("listdir:", json.dumps(result["listdir"]))
    except BenchError as e:
        print(f"bench_dirents: {e}", file=sys.stderr)
        return 1
    result["targets_met"] = all(r["target_met"] for r in result.values())
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
