"""``fusefs-campaign --fuzz-image N`` end to end, with a sample of the damaged
images mounted through the kernel as well (tools/campaign/fuzz.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CAMPAIGN = (sys.executable, "-m", "tools.campaign")
FLAGS = ("--fuzz-image", "40", "--fuzz-fuse-every", "4", "--seed", "5", "-j", "2", "-q")


@pytest.mark.mount
def test_fuzzing_agrees_with_the_kernel(tmp_path: Path) -> None:
    out = tmp_path / "fuzz"
    done = subprocess.run(
        [*CAMPAIGN, *FLAGS, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "fuzz.json").read_text())
    assert doc["images"] == 40
    assert doc["failures"] == []
    notes = [r["note"] for r in doc["fuse_sample"]["results"]]
    assert doc["fuse_sample"]["mounts"] == len(notes) > 0
    assert any(n.startswith("same through the kernel") for n in notes), notes
    assert "image fuzzing: 40 image(s)" in done.stdout
    # Nothing mounted is left behind.
    assert not any(p.is_dir() and p.name.startswith("fuzz-fuse-") for p in out.iterdir())
