"""The main job: make an image, mount it, work on it, check it, show the results.

Run by ``scripts/demo``.  Every step goes through the real command-line entry
points and real syscalls on the mounted filesystem; any mismatch stops the run
with a non-zero exit.  The image and its mount live in a temporary directory,
removed at the end; what is worth reading afterwards -- fsx's logs of the
lock-off failure, the campaign's matrix and reproducers -- goes to a directory
that is kept (``--logs``), and only paths in it are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from fusefs.demo import demo_console, race_table
from tools.campaign.cli import run_demo as run_campaign_demo
from tools.fsx.cli import demo as fsx_demo

console = demo_console()


def fusefs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fusefs.cli", *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: fusefs {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def build_tree(root: Path, seed: int) -> dict[str, str]:
    """Write a tree of files of assorted sizes; return path → sha256."""
    rng = random.Random(seed)
    digests: dict[str, str] = {}
    for d in range(4):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(12):
            size = rng.choice([0, 1, 100, 4095, 4096, 4097, 65536, 300_000, 1 << 20])
            data = rng.randbytes(size)
            path = sub / f"file{f}.bin"
            path.write_bytes(data)
            digests[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    (root / "dir0" / "link").symlink_to("nested/file0.bin")
    os.link(root / "dir1" / "nested" / "file1.bin", root / "dir1" / "hardlink")
    digests["dir1/hardlink"] = digests["dir1/nested/file1.bin"]
    os.setxattr(root / "dir2", "user.demo", b"fusefs")
    return digests


def verify_tree(root: Path, digests: dict[str, str]) -> int:
    bad = 0
    for rel, digest in digests.items():
        if hashlib.sha256((root / rel).read_bytes()).hexdigest() != digest:
            console.print(f"[red]mismatch[/red] {rel}")
            bad += 1
    if os.readlink(root / "dir0" / "link") != "nested/file0.bin":
        bad += 1
    if os.getxattr(root / "dir2", "user.demo") != b"fusefs":
        bad += 1
    return bad


BS = 4096


def control(mnt: Path, name: str, text: str) -> None:
    fd = os.open(mnt / ".fusefs" / name, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def mixed_io(mnt: Path, seed: int) -> str:
    """Buffered and O_DIRECT IO on one file, then a collapse and an insert, each
    checked byte for byte against a model of what the file must hold."""
    rng = random.Random(seed)
    path = mnt / "mixed.bin"
    model = bytearray(rng.randbytes(64 * BS))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 16 * BS)  # page-aligned for O_DIRECT
    checks = 0
    try:
        os.pwrite(fd, model, 0)  # buffered: in the page cache, dirty
        for _ in range(40):
            off = rng.randrange(0, 48) * BS
            n = rng.randrange(1, 16) * BS
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                buf[:n] = data
                os.pwrite(dfd, memoryview(buf)[:n], off)  # O_DIRECT write
            else:
                data = rng.randbytes(rng.randrange(1, 3 * BS))
                n = len(data)
                off += rng.randrange(0, BS)
                os.pwrite(fd, data, off)  # buffered, unaligned
            model[off : off + n] = data
            # Each side must see the other's writes.
            if os.pread(fd, len(model), 0) != model:
                raise SystemExit("demo: buffered read disagrees after mixed IO")
            got = os.preadv(dfd, [buf], 0)
            if bytes(buf[:got]) != bytes(model[:got]):
                raise SystemExit("demo: O_DIRECT read disagrees after mixed IO")
            checks += 2
        size = len(model)
        control(mnt, "fallocate", f"path=mixed.bin mode=collapse offset={8 * BS} length={4 * BS}")
        del model[8 * BS : 12 * BS]
        control(mnt, "fallocate", f"path=mixed.bin mode=insert offset={2 * BS} length={3 * BS}")
        model[2 * BS : 2 * BS] = bytes(3 * BS)
        if os.fstat(fd).st_size != len(model) or os.pread(fd, size, 0) != model:
            raise SystemExit("demo: collapse/insert result disagrees with the model")
        os.fsync(fd)
        control(mnt, "drop_caches", "1")
        if os.pread(fd, size, 0) != model:
            raise SystemExit("demo: data after drop_caches disagrees with the model")
        checks += 2
    finally:
        os.close(dfd)
        os.close(fd)
    return f"{checks} byte-for-byte checks passed"


def concurrent_mix(mnt: Path, seconds: float = 2.0) -> str:
    """Readers, an O_DIRECT writer and fallocate/truncate on one file at once:
    the pagecache lock's two sides in contention.  Ends with a consistency
    check: after the writers stop, buffered and O_DIRECT reads agree."""
    path = mnt / "contended.bin"
    path.write_bytes(random.Random(7).randbytes(256 * BS))
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []
    counts = {"reads": 0, "direct_writes": 0, "fallocates": 0}

    def reader() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            while time.monotonic() < stop:
                for off in range(0, 256 * BS, 16 * BS):  # sequential: readahead
                    os.pread(fd, 16 * BS, off)
                    counts["reads"] += 1
        finally:
            os.close(fd)

    def direct_writer() -> None:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4 * BS)
        rng = random.Random(1)
        try:
            while time.monotonic() < stop:
                buf[:] = rng.randbytes(4 * BS)
                os.pwrite(fd, buf, rng.randrange(0, 250) * BS)
                counts["direct_writes"] += 1
        finally:
            os.close(fd)

    def mangler() -> None:
        rng = random.Random(2)
        while time.monotonic() < stop:
            mode = rng.choice(["punch", "zero", "alloc"])
            off = rng.randrange(0, 250) * BS
            control(mnt, "fallocate", f"path=contended.bin mode={mode} offset={off} length={BS}")
            counts["fallocates"] += 1

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [
        threading.Thread(target=guarded(f)) for f in (reader, reader, direct_writer, mangler)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"demo: concurrent mix failed: {errors[0]!r}")
    fd = os.open(path, os.O_RDONLY)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffered = os.pread(fd, 256 * BS, 0)
        buf = mmap.mmap(-1, 256 * BS)
        os.preadv(dfd, [buf], 0)
        if bytes(buf) != buffered:
            raise SystemExit("demo: buffered and O_DIRECT reads disagree after the mix")
    finally:
        os.close(fd)
        os.close(dfd)
    return (
        f"{counts['reads']} reads, {counts['direct_writes']} O_DIRECT writes, "
        f"{counts['fallocates']} fallocates; buffered == O_DIRECT afterwards"
    )


def sequential_reads(mnt: Path, digests: dict[str, str]) -> str:
    control(mnt, "drop_caches", "1")
    for rel in digests:
        with open(mnt / rel, "rb", buffering=0) as f:
            while f.read(64 * 1024):
                pass
    return "after drop_caches"


def stats(mnt: Path) -> dict[str, str]:
    out = {}
    for line in (mnt / ".fusefs" / "stats").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def cache_summary(st: dict[str, str]) -> str:
    cached = int(st["cache_bytes"]) >> 20
    limit = int(st["cache_limit_bytes"]) >> 20
    return (
        f"{cached} MiB cached of {limit} MiB; hits {st['cache_hits']} "
        f"misses {st['cache_misses']}; readahead {st['readahead_used']}/"
        f"{st['readahead_issued']} pages used; lock waits: add {st['lock_add_waits']} "
        f"({float(st['lock_add_wait_seconds']):.3f} s), block {st['lock_block_waits']} "
        f"({float(st['lock_block_wait_seconds']):.3f} s), readahead gave way "
        f"{st['lock_tryget_failures']}x"
    )


def timed(label: str, results: list[tuple[str, str, float]], fn: Callable[[], str]) -> None:
    start = time.perf_counter()
    outcome = fn()
    results.append((label, outcome, time.perf_counter() - start))
    console.print(f"  {label}: {outcome}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="512M", help="image size (default 512M)")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument(
        "--logs", metavar="DIR", help="where the logs and reports go (default: a new /tmp dir)"
    )
    args = parser.parse_args(argv)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="fusefs-demo-logs-"))
    logs.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        style = "yellow" if "expected" in line else "cyan"
        console.print(f"[{style}]demo: {line}[/{style}]", highlight=False)

    results: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="fusefs-demo-") as tmp:
        image = Path(tmp) / "demo.img"
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        console.rule("fusefs demo")

        def mkfs() -> str:
            # The image goes with the temporary directory: its path is not worth printing.
            made = fusefs("mkfs", str(image), "--size", args.size).stdout.strip()
            return made.rpartition(": ")[2]

        timed("mkfs", results, mkfs)
        timed(
            "mount", results, lambda: fusefs("mount", str(image), str(mnt)).stdout.strip() or "ok"
        )
        fsx_ok = False
        try:
            digests: dict[str, str] = {}

            def write() -> str:
                digests.update(build_tree(mnt, args.seed))
                total = sum((mnt / p).stat().st_size for p in digests)
                return f"{len(digests)} files, {total / 2**20:.1f} MiB"

            timed("write tree", results, write)
            timed("verify", results, lambda: f"{verify_tree(mnt, digests)} mismatches")
            timed(
                "buffered + O_DIRECT + collapse/insert", results, lambda: mixed_io(mnt, args.seed)
            )
            timed("concurrent readers/O_DIRECT/fallocate", results, lambda: concurrent_mix(mnt))
            console.rule("fusefs-fsx: stress, then seed 7 with the lock off and on")
            fsx_log = logs / "fsx"
            fsx_log.mkdir(exist_ok=True)
            start = time.perf_counter()
            fsx_ok = fsx_demo(str(mnt), str(fsx_log), say=say)
            results.append(
                (
                    "fsx: 2000 ops (buffered+O_DIRECT+every fallocate, under pressure and chaos); "
                    "lock off fails, on passes",
                    "as expected" if fsx_ok else "UNEXPECTED (see above)",
                    time.perf_counter() - start,
                )
            )
            timed("sequential re-read of the tree", results, lambda: sequential_reads(mnt, digests))
            st = stats(mnt)
            timed("cache and lock", results, lambda: cache_summary(st))
            listing = (mnt / ".fusefs" / "dynamic_fault").read_text().splitlines()
            sites = [line for line in listing if line and not line.startswith("#")]
            timed("fault sites", results, lambda: f"{len(sites)} listed")
            for line in sites:
                console.print(f"    {line}", highlight=False)
        finally:
            timed("umount", results, lambda: fusefs("umount", str(mnt)).stdout.strip() or "clean")
        timed("fsck", results, lambda: fusefs("fsck", str(image)).stdout.strip().splitlines()[-1])
        fusefs("mount", str(image), str(mnt))
        try:
            timed("remount + verify", results, lambda: f"{verify_tree(mnt, digests)} mismatches")
        finally:
            fusefs("umount", str(mnt))
        timed(
            "fsck again",
            results,
            lambda: fusefs("fsck", str(image)).stdout.strip().splitlines()[-1],
        )
    console.rule("the races the pagecache add lock closes")
    start = time.perf_counter()
    races_ok = race_table(console=console)
    results.append(
        (
            "races (lock off wrong, lock on right)",
            "all six" if races_ok else "FAILED",
            time.perf_counter() - start,
        )
    )
    console.rule("fault campaign over the io class, and 20 power cuts")
    start = time.perf_counter()
    campaign_rc = run_campaign_demo(logs / "campaign")
    results.append(
        (
            "campaign: io sites x oneshot, 20 power cuts",
            "every run clean or not reached" if campaign_rc == 0 else "FAILURES (see above)",
            time.perf_counter() - start,
        )
    )

    table = Table(title="fusefs demo summary")
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for label, outcome, secs in results:
        table.add_row(label, outcome, f"{secs:.2f}")
    console.print(table)
    console.print(
        f"kept in {logs}: fsx/ (the logs and minimized op list of the expected lock-off "
        "failure), campaign/ (the matrix and its reproducers)",
        highlight=False,
    )
    failed = (
        not races_ok
        or not fsx_ok
        or campaign_rc != 0
        or any("mismatches" in o and not o.startswith("0 ") for _, o, _ in results)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
