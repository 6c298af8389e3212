"""fusefs-campaign end to end, bounded for CI: a few sites, then power cuts.

The site campaign runs the metadata and mount-cycle workloads (the data and fsx
workloads are the full campaign's) over sites whose outcome is known: a device
write error must give **clean** runs in which the workload saw EIO; a self-test
site that silently corrupts a block must be reported as **corruption**; one that
kills the daemon as **crash**; a site on a path the workload never takes (the
O_DIRECT read buffer) as **not reached**.  The power-cut runs must all be clean;
with the commit's flush before the superblock skipped (a self-test site), torn
cuts at the flushes must be caught.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools.campaign.mount import Image, listing_fired, parse_listing
from tools.campaign.report import render_markdown, summary_lines
from tools.campaign.run import cut_points, iter_modes
from tools.campaign.workloads import _mix_ok, fallocate_model

CAMPAIGN = [sys.executable, "-m", "tools.campaign"]
CRASH_SITE = "daemon_crash"
ORDERING_SITE = "commit_skip_checkpoint_flush"


def campaign(out: Path, *args: str, timeout: float = 240) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [*CAMPAIGN, "--out", str(out), "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    matrix = out / "matrix.json"
    assert matrix.exists(), f"no report:\n{done.stdout}\n{done.stderr}"
    assert (out / "matrix.md").exists()
    return done.returncode, json.loads(matrix.read_text()), done.stdout + done.stderr


# the pure parts (no mount):


def test_listing_parse() -> None:
    text = (
        "# sites:2 armed:1 fired:3 seed:0\n"
        "fusefs/blockdev.py:130 class:io:write module:fusefs.blockdev func:BlockDevice.write_sync "
        "name:blockdev_write frequency=3 times=2 hits:7 fired:2\n"
        "fusefs/commit.py:91 class:error:mount module:fusefs.commit func:load_checkpoint "
        "name:mount_read_checkpoint disabled hits:0 fired:0\n"
    )
    write, mount = parse_listing(text)
    assert (write.name, write.cls, write.line, write.root_class) == (
        "blockdev_write",
        "io:write",
        130,
        "io",
    )
    assert not write.is_mount_site
    assert mount.is_mount_site
    assert listing_fired(text, "blockdev_write") == 2
    assert listing_fired(text, "nothing") is None


def test_cut_points_spread_over_the_candidates() -> None:
    assert cut_points(range(1, 11), 30, 1) == list(range(1, 11))  # fewer events: every one
    points = cut_points(range(1, 1001), 30, 1)
    assert len(points) == 30
    assert points == sorted(set(points))
    assert points[0] <= 34 and points[-1] > 966  # noqa: PT018 -- both ends are cut
    assert cut_points(range(1, 1001), 30, 1) == points  # seeded
    assert cut_points([5, 9, 40], 2, 3) in ([5, 40], [9, 40], [5, 9])
    for n in range(31, 45):  # barely more candidates than points: still all distinct
        assert len(set(cut_points(range(n), 30, n))) == 30
    assert list(iter_modes("both", 3)) == ["drop", "torn", "drop"]


def test_fallocate_model() -> None:
    c = bytes(range(1, 17)) * 1024  # 16 KiB
    assert fallocate_model(c, "punch", 10, 5)[8:17] == c[8:10] + bytes(5) + c[15:17]
    assert len(fallocate_model(c, "keep_size", 16000, 9000)) == len(c)
    assert len(fallocate_model(c, "alloc", 16000, 9000)) == 25000
    assert fallocate_model(c, "zero", 16380, 10) == c[:16380] + bytes(10)
    assert fallocate_model(c, "zero,keep_size", 16380, 10) == c[:16380] + bytes(4)
    assert fallocate_model(c, "collapse", 4096, 4096) == c[:4096] + c[8192:]
    assert fallocate_model(c, "insert", 4096, 4096) == c[:4096] + bytes(4096) + c[4096:]


def test_a_failed_write_may_leave_a_mix_inside_its_range_only() -> None:
    old = b"a" * 100
    new = b"a" * 10 + b"b" * 20 + b"a" * 70
    assert _mix_ok(b"a" * 15 + b"b" * 15 + b"a" * 70, old, new, (10, 30))
    assert not _mix_ok(b"c" + b"a" * 99, old, new, (10, 30))  # outside the range
    assert not _mix_ok(b"a" * 10 + b"c" * 20 + b"a" * 70, old, new, (10, 30))  # neither


def test_report_renders_from_json() -> None:
    run = {
        "kind": "fault", "site": "blockdev_write", "mode": "oneshot", "outcome": "corruption",
        "fired": 1, "errors": {"EIO": 2}, "detail": "data/f0: fsynced contents differ",
        "notes": [], "seconds": 3.0, "workdir": "/x", "ops": 10, "events": None,
        "flush_events": [],
        "reproducer": {"command": "fusefs-campaign --name blockdev_write", "fault": "f"},
    }  # fmt: skip
    doc = {
        "started": "now", "seconds": 3.0, "argv": [], "seed": 1, "modes": ["oneshot"],
        "workloads": ["meta"], "sites_total": 1, "sites_per_class": {"io": 1},
        "sites": [{"name": "blockdev_write", "class": "io:write", "module": "m", "location": "l"}],
        "counts": {"clean": 0, "corruption": 1}, "runs": [run], "skipped": [],
        "budget_exhausted": False, "interrupted": False,
        "powercut": {"requested": 0, "workload_events": None, "counts": {}, "runs": []},
    }  # fmt: skip
    text = render_markdown(doc)
    assert "| `blockdev_write` | io:write | **corruption** (fired 1; 2 EIO) |" in text
    assert "fusefs-campaign --name blockdev_write" in text
    assert any("corruption: blockdev_write x oneshot" in line for line in summary_lines(doc))


# end to end:


@pytest.fixture(scope="module")
def site_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    from tests.integration.conftest import require_fuse

    require_fuse()
    image = Image(tmp_path_factory.mktemp("sites"), "16M", timeout=60)
    image.mkfs()
    assert image.mount().ok
    try:
        return {s.name for s in parse_listing(image.control_read("dynamic_fault"))}
    finally:
        image.umount()
        image.cleanup()


@pytest.mark.mount
def test_list_leaves_nothing_behind(tmp_path: Path, site_names: set[str]) -> None:
    done = subprocess.run(
        [*CAMPAIGN, "--list", "--class", "io"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines()}
    assert "blockdev_write" in listed
    assert listed <= site_names
    assert list(tmp_path.iterdir()) == []


@pytest.mark.mount
def test_short_campaign_matrix(tmp_path: Path, site_names: set[str]) -> None:
    names = ["blockdev_write", "blockdev_corrupt_write", "direct_read_buffer"]
    args = [a for n in names for a in ("--name", n)]
    code, doc, output = campaign(
        tmp_path, *args, "--workload", "meta,cycle", "--ops", "24", "--cycles", "2", "-j", "2"
    )
    runs = {r["site"]: r for r in doc["runs"]}
    assert set(runs) == set(names), output

    write = runs["blockdev_write"]
    assert write["outcome"] == "clean", write
    assert write["fired"] >= 1
    assert write["errors"].get("EIO", 0) >= 1, write

    corrupt = runs["blockdev_corrupt_write"]
    assert corrupt["outcome"] == "corruption", corrupt
    assert "fsynced contents differ" in corrupt["detail"] or "differ" in corrupt["detail"]
    assert "--name blockdev_corrupt_write" in corrupt["reproducer"]["command"]
    assert corrupt["reproducer"]["fault"].endswith("name blockdev_corrupt_write oneshot")

    assert runs["direct_read_buffer"]["outcome"] == "not reached"
    assert runs["direct_read_buffer"]["fired"] == 0

    assert code == 1  # the self-test failures make the campaign fail

    assert doc["matrix"]["blockdev_write"] == {"oneshot": "clean"}
    assert sum(doc["counts"].values()) == len(names)
    assert doc["counts"]["corruption"] >= 1
    assert doc["sites_total"] == len(site_names)
    markdown = (tmp_path / "matrix.md").read_text()
    assert "| `blockdev_corrupt_write` | io:selftest | **corruption**" in markdown
    assert "## Reproducers" in markdown


@pytest.mark.mount
def test_space_workload_reaches_the_commit_on_enospc(tmp_path: Path) -> None:
    """The space workload runs a small image out of space and frees it again at
    once, so the commit-and-retry path (fusefs.reclaim) is reached: its fault site
    gives clean ENOSPCs, and failing every other allocation (which fails some of
    those commits) leaves nothing acknowledged lost."""
    code, doc, output = campaign(
        tmp_path,
        *("--name", "nospace_commit_retry", "--name", "alloc_allocate"),
        *("--mode", "frequency 2", "--workload", "space", "--size", "8M", "-j", "2"),
    )
    runs = {r["site"]: r for r in doc["runs"]}
    assert set(runs) == {"nospace_commit_retry", "alloc_allocate"}, output
    retry = runs["nospace_commit_retry"]
    assert retry["outcome"] == "clean", retry
    assert retry["fired"] >= 1
    assert retry["errors"].get("ENOSPC", 0) >= 1, retry
    assert runs["alloc_allocate"]["outcome"] == "clean", runs["alloc_allocate"]
    assert code == 0, output


@pytest.mark.mount
def test_a_daemon_crash_is_reported_as_crash(tmp_path: Path, site_names: set[str]) -> None:
    assert CRASH_SITE in site_names, f"the crash self-test site {CRASH_SITE!r} is missing"
    code, doc, output = campaign(
        tmp_path, "--name", CRASH_SITE, "--workload", "meta", "--ops", "40"
    )
    (run,) = doc["runs"]
    assert run["outcome"] == "crash", output
    assert run["reproducer"]["command"].startswith(f"fusefs-campaign --name {CRASH_SITE} ")
    assert code == 1


@pytest.mark.mount
def test_a_hang_is_killed_and_reported(tmp_path: Path) -> None:
    # Any site will do: the extra fault holds every writeback open for ten minutes.
    code, doc, output = campaign(
        tmp_path,
        *("--name", "blockdev_flush", "--workload", "meta", "--ops", "12", "--timeout", "8"),
        *("--fault", "name writeback_before_lookup enable delay 600000"),
    )
    (run,) = doc["runs"]
    assert run["outcome"] == "hang", output
    assert run["seconds"] < 60
    assert code == 1


@pytest.mark.mount
def test_power_cuts_lose_nothing_fsynced(tmp_path: Path) -> None:
    code, doc, output = campaign(tmp_path, "--power-cut", "30", "--ops", "40", "-j", "2")
    pc = doc["powercut"]
    outcomes = [r["outcome"] for r in pc["runs"]]
    assert pc["workload_events"] > 30, output
    assert len(outcomes) == 30, output
    failures = [r for r in pc["runs"] if r["outcome"] not in ("clean", "not reached")]
    assert not failures, failures
    assert outcomes.count("clean") >= 25, outcomes  # nearly every cut point is reached
    assert {r["mode"] for r in pc["runs"]} == {"drop", "torn"}
    assert code == 0


@pytest.mark.mount
def test_metaheavy_power_cuts_recover_a_synced_state(tmp_path: Path) -> None:
    """The metadata-heavy workload on a small image (a small journal: background
    checkpoints happen): every cut recovers exactly a state the namespace passed
    through since its last returned sync (tests/unit/test_metaheavy.py shows the
    check failing on planted damage)."""
    code, doc, output = campaign(
        tmp_path,
        *("--power-cut", "4", "--workload", "metaheavy", "--ops", "150", "--size", "8M"),
        *("-j", "2"),
    )
    pc = doc["powercut"]
    assert pc["workload_events"] > 40, output
    failures = [r for r in pc["runs"] if r["outcome"] not in ("clean", "not reached")]
    assert not failures, failures
    assert [r["outcome"] for r in pc["runs"]].count("clean") >= 3, output
    assert doc["workloads"] == ["metaheavy"]
    assert code == 0


@pytest.mark.mount
def test_broken_commit_ordering_is_caught(tmp_path: Path, site_names: set[str]) -> None:
    assert ORDERING_SITE in site_names, f"the ordering self-test site {ORDERING_SITE!r} is missing"
    code, doc, output = campaign(
        tmp_path,
        *("--power-cut", "12", "--power-cut-on", "flush", "--power-cut-mode", "torn"),
        *("--fault", f"name {ORDERING_SITE} enable", "--ops", "40", "-j", "2"),
    )
    failures = [r for r in doc["powercut"]["runs"] if r["outcome"] in ("fsck error", "corruption")]
    assert failures, output
    assert code == 1
    assert f"--fault 'name {ORDERING_SITE} enable'" in failures[0]["reproducer"]["command"]


@pytest.mark.mount
def test_campaign_under_pressure_and_chaos(tmp_path: Path) -> None:
    """The workloads run beside a stream, a drop loop and a 1 MiB cache, with
    every race window opened at random: the fault run and the power cuts stay
    clean, and the pressure is reported."""
    code, doc, output = campaign(
        tmp_path,
        *("--name", "blockdev_write", "--workload", "fsx,meta", "--ops", "200"),
        *("--power-cut", "4", "--pressure", "--chaos", "0.1"),
        timeout=400,
    )
    (write,) = doc["runs"]
    assert write["outcome"] == "clean", write
    notes = " ".join(write["notes"])
    assert re.search(r"pressure: .*drop: [1-9]\d* drops.*stream: [1-9]\d* passes", notes), notes
    cuts = [r for r in doc["powercut"]["runs"] if r["outcome"] not in ("clean", "not reached")]
    assert not cuts, cuts
    assert code == 0, output


@pytest.mark.mount
def test_campaign_under_pressure_finds_a_lost_write(tmp_path: Path) -> None:
    """The lost-write bug brought back by its self-test site, on every hit, is
    reported as corruption; the reproducer repeats the stress flags."""
    code, doc, output = campaign(
        tmp_path,
        *("--name", "buffered_write_into_evicted_page", "--mode", "frequency 1"),
        *("--workload", "fsx", "--ops", "600", "--pressure", "drop", "--chaos", "0.2"),
        *("--no-minimize",),
        timeout=400,
    )
    (bug,) = doc["runs"]
    assert bug["outcome"] == "corruption", bug
    assert "--pressure drop --chaos 0.2 --chaos-delay 0-2" in bug["reproducer"]["command"]
    assert code == 1, output
