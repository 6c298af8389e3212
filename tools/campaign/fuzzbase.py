"""The base images of image fuzzing: made by real workloads, in-process.

The campaign's own workloads (`DataWorkload`, `MetaWorkload`) are written
against paths and system calls.  Here they run against a `Filesystem` in the
same process: they run in a worker thread, and `InProcessOs` -- put in place of
the workloads' ``os`` for the length of the build -- answers the calls they make
(mkdir, open, pwrite, pread, preadv, ftruncate, fsync, rename, link, symlink,
unlink, rmdir, xattrs, the ``.fusefs/fallocate`` control file) by calling the
filesystem on the trio loop, with `FsError` turned into `OSError` as the FUSE
layer would.  That is some hundred times faster than a mount, and the images
are the ones the workloads would leave on a mount.

Each base image adds to the workloads what a fuzzer wants to find on disk:
files whose every block carries a *pattern* naming the file and the block,
big fragmented files, many directories, xattrs, symlinks, hard links, orphans
(files unlinked while open when the daemon stopped), and a journal with several
entries, one of them after a checkpoint.  After the last unmount every free
block of the data area is filled with a *poison* pattern, so that a read that
strays outside a file's extents shows at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Final

import trio

from fusefs.control import parse_fallocate
from fusefs.errors import FsError
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.namespace import ROOT_INO
from tools.poison import POISON, poison_block, poison_free_blocks

BS: Final = 4096
ROOT: Final = Path("/fusefs-in-process")
"""Written over every free block of a base image (repeated to fill the block)."""


def pattern_block(tag: str, lblk: int, bs: int = BS) -> bytes:
    """A file's block ``lblk``, recognisable: the file's tag and the block number,
    repeated."""
    unit = f"<{tag}:{lblk}>".encode()
    return (unit * (bs // len(unit) + 1))[:bs]


# the system calls, in-process:


class _Fd:
    __slots__ = ("fh", "ino", "kind")

    def __init__(self, kind: str, ino: int, fh: int) -> None:
        self.kind = kind  # "file", "dir", "fallocate"
        self.ino = ino
        self.fh = fh


class InProcessOs:
    """The part of the ``os`` module the workloads use, answered by a `Filesystem`
    (from a worker thread: each call runs on the trio loop).  Everything else is
    the real ``os``."""

    def __init__(self, fs: Filesystem) -> None:
        self._fs = fs
        self._fds: dict[int, _Fd] = {}
        self._next = 1000

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        async def call() -> Any:
            try:
                return await fn(*args, **kw)
            except FsError as e:
                raise OSError(e.code, str(e)) from None

        return trio.from_thread.run(call)

    def _parts(self, path: Any) -> list[bytes]:
        rel = PurePosixPath(os.fspath(path)).relative_to(ROOT)
        return [os.fsencode(p) for p in rel.parts]

    def _resolve(self, path: Any) -> tuple[int, bytes]:
        """The parent directory's inode and the last name."""
        parts = self._parts(path)
        ino = ROOT_INO
        for name in parts[:-1]:
            ino = self._call(self._fs.lookup, ino, name).ino
        return ino, parts[-1] if parts else b"."

    def _ino(self, path: Any) -> int:
        parent, name = self._resolve(path)
        if name == b".":
            return parent
        ino: int = self._call(self._fs.lookup, parent, name).ino
        return ino

    def _fd(self, entry: _Fd) -> int:
        self._next += 1
        self._fds[self._next] = entry
        return self._next

    def mkdir(self, path: Any, mode: int = 0o777) -> None:
        parent, name = self._resolve(path)
        self._call(self._fs.mkdir, parent, name, stat.S_IFDIR | mode, 0, 0)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        parts = self._parts(path)
        if parts[-2:] == [b".fusefs", b"fallocate"]:
            return self._fd(_Fd("fallocate", 0, 0))
        parent, name = self._resolve(path)
        if flags & os.O_CREAT:
            with contextlib.suppress(OSError):
                ino = self._ino(path)
                if flags & os.O_EXCL:
                    raise OSError(errno.EEXIST, "exists")
                return self._fd(_Fd("file", ino, self._call(self._fs.open, ino, flags)))
            fh, attr = self._call(self._fs.create, parent, name, mode, flags, 0, 0)
            return self._fd(_Fd("file", attr.ino, fh))
        ino = self._ino(path)
        if flags & os.O_DIRECTORY or stat.S_ISDIR(self._call(self._fs.getattr, ino).mode):
            return self._fd(_Fd("dir", ino, 0))
        return self._fd(_Fd("file", ino, self._call(self._fs.open, ino, flags)))

    def close(self, fd: int) -> None:
        entry = self._fds.pop(fd)
        if entry.kind == "file":
            self._call(self._fs.release, entry.fh)

    def write(self, fd: int, data: Any) -> int:
        entry = self._fds[fd]
        if entry.kind == "fallocate":
            request = parse_fallocate(bytes(data).decode())
            if request.path is None:
                raise OSError(errno.EINVAL, "fallocate by path only")
            ino = self._ino(ROOT / request.path)
            self._call(self._fs.fallocate, ino, request.mode, request.offset, request.length)
            return len(data)
        size = self._call(self._fs.getattr, entry.ino).size
        return self.pwrite(fd, data, size)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        done: int = self._call(self._fs.write, self._fds[fd].fh, offset, bytes(data))
        return done

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        data: bytes = self._call(self._fs.read, self._fds[fd].fh, offset, length)
        return data

    def preadv(self, fd: int, buffers: list[Any], offset: int) -> int:
        buf = buffers[0]
        data = self.pread(fd, len(buf), offset)
        buf[: len(data)] = data
        return len(data)

    def ftruncate(self, fd: int, size: int) -> None:
        self._call(self._fs.setattr, self._fds[fd].ino, size=size)

    def fsync(self, fd: int) -> None:
        entry = self._fds[fd]
        if entry.kind == "file":
            self._call(self._fs.fsync, entry.fh, False)
        else:
            self._call(self._fs.commit)

    def symlink(self, target: Any, path: Any) -> None:
        parent, name = self._resolve(path)
        self._call(self._fs.symlink, parent, name, os.fsencode(target), 0, 0)

    def rename(self, src: Any, dst: Any) -> None:
        sp, sn = self._resolve(src)
        dp, dn = self._resolve(dst)
        self._call(self._fs.rename, sp, sn, dp, dn, 0)

    def link(self, src: Any, dst: Any) -> None:
        ino = self._ino(src)
        dp, dn = self._resolve(dst)
        self._call(self._fs.link, ino, dp, dn)

    def unlink(self, path: Any) -> None:
        self._call(self._fs.unlink, *self._resolve(path))

    def rmdir(self, path: Any) -> None:
        self._call(self._fs.rmdir, *self._resolve(path))

    def setxattr(self, path: Any, key: Any, value: bytes, flags: int = 0) -> None:
        self._call(self._fs.setxattr, self._ino(path), os.fsencode(key), bytes(value), flags)

    def removexattr(self, path: Any, key: Any) -> None:
        self._call(self._fs.removexattr, self._ino(path), os.fsencode(key))


@contextlib.contextmanager
def _workload_os(fake: InProcessOs) -> Iterator[None]:
    """The workload modules see ``fake`` as their ``os`` (the build is serial)."""
    from tools.campaign import meta, workloads

    modules: list[ModuleType] = [workloads, meta]
    saved = [m.os for m in modules]
    for m in modules:
        m.os = fake  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, real in zip(modules, saved, strict=True):
            m.os = real  # type: ignore[attr-defined]


async def run_workloads(fs: Filesystem, seed: int, ops: int, *, data: bool, meta: bool) -> None:
    """The campaign's data and metadata workloads against ``fs``, in-process."""
    from tools.campaign.meta import MetaWorkload
    from tools.campaign.workloads import DataWorkload, Observations

    fake = InProcessOs(fs)
    obs = Observations()

    def work() -> None:
        if data:
            DataWorkload(seed, ops=ops, max_size=128 * 1024, max_len=24 * 1024).run(
                ROOT, obs, lambda: None
            )
        if meta:
            MetaWorkload(seed, ops=ops).run(ROOT, obs, lambda: None)

    with _workload_os(fake):
        await trio.to_thread.run_sync(work)
    if obs.problems:
        raise RuntimeError(f"base image workload saw problems: {obs.problems[:3]}")


# the base images:


async def _patterned_file(
    fs: Filesystem, parent: int, name: bytes, blocks: list[int], tag: str
) -> int:
    """A file holding pattern blocks at the logical blocks ``blocks``, fsynced."""
    fh, attr = await fs.create(parent, name, 0o644, os.O_RDWR, 0, 0)
    for lblk in blocks:
        await fs.write(fh, lblk * BS, pattern_block(tag, lblk))
    await fs.fsync(fh, False)
    await fs.release(fh)
    return attr.ino


async def _small_files(fs: Filesystem, rng: random.Random) -> None:
    d = (await fs.mkdir(ROOT_INO, b"small", 0o755, 0, 0)).ino
    for i in range(24):
        n = rng.randint(1, 3)
        await _patterned_file(fs, d, f"s{i}".encode(), list(range(n)), f"s{i}")
    await run_workloads(fs, rng.randrange(1 << 30), 80, data=True, meta=False)


async def _fragmented(fs: Filesystem, rng: random.Random) -> None:
    """Two big files written block by block in turn, with holes: many extents."""
    d = (await fs.mkdir(ROOT_INO, b"big", 0o755, 0, 0)).ino
    fhs = []
    for i in range(3):
        fh, _ = await fs.create(d, f"big{i}".encode(), 0o644, os.O_RDWR, 0, 0)
        fhs.append(fh)
    for lblk in range(90):
        for i, fh in enumerate(fhs):
            if rng.random() < 0.85:
                await fs.write(fh, lblk * BS, pattern_block(f"big{i}", lblk))
        if lblk % 16 == 15:
            await fs.fsync(fhs[0], False)
    for fh in fhs:
        await fs.fsync(fh, False)
        await fs.release(fh)
    await run_workloads(fs, rng.randrange(1 << 30), 60, data=True, meta=False)


async def _many_dirs(fs: Filesystem, rng: random.Random) -> None:
    dirs = [ROOT_INO]
    for i in range(60):
        parent = rng.choice(dirs)
        dirs.append((await fs.mkdir(parent, f"d{i}".encode(), 0o755, 0, 0)).ino)
    for i in range(30):
        await _patterned_file(fs, rng.choice(dirs), f"f{i}".encode(), [0], f"m{i}")
    await run_workloads(fs, rng.randrange(1 << 30), 120, data=False, meta=True)


async def _links(fs: Filesystem, rng: random.Random) -> None:
    """Xattrs, symlinks and hard links."""
    d = (await fs.mkdir(ROOT_INO, b"links", 0o755, 0, 0)).ino
    files = []
    for i in range(12):
        files.append(await _patterned_file(fs, d, f"t{i}".encode(), [0, 2], f"t{i}"))
    for i in range(12):
        await fs.link(rng.choice(files), d, f"h{i}".encode())
        await fs.symlink(d, f"l{i}".encode(), f"t{i}/../t{i}".encode() * (1 + i % 3), 0, 0)
        await fs.setxattr(
            rng.choice([d, *files]), f"user.x{i}".encode(), rng.randbytes(rng.randint(0, 90)), 0
        )
    await fs.commit()
    await run_workloads(fs, rng.randrange(1 << 30), 100, data=False, meta=True)


async def _mixed(fs: Filesystem, rng: random.Random) -> None:
    await run_workloads(fs, rng.randrange(1 << 30), 100, data=True, meta=True)


@dataclass(frozen=True)
class BaseSpec:
    name: str
    build: Callable[[Filesystem, random.Random], Awaitable[None]]
    size: int = 2 << 20
    block_size: int = 4096
    orphans: bool = False  # stop without unmounting, files unlinked while open
    checkpoint: bool = False  # a checkpoint, then more journal entries


BASES: Final = (
    BaseSpec("small-files", _small_files),
    BaseSpec("fragmented", _fragmented, size=4 << 20),
    BaseSpec("many-dirs", _many_dirs),
    BaseSpec("links-xattrs", _links),
    BaseSpec("orphans", _mixed, orphans=True),
    BaseSpec("checkpointed", _many_dirs, checkpoint=True),
    BaseSpec("mixed", _mixed, size=3 << 20),
    BaseSpec("small-blocks", _links, size=1 << 20, block_size=1024),
)
BASE_NAMES: Final = tuple(b.name for b in BASES)


async def _build(spec: BaseSpec, path: Path, seed: int) -> None:
    rng = random.Random(f"{seed}:{spec.name}")
    mkfs(path, spec.size, block_size=spec.block_size, force=True)
    fs = await Filesystem.mount(path, MountOptions(commit_interval=3600))
    try:
        await spec.build(fs, rng)
        if spec.checkpoint:
            await fs.commit()
            await fs.committer.checkpoint(fs.ns)
            for i in range(4):
                await _patterned_file(fs, ROOT_INO, f"after{i}".encode(), [0, 1], f"a{i}")
        if spec.orphans:
            d = (await fs.mkdir(ROOT_INO, b"orph", 0o755, 0, 0)).ino
            held = []
            for i in range(4):
                fh, _ = await fs.create(d, f"o{i}".encode(), 0o644, os.O_RDWR, 0, 0)
                await fs.write(fh, 0, pattern_block(f"o{i}", 0) * 2)
                await fs.fsync(fh, False)
                await fs.unlink(d, f"o{i}".encode())
                held.append(fh)
            await fs.commit()
            # The daemon stops here, its files still open: no unmount.
            fs.dev.close()
            return
    except BaseException:
        fs.dev.close()
        raise
    await fs.unmount()


def build_base(name: str, path: Path, seed: int) -> str:
    """Make base image ``name`` at ``path``; returns its SHA-256 (for reproducers)."""
    spec = next(b for b in BASES if b.name == name)
    trio.run(_build, spec, path, seed)
    poison_free_blocks(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


__all__ = [
    "BASES",
    "BASE_NAMES",
    "POISON",
    "InProcessOs",
    "build_base",
    "pattern_block",
    "poison_block",
    "poison_free_blocks",
    "run_workloads",
]
