"""The IO benchmark's arithmetic: fio's JSON, ratios, goals, rounds, the memory row,
the table.  No timing, no mount."""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_io import (
    BY_NAME,
    QUICK,
    Bench,
    CacheMemory,
    FioError,
    Goal,
    Outcome,
    Workload,
    parse_fio,
    print_report,
    ratio,
    record_cache_memory,
    round_ratios,
    summarize,
    with_baseline,
)
from benchmarks.targets import Target


def fio_output(
    *, read_bytes: int = 0, write_bytes: int = 0, error: int = 0, before: str = "", after: str = ""
) -> str:
    def side(io_bytes: int) -> dict[str, Any]:
        return {
            "io_bytes": io_bytes,
            "bw_bytes": io_bytes // 2,  # as if it took 2 s
            "iops": io_bytes / 4096 / 2,
            "runtime": 2000 if io_bytes else 0,
        }

    job = {"jobname": "t", "error": error, "read": side(read_bytes), "write": side(write_bytes)}
    data = {"fio version": "fio-3.33", "jobs": [job]}
    return before + json.dumps(data, indent=2) + "\n" + after


def test_parse_fio_reads_the_direction_asked_for() -> None:
    text = fio_output(read_bytes=8 << 20, write_bytes=4 << 20)
    read = parse_fio(text, "read")
    assert read.io_bytes == 8 << 20
    assert read.bw_bytes == 4 << 20
    assert read.iops == 1024
    assert read.runtime_ms == 2000
    assert read.value("MB/s") == (4 << 20) / 1e6
    assert read.value("IOPS") == 1024
    assert parse_fio(text, "write").io_bytes == 4 << 20


def test_parse_fio_skips_notes_around_the_json() -> None:
    before = "note: both iodepth >= 1 and synchronous I/O engine are selected\n"
    after = "fio: file hash not empty on exit\n"
    result = parse_fio(fio_output(read_bytes=4096, before=before, after=after), "read")
    assert result.io_bytes == 4096


def test_parse_fio_reports_a_job_error_by_name() -> None:
    with pytest.raises(FioError, match="EIO"):
        parse_fio(fio_output(read_bytes=4096, error=5), "read")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fio: pid=1, err=2/file:filesetup.c", "no JSON"),
        ('{"jobs": []}', "unexpected fio JSON"),
        ('{"jobs": [{"error": 0, "read": {}}]}', "unexpected fio JSON"),
        (fio_output(write_bytes=4096), "no reads"),
    ],
)
def test_parse_fio_refuses_unusable_output(text: str, message: str) -> None:
    with pytest.raises(FioError, match=message):
        parse_fio(text, "read")


def test_ratio_is_none_without_both_numbers() -> None:
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(None, 200.0) is None
    assert ratio(50.0, None) is None
    assert ratio(50.0, 0.0) is None


def test_summarize_ratios_goals_and_raw_numbers() -> None:
    outcomes = [
        Outcome(BY_NAME["warm_randread_4k"], {"fusefs": 9000.0, "nullfs": 10000.0}),
        Outcome(BY_NAME["randwrite_4k"], {"fusefs": 4000.0, "nullfs": 10000.0}),
        Outcome(
            BY_NAME["seqwrite_1m"],
            {"fusefs": None, "plain": 300.0, "nullfs": 900.0},
            errors=["boom"],
        ),
        Outcome(
            BY_NAME["meta_10k"],
            {"fusefs": 1000.0, "plain": 4000.0, "nullfs": 1100.0},
            details={"files": 10000},
            rounds={"fusefs": [1000.0], "plain": [4000.0], "nullfs": [1100.0]},
        ),
    ]
    result = summarize(outcomes, quick=True)
    assert result["quick"] is True
    assert result["ratios"] == {
        "warm_randread_4k": 0.9,
        "randwrite_4k": 0.4,
        "seqwrite_1m": None,
        "seqwrite_1m_vs_nullfs": None,
        "meta_10k": 0.25,
        "meta_10k_vs_nullfs": 0.909,
    }
    assert result["references"]["meta_10k"] == "plain"
    assert result["references"]["meta_10k_vs_nullfs"] == "nullfs"
    # Exactly at the goal is met; a failed measurement is not; meta_10k is judged
    # against nullfs, not against its main reference.
    assert result["targets_met"] == {
        "warm_randread_4k": True,
        "randwrite_4k": False,
        "seqwrite_1m": False,
        "meta_10k": True,
    }
    assert result["targets"] == {
        "warm_randread_4k": 0.9,
        "randwrite_4k": 0.9,
        "seqwrite_1m": 1.0,
        "meta_10k": 0.9,
    }
    assert result["goals"]["meta_10k"] == {"ratio": "meta_10k_vs_nullfs", "op": ">=", "bound": 0.9}
    assert result["goals"]["seqwrite_1m"]["ratio"] == "seqwrite_1m"
    assert result["raw"]["meta_10k"] == {
        "unit": "files/s",
        "fusefs": 1000.0,
        "plain": 4000.0,
        "nullfs": 1100.0,
        "rounds": {"fusefs": [1000.0], "plain": [4000.0], "nullfs": [1100.0]},
        "round_ratios": {"meta_10k": [0.25], "meta_10k_vs_nullfs": [0.909]},
        "files": 10000,
    }
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize(
    "name", ["seqwrite_1m", "cold_seqread_1m", "direct_write_1m", "direct_read_1m"]
)
def test_sustained_rows_are_held_against_plain_and_shown_against_nullfs(name: str) -> None:
    w = BY_NAME[name]
    assert w.targets[0] == "fusefs"
    assert {"plain", "nullfs"} <= set(w.targets)
    assert w.references == ("plain", "nullfs")
    outcome = Outcome(w, {"fusefs": 400.0, "plain": 500.0, "nullfs": 1600.0})
    result = summarize([outcome])
    assert result["ratios"] == {name: 0.8, f"{name}_vs_nullfs": 0.25}
    assert result["references"] == {name: "plain", f"{name}_vs_nullfs": "nullfs"}
    if w.goal is not None:
        assert result["goals"][name]["ratio"] == name


def seqread_outcome(fusefs: list[float | None], nullfs: list[float | None]) -> Outcome:
    def best(values: list[float | None]) -> float | None:
        return max((v for v in values if v is not None), default=None)

    values = {"fusefs": best(fusefs), "nullfs": best(nullfs)}
    return Outcome(BY_NAME["warm_seqread_1m"], values, rounds={"fusefs": fusefs, "nullfs": nullfs})


def test_an_every_round_goal_is_judged_on_the_worst_round_pair() -> None:
    # Best against best is 1,800 / 1,900 = 0.947, over the goal; round 2 alone is
    # 1,500 / 1,800 = 0.833, under it.  Worst fusefs round against best nullfs round
    # (1,500 / 1,900) would say 0.789: the rounds are taken pairwise.
    outcome = seqread_outcome([1800.0, 1500.0, 1700.0], [1900.0, 1800.0, 1600.0])
    assert round_ratios(outcome, "nullfs") == pytest.approx([1800 / 1900, 1500 / 1800, 1700 / 1600])
    result = summarize([outcome])
    assert result["ratios"]["warm_seqread_1m"] == 0.947
    assert result["ratios"]["warm_seqread_1m_worst_round"] == 0.833
    assert result["references"]["warm_seqread_1m_worst_round"] == "nullfs"
    assert result["goals"]["warm_seqread_1m"]["ratio"] == "warm_seqread_1m_worst_round"
    assert result["targets_met"] == {"warm_seqread_1m": False}
    assert result["raw"]["warm_seqread_1m"]["round_ratios"] == {
        "warm_seqread_1m": [0.947, 0.833, 1.062]
    }

    steady = seqread_outcome([1800.0, 1700.0, 1500.0], [1900.0, 1800.0, 1600.0])
    assert summarize([steady])["targets_met"] == {"warm_seqread_1m": True}


@pytest.mark.parametrize(
    ("fusefs", "nullfs"),
    [
        ([1800.0, None], [1800.0, 1800.0]),  # fusefs failed in round 2
        ([1800.0], [1800.0, 1800.0]),  # ... and was not run again
        ([1800.0, 1800.0], [1800.0, None]),  # the reference failed
    ],
)
def test_a_round_without_both_numbers_fails_an_every_round_goal(
    fusefs: list[float | None], nullfs: list[float | None]
) -> None:
    outcome = seqread_outcome(fusefs, nullfs)
    assert round_ratios(outcome, "nullfs") == [1.0, None]
    result = summarize([outcome])
    assert result["ratios"]["warm_seqread_1m_worst_round"] is None
    assert result["targets_met"] == {"warm_seqread_1m": False}


def test_goals_at_least_and_at_most() -> None:
    at_least = Goal(0.9, "nullfs")
    assert at_least.met(0.9)
    assert at_least.met(1.5)
    assert not at_least.met(0.89)
    assert not at_least.met(None)
    assert at_least.worst([1.0, 0.8, 0.95]) == 0.8
    at_most = Goal(1.1, "cache_size", at_most=True)
    assert at_most.op == "<="
    assert at_most.met(1.1)
    assert at_most.met(0.5)
    assert not at_most.met(1.11)
    assert not at_most.met(None)
    assert at_most.worst([1.0, 1.2, 1.05]) == 1.2
    assert at_most.worst([1.0, None]) is None
    assert at_most.worst([]) is None


def test_a_goal_must_be_against_a_reference_of_its_workload() -> None:
    with pytest.raises(ValueError, match="not a reference"):
        Workload("w", "MB/s", ("fusefs", "plain"), "plain", Goal(0.9, "nullfs"), None)


def memory(base_mib: float, growth_mib: float) -> CacheMemory:
    """A round whose cache grows from 64 to 256 MiB, RSS by ``growth_mib``."""
    mib = 1 << 20
    full = base_mib + 70
    return CacheMemory(
        cache_size=64 * mib,
        large_size=256 * mib,
        base_rss=int(base_mib * mib),
        full_rss=int(full * mib),
        large_rss=int((full + growth_mib) * mib),
        cache_bytes=64 * mib,
        cache_pages=16384,
        large_bytes=256 * mib,
        large_pages=65536,
        dirty_rss=int((full + growth_mib + 2) * mib),
        dirty_pages=4000,
    )


def test_cache_memory_is_the_rss_growth_per_byte_of_cache_size() -> None:
    m = memory(base_mib=36, growth_mib=211.2)  # 19.2 MiB over the 192 MiB added
    assert m.growth == int((106 + 211.2) * (1 << 20)) - 106 * (1 << 20)
    assert m.added == 192 << 20
    assert m.ratio == pytest.approx(1.1, abs=1e-6)
    assert m.overhead_per_page == pytest.approx(19.2 * (1 << 20) / 49152, abs=0.1)  # 409.6
    # The slope leaves over 106 - 1.1 * 64 = 35.6 MiB: the fixed base.
    assert m.fixed_base == pytest.approx(35.6 * (1 << 20), abs=1)
    assert m.first_ratio == pytest.approx(70 / 64)
    details = m.details()
    assert details["overhead_bytes_per_page"] == 410
    assert details["base_rss"] == 36 << 20
    assert details["fixed_base_rss"] == round(35.6 * (1 << 20))
    assert details["dirty_pages"] == 4000

    outcome = Outcome(BY_NAME["cache_memory"])
    growth = record_cache_memory(outcome, m)
    assert growth == pytest.approx(211.2, abs=1e-5)  # MiB
    assert outcome.rounds == {"cache_size": [192.0]}
    assert outcome.details["memory"] == [details]


def test_cache_memory_is_an_upper_bound_goal_on_the_smallest_round() -> None:
    """Measured like the others (a fake step, no mount): the best round is the
    smallest, the reference is cache_size, and <= 1.10 is met at 1.10 exactly."""

    class FakeBench(Bench):
        def __init__(self, rounds: list[CacheMemory]) -> None:
            def fresh_fusefs(label: str) -> AbstractContextManager[Target]:
                self.mounts.append(label)
                return nullcontext(Target("fusefs", Path("/nonexistent")))

            plan = dataclasses.replace(QUICK, rounds=len(rounds))
            super().__init__({}, plan, [], lambda message: None, fresh_fusefs)
            self.rounds = rounds
            self.mounts: list[str] = []

        def cache_memory(self, target: Target, outcome: Outcome) -> float:
            return record_cache_memory(outcome, self.rounds.pop(0))

    bench = FakeBench([memory(36, 230.4), memory(36, 211.2), memory(36, 216.0)])
    [outcome] = bench.run([BY_NAME["cache_memory"]])
    assert bench.mounts == ["cache_memory-1", "cache_memory-2", "cache_memory-3"]
    assert outcome.values["fusefs"] == pytest.approx(211.2, abs=1e-5)
    assert outcome.values["cache_size"] == 192.0
    result = summarize([outcome])
    assert result["ratios"] == {"cache_memory": 1.1}
    assert result["references"] == {"cache_memory": "cache_size"}
    assert result["goals"] == {"cache_memory": {"ratio": "cache_memory", "op": "<=", "bound": 1.1}}
    assert result["targets_met"] == {"cache_memory": True}
    assert result["raw"]["cache_memory"]["round_ratios"] == {"cache_memory": [1.2, 1.1, 1.125]}
    assert len(result["raw"]["cache_memory"]["memory"]) == 3

    over = FakeBench([memory(36, 216.0)]).run([BY_NAME["cache_memory"]])
    assert summarize(over)["targets_met"] == {"cache_memory": False}


def test_the_table_shows_each_goal_on_the_row_it_is_judged_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes = [
        seqread_outcome([1800.0, 1500.0], [1900.0, 1800.0]),
        Outcome(BY_NAME["meta_10k"], {"fusefs": 1000.0, "plain": 4000.0, "nullfs": 1100.0}),
        Outcome(BY_NAME["cache_memory"], {"fusefs": 70.4, "cache_size": 64.0}),
    ]
    print_report(outcomes, summarize(outcomes), "t", [])
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if "│" in line}
    assert "—" in rows["warm_seqread_1m"]
    assert "≥ 0.90" in rows["warm_seqread_1m_worst_round"]
    assert "round by round" in rows["warm_seqread_1m_worst_round"]
    assert "NO" in rows["warm_seqread_1m_worst_round"]
    assert "≥ 0.90" not in rows["meta_10k"]
    assert "≥ 0.90" in rows["meta_10k_vs_nullfs"]
    assert "yes" in rows["meta_10k_vs_nullfs"]
    assert "≤ 1.10" in rows["cache_memory"]
    assert "cache_size 64.0 MiB" in rows["cache_memory"]
    assert "yes" in rows["cache_memory"]


def test_a_baseline_build_runs_beside_fusefs_and_gets_its_own_ratio() -> None:
    w = with_baseline(BY_NAME["seqwrite_1m"])
    assert w.targets == ("fusefs", "baseline", "plain", "nullfs")
    assert w.references == ("plain", "baseline", "nullfs")
    assert w.ratio_key("baseline") == "seqwrite_1m_vs_baseline"
    outcome = Outcome(w, values={"fusefs": 900.0, "baseline": 600.0, "plain": 1000.0})
    result = summarize([outcome])
    assert result["ratios"]["seqwrite_1m_vs_baseline"] == 1.5
    assert result["ratios"]["seqwrite_1m"] == 0.9
    # The memory row: the baseline's rounds keep out of cache_size's (fusefs's reference).
    mem = Outcome(with_baseline(BY_NAME["cache_memory"]))
    record_cache_memory(mem, memory(36, 211.2))
    assert record_cache_memory(mem, memory(36, 230.4), "baseline") == pytest.approx(230.4)
    assert mem.rounds == {"cache_size": [192.0]}
    assert len(mem.details["memory"]) == len(mem.details["memory_baseline"]) == 1
