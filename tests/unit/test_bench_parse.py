"""The IO benchmark's arithmetic: fio's JSON, ratios, goals.  No timing, no mount."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.bench_io import BY_NAME, FioError, Outcome, parse_fio, ratio, summarize


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
        Outcome(BY_NAME["warm_randread_4k"], {"fusefs": 7000.0, "nullfs": 10000.0}),
        Outcome(BY_NAME["randwrite_4k"], {"fusefs": 4000.0, "nullfs": 10000.0}),
        Outcome(BY_NAME["seqwrite_1m"], {"fusefs": None, "plain": 300.0}, errors=["boom"]),
        Outcome(
            BY_NAME["meta_10k"],
            {"fusefs": 1000.0, "plain": 4000.0, "nullfs": 2000.0},
            details={"files": 10000},
        ),
    ]
    result = summarize(outcomes, quick=True)
    assert result["quick"] is True
    assert result["ratios"] == {
        "warm_randread_4k": 0.7,
        "randwrite_4k": 0.4,
        "seqwrite_1m": None,
        "meta_10k": 0.25,
        "meta_10k_vs_nullfs": 0.5,
    }
    assert result["references"]["meta_10k_vs_nullfs"] == "nullfs"
    # Exactly at the goal is met; a failed measurement is not.
    assert result["targets_met"] == {
        "warm_randread_4k": True,
        "randwrite_4k": False,
        "seqwrite_1m": False,
    }
    assert result["targets"] == {"warm_randread_4k": 0.7, "randwrite_4k": 0.5, "seqwrite_1m": 0.5}
    assert result["raw"]["meta_10k"] == {
        "unit": "files/s",
        "fusefs": 1000.0,
        "plain": 4000.0,
        "nullfs": 2000.0,
        "files": 10000,
    }
    assert json.loads(json.dumps(result)) == result
