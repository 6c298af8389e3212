"""The metadata journal and checkpoints (fusefs/journal.py, fusefs/commit.py).

Each test drives the core in-process on a real image and "crashes" by closing
the device without unmounting: what the next mount finds is what the journal
and the checkpoint hold, nothing from memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import fusefs.commit
from fusefs.blockdev import BlockDevice
from fusefs.commit import load_checkpoint
from fusefs.errors import FsError, ReadOnly
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import (
    JOURNAL_HEADER_SIZE,
    JOURNAL_START,
    SUPERBLOCK_BLOCKS,
    JournalEntryHeader,
    Superblock,
    mkfs,
)
from fusefs.fsck import fsck
from fusefs.inode import Inode
from fusefs.namespace import ROOT_INO

from .conftest import assert_fsck_clean

BS = 4096
UID, GID = os.getuid(), os.getgid()
OPTS = MountOptions(commit_interval=3600)


def state(fs: Filesystem) -> dict[int, dict[str, Any]]:
    """Every inode's whole record: what a remount must reproduce."""
    return {ino: inode.to_record() for ino, inode in fs.ns.inodes.items()}


def crash(fs: Filesystem) -> None:
    """The daemon dies: nothing more reaches the image."""
    fs.dev.close()


async def remount(image: Path) -> Filesystem:
    return await Filesystem.mount(image, OPTS)


async def make(fs: Filesystem, name: bytes, data: bytes = b"", parent: int = ROOT_INO) -> int:
    fh, attr = await fs.create(parent, name, 0o644, os.O_RDWR, UID, GID)
    if data:
        await fs.write(fh, 0, data)
    await fs.release(fh)
    return attr.ino


async def churn(fs: Filesystem, tag: str, n: int = 20) -> None:
    """Creates, writes, a rename, an unlink, an xattr, a subdirectory."""
    d = await fs.mkdir(ROOT_INO, f"d-{tag}".encode(), 0o755, UID, GID)
    for i in range(n):
        await make(fs, f"{tag}{i}".encode(), bytes([i % 251]) * (100 + i * 300), d.ino)
    await fs.rename(d.ino, f"{tag}0".encode(), ROOT_INO, f"moved-{tag}".encode(), 0)
    await fs.unlink(d.ino, f"{tag}1".encode())
    await fs.setxattr(d.ino, b"user.tag", tag.encode(), 0)


def entry_headers(image: Path) -> list[tuple[int, JournalEntryHeader]]:
    """The journal entries from the tail on, as mount would find them."""
    dev = BlockDevice(image, BS, read_only=True)
    try:
        raw = dev.read_sync(SUPERBLOCK_BLOCKS[0], 1)
        sbs = [Superblock.unpack(dev.read_sync(b, 1)) for b in SUPERBLOCK_BLOCKS]
        sb = max(sbs, key=lambda s: s.seq)
        assert raw
        out: list[tuple[int, JournalEntryHeader]] = []
        pos, seq = sb.tail_pos, sb.tail_seq
        while True:
            head = JournalEntryHeader.unpack(dev.read_sync(JOURNAL_START + pos, 1), sb.seed)
            if head is None or head.seq != seq:
                return out
            out.append((pos, head))
            pos = (pos + head.blocks) % sb.journal_blocks
            seq += 1
    finally:
        dev.close()


async def test_a_commit_writes_what_changed_not_what_exists(image: Path) -> None:
    fs = await remount(image)
    for i in range(2000):
        await make(fs, f"f{i}".encode())
    await fs.commit()
    assert fs.committer.last_commit_bytes > 20_000  # 2,000 inodes and entries
    ino = await make(fs, b"one", b"x" * 100)
    fh = await fs.open(ino, os.O_RDWR)
    await fs.write(fh, 0, b"y" * 4096)
    await fs.fsync(fh, False)
    await fs.release(fh)
    # One inode, one entry, one extent range, the directory's times.
    assert fs.committer.last_commit_bytes < 600
    await fs.unmount()
    assert_fsck_clean(image)


async def test_the_journal_alone_brings_back_every_commit(image: Path) -> None:
    fs = await remount(image)
    await churn(fs, "a")
    await fs.commit()
    await churn(fs, "b")
    await fs.commit()
    assert fs.committer.checkpoints == 0  # all of it is in the journal
    want = state(fs)
    crash(fs)
    assert_fsck_clean(image)
    fs = await remount(image)
    assert state(fs) == want
    await fs.unmount()


async def test_changes_after_the_last_commit_are_gone_and_the_rest_is_whole(image: Path) -> None:
    fs = await remount(image)
    await churn(fs, "a")
    await fs.commit()
    want = state(fs)
    await churn(fs, "b")  # never committed
    crash(fs)
    fs = await remount(image)
    assert state(fs) == want
    await fs.unmount()
    assert_fsck_clean(image)


async def test_a_torn_last_entry_is_dropped(image: Path) -> None:
    fs = await remount(image)
    await churn(fs, "a")
    await fs.commit()
    want = state(fs)
    await churn(fs, "b")
    await fs.commit()
    crash(fs)
    pos, head = entry_headers(image)[-1]
    fd = os.open(image, os.O_RDWR)
    try:  # the last block of the last entry never made it
        last = JOURNAL_START + pos + head.blocks - 1
        os.pwrite(fd, b"\0" * 512, last * BS + (JOURNAL_HEADER_SIZE if head.blocks == 1 else 0))
    finally:
        os.close(fd)
    result = fsck(image)
    assert result.exit_code == 0, result.messages
    assert any("torn last entry was dropped" in line for line in result.report)
    fs = await remount(image)
    assert state(fs) == want
    await make(fs, b"after")  # the journal goes on over the torn entry
    await fs.commit()
    crash(fs)
    fs = await remount(image)
    assert b"after" in (fs.ns.inodes[ROOT_INO].entries or {})
    await fs.unmount()
    assert_fsck_clean(image)


async def test_a_damaged_entry_before_good_ones_is_refused(image: Path) -> None:
    fs = await remount(image)
    for tag in "abc":
        await churn(fs, tag, 3)
        await fs.commit()
    crash(fs)
    pos, _ = entry_headers(image)[0]
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * 16, (JOURNAL_START + pos) * BS + JOURNAL_HEADER_SIZE + 8)
    finally:
        os.close(fd)
    with pytest.raises(FsError, match=r"journal entry \d+ is damaged and later entries follow"):
        await remount(image)
    assert fsck(image).exit_code == 8


async def test_a_half_full_journal_starts_a_checkpoint_and_frees_it(image: Path) -> None:
    fs = await remount(image)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        i = 0
        while fs.committer.checkpoints == 0:
            await make(fs, f"f{i}".encode(), b"z" * 5000)
            await fs.commit()
            i += 1
            assert i < 20_000
        assert fs.committer.journal_used < fs.committer.ring // 2 + 64
        want = state(fs)
        nursery.cancel_scope.cancel()
    crash(fs)
    assert_fsck_clean(image)
    fs = await remount(image)
    assert state(fs) == want
    await fs.unmount()


async def test_a_fuzzy_checkpoint_with_changes_between_its_chunks(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 8 inodes; between every two, creates, renames across chunks,
    unlinks of inodes already written and not yet written, directory moves."""
    monkeypatch.setattr(fusefs.commit, "CHUNK_WEIGHT", 8)
    fs = await remount(image)
    for tag in "abcd":
        await churn(fs, tag, 10)
    await fs.commit()
    real_chunk = fusefs.commit._chunk
    count = 0

    async def meddle() -> None:
        nonlocal count
        count += 1
        await make(fs, f"new{count}".encode(), b"n" * (count * 700))
        names = sorted(fs.ns.inodes[ROOT_INO].entries or {})
        victim = names[count % len(names)]
        target = fs.ns.lookup(ROOT_INO, victim)
        if target.is_dir:
            await fs.rename(ROOT_INO, victim, ROOT_INO, victim + b"-r", 0)
        else:
            await fs.unlink(ROOT_INO, victim)

    pending: list[int] = []

    def chunk(source: Any, batch: list[int]) -> bytes:
        pending.append(1)
        return real_chunk(source, batch)

    monkeypatch.setattr(fusefs.commit, "_chunk", chunk)
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def checkpoint() -> None:
            assert await fs.committer.checkpoint(fs.ns)
            done.set()

        nursery.start_soon(checkpoint)
        while not done.is_set():
            if pending:
                pending.clear()
                await meddle()
            await trio.lowlevel.checkpoint()
    assert count > 5
    assert fs.committer.checkpoints == 1
    await churn(fs, "after", 3)
    await fs.commit()
    want = state(fs)
    crash(fs)
    assert_fsck_clean(image)
    fs = await remount(image)
    assert state(fs) == want
    await fs.unmount()


async def test_an_entry_larger_than_the_journal_makes_a_full_checkpoint(tmp_path: Path) -> None:
    image = tmp_path / "tiny.img"
    mkfs(image, 1 << 20)  # 256 blocks: a journal of 8
    fs = await remount(image)
    assert fs.committer.ring == 8
    for _ in range(1500):  # far more than 8 blocks of records
        await make(fs, os.urandom(24).hex().encode())
    await fs.commit()
    assert fs.committer.full_checkpoints == 1
    assert fs.committer.journal_used == 0
    want = state(fs)
    crash(fs)
    assert_fsck_clean(image)
    fs = await remount(image)
    assert state(fs) == want
    await fs.unmount()


def superblocks(image: Path) -> list[Superblock]:
    with open(image, "rb") as f:
        return [Superblock.unpack(f.read(BS)), Superblock.unpack(f.read(BS))]


async def test_two_superblock_copies_from_the_start(image: Path) -> None:
    assert [sb.seq for sb in superblocks(image)] == [1, 1]
    fs = await remount(image)
    await churn(fs, "a")
    await fs.commit()  # journal only: the superblocks stay as mkfs wrote them
    assert [sb.seq for sb in superblocks(image)] == [1, 1]
    assert await fs.committer.checkpoint(fs.ns)
    assert sorted(sb.seq for sb in superblocks(image)) == [1, 2]
    assert await fs.committer.checkpoint(fs.ns)
    assert sorted(sb.seq for sb in superblocks(image)) == [2, 3]  # the older copy went
    await fs.unmount()
    assert_fsck_clean(image)


@pytest.mark.parametrize(
    "site", ["commit_write_journal", "checkpoint_write_chunk", "commit_write_superblock"]
)
async def test_a_failed_commit_or_checkpoint_keeps_the_last_durable_state(
    image: Path, site: str
) -> None:
    fs = await remount(image)
    await churn(fs, "a")
    await fs.commit()
    want = state(fs)
    await churn(fs, "b")
    REGISTRY.apply_startup([f"name {site} oneshot"])
    if site == "commit_write_journal":
        with pytest.raises(FsError):
            await fs.commit()
    else:
        with pytest.raises(FsError):
            await fs.committer.checkpoint(fs.ns)
        await fs.commit()  # a failed checkpoint alone leaves the last one current
    if site == "commit_write_journal":
        assert fs.read_only
        with pytest.raises(ReadOnly):
            await make(fs, b"more")
    crash(fs)
    assert_fsck_clean(image)
    fs = await remount(image)
    if site == "commit_write_journal":
        assert state(fs) == want
    await fs.unmount()
    assert_fsck_clean(image)


async def test_a_replay_fault_fails_the_mount_cleanly(image: Path) -> None:
    REGISTRY.apply_startup(["name journal_replay oneshot"])
    with pytest.raises(FsError, match="injected error replaying the journal"):
        await remount(image)
    fs = await remount(image)
    await fs.unmount()


async def test_a_version_1_image_is_refused_with_a_reason(image: Path) -> None:
    fd = os.open(image, os.O_RDWR)
    try:
        for blk in SUPERBLOCK_BLOCKS:
            os.pwrite(fd, (1).to_bytes(4, "little"), blk * BS + 8)
    finally:
        os.close(fd)
    with pytest.raises(FsError, match="unsupported format version 1"):
        await remount(image)


async def test_fsck_repair_writes_a_full_checkpoint_and_empties_the_journal(image: Path) -> None:
    fs = await remount(image)
    await churn(fs, "a")
    await fs.commit()
    ino = fs.ns.lookup(ROOT_INO, b"moved-a").ino
    fs.ns.inodes[ino].nlink = 5  # wrong: fsck must fix it
    await fs.commit()
    crash(fs)
    assert fsck(image).exit_code == 4
    assert (await trio.to_thread.run_sync(fsck, image, True)).exit_code == 1
    dev = BlockDevice(image, BS, read_only=True)
    try:
        loaded = load_checkpoint(dev)
    finally:
        dev.close()
    assert loaded.journal.entries == 0
    assert loaded.inodes[ino].nlink == 1
    assert_fsck_clean(image)


async def test_records_round_trip_every_field(fs: Filesystem) -> None:
    """`Inode.from_record` sets every slot (`Inode.__init__` fills them all, without
    the journaling `__setattr__`)."""
    import dataclasses

    d = await fs.mkdir(ROOT_INO, b"d", 0o750, UID, GID)
    ino = await make(fs, b"f", b"q" * 9000, d.ino)
    await fs.setxattr(ino, b"user.k", b"\x00\xff", 0)
    link = await fs.symlink(d.ino, b"l", b"../target\xff", UID, GID)
    await fs.sync()
    for n in (ROOT_INO, d.ino, ino, link.ino):
        inode = fs.ns.inodes[n]
        back = type(inode).from_record(inode.to_record())
        for f in dataclasses.fields(inode):
            getattr(back, f.name)  # set, even the run-time ones
        assert back.to_record() == inode.to_record()
        assert back.track is None
        assert back.open_count == 0


async def test_the_journal_sees_changes_of_stored_fields_once_adopted(fs: Filesystem) -> None:
    track = fs.ns.track
    await fs.commit()
    loose = Inode(ino=10**6, mode=0o100644, uid=0, gid=0, nlink=1)
    loose.size = 5  # no tracker yet: nothing to record
    assert loose.track is None
    ino = await make(fs, b"f")
    assert ino in track.inodes  # created: journaled whole
    await fs.commit()
    inode = fs.ns.inodes[ino]
    inode.lookups += 1  # run time only
    assert not track.inodes
    inode.touch(c=False)  # no time asked for: no change
    assert not track.inodes
    inode.touch(m=True)
    assert track.inodes == {ino}
    await fs.commit()
    inode.uid = 7
    assert track.inodes == {ino}
    assert fs.ns.find(ROOT_INO, b"missing") is None
    assert fs.ns.find(ROOT_INO, b"f") is inode


async def test_after_a_remount_a_commit_still_writes_only_what_changed(image: Path) -> None:
    fs = await remount(image)
    big = await make(fs, b"big")
    fh = await fs.open(big, os.O_RDWR)
    for i in range(0, 2000, 2):  # 1,000 separate extents
        await fs.write(fh, i * BS, b"b" * BS)
    await fs.release(fh)
    await fs.unmount()
    fs = await remount(image)
    assert len(fs.ns.inodes[big].extents.to_runs()) == 1000  # type: ignore[union-attr]
    fh = await fs.open(big, os.O_RDWR)
    await fs.write(fh, 3 * BS, b"t" * BS)  # one more extent, in the middle
    await fs.fsync(fh, False)
    await fs.release(fh)
    assert fs.committer.last_commit_bytes < 600
    await fs.unmount()
    assert_fsck_clean(image)
