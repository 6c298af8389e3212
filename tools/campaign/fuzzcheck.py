"""What image fuzzing does with one damaged image, and how it judges the result.

On three copies of the image:

1. ``fsck`` (check only);
2. mount in-process (`Filesystem.mount`, read-write: recovery runs), read
   everything -- walk the tree, read every file, readlink, listxattr and
   getxattr --, make a few changes, and unmount; fsck must still load what the
   unmount left, and find it clean if it was;
3. ``fsck --repair``, then a second ``fsck``, which must be clean, and a mount
   that reads everything again and makes the same changes, after which fsck
   must still find it clean.

While a mount is up every mapped extent is checked against the layout (inside
the data area, not on the superblocks, the journal or the checkpoint, no block
mapped twice) and every block a read returns is compared with what the image
holds at the block the file maps there, or zeros for a hole: a read that
returns anything else served data from outside the file's extents.

Outcomes: ``refused`` (fsck and mount refuse it with a clean one-line error),
``consistent`` (fsck clean, mounts and reads), ``repaired`` (fsck found errors,
``--repair`` fixed them), or a failure: ``traceback`` (an exception other than
`FsError` escaped fsck, mount, a read or unmount), ``hang`` (the image's worker
overran its time), ``bad data`` (a read outside the file's extents, or a mount
that accepted an extent it must not), ``repair failed`` (the repaired image
does not mount or read, or the second fsck still finds errors), ``mount
damaged`` (after a mount and a few changes -- `_Reader.use` -- fsck can no
longer load the image, or finds errors in one it found clean), ``fsck missed``
(fsck called the image clean, but mount refused it or a read failed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from fusefs.errors import FsError
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import JOURNAL_START
from fusefs.fsck import EXIT_CLEAN, EXIT_CORRECTED, EXIT_OPERATIONAL, FsckResult, fsck
from fusefs.namespace import ROOT_INO
from tools.campaign.fuzzbase import POISON, pattern_block

OK_OUTCOMES: Final = ("refused", "consistent", "repaired")
FAILURES: Final = (
    "traceback",
    "hang",
    "bad data",
    "repair failed",
    "fsck missed",
    "mount damaged",
)
OUTCOMES: Final = (*OK_OUTCOMES, *FAILURES)

READ_CAP: Final = 4 << 20  # bytes of one file read from its start (the rest: its last block)
WALK_CAP: Final = 20000  # entries walked on one mount
CHUNK: Final = 128 * 1024


class Failure(Exception):
    """What makes an image a failure (``kind`` one of `FAILURES`)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class MountReport:
    """What one mount saw."""

    refused: str = ""  # the FsError that refused the mount
    errors: list[str] = field(default_factory=list)  # clean errors of reads
    write_errors: list[str] = field(default_factory=list)  # clean errors of `_Reader.use`
    files: int = 0
    bytes_read: int = 0
    poison_blocks: int = 0  # free blocks (poisoned in the base) that a file maps now
    loops: int = 0  # directories reached twice
    tree: dict[str, str] = field(default_factory=dict)  # path -> digest (for the FUSE sample)


@dataclass
class Verdict:
    outcome: str
    detail: str = ""
    fsck_exit: int | None = None
    repair_exit: int | None = None
    second_exit: int | None = None
    mount: MountReport | None = None
    traceback: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "detail": self.detail,
            "fsck": self.fsck_exit,
            "repair": self.repair_exit,
            "second_fsck": self.second_exit,
            "mount_refused": self.mount.refused if self.mount else "",
            "read_errors": len(self.mount.errors) if self.mount else 0,
            "poison_blocks": self.mount.poison_blocks if self.mount else 0,
            "traceback": self.traceback,
        }


def _one_line(what: str, message: str) -> None:
    if "\n" in message or not message.strip():
        raise Failure("traceback", f"{what}: error message not one line: {message!r}")


def _fsck(path: Path, repair: bool = False) -> FsckResult:
    what = "fsck --repair" if repair else "fsck"
    try:
        result = fsck(path, repair=repair)
    except Exception as e:
        raise Failure("traceback", f"{what} raised {type(e).__name__}: {e}") from e
    for line in result.messages:
        _one_line(what, line)
    return result


# the mount and the reads:


class _Reader:
    def __init__(self, fs: Filesystem, raw: bytes, report: MountReport) -> None:
        self.fs = fs
        self.raw = raw
        self.bs = fs.block_size
        self.report = report
        self.visited: set[int] = set()
        self.files: list[int] = []

    def check_layout(self) -> None:
        """Every extent the mount accepted lies in the data area, off the metadata,
        and no block is mapped twice."""
        sb = self.fs.committer.superblock
        owner: dict[int, int] = {}
        for pblk, n in self.fs.committer.runs:
            for b in range(pblk, pblk + n):
                owner[b] = 0
        for inode in self.fs.ns.inodes.values():
            if inode.extents is None:
                continue
            for ext in inode.extents.extents():
                assert ext.pblk is not None
                if ext.pblk < sb.first_data_block or ext.pblk + ext.length > sb.device_blocks:
                    where = (
                        "the superblock or journal"
                        if ext.pblk < sb.first_data_block
                        else "past the device"
                    )
                    raise Failure(
                        "bad data",
                        f"mount accepted inode {inode.ino}'s extent at block "
                        f"{ext.pblk}+{ext.length}, in {where} (data area "
                        f"{sb.first_data_block}..{sb.device_blocks}, journal from {JOURNAL_START})",
                    )
                for b in range(ext.pblk, ext.pblk + ext.length):
                    other = owner.get(b)
                    if other is not None:
                        what = "the checkpoint" if other == 0 else f"inode {other}"
                        raise Failure(
                            "bad data",
                            f"mount accepted block {b} mapped by inode {inode.ino} and by {what}",
                        )
                    owner[b] = inode.ino

    def expected(self, inode: Any, offset: int, length: int) -> bytes:
        """What the file holds at [offset, offset + length): the image's bytes of
        the blocks it maps, zeros in holes and unwritten extents."""
        bs = self.bs
        out = bytearray()
        end = offset + length
        lblk = offset // bs
        while lblk * bs < end:
            ext = inode.extents.lookup(lblk)
            if ext.pblk is None or ext.unwritten:
                block = bytes(bs)
            else:
                p = ext.pblk + (lblk - ext.start)
                block = self.raw[p * bs : (p + 1) * bs].ljust(bs, b"\0")
                if POISON in block:
                    self.report.poison_blocks += 1
            out += block
            lblk += 1
        first = offset - (offset // bs) * bs
        return bytes(out[first : first + length])

    async def read_file(self, path: str, ino: int) -> str:
        fs = self.fs
        inode = fs.ns.get(ino)
        fh = await fs.open(ino, os.O_RDONLY)
        digest = hashlib.sha256()
        try:
            size = inode.size
            spans = [(0, min(size, READ_CAP))]
            if size > READ_CAP:
                tail = max(READ_CAP, size - self.bs)
                spans.append((tail, size - tail))
            for start, length in spans:
                pos = start
                while pos < start + length:
                    want = min(CHUNK, start + length - pos)
                    got = await fs.read(fh, pos, want)
                    expect = self.expected(inode, pos, want)
                    if got != expect:
                        at = next(
                            (
                                i
                                for i, (a, b) in enumerate(zip(got, expect, strict=False))
                                if a != b
                            ),
                            min(len(got), len(expect)),
                        )
                        raise Failure(
                            "bad data",
                            f"{path} (inode {ino}): read {pos}+{want} returned {len(got)} bytes "
                            f"that differ at {pos + at} from the blocks the file maps "
                            f"(want {len(expect)} bytes)",
                        )
                    digest.update(got)
                    self.report.bytes_read += len(got)
                    pos += want
        finally:
            await fs.release(fh)
        return digest.hexdigest()

    async def use(self) -> None:
        """A few changes, as a user's first minutes on the mount would make them:
        a new file written and fsynced, appends, fallocate (punch, zero,
        collapse, insert) and truncates of files found,
        mkdir, rename, link, unlink, then a commit.  Errors are clean ones
        (the image may be damaged); what the commits leave is judged by fsck."""
        fs, bs = self.fs, self.bs
        if fs.read_only:
            return

        async def step(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
            try:
                return await fn(*args, **kw)
            except FsError as e:
                _one_line(what, str(e))
                self.report.write_errors.append(f"{what}: {e}")
                return None

        made = await step("create", fs.create, ROOT_INO, b"fuzz-new", 0o644, os.O_RDWR, 0, 0)
        if made is not None:
            fh = made[0]
            for lblk in range(3):
                await step("write", fs.write, fh, lblk * bs, pattern_block("fuzz-new", lblk, bs))
            await step("fsync", fs.fsync, fh, False)
            await step("release", fs.release, fh)
        for ino in self.files[:3]:
            fh = await step("open", fs.open, ino, os.O_RDWR)
            if fh is None:
                continue
            size = fs.ns.get(ino).size
            await step("append", fs.write, fh, size, b"appended by the fuzzer")
            blocks = fs.ns.get(ino).size // bs
            if blocks >= 4:
                # fallocate(2): punch a hole, zero a range, collapse, insert.
                for mode in (0x03, 0x10, 0x08, 0x20):
                    await step("fallocate", fs.fallocate, ino, mode, bs, bs)
            await step("truncate", fs.setattr, ino, size=size // 2)
            await step("release", fs.release, fh)
        d = await step("mkdir", fs.mkdir, ROOT_INO, b"fuzz-dir", 0o755, 0, 0)
        if made is not None and d is not None:
            await step("rename", fs.rename, ROOT_INO, b"fuzz-new", d.ino, b"moved", 0)
            await step("link", fs.link, made[1].ino, ROOT_INO, b"fuzz-link")
            await step("unlink", fs.unlink, ROOT_INO, b"fuzz-link")
        await step("sync", fs.sync)

    async def walk(self) -> None:
        stack: list[tuple[str, int]] = [("", ROOT_INO)]
        self.visited.add(ROOT_INO)
        entries = 0
        while stack and entries < WALK_CAP:
            path, ino = stack.pop()
            try:
                fh = await self.fs.opendir(ino)
            except FsError as e:
                _one_line(f"opendir {path or '/'}", str(e))
                self.report.errors.append(f"{path or '/'}: {e}")
                continue
            try:
                names = [(n, a) for n, a, _ in self.fs.readdir_entries(fh, 0)]
            finally:
                await self.fs.releasedir(fh)
            for name, attr in names:
                entries += 1
                child = f"{path}/{os.fsdecode(name)}"
                await self.entry(child, ino, name, attr.ino, stack)

    async def entry(
        self, path: str, parent: int, name: bytes, ino: int, stack: list[tuple[str, int]]
    ) -> None:
        fs = self.fs
        try:
            attr = await fs.lookup(parent, name)
            digest = f"mode {attr.mode:o}"
            for xname in sorted(await fs.listxattr(ino)):
                value = await fs.getxattr(ino, xname)
                digest += f" {xname!r}={hashlib.sha256(value).hexdigest()[:16]}"
            inode = fs.ns.get(ino)
            if inode.is_dir:
                if ino in self.visited:
                    self.report.loops += 1
                    return
                self.visited.add(ino)
                stack.append((path, ino))
            elif inode.is_symlink:
                digest += f" -> {(await fs.readlink(ino))!r}"
            elif inode.is_reg:
                self.report.files += 1
                self.files.append(ino)
                digest += f" size {attr.size} data {await self.read_file(path, ino)}"
            self.report.tree[path] = digest
        except FsError as e:
            _one_line(f"reading {path}", str(e))
            self.report.errors.append(f"{path}: {e}")


async def _mount_and_read(path: Path, report: MountReport) -> None:
    try:
        fs = await Filesystem.mount(path, MountOptions(commit_interval=3600))
    except FsError as e:
        _one_line("mount", str(e))
        report.refused = str(e)
        return
    try:
        raw = await trio.Path(path).read_bytes()
        reader = _Reader(fs, raw, report)
        reader.check_layout()
        await reader.walk()
        reader.check_layout()
        await reader.use()
    except BaseException:
        fs.dev.close()
        raise
    try:
        await fs.unmount()
    except FsError as e:
        _one_line("unmount", str(e))
        report.errors.append(f"unmount: {e}")


def mount_and_read(path: Path, timeout: float) -> MountReport:
    """Mount ``path`` in-process, read everything, unmount (see the module docstring)."""
    report = MountReport()

    async def main() -> None:
        with trio.fail_after(timeout):
            await _mount_and_read(path, report)

    try:
        trio.run(main)
    except Failure:
        raise
    except trio.TooSlowError:
        raise Failure("hang", f"mount and read of {path.name} overran {timeout:.0f} s") from None
    except Exception as e:
        raise Failure("traceback", f"mount/read raised {type(e).__name__}: {e}") from e
    return report


# one image:


def check_image(image: bytes, workdir: Path, timeout: float = 60.0) -> Verdict:
    """Judge one damaged image (see the module docstring); ``workdir`` is scratch."""
    workdir.mkdir(parents=True, exist_ok=True)
    copies = [workdir / f"{n}.img" for n in ("check", "mount", "repair")]
    for c in copies:
        c.write_bytes(image)
    verdict = Verdict("refused")
    try:
        _judge(copies, verdict, timeout)
    except Failure as f:
        verdict.outcome, verdict.detail = f.kind, f.detail
        if f.__cause__ is not None:
            verdict.traceback = "".join(traceback.format_exception(f.__cause__))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return verdict


def _judge(copies: list[Path], verdict: Verdict, timeout: float) -> None:
    check, mount, repair = copies
    first = _fsck(check)
    verdict.fsck_exit = first.exit_code
    report = verdict.mount = mount_and_read(mount, timeout)
    if not report.refused:
        # The mount ran recovery, made a few changes and committed: that must
        # not have made the image one fsck can no longer load, nor a clean one
        # inconsistent.
        after = _fsck(mount)
        if after.exit_code == EXIT_OPERATIONAL or (
            first.exit_code == EXIT_CLEAN and after.exit_code != EXIT_CLEAN
        ):
            raise Failure(
                "mount damaged",
                f"fsck exit {first.exit_code} before the mount, {after.exit_code} after: "
                + "; ".join(after.errors[:2]),
            )
    if first.exit_code == EXIT_CLEAN:
        if report.refused:
            raise Failure("fsck missed", f"fsck found it clean; mount refused: {report.refused}")
        if report.errors:
            raise Failure("fsck missed", f"fsck found it clean; reads failed: {report.errors[0]}")
    fixed = _fsck(repair, repair=True)
    verdict.repair_exit = fixed.exit_code
    if fixed.exit_code == EXIT_OPERATIONAL:
        if not report.refused and first.exit_code != EXIT_OPERATIONAL:
            raise Failure("repair failed", f"fsck --repair gave up: {fixed.messages[:1]}")
        verdict.outcome = "refused"
        verdict.detail = report.refused or "; ".join(first.messages[:1])
        return
    second = _fsck(repair)
    verdict.second_exit = second.exit_code
    if second.exit_code != EXIT_CLEAN:
        lines = "; ".join(second.errors[:2] or second.messages[:2])
        raise Failure(
            "repair failed",
            f"fsck --repair exit {fixed.exit_code}, then fsck exit {second.exit_code}: {lines}",
        )
    again = mount_and_read(repair, timeout)
    if again.refused or again.errors:
        raise Failure(
            "repair failed",
            f"the repaired image: {again.refused or again.errors[0]}",
        )
    used = _fsck(repair)
    if used.exit_code != EXIT_CLEAN:
        raise Failure(
            "mount damaged",
            f"the repaired image, used, then fsck exit {used.exit_code}: "
            + "; ".join(used.errors[:2]),
        )
    if first.exit_code == EXIT_CLEAN and fixed.exit_code != EXIT_CORRECTED:
        verdict.outcome = "consistent"
    else:
        verdict.outcome = "repaired"
        verdict.detail = "; ".join(first.errors[:1]) or report.refused


__all__ = [
    "FAILURES",
    "OK_OUTCOMES",
    "OUTCOMES",
    "Failure",
    "MountReport",
    "Verdict",
    "check_image",
    "mount_and_read",
]
