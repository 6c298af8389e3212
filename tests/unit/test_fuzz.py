"""Image fuzzing (tools/campaign/fuzz*.py): the damage is deterministic, a small
run ends with no failure, and planted bugs -- in fsck, in mount's bound checks,
in the read path, a mount that never returns -- are reported as failures."""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import trio

import fusefs.alloc
import fusefs.fsck
from fusefs.filesystem import Filesystem
from tools.campaign.fuzz import Result, job_of, replay, run_fuzz, save_reproducer
from tools.campaign.fuzzbase import BASE_NAMES, POISON, build_base
from tools.campaign.fuzzcheck import check_image, mount_and_read
from tools.campaign.fuzzdamage import KINDS, damage, parse, replace_chunk


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bases")
    paths = {}
    for name in BASE_NAMES:
        paths[name] = out / f"{name}.img"
        build_base(name, paths[name], 7)
    return paths


@pytest.fixture
def base(bases: dict[str, Path]) -> bytes:
    return bases["links-xattrs"].read_bytes()


def test_bases_are_healthy_and_poisoned(bases: dict[str, Path]) -> None:
    for name, path in bases.items():
        result = fusefs.fsck.fsck(path)
        assert result.exit_code == 0, (name, result.messages)
        assert POISON in path.read_bytes(), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_damage_is_deterministic_per_seed(base: bytes, kind: str) -> None:
    images = {}
    for seed in range(12):
        first = damage(base, kind, seed)
        assert damage(base, kind, seed) == first
        assert first[0] != base or "nothing changed" in first[1], first[1]
        images[first[0]] = first[1]
    assert len(images) > 6  # seeds make different images


def test_jobs_cover_every_base_and_kind() -> None:
    jobs = [job_of(i, 1) for i in range(len(KINDS) * len(BASE_NAMES))]
    assert {(j.base, j.kind) for j in jobs} == {(b, k) for b in BASE_NAMES for k in KINDS}
    assert job_of(5, 1) == job_of(5, 1)
    assert job_of(5, 1).seed != job_of(5, 2).seed


def _args(out: Path, n: int, **kw: Any) -> argparse.Namespace:
    defaults = {
        "out": str(out),
        "seed": 3,
        "fuzz_image": n,
        "fuzz_fuse_every": 0,
        "jobs": 2,
        "timeout": 60.0,
        "budget": None,
        "quiet": True,
        "argv": ["--fuzz-image", str(n)],
    }
    return argparse.Namespace(**{**defaults, **kw})


def test_a_small_run_has_no_failure(tmp_path: Path) -> None:
    doc = run_fuzz(_args(tmp_path, 60))
    assert doc["images"] == 60
    assert doc["failures"] == [], json.dumps(doc["failures"], indent=1)[:3000]
    assert sum(doc["matrix"]["bitflip"].values()) == 6
    assert doc["counts"]["refused"]
    assert doc["counts"]["consistent"]
    assert (tmp_path / "fuzz.md").read_text().startswith("# fusefs image fuzzing")


# planted bugs:


def _extent_past_the_device(base: bytes) -> bytes:
    img = bytearray(base)
    layout = parse(img)
    records = copy.deepcopy(layout.chunks[0])
    victim = next(r for r in records if r.get("extents"))
    victim["extents"].append([1000, layout.sb.device_blocks - 1, 4, False])
    replace_chunk(img, layout, 0, records, random.Random(1))
    return bytes(img)


def _double_map(base: bytes) -> bytes:
    img = bytearray(base)
    layout = parse(img)
    records = copy.deepcopy(layout.chunks[0])
    files = [r for r in records if r.get("extents")]
    files[1]["extents"][0][1] = files[0]["extents"][0][1]
    replace_chunk(img, layout, 0, records, random.Random(1))
    return bytes(img)


def test_a_bad_extent_is_refused_or_repaired(base: bytes, tmp_path: Path) -> None:
    for image in (_extent_past_the_device(base), _double_map(base)):
        verdict = check_image(image, tmp_path / "w")
        assert verdict.outcome == "repaired", verdict


@pytest.fixture
def no_bound_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mount rebuilds block usage without its checks: overlaps and runs past
    the device go unnoticed."""

    def mark_used(self: fusefs.alloc.Allocator, pblk: int, n: int) -> None:
        lo, hi = max(pblk, self._first_data), min(pblk + n, self._device_blocks)
        for b in range(lo, hi):
            if self._map[b] == fusefs.alloc.FREE:
                self._map[b] = fusefs.alloc.USED
                self._nfree -= 1
                self._nallocated += 1

    monkeypatch.setattr(fusefs.alloc.Allocator, "mark_used", mark_used)


@pytest.mark.usefixtures("no_bound_checks")
def test_a_mount_without_bound_checks_is_caught(base: bytes, tmp_path: Path) -> None:
    verdict = check_image(_extent_past_the_device(base), tmp_path / "w")
    assert verdict.outcome == "bad data", verdict
    assert "past the device" in verdict.detail
    verdict = check_image(_double_map(base), tmp_path / "w")
    assert verdict.outcome == "bad data", verdict
    assert "mapped by inode" in verdict.detail


def test_an_fsck_that_skips_its_block_check_is_caught(
    base: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fusefs.fsck, "_check_blocks", lambda *a: False)
    verdict = check_image(_double_map(base), tmp_path / "w")
    assert verdict.outcome == "fsck missed", verdict


def test_a_read_that_strays_is_caught(
    base: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads that return the next block's bytes: data from outside the extents."""
    real = Filesystem.read

    async def read(self: Filesystem, fh: int, offset: int, size: int) -> bytes:
        return await real(self, fh, offset + self.block_size, size)

    monkeypatch.setattr(Filesystem, "read", read)
    verdict = check_image(base, tmp_path / "w")
    assert verdict.outcome == "bad data", verdict
    assert "differ" in verdict.detail


def test_a_mount_that_never_returns_is_a_hang(
    base: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def mount(*args: Any, **kw: Any) -> Filesystem:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(Filesystem, "mount", mount)
    path = tmp_path / "a.img"
    path.write_bytes(base)
    with pytest.raises(Exception, match="hang") as info:
        mount_and_read(path, timeout=0.5)
    assert getattr(info.value, "kind", "") == "hang"


def test_a_traceback_is_a_failure_with_a_reproducer(
    bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kw: Any) -> None:
        raise KeyError(5)

    monkeypatch.setattr(fusefs.fsck, "_check_tree", broken)
    for index in range(40):
        job = job_of(index, 1)
        image, recipe = damage(bases[job.base].read_bytes(), job.kind, job.seed)
        verdict = check_image(image, tmp_path / "w")
        if verdict.outcome != "refused":
            break
    assert verdict.outcome == "traceback", verdict
    assert "KeyError" in verdict.traceback
    path = save_reproducer(tmp_path, bases[job.base], Result(job, recipe, verdict.to_json()), [])
    doc = json.loads(path.read_text())
    assert doc["replay"].endswith(f"--fuzz-replay {path}")
    assert replay(path, 30.0) == 1  # still broken
    monkeypatch.undo()
    assert replay(path, 30.0) == 0
