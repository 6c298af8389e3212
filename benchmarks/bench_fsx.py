"""fusefs-fsx on a fusefs mount beside a plain directory, in one run.

The same op sequences (same seeds, same flags) run on three targets, taking turns:

- ``kernel``: a fusefs mount with ``--fallocate-route auto`` (the default):
  fallocate(2) for every mode the kernel forwards (alloc, keep_size, punch, zero,
  zero+keep_size), ``.fusefs/fallocate`` for collapse and insert;
- ``control``: the same mount with ``--fallocate-route control``: every mode
  through the control file, as before fallocate(2) reached fusefs;
- ``plain``: a directory of the local filesystem that holds the temporary
  directory, fallocate(2) for every mode it supports.

Every run checks SEEK_DATA/SEEK_HOLE against the model after each write,
fallocate and truncate (exactly on fusefs; holes-read-as-zeros elsewhere:
docs/fsx.md).  Reported: ops/s of each (the best of the rounds for each seed, then
summed over the seeds as total ops / total seconds), the ratio to the plain
directory, and the mount's counters: how many fallocate requests of each mode
arrived by which route (``fallocate.kernel.MODE``, ``fallocate.control.MODE``)
and how many SEEK_DATA/SEEK_HOLE requests.

Run: ``python -m benchmarks.bench_fsx [--ops N] [--seeds 1,2] [--rounds R] [--dir DIR]``.
Ends with ``RESULT {json}``.  Exits 1 if any run fails: a failure is a bug, not a
number.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from benchmarks import run_main
from benchmarks.targets import BenchError, fusefs_mounted

FSX: Final = [sys.executable, "-m", "tools.fsx"]
_PASSED: Final = re.compile(r"all (\d+) ops passed in ([0-9.]+) s")


def counters(mountpoint: Path) -> dict[str, int]:
    out = {}
    for line in (mountpoint / ".fusefs" / "stats").read_text().splitlines():
        key, _, value = line.partition(": ")
        if key.startswith("fallocate.") or key in ("seek_data", "seek_hole"):
            out[key] = int(value)
    return out


def fsx(path: Path, seed: int, ops: int, route: str | None) -> tuple[int, float]:
    """One run: (ops, seconds); BenchError with the tool's report if it failed."""
    argv = [*FSX, "-N", str(ops), "-S", str(seed), "-P", str(path.parent)]
    if route is not None:
        argv += ["--fallocate-route", route]
    done = subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, timeout=1800, check=False
    )
    m = _PASSED.search(done.stdout)
    if done.returncode != 0 or m is None:
        raise BenchError(f"fsx {' '.join(argv[2:])} {path}: exit {done.returncode}\n{done.stdout}")
    return int(m[1]), float(m[2])


def run(args: argparse.Namespace) -> int:
    cli = [sys.executable, "-m", "fusefs.cli"]
    seeds = [int(s) for s in args.seeds.split(",")]
    errors: list[str] = []
    best: dict[str, dict[int, float]] = {"kernel": {}, "control": {}, "plain": {}}
    ops_done: dict[str, dict[int, int]] = {"kernel": {}, "control": {}, "plain": {}}
    deltas: dict[str, dict[str, int]] = {"kernel": {}, "control": {}}
    with tempfile.TemporaryDirectory(prefix="bench-fsx-", dir=args.dir) as tmp:
        work = Path(tmp)
        plain = work / "plain"
        plain.mkdir()
        with fusefs_mounted(cli, work, "", errors) as target:
            for _ in range(args.rounds):
                for seed in seeds:
                    for name in ("kernel", "control", "plain"):
                        root = plain if name == "plain" else target.root
                        route = {"kernel": "auto", "control": "control"}.get(name)
                        before = counters(target.root) if name != "plain" else {}
                        n, seconds = fsx(root / f"fsx-{name}", seed, args.ops, route)
                        if name != "plain":
                            after = counters(target.root)
                            for key, value in after.items():
                                moved = value - before.get(key, 0)
                                if moved:
                                    deltas[name][key] = deltas[name].get(key, 0) + moved
                        ops_done[name][seed] = n
                        best[name][seed] = min(best[name].get(seed, seconds), seconds)
    if errors:
        print(f"bench_fsx: {'; '.join(errors)}", file=sys.stderr)
        return 1
    rate = {name: sum(ops_done[name].values()) / sum(best[name].values()) for name in best}
    ratio = {name: round(rate[name] / rate["plain"], 2) for name in ("kernel", "control")}
    print(f"fsx, {args.ops} ops x seeds {args.seeds}, best of {args.rounds}:")
    for name in ("kernel", "control", "plain"):
        extra = f"  ({ratio[name]:.2f} x plain)" if name in ratio else ""
        print(f"  {name:8s} {rate[name]:8.0f} ops/s{extra}")
    for name in ("kernel", "control"):
        print(f"  requests on the mount, {name} runs (all rounds):")
        for key, value in sorted(deltas[name].items()):
            print(f"    {key}: {value}")
    result = {
        "ops": args.ops,
        "seeds": seeds,
        "rounds": args.rounds,
        "ops_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_to_plain": ratio,
        "requests": deltas,
        "machine": platform.platform(),
    }
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_fsx", description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=3000, help="ops per run (default 3000)")
    p.add_argument("--seeds", default="1,2", help="seeds, comma-separated (default 1,2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the best counts (default 2)")
    p.add_argument("--dir", default=None, help="where the image and the plain files go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv, (BenchError, OSError, subprocess.TimeoutExpired))


if __name__ == "__main__":
    sys.exit(main())
