"""Workloads for fault campaigns, each keeping a model of what it was told.

A workload runs real syscalls on a mounted fusefs and records, as it goes, what
the filesystem acknowledged: an operation that returned success is in the model;
a returned ``fsync`` makes the model's state of that file (and, since a commit
snapshots the whole namespace, the namespace itself) *durable*.  After the run
the campaign unmounts, checks and remounts the image, and `verify` compares the
tree with exactly that record:

- after a clean shutdown (the daemon's final commit succeeded), everything that
  returned success must be there;
- otherwise (the filesystem went read-only after a failed commit, the daemon
  died, the power was cut) only what was durable is owed: each file not written
  since its last returned ``fsync`` must hold exactly its fsynced contents, and
  the namespace must be one of the states it passed through since the last
  returned ``fsync`` -- commits are atomic snapshots of a sequential history.

When an operation fails with a clean error (EIO, ENOMEM, ENOSPC, EROFS) the
filesystem owes no particular result for it, only that it did no harm outside
it: the workload reads the file (or walks the tree) back, accepts the result if
it is the old state, the new one, or -- for writes and zeroing -- a byte-wise mix
inside the operation's range, and adopts it.  Anything else is corruption.  An
error outside the clean set is reported too (``unexpected``): the filesystem
disagreed with what it had acknowledged (ENOENT for a file it created) or gave
an error it must not.  ENOTCONN means the daemon is gone: `DaemonGone` ends the
workload.

Every choice comes from ``random.Random`` seeded by the run: a run is replayed
from its seed.  This module has the shared parts and the data workload; the
metadata workload is tools/campaign/meta.py, fsx's adapter tools/campaign/fsx.py.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tools.campaign.mount import GONE_ERRNOS

BS: Final = 4096
CLEAN_ERRNOS: Final = frozenset({errno.EIO, errno.ENOMEM, errno.ENOSPC, errno.EROFS})
FALLOCATE_MODES: Final = (
    "alloc",
    "keep_size",
    "punch",
    "zero",
    "zero,keep_size",
    "collapse",
    "insert",
)


class DaemonGone(Exception):
    """The mount answered ENOTCONN: the daemon died (or the power was cut)."""


@dataclass
class Observations:
    """What a run's workloads saw, besides what they were told succeeded."""

    errors: dict[str, int] = field(default_factory=dict)  # clean errnos, by name
    problems: list[str] = field(default_factory=list)  # corruption seen during the run
    daemon_gone: bool = False
    ops: int = 0

    def clean_error(self, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.errors[name] = self.errors.get(name, 0) + 1

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


def classify(e: OSError, obs: Observations, what: str) -> None:
    """Sort an error: clean (counted), daemon gone (raises), or a problem."""
    if e.errno in GONE_ERRNOS:
        obs.daemon_gone = True
        raise DaemonGone(f"{what}: {e.strerror}") from None
    if e.errno in CLEAN_ERRNOS:
        obs.clean_error(e)
        return
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    obs.problem(f"{what}: unexpected error {name} ({e.strerror})")


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for start in range(0, n, BS):
        if a[start : start + BS] != b[start : start + BS]:
            for i in range(start, min(n, start + BS)):
                if a[i] != b[i]:
                    return i
    return n


def read_whole(path: Path | str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


# data:


@dataclass
class DataFile:
    name: str
    content: bytearray = field(default_factory=bytearray)
    durable: bytes | None = None  # contents at the last returned fsync
    written_after_fsync: bool = True
    lost: bool = False  # the workload lost track (a read-back failed)


class DataWorkload:
    """A small fsx: buffered and O_DIRECT reads and writes, truncate and every
    fallocate mode (through ``.fusefs/fallocate``) over a few files, with
    read-back checks and an ``fsync`` every few operations."""

    name = "data"

    def __init__(
        self,
        seed: int,
        *,
        ops: int = 120,
        files: int = 3,
        max_size: int = 256 * 1024,
        max_len: int = 48 * 1024,
        fsync_every: int = 8,
        direct: bool = True,
        fallocate: bool = True,
    ) -> None:
        self.rng = random.Random(f"{seed}:data")
        self.nops = ops
        self.max_size = max_size
        self.max_len = max_len
        self.fsync_every = fsync_every
        self.direct = direct
        self.fallocate = fallocate
        self.files = [DataFile(f"f{i}") for i in range(files)]
        self.dir = "data"
        self.created = False
        self._fds: dict[str, int] = {}
        self._dfds: dict[str, int] = {}

    # running:

    def run(self, root: Path, obs: Observations, deadline: Callable[[], None]) -> None:
        self.root = root
        try:
            if self._setup(obs):
                self._ops(obs, deadline)
        finally:
            self._close()

    def _ops(self, obs: Observations, deadline: Callable[[], None]) -> None:
        for i in range(self.nops):
            deadline()
            live = [f for f in self.files if not f.lost]
            if not live:
                return
            f = self.rng.choice(live)
            if (i + 1) % self.fsync_every == 0:
                self._fsync(f, obs)
            else:
                self._random_op(f, obs)
            obs.ops += 1
        for f in self.files:
            if not f.lost:
                self._fsync(f, obs)

    def _path(self, f: DataFile) -> Path:
        return self.root / self.dir / f.name

    def _setup(self, obs: Observations) -> bool:
        try:
            os.mkdir(self.root / self.dir)
        except OSError as e:
            classify(e, obs, f"mkdir {self.dir}")
            return False
        self.created = True
        for f in self.files:
            try:
                self._fds[f.name] = os.open(
                    self._path(f), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644
                )
                if self.direct:
                    self._dfds[f.name] = os.open(self._path(f), os.O_RDWR | os.O_DIRECT)
            except OSError as e:
                classify(e, obs, f"create {f.name}")
                f.lost = True
        return True

    def _close(self) -> None:
        for fd in [*self._fds.values(), *self._dfds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._dfds.clear()

    def _random_op(self, f: DataFile, obs: Observations) -> None:
        choices = ["write"] * 6 + ["read"] * 4 + ["truncate"] * 2
        if self.direct and f.name in self._dfds:
            choices += ["dwrite"] * 3 + ["dread"] * 2
        if self.fallocate:
            choices += list(FALLOCATE_MODES)
        op = self.rng.choice(choices)
        size = len(f.content)
        if op in ("read", "dread"):
            self._read(f, obs, direct=op == "dread")
        elif op in ("write", "dwrite"):
            direct = op == "dwrite"
            if direct:
                off = self.rng.randrange(0, self.max_size // BS) * BS
                length = self.rng.randint(1, max(1, self.max_len // BS)) * BS
            else:
                off = self.rng.randrange(0, self.max_size)
                length = self.rng.randint(1, self.max_len)
            length = min(length, self.max_size - off) or BS
            data = self.rng.randbytes(length)
            self._write(f, obs, off, data, direct)
        elif op == "truncate":
            self._truncate(f, obs, self.rng.randrange(0, self.max_size))
        elif op in ("collapse", "insert"):
            blocks = size // BS
            if op == "collapse" and blocks >= 2:
                start = self.rng.randrange(0, blocks - 1)
                n = self.rng.randint(1, blocks - 1 - start)
                if (start + n) * BS < size:
                    self._fallocate(f, obs, op, start * BS, n * BS)
            elif op == "insert" and blocks >= 1:
                start = self.rng.randrange(0, blocks)
                n = self.rng.randint(1, 4)
                if size + n * BS <= self.max_size:
                    self._fallocate(f, obs, op, start * BS, n * BS)
        else:
            off = self.rng.randrange(0, self.max_size)
            length = min(self.rng.randint(1, self.max_len), self.max_size - off) or 1
            self._fallocate(f, obs, op, off, length)

    # operations, each with its model update and its read-back on failure:

    def _write(self, f: DataFile, obs: Observations, off: int, data: bytes, direct: bool) -> None:
        old = bytes(f.content)
        new = bytearray(old)
        if len(new) < off:
            new.extend(bytes(off - len(new)))
        new[off : off + len(data)] = data
        f.written_after_fsync = True
        what = f"{'O_DIRECT ' if direct else ''}write {f.name} {off}+{len(data)}"
        try:
            if direct:
                buf = mmap.mmap(-1, len(data))
                try:
                    buf.write(data)
                    done = os.pwrite(self._dfds[f.name], buf, off)
                finally:
                    buf.close()
            else:
                done = os.pwrite(self._fds[f.name], data, off)
        except OSError as e:
            classify(e, obs, what)
            self._resolve(f, obs, what, old, new, mixed=(off, off + len(data)))
            return
        if done != len(data):
            # A short write: the rest was not acknowledged.
            new = bytearray(old)
            if len(new) < off:
                new.extend(bytes(off - len(new)))
            new[off : off + done] = data[:done]
        f.content = new

    def _read(self, f: DataFile, obs: Observations, direct: bool) -> None:
        size = len(f.content)
        if direct:
            off = self.rng.randrange(0, max(1, -(-size // BS) + 1)) * BS
            length = self.rng.randint(1, 16) * BS
        else:
            off = self.rng.randrange(0, size + 1)
            length = self.rng.randint(1, self.max_len)
        what = f"{'O_DIRECT ' if direct else ''}read {f.name} {off}+{length}"
        try:
            if direct:
                buf = mmap.mmap(-1, length)
                try:
                    n = os.preadv(self._dfds[f.name], [buf], off)
                    got = bytes(buf[:n])
                finally:
                    buf.close()
            else:
                got = os.pread(self._fds[f.name], length, off)
        except OSError as e:
            classify(e, obs, what)
            return
        want = bytes(f.content[off : off + length])
        if got != want:
            at = off + _first_difference(got, want)
            obs.problem(
                f"{what}: wrong data (got {len(got)} bytes, want {len(want)}; first difference "
                f"at offset {at})"
            )
            f.lost = True

    def _truncate(self, f: DataFile, obs: Observations, size: int) -> None:
        old = bytes(f.content)
        new = bytearray(old[:size]).ljust(size, b"\0")
        f.written_after_fsync = True
        what = f"truncate {f.name} to {size}"
        try:
            os.ftruncate(self._fds[f.name], size)
        except OSError as e:
            classify(e, obs, what)
            self._resolve(f, obs, what, old, new)
            return
        f.content = new

    def _fallocate(self, f: DataFile, obs: Observations, mode: str, off: int, length: int) -> None:
        old = bytes(f.content)
        new = fallocate_model(old, mode, off, length)
        f.written_after_fsync = True
        what = f"fallocate {mode} {f.name} {off}+{length}"
        command = f"path={self.dir}/{f.name} mode={mode} offset={off} length={length}"
        try:
            fd = os.open(self.root / ".fusefs" / "fallocate", os.O_WRONLY)
            try:
                os.write(fd, command.encode())
            finally:
                os.close(fd)
        except OSError as e:
            classify(e, obs, what)
            mixed = (off, off + length) if mode.startswith(("punch", "zero")) else None
            self._resolve(f, obs, what, old, new, mixed=mixed)
            return
        f.content = new

    def _fsync(self, f: DataFile, obs: Observations) -> None:
        try:
            os.fsync(self._fds[f.name])
        except OSError as e:
            classify(e, obs, f"fsync {f.name}")
            return
        f.durable = bytes(f.content)
        f.written_after_fsync = False

    def _resolve(
        self,
        f: DataFile,
        obs: Observations,
        what: str,
        old: bytes,
        new: bytes | bytearray,
        mixed: tuple[int, int] | None = None,
    ) -> None:
        """After a failed operation: read the file back and adopt what is there if
        the filesystem may have left it so (old, new, or within ``mixed`` a byte-wise
        mix of the two); otherwise report corruption."""
        try:
            got = read_whole(self._path(f))
        except OSError as e:
            if e.errno in GONE_ERRNOS:
                classify(e, obs, f"read-back after {what}")
            f.lost = True
            return
        if got in (old, bytes(new)) or (mixed is not None and _mix_ok(got, old, new, mixed)):
            f.content = bytearray(got)
            return
        obs.problem(
            f"after failed {what}: {f.name} holds neither the old nor the new contents "
            f"(size {len(got)}; old {len(old)}, new {len(new)}; first difference from old at "
            f"{_first_difference(got, old)})"
        )
        f.lost = True

    # verification:

    def verify(self, root: Path, clean: bool) -> list[str]:
        """Compare the files with the record (see the module docstring)."""
        problems: list[str] = []
        if not self.created:
            return problems
        for f in self.files:
            if f.lost:
                continue
            path = root / self.dir / f.name
            if clean:
                want: bytes | None = bytes(f.content)
            else:
                want = None if f.written_after_fsync else f.durable
            if want is None:
                continue
            try:
                got = read_whole(path)
            except FileNotFoundError:
                problems.append(f"{self.dir}/{f.name}: missing ({len(want)} bytes acknowledged)")
                continue
            except OSError as e:
                problems.append(f"{self.dir}/{f.name}: unreadable: {e.strerror}")
                continue
            if got != want:
                problems.append(
                    f"{self.dir}/{f.name}: {'final' if clean else 'fsynced'} contents differ "
                    f"(size {len(got)}, want {len(want)}; first difference at "
                    f"{_first_difference(got, want)})"
                )
        return problems


class SpaceWorkload(DataWorkload):
    """Runs the filesystem out of space and frees it again at once (fusefs.reclaim).

    Each round fills the filesystem through one file (a write of more than
    ``statvfs`` shows, which comes back short or with ENOSPC), fsyncs it,
    truncates it to nothing -- its blocks now wait for a commit -- and at once
    writes as much as ``statvfs`` shows to the other file, buffered or O_DIRECT:
    the write that needs the freed blocks commits to get them, which is where
    the ``nospace_commit_retry`` site sits.  The files are the data workload's,
    with its model and read-back checks.  Its files grow to the image's size:
    use it with a small image (``--size 8M``)."""

    name = "space"

    def __init__(self, seed: int, *, ops: int = 120) -> None:
        super().__init__(seed, ops=ops, files=2, fallocate=False)
        self.rng = random.Random(f"{seed}:space")
        self.dir = "space"
        self.rounds = max(2, ops // 30)

    def _ops(self, obs: Observations, deadline: Callable[[], None]) -> None:
        fill, again = self.files
        for _ in range(self.rounds):
            deadline()
            if fill.lost or again.lost:
                return
            self._write(fill, obs, len(fill.content), self._over_the_top(1), direct=False)
            self._fsync(fill, obs)
            self._truncate(fill, obs, 0)
            direct = self.direct and self.rng.random() < 0.5 and again.name in self._dfds
            data = self._over_the_top(0)
            if direct:
                data = data[: len(data) // BS * BS]
            self._write(again, obs, 0, data, direct=direct)
            self._fsync(again, obs)
            self._truncate(again, obs, 0)
            obs.ops += 5
        for f in self.files:
            if not f.lost:
                self._fsync(f, obs)

    def _over_the_top(self, extra_blocks: int) -> bytes:
        """As many bytes as ``statvfs`` shows free, plus ``extra_blocks`` blocks."""
        try:
            sv = os.statvfs(self.root)
            free = sv.f_bavail * sv.f_frsize
        except OSError:
            free = 0
        return self.rng.randbytes(max(BS, free + extra_blocks * BS))


def _mix_ok(got: bytes, old: bytes, new: bytes | bytearray, span: tuple[int, int]) -> bool:
    """Whether ``got`` is ``old`` outside ``span`` and byte-wise old or new inside it,
    with a size between the two sizes."""
    lo, hi = sorted((len(old), len(new)))
    if not lo <= len(got) <= hi:
        return False
    start, end = span
    oldp = old.ljust(len(got), b"\0")
    newp = bytes(new).ljust(len(got), b"\0")
    if got[:start] != oldp[:start] or got[end:] != oldp[end : len(got)]:
        return False
    for pos in range(start, min(end, len(got)), BS):
        chunk = got[pos : min(end, pos + BS)]
        if chunk in (oldp[pos : pos + len(chunk)], newp[pos : pos + len(chunk)]):
            continue
        if any(g not in (o, n) for g, o, n in zip(chunk, oldp[pos:], newp[pos:], strict=False)):
            return False
    return True


def fallocate_model(content: bytes, mode: str, off: int, length: int) -> bytearray:
    """The contents after a successful fallocate (docs/fallocate.md)."""
    c = bytearray(content)
    end = off + length
    if mode in ("alloc", "zero") and len(c) < end:
        c.extend(bytes(end - len(c)))
    if mode in ("punch", "zero", "zero,keep_size"):
        stop = min(end, len(c))
        if off < stop:
            c[off:stop] = bytes(stop - off)
    elif mode == "collapse":
        del c[off:end]
    elif mode == "insert":
        c[off:off] = bytes(length)
    return c


__all__ = [
    "CLEAN_ERRNOS",
    "FALLOCATE_MODES",
    "DaemonGone",
    "DataWorkload",
    "Observations",
    "SpaceWorkload",
    "classify",
    "fallocate_model",
    "read_whole",
]
