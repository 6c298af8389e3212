"""tools/sharding.py and the campaign's and the sweep's use of it, without a mount:
the partition (deterministic, disjoint, covering, balanced), the fingerprints,
merge's refusals, and a merge of a report split by the partition giving back
the report's outcome table."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.campaign.merge import merge_reports, table_differences
from tools.campaign.plan import powercut_cost, run_id
from tools.campaign.report import outcome_table
from tools.campaign.run import RunConfig
from tools.fsx.sweep import parse_seeds
from tools.sharding import (
    MergeError,
    Shard,
    fingerprint,
    load_shards,
    merge_runs,
    partition,
    plan_id,
    shard_section,
    without_options,
)


@given(st.lists(st.integers(0, 10_000), max_size=60), st.integers(1, 9))
def test_partition_is_disjoint_covering_and_balanced(costs: list[int], count: int) -> None:
    shards = partition(costs, count)
    assert len(shards) == count
    every = sorted(i for shard in shards for i in shard)
    assert every == list(range(len(costs)))  # each run in exactly one shard
    assert all(shard == sorted(shard) for shard in shards)  # in run-list order
    loads = [sum(costs[i] for i in shard) for shard in shards]
    # Greedy list scheduling: the dearest shard got its last run while it was
    # the cheapest, so it exceeds the cheapest by at most one run's cost.
    assert max(loads) - min(loads) <= max(costs, default=0)
    assert partition(list(costs), count) == shards  # deterministic


def test_partition_breaks_ties_by_position_then_shard() -> None:
    assert partition([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert partition([1, 9, 1, 9, 1], 2) == [[0, 1, 4], [2, 3]]
    assert partition([], 3) == [[], [], []]
    assert partition([3, 3], 4) == [[0], [1], [], []]


def test_shard_parse() -> None:
    assert Shard.parse("2/4") == Shard(2, 4)
    assert str(Shard.parse(" 4/4 ")) == "4/4"
    for bad in ("0/4", "5/4", "1/0", "a/b", "1", "1/2/3", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_plan_id_and_fingerprint() -> None:
    a = plan_id({"seed": 1}, ["x", "y"])
    assert a == plan_id({"seed": 1}, ["x", "y"])
    assert a != plan_id({"seed": 2}, ["x", "y"])
    assert a != plan_id({"seed": 1}, ["y", "x"])  # the order is the report's
    assert fingerprint(a, 2) != fingerprint(a, 3)


def test_without_options() -> None:
    argv = ["--seeds", "1-4", "-S3", "-P", "d", "--shard=1/2", "-N", "50", "f"]
    assert without_options(argv, ("--seeds", "--shard", "-S", "-P")) == ["-N", "50", "f"]


def test_parse_seeds() -> None:
    assert parse_seeds("3-6") == [3, 4, 5, 6]
    assert parse_seeds("1,4-5,9") == [1, 4, 5, 9]
    for bad in ("0-3", "5-2", "x", "1-3,3"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_a_late_cut_is_expected_to_cost_more() -> None:
    cfg = RunConfig(out=Path("/nonexistent"))
    assert powercut_cost(cfg, 10, 300) < powercut_cost(cfg, 290, 300)
    assert powercut_cost(cfg, 10, None) == powercut_cost(cfg, 99, None)


# merging reports:


def _run(kind: str, site: str, mode: str, outcome: str) -> dict[str, Any]:
    return {
        "kind": kind, "site": site, "mode": mode, "outcome": outcome, "fired": 1, "errors": {},
        "detail": "", "notes": [], "seconds": 1.0, "reproducer": {}, "workdir": "/x", "ops": 3,
        "events": None, "flush_events": [],
    }  # fmt: skip


def _campaign() -> dict[str, Any]:
    sites = ["blockdev_write", "blockdev_flush", "direct_read_buffer"]
    runs = [
        _run("fault", s, m, "not reached" if s == "direct_read_buffer" else "clean")
        for s in sites
        for m in ("oneshot", "frequency 3")
    ]
    cuts = [_run("powercut", f"cut@{p}", "drop" if i % 2 == 0 else "torn", "clean")
            for i, p in enumerate((5, 40, 77, 150))]  # fmt: skip
    return {
        "kind": "campaign", "plan_id": "", "started": "2026-01-01T00:00:00", "seconds": 10.0,
        "argv": [], "seed": 1, "modes": ["oneshot", "frequency 3"], "workloads": ["meta"],
        "sites_total": 3, "sites_per_class": {"io": 3},
        "sites": [{"name": s, "class": "io", "module": "m", "location": "l"} for s in sites],
        "counts": {}, "matrix": {}, "runs": runs, "skipped": [], "budget_exhausted": False,
        "interrupted": False,
        "powercut": {"requested": 4, "workload_events": 160, "counts": {}, "runs": cuts},
        "shard": None,
    }  # fmt: skip


def _split(doc: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """``doc`` as ``count`` shards would have reported it."""
    every = [*doc["runs"], *doc["powercut"]["runs"]]
    ids = [run_id(r) for r in every]
    costs = [3000 if r["kind"] == "fault" else 1000 + 2 * i for i, r in enumerate(every)]
    pid = plan_id({}, ids)
    shards = []
    for k, mine in enumerate(partition(costs, count), start=1):
        part = copy.deepcopy(doc)
        part["plan_id"] = pid
        part["runs"] = [every[i] for i in mine if every[i]["kind"] == "fault"]
        part["powercut"]["runs"] = [every[i] for i in mine if every[i]["kind"] == "powercut"]
        part["shard"] = shard_section(Shard(k, count), pid, ids, costs, mine)
        part["seconds"] = float(k)
        shards.append(part)
    return shards


@pytest.mark.parametrize("count", [1, 2, 3, 4, 10])
def test_shards_merge_to_the_whole_report(count: int) -> None:
    doc = _campaign()
    shards = _split(doc, count)
    merged = merge_reports(shards, [f"s{k}" for k in range(count)])
    assert outcome_table(merged) == outcome_table(doc)
    assert merged["matrix"]["direct_read_buffer"] == {
        "oneshot": "not reached",
        "frequency 3": "not reached",
    }
    assert merged["counts"]["clean"] == 4
    assert merged["powercut"]["counts"]["clean"] == 4
    assert merged["seconds"] == float(count)  # the slowest shard
    assert merged["shard"] is None
    assert len(merged["merged"]["shards"]) == count
    doc["plan_id"] = merged["plan_id"]
    assert table_differences(merged, doc) == []


def test_table_differences_name_the_run() -> None:
    doc = _campaign()
    other = copy.deepcopy(doc)
    other["runs"][1]["outcome"] = "crash"
    (line,) = table_differences(doc, other)
    assert line.startswith("run 2: ") and "crash" in line  # noqa: PT018


def _refusal(tmp_path: Path, shards: list[dict[str, Any]]) -> str:
    paths = []
    for doc in shards:
        d = Path(tempfile.mkdtemp(dir=tmp_path))
        (d / "matrix.json").write_text(json.dumps(doc))
        paths.append(d)
    with pytest.raises(MergeError) as e:
        load_shards(paths, "matrix.json", "campaign")
    message = str(e.value)
    assert "\n" not in message
    return message


def test_merge_refuses_a_missing_shard(tmp_path: Path) -> None:
    shards = _split(_campaign(), 3)
    assert "missing shard(s) 2 of 3" in _refusal(tmp_path, [shards[0], shards[2]])


def test_merge_refuses_a_duplicate_shard(tmp_path: Path) -> None:
    shards = _split(_campaign(), 2)
    assert "duplicate shard 2/2" in _refusal(tmp_path, [*shards, shards[1]])


def test_merge_refuses_shards_of_other_campaigns(tmp_path: Path) -> None:
    two = _split(_campaign(), 2)
    three = _split(_campaign(), 3)
    assert "another campaign" in _refusal(tmp_path, [two[0], three[1]])
    other = _campaign()
    other["runs"].pop()
    assert "another campaign" in _refusal(tmp_path, [two[0], _split(other, 2)[1]])


def test_merge_refuses_reports_that_are_no_shards(tmp_path: Path) -> None:
    assert "not a shard" in _refusal(tmp_path, [_campaign()])
    sweep = {"kind": "fsx-sweep", "shard": {}}
    assert "not a campaign report" in _refusal(tmp_path, [sweep])


def test_merge_runs_refuses_a_run_twice_or_unplanned() -> None:
    shards = _split(_campaign(), 2)
    shards[1]["runs"].append(shards[0]["runs"][0])
    with pytest.raises(MergeError, match="two shards"):
        merge_reports(shards, [])
    shards = _split(_campaign(), 2)
    shards[0]["runs"].append(_run("fault", "nowhere", "oneshot", "clean"))
    with pytest.raises(MergeError, match="not planned"):
        merge_runs(shards, lambda d: d["runs"], run_id)
