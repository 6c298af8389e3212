"""``scripts/demo``'s program, end to end, as a user reads its output in a file:
the expected failure is announced as such, every report path it prints still
exists when it has exited, and no record is split across lines."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusefs.demo import demo_console


def test_demo_console_keeps_records_whole_in_a_file() -> None:
    out = io.StringIO()
    console = demo_console(out)
    record = "fusefs/blockdev.py:206 class:io:selftest " + "x" * 150 + " fired:0"
    console.print(f"    {record}")
    console.rule("a rule")
    lines = out.getvalue().splitlines()
    assert lines[0] == f"    {record}"
    assert len(lines[1]) > 80  # a file is not an 80-column terminal


@pytest.mark.mount
def test_the_demo_as_a_file_reads_it(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--size", "256M", "--logs", str(logs)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    lines = out.splitlines()

    def index(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"no line matches {pattern!r}"
        return found[0]

    announced = index(r"^demo: seed 7 with the pagecache add lock OFF: .*expected")
    failed = index(r"^fsx: FAILED")
    confirmed = index(r"^demo: the lock-off run failed, as expected")
    assert announced < failed < confirmed

    printed = [
        word
        for line in lines
        if re.match(r"(fsx: wrote|fsx: minimized op list:|reports:|kept in)", line)
        for word in line.replace(":", " ").split()
        if word.startswith("/")
    ]
    assert any(p.endswith("matrix.md") for p in printed), printed
    assert any(p.endswith(".min.fsxops") for p in printed), printed
    for path in printed:
        assert Path(path).exists(), f"the demo printed {path}, gone after it exited"

    records = [line for line in lines if re.match(r"^\s+fusefs/\S+\.py:\d+ class:", line)]
    assert len(records) >= 20
    assert all(re.search(r" hits:\d+ fired:\d+$", line) for line in records), records
