"""Bugs image fuzzing found (tools/campaign/fuzz.py), each replayed on a small image.

Every image here has valid checksums all the way up to the superblock: the
metadata is wrong, not damaged, so only the checks of the loader and of fsck
stand between it and the filesystem.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fusefs.errors import Corrupt
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.fsck import fsck
from fusefs.inode import Inode
from fusefs.namespace import ROOT_INO
from tools.campaign.fuzzdamage import add_entry, empty_payload, parse, replace_chunk, write_index

OPTS = MountOptions(commit_interval=3600)


@pytest.fixture
async def tree(tmp_path: Path) -> Path:
    """/a/b/f (a file of two blocks) and /g, all in the checkpoint: a full
    checkpoint after the tree is made, so the journal is empty."""
    path = tmp_path / "fs.img"
    mkfs(path, 2 << 20)
    fs = await Filesystem.mount(path, OPTS)
    a = (await fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0)).ino
    b = (await fs.mkdir(a, b"b", 0o755, 0, 0)).ino
    for parent, name in ((b, b"f"), (ROOT_INO, b"g")):
        fh, _ = await fs.create(parent, name, 0o644, os.O_RDWR, 0, 0)
        await fs.write(fh, 0, b"x" * 8192)
        await fs.release(fh)
    await fs.sync()
    await fs.committer.write_checkpoint(fs.ns)
    await fs.unmount()
    assert fsck(path).exit_code == 0
    return path


def inos(path: Path) -> dict[str, int]:
    records = parse(path.read_bytes()).records()
    by_ino = {r["ino"]: r for r in records}
    a = by_ino[ROOT_INO]["entries"]["a"]
    b = by_ino[a]["entries"]["b"]
    return {"a": a, "b": b, "f": by_ino[b]["entries"]["f"], "g": by_ino[ROOT_INO]["entries"]["g"]}


def rewrite_checkpoint(path: Path, change: Callable[[dict[int, dict[str, Any]]], None]) -> None:
    """Change the checkpoint's inode records (by number); checksums made right."""
    img = bytearray(path.read_bytes())
    layout = parse(img)
    assert len(layout.chunks) == 1
    records = copy.deepcopy(layout.chunks[0])
    change({r["ino"]: r for r in records})
    replace_chunk(img, layout, 0, records, random.Random(0))
    path.write_bytes(img)


def journal(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """A valid journal entry with the records ``change`` puts in."""
    img = bytearray(path.read_bytes())
    layout = parse(img)
    payload = empty_payload(layout)
    change(payload)
    assert "added" in add_entry(img, layout, payload)
    path.write_bytes(img)


def lower_next_ino(path: Path) -> None:
    """The checkpoint index's next inode number set to 2."""
    img = bytearray(path.read_bytes())
    layout = parse(img)
    index = copy.deepcopy(layout.index)
    index["next_ino"] = 2
    write_index(img, layout, index, random.Random(0))
    path.write_bytes(img)


async def assert_repairs(path: Path, *errors: str) -> None:
    """fsck finds ``errors``; --repair fixes them; fsck is clean after; it mounts."""
    first = fsck(path)
    assert first.exit_code == 4, first.messages
    for e in errors:
        assert any(e in line for line in first.errors), (e, first.errors)
    fixed = await trio.to_thread.run_sync(lambda: fsck(path, repair=True))
    assert fixed.exit_code == 1, fixed.messages
    second = fsck(path)
    assert second.exit_code == 0, second.messages
    fs = await Filesystem.mount(path, OPTS)
    await fs.unmount()


# the loader: type and range checks of decoded records


async def test_a_journal_name_that_is_not_a_string_is_refused(tree: Path) -> None:
    """It raised AttributeError out of `journal.apply`: a traceback from mount and fsck."""
    ino = inos(tree)
    journal(tree, lambda p: p["dirents"].append([ino["a"], None, ino["g"]]))
    result = fsck(tree)
    assert result.exit_code == 8
    assert "bad record" in result.errors[0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mode", 1 << 40),  # stat.S_ISDIR raised OverflowError
        ("mode", 0o644),  # no file type
        ("ino", 0),  # 0 stands for the metadata in fsck's block owners
        ("ino", -1),
        ("nlink", -1),
        ("size", -1),
        ("uid", 1 << 40),
        ("gid", "0"),
        ("mtime", 1.5),
        ("xattrs", {"": ""}),  # an empty name: getxattr refused it, fsck did not
        ("xattrs", {"user.a": "ab" * 70000}),
    ],
)
def test_an_inode_record_out_of_range_is_refused(key: str, value: Any) -> None:
    rec = Inode(ino=5, mode=0o100644, uid=0, gid=0, nlink=1).to_record()
    Inode.from_record(rec)
    rec[key] = value
    with pytest.raises(ValueError, match=r"out of range|unknown file type"):
        Inode.from_record(rec)


async def test_a_checkpoint_with_a_mode_out_of_range_is_refused(tree: Path) -> None:
    def change(recs: dict[int, dict[str, Any]]) -> None:
        recs[inos(tree)["g"]]["mode"] = 1 << 40

    rewrite_checkpoint(tree, change)
    result = fsck(tree)
    assert result.exit_code == 8
    assert "mode" in result.errors[0]


async def test_a_mount_of_a_record_out_of_range_fails_cleanly(tree: Path) -> None:
    ino = inos(tree)
    journal(tree, lambda p: p["inodes"].append({**_attrs(ino["g"]), "uid": 1 << 40}))
    with pytest.raises(Corrupt, match="uid"):
        await Filesystem.mount(tree, OPTS)


def _attrs(ino: int) -> dict[str, Any]:
    return Inode(ino=ino, mode=0o100644, uid=0, gid=0, nlink=1).to_record(whole=False)
