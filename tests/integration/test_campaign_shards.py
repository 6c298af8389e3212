"""Sharded runs merge to the single run, run by run, through the real commands.

A small campaign -- three sites whose outcomes are fixed (clean, corruption
from the self-test site that corrupts a write, not reached) and three power cuts
at given device events -- runs once whole and once as three shards side by side
(``fusefs-campaign --shard K/3``); ``fusefs-campaign merge`` of the shards must
give the whole run's outcome table (tools/campaign/report.py: run ids, order,
kind, site, mode, outcome), and ``fusefs-campaign compare`` must say so.  Merge
refuses a missing shard, a duplicate, and shards of another campaign.  The same
for an fsx seed sweep on a plain directory (``fusefs-fsx --seeds --shard``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools.campaign.report import outcome_table

CAMPAIGN = [sys.executable, "-m", "tools.campaign"]
FSX = [sys.executable, "-m", "tools.fsx"]
ARGS = (
    *("--name", "blockdev_write", "--name", "blockdev_corrupt_write"),
    *("--name", "direct_read_buffer", "--workload", "meta,cycle", "--ops", "24"),
    *("--cycles", "1", "--power-cut-at", "10", "--power-cut-at", "25", "--power-cut-at", "40"),
)
SHARDS = 3


def _run(*argv: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def _doc(path: Path, name: str = "matrix.json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / name).read_text())
    return data


@pytest.fixture(scope="module")
def campaign_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole campaign in ``single``, its shards in ``shard-K``, started
    together (the shards one at a time on each of the two cores)."""
    from tests.integration.conftest import require_fuse

    require_fuse()
    base = tmp_path_factory.mktemp("shards")
    procs = [
        subprocess.Popen(
            [*CAMPAIGN, *ARGS, "--shard", f"{k}/{SHARDS}", "--out", str(base / f"shard-{k}"), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(1, SHARDS + 1)
    ]
    single = _run(*CAMPAIGN, *ARGS, "--out", str(base / "single"), "-q")
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode in (0, 1), out
    assert single.returncode == 1, single.stdout + single.stderr  # the corruption self-test
    return base


@pytest.mark.mount
def test_shards_merge_to_the_single_run(campaign_runs: Path) -> None:
    base = campaign_runs
    shards = [base / f"shard-{k}" for k in range(1, SHARDS + 1)]
    merged = _run(*CAMPAIGN, "merge", *map(str, shards), "--out", str(base / "merged"))
    assert merged.returncode == 1, merged.stdout + merged.stderr  # it holds the corruption
    whole, folded = _doc(base / "single"), _doc(base / "merged")
    assert outcome_table(folded) == outcome_table(whole)
    assert [r[3] for r in outcome_table(whole)[:3]] == ["clean", "corruption", "not reached"]
    assert len(outcome_table(whole)) == 6
    assert folded["plan_id"] == whole["plan_id"]
    assert folded["matrix"] == whole["matrix"]
    assert folded["counts"] == whole["counts"]
    assert folded["powercut"]["counts"] == whole["powercut"]["counts"]
    same = _run(*CAMPAIGN, "compare", str(base / "merged"), str(base / "single"))
    assert same.returncode == 0, same.stdout
    assert "same outcome table: 6 runs" in same.stdout
    markdown = (base / "merged" / "matrix.md").read_text()
    assert f"Merged from {SHARDS} shards" in markdown
    assert "| `blockdev_corrupt_write` | io:selftest | **corruption**" in markdown

    # Each shard ran its own slice: disjoint, covering, every shard computing
    # the same partition of the same plan.
    sections = [_doc(s)["shard"] for s in shards]
    assert len({s["fingerprint"] for s in sections}) == 1
    assigned = [rid for s in sections for rid in s["assigned"]]
    assert sorted(assigned) == sorted(sections[0]["plan_runs"])
    assert len(assigned) == len(set(assigned)) == 6


@pytest.mark.mount
def test_merge_refuses_missing_duplicate_and_foreign_shards(campaign_runs: Path) -> None:
    base = campaign_runs
    one, two, three = (str(base / f"shard-{k}") for k in range(1, SHARDS + 1))
    for dirs, why in [
        ((one, three), "missing shard(s) 2 of 3"),
        ((one, two, three, two), "duplicate shard 2/3"),
        ((one, two, str(base / "single")), "not a shard's report"),
    ]:
        done = _run(*CAMPAIGN, "merge", *dirs, "--out", str(base / "refused"))
        assert done.returncode == 2, done.stdout + done.stderr
        assert why in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (base / "refused").exists()
    # A shard of the same runs in another partition is another campaign's shard.
    foreign = json.loads((base / "shard-2" / "matrix.json").read_text())
    foreign["shard"]["fingerprint"] = "0" * 16
    (base / "foreign").mkdir()
    (base / "foreign" / "matrix.json").write_text(json.dumps(foreign))
    done = _run(*CAMPAIGN, "merge", one, str(base / "foreign"), three, "--out", str(base / "x"))
    assert done.returncode == 2
    assert "shard of another campaign" in done.stderr


def test_fsx_sweep_shards_merge_to_the_single_sweep(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    flags = ("-N", "200", "-q", str(target / "f"))
    single = _run(*FSX, "--seeds", "1-5", "-P", str(tmp_path / "single"), *flags)
    assert single.returncode == 0, single.stdout + single.stderr
    for k in (1, 2):
        done = _run(
            *FSX, "--seeds", "1-5", "--shard", f"{k}/2", "-P", str(tmp_path / f"s{k}"), *flags
        )
        assert done.returncode == 0, done.stdout + done.stderr
    merged = _run(
        *FSX, "merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")
    )
    assert merged.returncode == 0, merged.stdout + merged.stderr
    whole, folded = _doc(tmp_path / "single", "sweep.json"), _doc(tmp_path / "m", "sweep.json")
    table = [(r["id"], r["outcome"]) for r in folded["runs"]]
    assert table == [(r["id"], r["outcome"]) for r in whole["runs"]]
    assert table == [(f"seed {s}", "passed") for s in range(1, 6)]
    assert (tmp_path / "s1" / "seed-1").is_dir()
    assert (tmp_path / "s2" / "seed-2").is_dir()
    assert "| 5 | passed |" in (tmp_path / "m" / "sweep.md").read_text()

    # A shard of a sweep with other flags is refused.
    other = _run(
        *FSX,
        "--seeds",
        "1-5",
        "--shard",
        "2/2",
        "-P",
        str(tmp_path / "o"),
        "-N",
        "100",
        "-q",
        str(target / "f"),
    )
    assert other.returncode == 0
    done = _run(
        *FSX, "merge", str(tmp_path / "s1"), str(tmp_path / "o"), "--out", str(tmp_path / "x")
    )
    assert done.returncode == 2
    assert "shard of another fsx-sweep" in done.stderr
