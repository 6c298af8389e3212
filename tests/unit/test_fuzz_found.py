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
from fusefs.format import JOURNAL_START, mkfs
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


def zero_entry_header(path: Path, i: int) -> int:
    """The first block of the journal's ``i``-th live entry zeroed; its number."""
    img = bytearray(path.read_bytes())
    layout = parse(img)
    entry = layout.entries[i]
    blk = JOURNAL_START + entry.pos
    img[blk * layout.bs : (blk + 1) * layout.bs] = bytes(layout.bs)
    path.write_bytes(img)
    return entry.seq


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


# fsck --repair


async def test_repair_writes_the_next_inode_number_it_corrects(tree: Path) -> None:
    """fsck --repair counted the error fixed but wrote nothing: fsck found it again."""
    journal(tree, lambda p: p.update(next_ino=2))
    lower_next_ino(tree)
    await assert_repairs(tree, "next inode number 2")


async def test_repair_leaves_a_directory_one_name(tree: Path) -> None:
    """/a/b/loop naming /a: 'more than one name' was an error fsck left (exit 4)."""
    ino = inos(tree)
    rewrite_checkpoint(tree, lambda r: r[ino["b"]]["entries"].update(loop=ino["a"]))
    await assert_repairs(tree, f"directory {ino['a']} has 2 names")
    fs = await Filesystem.mount(tree, OPTS)
    assert fs.ns.lookup(ROOT_INO, b"a").ino == ino["a"]
    assert b"loop" not in (fs.ns.get(ino["b"]).entries or {})
    await fs.unmount()


async def test_repair_breaks_a_loop_nothing_reaches(tree: Path) -> None:
    """/a and /a/b holding each other, /a's name gone: both went to lost+found
    and kept their names in each other -- directories with two names again."""
    ino = inos(tree)

    def change(r: dict[int, dict[str, Any]]) -> None:
        del r[ROOT_INO]["entries"]["a"]
        r[ino["b"]]["entries"]["up"] = ino["a"]

    rewrite_checkpoint(tree, change)
    await assert_repairs(tree, f"inode {ino['a']} is not reachable")
    fs = await Filesystem.mount(tree, OPTS)
    lf = fs.ns.lookup(ROOT_INO, b"lost+found")
    assert lf.entries is not None
    assert ino["a"] in lf.entries.values()
    assert fs.ns.get(ROOT_INO).nlink == 3  # 2 + lost+found (/a is in it now)
    await fs.unmount()


async def test_repair_counts_lost_found_in_the_root_link_count(tree: Path) -> None:
    """A removed /a left /a/b unreachable: the new lost+found raised the root's
    count by hand, and the count check then set it back."""
    ino = inos(tree)
    journal(tree, lambda p: p["deleted"].append(ino["a"]))
    await assert_repairs(tree, f"entry b'a' names missing inode {ino['a']}")


async def test_check_only_with_a_dangling_entry_and_a_loop(tree: Path) -> None:
    """Without --repair the dangling entry stays, and the later checks looked
    the missing inode up: KeyError."""
    ino = inos(tree)

    def change(r: dict[int, dict[str, Any]]) -> None:
        r[ino["b"]]["entries"]["gone"] = 999
        r[ino["b"]]["entries"]["loop"] = ino["a"]

    rewrite_checkpoint(tree, change)
    await assert_repairs(tree, "names missing inode 999", "has 2 names")


async def test_repair_drops_entries_naming_the_root_or_with_bad_names(tree: Path) -> None:
    ino = inos(tree)

    def change(p: dict[str, Any]) -> None:
        p["dirents"] += [[ino["a"], "root", ROOT_INO], [ino["a"], "x/y", ino["g"]]]

    journal(tree, change)
    await assert_repairs(tree, "names the root directory", "is not a valid name")


async def test_repair_cuts_a_size_past_the_largest_file(tree: Path) -> None:
    """A size of 2**62: every read of the file failed; fsck found nothing."""
    ino = inos(tree)
    rewrite_checkpoint(tree, lambda r: r[ino["g"]].update(size=1 << 62))
    await assert_repairs(tree, "past the largest file")
    fs = await Filesystem.mount(tree, OPTS)
    assert fs.ns.get(ino["g"]).size == 8192
    await fs.unmount()


# mount


async def test_mount_reclaims_no_inode_a_name_still_reaches(tree: Path) -> None:
    """A link count of 0 on the root and on /g: recovery took both for orphans
    of files unlinked while open, removed them, and the unmount committed a
    filesystem without a root (refused at the next mount)."""
    ino = inos(tree)

    def change(r: dict[int, dict[str, Any]]) -> None:
        r[ROOT_INO]["nlink"] = 0
        r[ino["g"]]["nlink"] = 0

    rewrite_checkpoint(tree, change)
    fs = await Filesystem.mount(tree, OPTS)
    assert fs.ns.lookup(ROOT_INO, b"g").ino == ino["g"]
    await fs.unmount()
    await assert_repairs(tree, f"inode {ino['g']}: link count 0, should be 1")
    fs = await Filesystem.mount(tree, OPTS)
    fh = await fs.open(ino["g"], os.O_RDONLY)
    assert await fs.read(fh, 0, 8192) == b"x" * 8192
    await fs.release(fh)
    await fs.unmount()


async def test_a_missing_entry_with_later_entries_is_refused(tree: Path) -> None:
    """The header of a middle entry zeroed: replay stopped there and the mount
    went on; its first commit, written where replay stopped, made the stale
    entries after it replayable again -- on the next mount they were applied
    on top of the new state (here: the root removed)."""
    fs = await Filesystem.mount(tree, OPTS)
    for name in (b"j1", b"j2", b"j3"):
        fh, _ = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
        await fs.release(fh)
        await fs.commit()
    await fs.unmount()
    journal(tree, lambda p: p["deleted"].append(ROOT_INO))
    seq = zero_entry_header(tree, 1)
    with pytest.raises(Corrupt, match=f"entry {seq} is damaged or missing"):
        await Filesystem.mount(tree, OPTS)
    assert fsck(tree).exit_code == 8


async def test_mount_never_hands_out_an_inode_number_in_use(tree: Path) -> None:
    """A next inode number of 2 in the checkpoint: the next file created took
    number 2 -- replacing /a -- and the image lost its tree."""
    lower_next_ino(tree)
    fs = await Filesystem.mount(tree, OPTS)
    fh, attr = await fs.create(ROOT_INO, b"new", 0o644, os.O_RDWR, 0, 0)
    await fs.release(fh)
    assert attr.ino > max(inos(tree).values())
    await fs.unmount()
    assert fsck(tree).exit_code == 0


async def test_a_next_inode_number_out_of_range_is_refused_then_repaired(tree: Path) -> None:
    """2**70 from the journal: the next file got a number no load accepts."""
    journal(tree, lambda p: p.update(next_ino=1 << 70))
    with pytest.raises(Corrupt, match="next inode number"):
        await Filesystem.mount(tree, OPTS)
    await assert_repairs(tree, "out of range")
