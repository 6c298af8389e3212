"""The main job: make an image, mount it, work on it, check it, show the results.

Run by ``scripts/demo``.  Every step goes through the real command-line entry
points and real syscalls on the mounted filesystem; any mismatch stops the run
with a non-zero exit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


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


def timed(label: str, results: list[tuple[str, str, float]], fn: Callable[[], str]) -> None:
    start = time.perf_counter()
    outcome = fn()
    results.append((label, outcome, time.perf_counter() - start))
    console.print(f"  {label}: {outcome}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="512M", help="image size (default 512M)")
    parser.add_argument("--seed", type=int, default=2018)
    args = parser.parse_args(argv)

    results: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="fusefs-demo-") as tmp:
        image = Path(tmp) / "demo.img"
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        console.rule("fusefs demo")
        timed(
            "mkfs",
            results,
            lambda: fusefs("mkfs", str(image), "--size", args.size).stdout.strip() or "ok",
        )
        timed(
            "mount", results, lambda: fusefs("mount", str(image), str(mnt)).stdout.strip() or "ok"
        )
        try:
            digests: dict[str, str] = {}

            def write() -> str:
                digests.update(build_tree(mnt, args.seed))
                total = sum((mnt / p).stat().st_size for p in digests)
                return f"{len(digests)} files, {total / 2**20:.1f} MiB"

            timed("write tree", results, write)
            timed("verify", results, lambda: f"{verify_tree(mnt, digests)} mismatches")
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
            bad = verify_tree(mnt, digests)
            timed("remount + verify", results, lambda: f"{bad} mismatches")
        finally:
            fusefs("umount", str(mnt))
        timed(
            "fsck again",
            results,
            lambda: fusefs("fsck", str(image)).stdout.strip().splitlines()[-1],
        )

    table = Table(title="fusefs demo summary")
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for label, outcome, secs in results:
        table.add_row(label, outcome, f"{secs:.2f}")
    console.print(table)
    failed = any("mismatches" in o and not o.startswith("0 ") for _, o, _ in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
