"""The power-cut simulator (fusefs/powercut.py), alone and under the core in-process.

The in-process tests cut the power at every device event of a small fsyncing
workload, in both modes, and require after each cut: fsck clean, and every file
fsynced and not written after holding exactly its fsynced bytes.  Then they break
the commit's ordering on purpose (the flush that makes file data durable
before the journal entry mapping it is skipped) and require the same harness
to notice.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import fusefs.powercut
from fusefs.blockdev import BlockDevice
from fusefs.errors import FsError, InvalidArgument
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import JOURNAL_START, SUPERBLOCK_BLOCKS, mkfs
from fusefs.fsck import fsck
from fusefs.namespace import ROOT_INO
from fusefs.powercut import ENV_VAR, CutPlan, CutRecord, PowerCut, PowerOff, read_record
from tools.poison import POISON, poison_free_blocks

BS = 4096
UID, GID = os.getuid(), os.getgid()


# the plan:


def test_plan_parse() -> None:
    assert CutPlan.parse("") == CutPlan()
    plan = CutPlan.parse("at=7, mode=torn, seed=3, record=/tmp/r")
    assert (plan.at, plan.mode, plan.seed, plan.record) == (7, "torn", 3, "/tmp/r")
    assert CutPlan.parse(plan.spec()).at == 7
    drawn = {CutPlan.parse(f"at=random,max=50,seed={s}").at for s in range(20)}
    assert drawn <= set(range(1, 51))
    assert len(drawn) > 5
    assert CutPlan.parse("at=random,max=50,seed=4") == CutPlan.parse("at=random,max=50,seed=4")


@pytest.mark.parametrize(
    "text", ["at=0", "at=x", "mode=melt", "at=random", "bogus=1", "seed", "at=random,max=0"]
)
def test_plan_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        CutPlan.parse(text)


# the simulator on a bare file:


@dataclass
class Cuts:
    records: list[CutRecord] = field(default_factory=list)

    def __call__(self, record: CutRecord) -> None:
        self.records.append(record)


def bare(tmp_path: Path, plan: CutPlan, blocks: int = 8) -> tuple[int, PowerCut, Cuts]:
    path = tmp_path / "dev"
    path.write_bytes(b"\0" * (blocks * BS))
    fd = os.open(path, os.O_RDWR)
    cuts = Cuts()
    return fd, PowerCut(fd, BS, plan, record_path=f"{path}.powercut", on_cut=cuts), cuts


def on_image(fd: int, blk: int) -> bytes:
    return os.pread(fd, BS, blk * BS)


def test_writes_stay_in_the_overlay_until_a_flush(tmp_path: Path) -> None:
    fd, pc, _ = bare(tmp_path, CutPlan())
    try:
        assert pc.pwrite(fd, b"a" * BS + b"b" * BS, 2 * BS) == 2 * BS
        assert on_image(fd, 2) == bytes(BS)  # not persisted yet
        assert pc.pread(fd, 3 * BS, BS) == bytes(BS) + b"a" * BS + b"b" * BS  # but visible
        pc.fdatasync(fd)
        assert on_image(fd, 3) == b"b" * BS
        pc.pwrite(fd, b"c" * BS, 3 * BS)
        pc.close()  # what is left reaches the image, and the count is recorded
        assert on_image(fd, 3) == b"c" * BS
        record = read_record(f"{tmp_path / 'dev'}.powercut")
        assert record is not None
        assert (record.events, record.writes, record.flushes, record.cut) == (3, 2, 1, False)
        assert record.flush_events == [2]  # event numbers
    finally:
        os.close(fd)


def test_drop_mode_loses_every_unflushed_write(tmp_path: Path) -> None:
    fd, pc, cuts = bare(tmp_path, CutPlan(at=4, mode="drop"))
    try:
        pc.pwrite(fd, b"a" * BS, 0)  # event 1
        pc.fdatasync(fd)  # event 2
        pc.pwrite(fd, b"b" * BS, BS)  # event 3
        with pytest.raises(PowerOff) as e:
            pc.pwrite(fd, b"c" * BS, 2 * BS)  # event 4: the cut
        assert e.value.errno == errno.EIO
        assert [on_image(fd, b)[:1] for b in range(3)] == [b"a", b"\0", b"\0"]
        assert len(cuts.records) == 1
        record = cuts.records[0]
        assert (record.cut, record.cut_on, record.pending, record.kept) == (True, "write", 1, 0)
        # The machine is off.
        for call in (lambda: pc.pread(fd, BS, 0), lambda: pc.fdatasync(fd)):
            with pytest.raises(PowerOff):
                call()
        saved = read_record(f"{tmp_path / 'dev'}.powercut")
        assert saved is not None
        assert saved.cut
    finally:
        os.close(fd)


def test_a_cut_can_fall_on_a_flush(tmp_path: Path) -> None:
    fd, pc, cuts = bare(tmp_path, CutPlan(at=3))
    try:
        pc.pwrite(fd, b"a" * BS, 0)
        pc.pwrite(fd, b"b" * BS, BS)
        with pytest.raises(PowerOff):
            pc.fdatasync(fd)
        assert cuts.records[0].cut_on == "flush"
        assert cuts.records[0].pending == 2
        assert on_image(fd, 0) == bytes(BS)
    finally:
        os.close(fd)


def torn_image(tmp_path: Path, seed: int) -> tuple[list[bytes], CutRecord]:
    sub = tmp_path / str(seed)
    sub.mkdir()
    fd, pc, cuts = bare(sub, CutPlan(at=9, mode="torn", seed=seed))
    try:
        for blk in range(8):
            pc.pwrite(fd, bytes([0x41 + blk]) * BS, blk * BS)
        with pytest.raises(PowerOff):
            pc.pwrite(fd, b"z" * BS, 0)
        return [on_image(fd, b) for b in range(8)], cuts.records[0]
    finally:
        os.close(fd)


def test_torn_mode_keeps_a_seeded_subset_and_may_tear_a_block(tmp_path: Path) -> None:
    outcomes = [torn_image(tmp_path, seed) for seed in range(12)]
    for blocks, record in outcomes:
        assert record.pending == 8
        kept = [b for b in range(8) if blocks[b] == bytes([0x41 + b]) * BS]
        torn = [b for b in range(8) if blocks[b] not in (bytes(BS), bytes([0x41 + b]) * BS)]
        assert len(torn) <= 1
        if torn:
            assert record.torn_block == torn[0]
            sectors = [blocks[torn[0]][s * 512 : (s + 1) * 512] for s in range(BS // 512)]
            assert set(sectors) == {bytes(512), bytes([0x41 + torn[0]]) * 512}  # part old, part new
        assert len(kept) + len(torn) >= record.kept - (1 if record.torn_block is not None else 0)
    assert len({tuple(b) for b, _ in outcomes}) > 6  # the seed decides
    assert any(r.torn_block is not None for _, r in outcomes)
    (tmp_path / "again").mkdir()
    again, _ = torn_image(tmp_path / "again", 5)
    assert again == outcomes[5][0]  # reproducible


# the block device:


def test_blockdev_without_the_simulator_uses_the_system_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "img"
    mkfs(path, 1 << 20)
    dev = BlockDevice(path, BS)
    try:
        assert dev.powercut is None
        assert dev._pwrite is os.pwrite
        assert dev._pread is os.pread
    finally:
        dev.close()


def test_blockdev_armed_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "img"
    mkfs(path, 1 << 20)
    monkeypatch.setenv(ENV_VAR, "mode=torn,seed=2")
    ro = BlockDevice(path, BS, read_only=True)  # fsck's device is never armed
    assert ro.powercut is None
    ro.close()
    dev = BlockDevice(path, BS)
    try:
        assert dev.powercut is not None
        assert dev.powercut.plan == CutPlan(mode="torn", seed=2)
        dev.write_sync(10, b"x" * BS)
        assert dev.read_sync(10, 1) == b"x" * BS
        assert dev.statistics().pending_writes == 1
        dev.flush_sync()
    finally:
        dev.close()
    assert read_record(f"{path}.powercut") is not None
    monkeypatch.setenv(ENV_VAR, "mode=sideways")
    with pytest.raises(InvalidArgument):
        BlockDevice(path, BS)


# under the core:


@dataclass
class Tracked:
    """What the workload was told: each file's bytes at its last returned fsync."""

    durable: dict[bytes, bytes] = field(default_factory=dict)
    dirty: set[bytes] = field(default_factory=set)  # written since its last fsync


async def fsyncing_workload(fs: Filesystem, tracked: Tracked) -> None:
    """Create, write (overwrite, extend), fsync, truncate, unlink: every few
    operations an fsync, so that the cuts fall between and inside commits."""
    contents: dict[bytes, bytearray] = {}
    for round_ in range(3):
        for i in range(3):
            name = f"f{i}".encode()
            if name not in contents:
                fh, _ = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, UID, GID)
                contents[name] = bytearray()
            else:
                fh = await fs.open((await fs.lookup(ROOT_INO, name)).ino, os.O_RDWR)
            data = bytes([0x30 + round_ * 3 + i]) * (BS + 700 * i)
            offset = (round_ * 3000) % (2 * BS)
            tracked.dirty.add(name)
            await fs.write(fh, offset, data)
            c = contents[name]
            c.extend(bytes(max(0, offset + len(data) - len(c))))
            c[offset : offset + len(data)] = data
            if round_ == 2 and i == 1:
                await fs.truncate(fs.ns.get((await fs.lookup(ROOT_INO, name)).ino), BS)
                del c[BS:]
            await fs.fsync(fh, datasync=False)
            tracked.durable[name] = bytes(c)
            tracked.dirty.discard(name)
            await fs.release(fh)


async def run_cut(
    image: Path,
    plan: str,
    monkeypatch: pytest.MonkeyPatch,
    patch: Callable[[Filesystem], None] | None = None,
) -> tuple[Tracked, CutRecord | None]:
    cuts = Cuts()
    monkeypatch.setattr(fusefs.powercut, "_default_on_cut", cuts)
    monkeypatch.setenv(ENV_VAR, plan)
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    monkeypatch.delenv(ENV_VAR)
    if patch is not None:
        patch(fs)
    tracked = Tracked()
    try:
        await fsyncing_workload(fs, tracked)
        await fs.unmount()
    except FsError:
        assert cuts.records, "the workload failed without a power cut"
    fs.dev.close()  # after a cut the machine is off: nothing more reaches the image
    record = read_record(f"{image}.powercut")
    return tracked, record


async def check_after_cut(image: Path, tracked: Tracked) -> list[str]:
    """fsck, recovery, then every fsynced file not written after must be exact,
    and no file -- fsynced or not -- may show a block nobody wrote to it."""
    result = fsck(image)
    if result.exit_code != 0:
        return [f"fsck exit {result.exit_code}: {result.messages[:2]}"]
    try:
        fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    except FsError as e:
        return [f"mount after the cut: {e}"]
    problems = []
    try:
        for name in sorted(tracked.dirty):
            try:
                fh = await fs.open((await fs.lookup(ROOT_INO, name)).ino, os.O_RDONLY)
            except FsError:
                if name in tracked.durable:
                    problems.append(f"{name!r}: fsynced, and gone")
                continue  # its creation was not durable yet
            if POISON[:16] in await fs.read(fh, 0, 4 * BS):
                problems.append(f"{name!r}: shows a block whose data never reached the disk")
            await fs.release(fh)
        for name, want in tracked.durable.items():
            if name in tracked.dirty:
                continue
            try:
                ino = (await fs.lookup(ROOT_INO, name)).ino
                fh = await fs.open(ino, os.O_RDONLY)
                got = await fs.read(fh, 0, len(want) + BS)
                await fs.release(fh)
            except FsError as e:
                problems.append(f"{name!r}: {e}")
                continue
            if got != want:
                problems.append(f"{name!r}: {len(got)} bytes, want {len(want)}")
    finally:
        await fs.unmount()
    return problems


@pytest.fixture
def fresh(tmp_path: Path) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        path = tmp_path / f"{name}.img"
        mkfs(path, 8 << 20)
        poison_free_blocks(path)
        return path

    return make


async def count_events(fresh: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> CutRecord:
    image = fresh("count")
    _, record = await run_cut(image, "mode=drop", monkeypatch)
    assert record is not None
    assert not record.cut
    return record


@pytest.mark.parametrize("mode", ["drop", "torn"])
async def test_no_fsynced_byte_is_lost_at_any_cut(
    mode: str, fresh: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    total = (await count_events(fresh, monkeypatch)).events
    assert total > 20
    failures = []
    for at in range(1, total + 1):
        image = fresh(f"{mode}{at}")
        tracked, record = await run_cut(image, f"at={at},mode={mode},seed={at}", monkeypatch)
        assert record is not None
        assert record.cut
        failures += [f"cut@{at}: {p}" for p in await check_after_cut(image, tracked)]
    assert not failures


def skip_flush_before_superblock(fs: Filesystem) -> None:
    """Break the commit protocol: skip every flush that has no metadata write
    (journal or superblock) pending -- exactly the flush a commit makes so that
    file data is durable before the journal entry that maps it."""
    dev = fs.dev
    assert dev.powercut is not None
    powercut = dev.powercut
    flush: Callable[[], Awaitable[None]] = dev.flush
    metadata = set(SUPERBLOCK_BLOCKS) | set(range(JOURNAL_START, JOURNAL_START + fs.committer.ring))

    async def broken_flush() -> None:
        if any(blk in metadata for blk, _ in powercut._journal):
            await flush()

    dev.flush = broken_flush  # type: ignore[method-assign]


async def test_a_broken_commit_ordering_is_caught(
    fresh: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = fresh("count")
    _, record = await run_cut(image, "mode=drop", monkeypatch, skip_flush_before_superblock)
    assert record is not None
    caught = []
    for at in record.flush_events:
        for seed in range(4):  # which pending writes survive: the entry without the data
            image = fresh(f"broken{at}-{seed}")
            tracked, cut = await run_cut(
                image, f"at={at},mode=torn,seed={seed}", monkeypatch, skip_flush_before_superblock
            )
            assert cut is not None
            assert cut.cut_on == "flush"
            caught += await check_after_cut(image, tracked)
    assert caught, "torn cuts at the journal flushes went unnoticed"
