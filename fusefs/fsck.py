"""fsck: verify an unmounted image, and repair what can be repaired.

Checks, in order:

1. both superblock copies (a stale one is fine; a damaged one is an error,
   which --repair fixes by writing the current superblock over it), the
   checkpoint's header, index and chunk checksums;
2. the journal replays: entries from the tail while their sequence numbers
   follow on; a torn last entry is a note (the commit it held never finished),
   a damaged entry with valid ones after it is an error (`load_checkpoint`
   refuses it, exit 8);
3. the inode table decodes, the root is a directory, every extent lies inside
   the data area, no block is mapped twice (by two files, or by a file and the
   metadata: journal and checkpoint) -- block usage is not stored, it is
   rebuilt from the mappings at mount, so this is what keeps it right;
4. every directory entry names an existing inode, link counts equal the number
   of entries naming the inode (directories: 2 + subdirectories), each
   directory's parent pointer matches the directory holding it;
5. every inode with links is reachable from the root; inodes without links are
   orphans of files unlinked while open (reclaimed at mount or by --repair).

Exit codes as e2fsck: 0 clean, 1 errors corrected, 4 errors left uncorrected,
8 operational error (unreadable image, corrupt superblock or checkpoint).
`FsckResult` keeps the errors (what the command line prints on stderr) apart
from the report (notes and the summary line, on stdout).
Repair fixes counts, drops dangling entries and double mappings (the later
owner loses the blocks), reconnects unreachable inodes under ``/lost+found``,
reclaims orphans, and writes the result as a new checkpoint with a normal
atomic commit.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field

import trio

from fusefs.alloc import Allocator, Run
from fusefs.blockdev import BlockDevice
from fusefs.commit import Committer, Loaded, load_checkpoint
from fusefs.dirents import Directory
from fusefs.errors import FsError
from fusefs.format import SUPERBLOCK_BLOCKS, Superblock, normalize_runs, probe_block_size
from fusefs.inode import Inode, now_ns
from fusefs.namespace import ROOT_INO, Namespace

EXIT_CLEAN = 0
EXIT_CORRECTED = 1
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8


@dataclass
class FsckResult:
    exit_code: int
    errors: list[str] = field(default_factory=list)  # one line each, for stderr
    report: list[str] = field(default_factory=list)  # notes, then the summary line

    @property
    def messages(self) -> list[str]:
        """Every line: the errors, then the report (its last line is the summary)."""
        return [*self.errors, *self.report]


@dataclass
class _Check:
    repair: bool
    errors: list[str] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    fixed: int = 0

    def error(self, msg: str, *, fixable: bool = True) -> None:
        if self.repair and fixable:
            self.fixed += 1
            self.errors.append(f"{msg} (fixed)")
        else:
            self.errors.append(msg)

    def note(self, msg: str) -> None:
        self.report.append(msg)

    def result(self, exit_code: int) -> FsckResult:
        return FsckResult(exit_code, self.errors, self.report)


def _about(path: str, e: Exception) -> str:
    """``path: reason``, the path once (the block device's errors name it already)."""
    reason = str(e).removeprefix(f"{path}: ")
    return f"{path}: {reason}"


def fsck(path: str | os.PathLike[str], repair: bool = False) -> FsckResult:
    """Check (and with ``repair`` fix) the image at ``path``."""
    path = os.fspath(path)
    try:
        bs = probe_block_size(path)
        dev = BlockDevice(path, bs, read_only=not repair)
    except (FsError, OSError) as e:
        return FsckResult(EXIT_OPERATIONAL, [_about(path, e)])
    try:
        try:
            loaded = load_checkpoint(dev)
        except FsError as e:
            return FsckResult(EXIT_OPERATIONAL, [f"{path}: checkpoint unreadable: {e}"])
        check = _Check(repair)
        damaged = _check_superblocks(dev, loaded, check)
        _note_journal(loaded, check)
        inodes = _check_inodes(loaded, check)
        if inodes is None:
            return check.result(EXIT_UNCORRECTED)
        changed = _check_blocks(loaded, inodes, check)
        changed |= _check_tree(inodes, check)
        if repair:
            try:
                # The damaged copies first: then a repair commit, which overwrites
                # one copy, always leaves the other one valid.
                _rewrite_superblocks(dev, loaded, damaged)
                if changed:
                    trio.run(_write_repaired, dev, loaded, inodes)
            except FsError as e:
                check.errors.append(f"repair failed to commit: {e}")
                return check.result(EXIT_UNCORRECTED)
        errors = len(check.errors)
        if errors == 0:
            code = EXIT_CORRECTED if (repair and changed) else EXIT_CLEAN
        elif repair and check.fixed == errors:
            code = EXIT_CORRECTED
        else:
            code = EXIT_UNCORRECTED
        notes = len(check.report)
        summary = (
            f"{len(inodes)} inodes, {errors} errors"
            + (f", {check.fixed} fixed" if repair else "")
            + (f", {notes} notes" if notes else "")
        )
        check.report.append(summary)
        return check.result(code)
    finally:
        dev.close()


_COPY_NAMES = "AB"


def _check_superblocks(dev: BlockDevice, loaded: Loaded, check: _Check) -> list[int]:
    """The blocks of damaged superblock copies (the current one is valid: it was
    just loaded)."""
    damaged = []
    for copy, blk in zip(_COPY_NAMES, SUPERBLOCK_BLOCKS, strict=True):
        raw = dev.read_sync(blk, 1)
        try:
            sb = Superblock.unpack(raw)
        except FsError as e:
            reason = str(e)
        else:
            current = loaded.superblock
            if (sb.block_size, sb.device_blocks, sb.uuid) == (
                current.block_size,
                current.device_blocks,
                current.uuid,
            ):
                continue
            reason = "belongs to another filesystem (its size or uuid differs)"
        damaged.append(blk)
        check.error(
            f"superblock copy {copy} (block {blk}) is damaged: {reason}; "
            f"the image still mounts from the other copy"
        )
    return damaged


def _rewrite_superblocks(dev: BlockDevice, loaded: Loaded, damaged: list[int]) -> None:
    """Write the current superblock over each damaged copy, then flush."""
    if not damaged:
        return
    raw = loaded.superblock.pack(dev.block_size)
    for blk in damaged:
        dev.write_sync(blk, raw)
    dev.flush_sync()


def _note_journal(loaded: Loaded, check: _Check) -> None:
    """A torn last entry is what a crash in the middle of a commit leaves: no
    error, but worth saying (replaying whole entries is the normal case)."""
    journal = loaded.journal
    if journal.torn:
        check.note(
            f"journal: {journal.entries} entries replayed; a torn last entry was dropped "
            f"(its commit never finished)"
        )


def _check_inodes(loaded: Loaded, check: _Check) -> dict[int, Inode] | None:
    inodes = loaded.inodes
    root = inodes.get(ROOT_INO)
    if root is None or not root.is_dir:
        check.error("no root directory", fixable=False)
        return None
    if inodes and loaded.next_ino <= max(inodes):
        check.error(f"next inode number {loaded.next_ino} not above the largest in use")
        loaded.next_ino = max(inodes) + 1
    return inodes


def _check_blocks(loaded: Loaded, inodes: dict[int, Inode], check: _Check) -> bool:
    """Extents inside the device, nothing mapped twice, usage equal to the mappings."""
    changed = False
    blocks = loaded.superblock.device_blocks
    first_data = loaded.superblock.first_data_block
    owner: dict[int, int] = {}
    for pblk, n in (*loaded.runs, loaded.journal_run):
        for b in range(pblk, pblk + n):
            owner[b] = 0  # the metadata itself
    for inode in sorted(inodes.values(), key=lambda i: i.ino):
        if inode.extents is None:
            continue
        bad: list[tuple[int, int]] = []
        for ext in list(inode.extents.extents()):
            assert ext.pblk is not None
            if ext.pblk < first_data or ext.pblk + ext.length > blocks:
                check.error(
                    f"inode {inode.ino}: extent {ext.start}+{ext.length} at block {ext.pblk} "
                    f"outside the data area"
                )
                bad.append((ext.start, ext.length))
                continue
            for i in range(ext.length):
                b = ext.pblk + i
                other = owner.get(b)
                if other is not None:
                    what = "the metadata" if other == 0 else f"inode {other}"
                    check.error(f"block {b} mapped by inode {inode.ino} and by {what}")
                    bad.append((ext.start + i, 1))
                else:
                    owner[b] = inode.ino
        if bad and check.repair:
            for lblk, n in bad:
                inode.extents.unmap(lblk, n)
            changed = True
    return changed


def _check_tree(inodes: dict[int, Inode], check: _Check) -> bool:
    changed = False
    refs: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    parent_of: dict[int, int] = {}
    for d in list(inodes.values()):
        if d.entries is None:
            continue
        for name, ino in list(d.entries.items()):
            child = inodes.get(ino)
            if child is None:
                check.error(f"directory {d.ino}: entry {name!r} names missing inode {ino}")
                if check.repair:
                    del d.entries[name]
                    changed = True
                continue
            refs[ino] += 1
            if child.is_dir:
                subdirs[d.ino] += 1
                if ino in parent_of:
                    check.error(f"directory {ino} has more than one name", fixable=False)
                parent_of[ino] = d.ino
    # reachability from the root
    reachable = {ROOT_INO}
    stack = [ROOT_INO]
    while stack:
        d = inodes[stack.pop()]
        for ino in (d.entries or {}).values():
            if ino in inodes and ino not in reachable:
                reachable.add(ino)
                if inodes[ino].is_dir:
                    stack.append(ino)
    lost_found: Inode | None = None
    for inode in sorted(inodes.values(), key=lambda i: i.ino):
        if inode.ino in reachable:
            continue
        if inode.nlink == 0 and refs[inode.ino] == 0:
            check.note(f"inode {inode.ino}: orphan (unlinked while open); reclaimed at mount")
            if check.repair:
                del inodes[inode.ino]
                changed = True
            continue
        check.error(f"inode {inode.ino} is not reachable from the root")
        if check.repair:
            if lost_found is None:
                lost_found = _lost_and_found(inodes)
            assert lost_found.entries is not None
            lost_found.entries[f"#{inode.ino}".encode()] = inode.ino
            refs[inode.ino] += 1
            if inode.is_dir:
                inode.parent = lost_found.ino
                subdirs[lost_found.ino] += 1
                parent_of[inode.ino] = lost_found.ino
            changed = True
    for inode in inodes.values():
        want = 2 + subdirs[inode.ino] if inode.is_dir else refs[inode.ino]
        if inode.ino not in reachable and inode.nlink == 0 and refs[inode.ino] == 0:
            continue
        if inode.nlink != want:
            check.error(f"inode {inode.ino}: link count {inode.nlink}, should be {want}")
            if check.repair:
                inode.nlink = want
                changed = True
        if inode.is_dir and inode.ino != ROOT_INO:
            parent = parent_of.get(inode.ino)
            if parent is not None and inode.parent != parent:
                check.error(f"directory {inode.ino}: parent {inode.parent}, should be {parent}")
                if check.repair:
                    inode.parent = parent
                    changed = True
    return changed


def _lost_and_found(inodes: dict[int, Inode]) -> Inode:
    root = inodes[ROOT_INO]
    assert root.entries is not None
    ino = root.entries.get(b"lost+found")
    if ino is not None and inodes[ino].is_dir:
        return inodes[ino]
    new_ino = max(inodes) + 1
    t = now_ns()
    lf = Inode(
        ino=new_ino,
        mode=stat.S_IFDIR | 0o700,
        uid=0,
        gid=0,
        nlink=2,
        atime_ns=t,
        mtime_ns=t,
        ctime_ns=t,
        entries=Directory(),
        parent=ROOT_INO,
    )
    inodes[new_ino] = lf
    root.entries[b"lost+found"] = new_ino
    root.nlink += 1
    return lf


async def _write_repaired(dev: BlockDevice, loaded: Loaded, inodes: dict[int, Inode]) -> None:
    """Write the repaired inode table as a new full checkpoint (the journal
    empties: everything is in the checkpoint)."""
    sb = loaded.superblock
    used: list[Run] = []
    for inode in inodes.values():
        if inode.extents is not None:
            used += [(e.pblk, e.length) for e in inode.extents.extents() if e.pblk is not None]
    alloc = Allocator.from_used(
        sb.device_blocks, sb.first_data_block, normalize_runs(used) + list(loaded.runs)
    )
    committer = Committer(dev, alloc, loaded)
    next_ino = max(loaded.next_ino, max(inodes) + 1)
    await committer.write_checkpoint(Namespace(inodes, next_ino))


__all__ = ["FsckResult", "fsck"]
