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
4. every directory entry names an existing inode other than the root, by a
   valid name; every directory has one name (no hard links, no loops); link
   counts equal the number of entries naming the inode (directories: 2 +
   subdirectories), each directory's parent pointer matches the directory
   holding it; no file is larger than the largest a file can be;
5. every inode with links is reachable from the root; inodes without links are
   orphans of files unlinked while open (reclaimed at mount or by --repair).

Exit codes as e2fsck: 0 clean, 1 errors corrected, 4 errors left uncorrected,
8 operational error (unreadable image, corrupt superblock or checkpoint).
`FsckResult` keeps the errors (what the command line prints on stderr) apart
from the report (notes and the summary line, on stdout).
Repair fixes counts, drops dangling entries, bad names, extra names of a
directory and double mappings (the later owner loses the blocks), cuts sizes
back to the mapped blocks, reconnects unreachable inodes under ``/lost+found``,
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
from fusefs.extents import MAX_FILE_BLOCKS
from fusefs.format import SUPERBLOCK_BLOCKS, Superblock, normalize_runs, probe_block_size
from fusefs.inode import INO_LIMIT, Inode, now_ns
from fusefs.namespace import NAME_MAX, ROOT_INO, Namespace

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
        next_ino = loaded.next_ino
        inodes = _check_inodes(loaded, check)
        if inodes is None:
            return check.result(EXIT_UNCORRECTED)
        changed = loaded.next_ino != next_ino
        changed |= _check_sizes(inodes, dev.block_size, check)
        changed |= _check_blocks(loaded, inodes, check)
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
    elif loaded.next_ino >= INO_LIMIT:
        check.error(f"next inode number {loaded.next_ino} out of range")
        loaded.next_ino = max(inodes) + 1
    return inodes


def _check_sizes(inodes: dict[int, Inode], block_size: int, check: _Check) -> bool:
    """No file larger than the largest a file can be (reads past it fail)."""
    changed = False
    limit = MAX_FILE_BLOCKS * block_size
    for inode in inodes.values():
        if inode.size <= limit:
            continue
        check.error(f"inode {inode.ino}: size {inode.size} past the largest file, {limit}")
        if check.repair:
            end = 0
            if inode.extents is not None:
                end = max((e.end for e in inode.extents.extents()), default=0)
            inode.size = end * block_size
            changed = True
    return changed


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
    """Entries, names of directories, reachability, link counts, parents.

    Repairs go in an order where each leaves nothing for a later check to
    undo: entries that can't stand (dangling, a bad name, naming the root) go
    first; then each directory keeps one name (a directory tree has no hard
    links; the name in the directory its parent pointer names wins); then what
    is not reachable from the root goes to ``/lost+found`` -- a directory losing
    first any name left in an unreachable loop; the counts are taken last, from
    the tree as it is then.
    """
    changed = _check_entries(inodes, check)
    changed |= _check_dir_names(inodes, check)
    changed |= _check_reachable(inodes, check)
    refs: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    parent_of: dict[int, int] = {ROOT_INO: ROOT_INO}
    for d in inodes.values():
        for ino in (d.entries or {}).values():
            if ino not in inodes:
                continue  # reported (check only: not repaired)
            refs[ino] += 1
            if inodes[ino].is_dir:
                subdirs[d.ino] += 1
                parent_of[ino] = d.ino
    for inode in inodes.values():
        if _is_orphan(inode, refs):
            continue
        want = 2 + subdirs[inode.ino] if inode.is_dir else refs[inode.ino]
        if inode.nlink != want:
            check.error(f"inode {inode.ino}: link count {inode.nlink}, should be {want}")
            if check.repair:
                inode.nlink = want
                changed = True
        parent = parent_of.get(inode.ino)
        if inode.is_dir and parent is not None and inode.parent != parent:
            check.error(f"directory {inode.ino}: parent {inode.parent}, should be {parent}")
            if check.repair:
                inode.parent = parent
                changed = True
    return changed


def _is_orphan(inode: Inode, refs: Counter[int]) -> bool:
    """A file unlinked while open: no links, no names (a directory with entries
    is not one: it was never removed)."""
    return inode.nlink == 0 and refs[inode.ino] == 0 and not (inode.is_dir and inode.entries)


def _bad_name(name: bytes) -> bool:
    return not name or len(name) > NAME_MAX or b"/" in name or name in (b".", b"..")


def _check_entries(inodes: dict[int, Inode], check: _Check) -> bool:
    changed = False
    for d in list(inodes.values()):
        for name, ino in list((d.entries or {}).items()):
            if ino not in inodes:
                problem = f"names missing inode {ino}"
            elif _bad_name(name):
                problem = f"is not a valid name (inode {ino})"
            elif ino == ROOT_INO:
                problem = "names the root directory"
            else:
                continue
            check.error(f"directory {d.ino}: entry {name!r} {problem}")
            if check.repair:
                assert d.entries is not None
                del d.entries[name]
                changed = True
    return changed


def _check_dir_names(inodes: dict[int, Inode], check: _Check) -> bool:
    names: dict[int, list[tuple[int, bytes]]] = {}
    for d in inodes.values():
        for name, ino in (d.entries or {}).items():
            if ino in inodes and inodes[ino].is_dir:
                names.setdefault(ino, []).append((d.ino, name))
    changed = False
    for ino, where in sorted(names.items()):
        if len(where) < 2:
            continue
        check.error(f"directory {ino} has {len(where)} names")
        if check.repair:
            parent = inodes[ino].parent
            keep = next((w for w in where if w[0] == parent), where[0])
            for dir_ino, name in where:
                if (dir_ino, name) != keep:
                    entries = inodes[dir_ino].entries
                    assert entries is not None
                    del entries[name]
            changed = True
    return changed


def _reach(inodes: dict[int, Inode], start: int, reachable: set[int]) -> None:
    """Add what ``start`` (reachable) leads to."""
    stack = [start]
    while stack:
        for ino in (inodes[stack.pop()].entries or {}).values():
            if ino in inodes and ino not in reachable:
                reachable.add(ino)
                if inodes[ino].is_dir:
                    stack.append(ino)


def _check_reachable(inodes: dict[int, Inode], check: _Check) -> bool:
    reachable = {ROOT_INO}
    _reach(inodes, ROOT_INO, reachable)
    refs: Counter[int] = Counter()
    for d in inodes.values():
        refs.update((d.entries or {}).values())
    changed = False
    lost_found: Inode | None = None
    # Directories first: reconnecting one brings its subtree back with it.
    unreachable = sorted(
        (i for i in inodes.values() if i.ino not in reachable), key=lambda i: (not i.is_dir, i.ino)
    )
    for inode in unreachable:
        if inode.ino in reachable:
            continue
        if _is_orphan(inode, refs):
            check.note(f"inode {inode.ino}: orphan (unlinked while open); reclaimed at mount")
            if check.repair:
                del inodes[inode.ino]
                changed = True
            continue
        check.error(f"inode {inode.ino} is not reachable from the root")
        if not check.repair:
            continue
        if lost_found is None:
            lost_found = _lost_and_found(inodes)
            reachable.add(lost_found.ino)
        assert lost_found.entries is not None
        if inode.is_dir:
            # Its other names are in unreachable directories (a loop): drop them.
            for d in inodes.values():
                for name in [n for n, i in (d.entries or {}).items() if i == inode.ino]:
                    assert d.entries is not None
                    del d.entries[name]
        lost_found.entries[f"#{inode.ino}".encode()] = inode.ino
        reachable.add(inode.ino)
        if inode.is_dir:
            _reach(inodes, inode.ino, reachable)
        changed = True
    return changed


def _lost_and_found(inodes: dict[int, Inode]) -> Inode:
    root = inodes[ROOT_INO]
    assert root.entries is not None
    ino = root.entries.get(b"lost+found")
    if ino is not None and inodes[ino].is_dir:
        return inodes[ino]
    name = b"lost+found"
    while name in root.entries:
        name += b"~"
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
    root.entries[name] = new_ino
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
