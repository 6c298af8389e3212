"""The metadata benchmark's arithmetic: percentiles, /proc and log parsing, ratios,
targets, the table.  No timing, no mount."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_meta import (
    format_table,
    fsync_rounds,
    latency,
    listdir_best,
    percentile,
    replayed_entries,
    summarize,
    table_rows,
)
from benchmarks.targets import parse_vmrss


def test_percentile_interpolates_between_closest_ranks() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 100) == 5.0
    assert percentile(samples, 90) == pytest.approx(4.6)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_latency_is_in_milliseconds() -> None:
    samples = [i / 1000 for i in range(1, 21)]  # 1..20 ms
    assert latency(samples) == {"median_ms": 10.5, "p90_ms": 18.1, "max_ms": 20.0, "n": 20}


def test_parse_vmrss_reads_the_kb_line_as_bytes() -> None:
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmRSS:\t   35840 kB\nRssAnon:\t 20000 kB\n"
    assert parse_vmrss(status) == 35840 * 1024
    with pytest.raises(ValueError, match="VmRSS"):
        parse_vmrss("Name:\tpython\n")


def test_replayed_entries_of_the_last_mount_in_the_log() -> None:
    log = (
        "t 1 INFO fusefs: starting: a.img on /m (pid 1)\n"
        "t 1 INFO fusefs.filesystem: mount: replayed 7 journal entries\n"
        "t 2 INFO fusefs: starting: a.img on /m (pid 2)\n"
        "t 2 INFO fusefs.filesystem: mount: replayed 1 journal entry; dropped a torn entry\n"
    )
    assert replayed_entries(log) == 1
    assert replayed_entries(log + "t 3 INFO fusefs: starting: a.img on /m (pid 3)\n") == 0
    assert replayed_entries("") == 0


def raw_numbers() -> dict[str, Any]:
    return {
        "plan": {"files": 100_000, "listdir_small": 10_000, "listdir_large": 20_000},
        "fsync": {
            "fusefs": {
                "empty": {"median_ms": 2.0, "p90_ms": 4.0},
                "populated": {"median_ms": 5.0, "p90_ms": 6.0},
            },
            "plain": {
                "empty": {"median_ms": 1.0, "p90_ms": 2.0},
                "populated": {"median_ms": 1.0, "p90_ms": 3.0},
            },
        },
        "listdir": {
            "fusefs": {"small_s": 0.1, "large_s": 0.2},
            "plain": {"small_s": 0.01, "large_s": 0.02},
        },
        "rss": {"before_bytes": 1 << 20, "after_bytes": 2 << 20, "per_file_bytes": 512.0},
        "rates": {
            "fusefs_empty": {"create": 1000, "stat": 8000, "unlink": 2000},
            "nullfs_empty": {"create": 2000, "stat": 16000, "unlink": 4000},
            "plain_empty": {"create": 4000, "stat": 8000, "unlink": 8000},
        },
        "mixed": {"fusefs": {"loops_per_s": 50.0}, "plain": {"loops_per_s": 500.0}},
        "scale": {"1000000": {"mount_s": 30.0, "fsck_s": 40.0, "fsck_exit": 0}},
    }


def test_summarize_ratios_and_targets() -> None:
    result = summarize(raw_numbers(), quick=False)
    out = result["ratios"]
    assert out["fsync_p50_populated_vs_empty"] == 2.5
    assert out["fsync_p90_populated_vs_empty"] == 1.5
    assert out["plain_fsync_p50_populated_vs_empty"] == 1.0
    assert out["fsync_p50_populated_vs_plain"] == 5.0
    assert out["listdir_large_vs_small"] == 2.0
    assert out["listdir_large_vs_plain"] == 10.0
    assert out["nullfs_listdir_large_vs_small"] is None  # not measured
    assert out["rss_bytes_per_file"] == 512.0
    assert out["create_empty_vs_plain"] == 0.25
    assert out["create_empty_vs_nullfs"] == 0.5
    assert out["stat_populated_vs_plain"] is None
    assert out["mixed_vs_plain"] == 0.1
    # Each target is an upper bound; a missing figure is not met.
    assert result["targets_met"] == {
        "fsync_p50_populated_vs_empty": False,
        "listdir_large_vs_small": True,
        "rss_bytes_per_file": True,
    }
    assert result["quick"] is False
    assert json.loads(json.dumps(result)) == result


def test_a_missing_figure_misses_its_target() -> None:
    raw = raw_numbers()
    del raw["rss"]
    assert summarize(raw)["targets_met"]["rss_bytes_per_file"] is False


def test_table_shows_every_figure_and_marks_missed_targets() -> None:
    rows = table_rows(summarize(raw_numbers()))
    assert all(len(row) == 5 for row in rows)
    by_name = {row[0]: row for row in rows}
    assert by_name["fsync p50 populated ÷ empty"][4] == "2.5 (≤ 2: MISSED)"
    assert by_name["listdir 20,000 ÷ 10,000"][1:] == ("2", "—", "2", "2 (≤ 2.5: met)")
    assert by_name["create/s, empty"][1:4] == ("1,000", "2,000", "4,000")
    assert by_name["fsck, 1,000,000 files"][1] == "40.0 s (exit 0)"
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("figure")
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == len(rows) + 2


def test_fsync_rounds_takes_every_file_in_turn(tmp_path: Path) -> None:
    files = {("fusefs", "empty"): tmp_path / "a", ("fusefs", "populated"): tmp_path / "b"}
    samples = fsync_rounds(files, samples=3, rounds=2)
    assert list(samples) == list(files)
    assert all(len(values) == 4 for values in samples.values())  # 2 a round, rounded up
    assert all(v > 0 for values in samples.values() for v in values)


def test_listdir_best_times_each_directory(tmp_path: Path) -> None:
    directories = [tmp_path / "small", tmp_path / "large"]
    for directory, count in zip(directories, (2, 5), strict=True):
        directory.mkdir()
        for i in range(count):
            (directory / str(i)).touch()
    best = listdir_best(directories, rounds=3)
    assert len(best) == 2
    assert all(0 < seconds < float("inf") for seconds in best)
