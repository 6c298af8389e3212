"""fusefs-fsx under other processes' pressure (``--pressure``, ``--chaos``), and
the proof that it finds the lost-write bugs it was built for.

A few seeds of each configuration the lost-write issue named: eviction (a
process streaming through a 1 MiB cache), a ``drop_caches`` loop beside
writes and truncates, the chaos schedule, O_DIRECT mixed in.  Each must pass
with the lock on.  Then each of the two bugs, brought back by its self-test
site (``buffered_write_into_evicted_page``, ``truncate_zero_under_dirty_page``),
must be found: the tooling is only worth what it catches.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tools.fsx import cli as fsx

from .conftest import FuseMount, control_read
from .test_fsx import fsx_cli, output

# The read/write/truncate mix with small ops over a small file: a truncate often
# lands in a page a write has just dirtied (docs/fsx.md, "Pressure").
TRUNCATE_MIX = ["-l", "64K", "-o", "8K", "--weights", "only:read=8,write=8,truncate=4"]

CONFIGS = {
    "eviction": ["--pressure", "stream,cache"],
    "drop-truncate": [*TRUNCATE_MIX, "--pressure", "drop"],
    "chaos": ["--chaos", "0.1", "--pressure", "all"],
    "direct": ["--weights", "dread=6,dwrite=6", "--pressure", "all"],
}


def nothing_left_switched(m: FuseMount) -> None:
    assert control_read(m.mountpoint, "cache_size") == f"{64 << 20}\n"
    assert control_read(m.mountpoint, "pagecache_lock").strip() == "on"
    assert " armed:0 " in control_read(m.mountpoint, "dynamic_fault").splitlines()[0] + " "
    assert not [n for n in os.listdir(m.mountpoint) if n.startswith(".pressure-")]


@pytest.mark.mount
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fsx_under_pressure_passes(
    shared_mount: FuseMount, work: str, tmp_path: Path, config: str, seed: int
) -> None:
    done = fsx_cli(
        "-N", "1500", "-S", str(seed), *CONFIGS[config], "-P", tmp_path, os.path.join(work, "f")
    )
    assert done.returncode == 0, output(done)
    assert "all 1500 ops passed" in done.stdout
    summary = re.search(r"fsx: pressure \(.*\): (.*)", done.stdout)
    assert summary, output(done)
    if "drop" in CONFIGS[config][-1] or "all" in CONFIGS[config]:
        assert re.search(r"drop: [1-9]\d* drops", summary[1]), summary[1]
    if "stream" in CONFIGS[config][-1] or "all" in CONFIGS[config]:
        assert re.search(r"stream: [1-9]\d* passes", summary[1]), summary[1]
    nothing_left_switched(shared_mount)


def finds(argv: list[str], target: str, tmp_path: Path, seeds: tuple[int, ...]) -> str:
    """The first failing run's output over ``seeds``; fails the test if none fails."""
    outputs = []
    for seed in seeds:
        done = fsx_cli(*argv, "-S", str(seed), "-P", tmp_path / str(seed), target)
        if done.returncode == fsx.EXIT_FAILED:
            return done.stdout
        assert done.returncode == 0, output(done)
        outputs.append(done.stdout.splitlines()[-2:])
    raise AssertionError(f"no seed of {seeds} found the bug: {outputs}")


@pytest.mark.mount
def test_pressure_finds_a_write_into_an_evicted_page(mnt: FuseMount, tmp_path: Path) -> None:
    """The writer's page dropped between its fill and the write, and the write
    made anyway (the first lost-write bug): found in a few hundred ops -- by a
    read, or, when a lost write was all that would have made a block data, by
    the seek check right after it (SEEK_HOLE finds a hole where it wrote)."""
    bug = "name buffered_write_into_evicted_page enable"
    argv = ["-N", "3000", "--pressure", "drop", "--chaos", "0.2", "--fault", bug]
    out = finds(argv, mnt.path("f"), tmp_path, (1, 2, 3))
    found = (
        r"FAILED: (read|readahead|full check after) op \d+: bad data"
        r"|FAILED: seek after op (\d+): SEEK_(HOLE|DATA) from \d+ gave \d+, the model says"
    )
    assert re.search(found, out), out
    nothing_left_switched(mnt)
    # With the bug left out the same run passes.
    done = fsx_cli(*argv[:-2], "-S", "1", "-P", tmp_path / "ok", mnt.path("g"))
    assert done.returncode == 0, output(done)


@pytest.mark.mount
def test_pressure_finds_truncate_zeroing_under_a_dirty_page(mnt: FuseMount, tmp_path: Path) -> None:
    """Truncate zeroing the EOF block on the device while writeback of its
    dirty page runs (the second lost-write bug): found within a few thousand
    ops of the truncate mix with drops and chaos windows.  Without the seek
    check: its lseeks pass a race site each, and the chaos windows they open
    (half of them, 5 ms on average) change the interleavings this run needs."""
    bug = "name truncate_zero_under_dirty_page enable"
    argv = [
        "-N", "6000", *TRUNCATE_MIX, "--pressure", "drop", "--pressure-interval", "5",
        "--chaos", "0.5", "--chaos-delay", "0-10", "--no-seek-check", "--fault", bug,
    ]  # fmt: skip
    out = finds(argv, mnt.path("f"), tmp_path, (2, 3, 1))
    assert re.search(r"FAILED: (read|full check after) op \d+: bad data", out), out
    nothing_left_switched(mnt)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pressure", "cache"], "--pressure cache needs a fusefs mount"),
        (["--pressure", "stream,bogus"], "unknown pressure kind(s) ['bogus']"),
        (["--chaos", "0.5"], "need a fusefs mount"),
        (["--chaos", "2"], "--chaos needs a probability in (0, 1]"),
        (["--weights", "write=x"], "'write=x': expected KIND=N with N >= 0"),
        (["--weights", "nope=1"], "unknown op kind 'nope'"),
        (["--weights", "only:fsync=0"], "every op kind left has weight 0"),
    ],
)
def test_bad_stress_options_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    done = fsx_cli("-N", "10", *args, "-P", tmp_path, tmp_path / "f")
    assert done.returncode == fsx.EXIT_USAGE, output(done)
    assert message in done.stderr, output(done)
    assert "Traceback" not in done.stderr


def test_stream_pressure_on_a_plain_directory(tmp_path: Path) -> None:
    done = fsx_cli("-N", "300", "-S", "4", "--pressure", "stream", "-P", tmp_path, tmp_path / "f")
    assert done.returncode == 0, output(done)
    assert re.search(r"stream: [1-9]\d* passes", done.stdout), output(done)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pressure-")]
