"""fsx, the syscall part: the file under test, its two descriptors, fallocate in
every mode, SEEK_DATA/SEEK_HOLE, the fusefs control directory and the race
readers.

The target is any file.  If a directory above it holds ``.fusefs/dynamic_fault``
the file is on a fusefs mount, and each fallocate mode takes one of two routes
(``--fallocate-route``): ``kernel``, libc's ``fallocate(2)`` on the file, which
the kernel's FUSE driver forwards for alloc, keep_size, punch and zero range
(± keep_size); ``control``, a request to ``.fusefs/fallocate``, the one way to
collapse and insert range (the driver refuses both with EOPNOTSUPP before any
request is sent: docs/fallocate.md).  ``auto`` (the default) takes the kernel
for every mode it forwards and the control file for the others.  Which modes
the kernel forwards is probed, not assumed: each mode is tried once on the
empty file, as xfstests fsx does.  ``drop_caches``, the pagecache lock and the
fault sites are there to use too.  Anywhere else fallocate is ``fallocate(2)``
(probed the same way: a mode the filesystem refuses with EOPNOTSUPP is turned
off, and said so).  O_DIRECT is probed the same way.

fallocate(2) is called through ctypes for every mode, mode 0 included: glibc's
``posix_fallocate`` (``os.posix_fallocate``) falls back to writing zeros when
the filesystem refuses, which would hide a refusal and change what the blocks
are (written, not preallocated).

SEEK_DATA/SEEK_HOLE are plain ``os.lseek`` on the buffered descriptor; a
filesystem that refuses them (EINVAL) gets no seek checks.

O_DIRECT IO uses a page-aligned buffer from an anonymous `mmap`, at offsets and
lengths that are multiples of 4096 (fsx ``-Z`` semantics; fusefs refuses
anything else with EINVAL).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from fusefs.cli import fallocate_fd
from tools.fsx.model import BS, FALLOC_MODES

CONTROL_DIR: Final = ".fusefs"
FALLOC_FLAGS: Final = {
    "alloc": 0,
    "keep_size": 0x01,
    "punch": 0x02 | 0x01,
    "zero": 0x10,
    "zero,keep_size": 0x10 | 0x01,
    "collapse": 0x08,
    "insert": 0x20,
}
READ_CHUNK: Final = 1 << 20
ROUTES: Final = ("auto", "kernel", "control")


def find_control_root(path: str) -> str | None:
    """The root of the fusefs mount holding ``path``, or None on any other
    filesystem: the nearest directory up from it with ``.fusefs/dynamic_fault``."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.exists(os.path.join(d, CONTROL_DIR, "dynamic_fault")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


class Control:
    """The ``.fusefs/`` files of one mount."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, CONTROL_DIR, name)

    def write(self, name: str, text: str) -> None:
        """One command; the command's errno raises as OSError from the write."""
        fd = os.open(self.path(name), os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def read(self, name: str) -> str:
        with open(self.path(name), encoding="utf-8") as f:
            return f.read()

    def stats(self) -> dict[str, str]:
        out = {}
        for line in self.read("stats").splitlines():
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
        return out


def kernel_fallocate(fd: int, mode: str, offset: int, length: int) -> None:
    fallocate_fd(fd, FALLOC_FLAGS[mode], offset, length)


@dataclass
class Capabilities:
    """What the filesystem under the file can do, found once before the run."""

    control_root: str | None
    direct: bool
    falloc: dict[str, str] = field(default_factory=dict)  # mode → "control" | "syscall"
    notes: list[str] = field(default_factory=list)  # what was turned off, and why
    seek: bool = True  # SEEK_DATA/SEEK_HOLE answered (not EINVAL)

    @property
    def fusefs(self) -> bool:
        return self.control_root is not None


class RouteError(ValueError):
    """A ``--fallocate-route`` the target cannot take."""


def probe(path: str, route: str = "auto") -> Capabilities:
    """Create ``path`` empty and find out what works on it; ``route`` is how
    fallocate reaches a fusefs mount (`ROUTES`)."""
    if route not in ROUTES:
        raise RouteError(f"unknown fallocate route {route!r} (one of {', '.join(ROUTES)})")
    root = find_control_root(path)
    if route == "control" and root is None:
        raise RouteError("--fallocate-route control needs a fusefs mount (.fusefs above the file)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        caps = Capabilities(root, direct=True)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        except OSError as e:
            caps.direct = False
            caps.notes.append(f"O_DIRECT: {e.strerror}: O_DIRECT reads and writes turned off")
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: an empty file has no data, as it should
                caps.seek = False
                caps.notes.append(f"SEEK_DATA: {e.strerror}: seek checks turned off")
        if root is None:
            caps.notes.append("not a fusefs mount (no .fusefs above it): drop_caches turned off")
        if route == "control":
            caps.falloc = dict.fromkeys(FALLOC_MODES, "control")
            return caps
        for mode in FALLOC_MODES:
            if _kernel_takes(fd, mode):
                caps.falloc[mode] = "syscall"
            elif route == "auto" and root is not None:
                caps.falloc[mode] = "control"
                caps.notes.append(
                    f"fallocate {mode}: fallocate(2) refuses it (EOPNOTSUPP): "
                    "through .fusefs/fallocate"
                )
            else:
                caps.notes.append(f"fallocate {mode}: not supported here: turned off")
        return caps
    finally:
        os.close(fd)


def _kernel_takes(fd: int, mode: str) -> bool:
    """Whether fallocate(2) does ``mode`` on the (empty) file ``fd``.  As xfstests
    fsx: EOPNOTSUPP or ENOSYS means no; any other answer (EINVAL for a collapse
    of an empty file) means the mode exists."""
    try:
        kernel_fallocate(fd, mode, 0, 1)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
    os.ftruncate(fd, 0)
    return True


class Target:
    """The file under test: a buffered descriptor and, when O_DIRECT works, a
    second one opened O_DIRECT."""

    def __init__(self, path: str, caps: Capabilities, *, truncate: bool, buffer_size: int) -> None:
        self.path = path
        self.caps = caps
        self.control = Control(caps.control_root) if caps.control_root else None
        self.rel = os.path.relpath(os.path.abspath(path), caps.control_root or "/")
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)
        self.dfd = -1
        self._falloc_fd = -1
        self.buf = mmap.mmap(-1, max(BS, -(-buffer_size // BS) * BS))
        self._open_extra()

    def _open_extra(self) -> None:
        if self.caps.direct:
            self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        if self.control is not None and self._falloc_fd < 0:
            self._falloc_fd = os.open(self.control.path("fallocate"), os.O_WRONLY)

    def close(self) -> None:
        for fd in (self.fd, self.dfd, self._falloc_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.dfd = self._falloc_fd = -1
        self.buf.close()

    def reopen(self) -> None:
        os.close(self.fd)
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        self.fd = os.open(self.path, os.O_RDWR)
        self._open_extra()

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # IO:

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        done = os.pwrite(self.fd, data, offset)
        if done != len(data):
            raise OSError(errno.EIO, f"short write: {done} of {len(data)} bytes")

    def _direct_buf(self, length: int) -> memoryview:
        if length > len(self.buf):
            self.buf.close()
            self.buf = mmap.mmap(-1, -(-length // BS) * BS)
        return memoryview(self.buf)[:length]

    def dread(self, offset: int, length: int) -> bytes:
        view = self._direct_buf(length)
        try:
            got = os.preadv(self.dfd, [view], offset)
            return bytes(view[:got])
        finally:
            view.release()

    def dwrite(self, offset: int, data: bytes) -> None:
        view = self._direct_buf(len(data))
        try:
            view[:] = data
            done = os.pwritev(self.dfd, [view], offset)
        finally:
            view.release()
        if done != len(data):
            raise OSError(errno.EIO, f"short O_DIRECT write: {done} of {len(data)} bytes")

    def read_all(self, *, direct: bool = False) -> bytes:
        """The whole file, read up to EOF in large pieces."""
        parts: list[bytes] = []
        pos = 0
        while True:
            chunk = self.dread(pos, READ_CHUNK) if direct else os.pread(self.fd, READ_CHUNK, pos)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            pos += len(chunk)
            if direct and len(chunk) < READ_CHUNK:
                # EOF; and the next offset may not be aligned for O_DIRECT.
                return b"".join(parts)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fallocate(self, mode: str, offset: int, length: int) -> None:
        how = self.caps.falloc.get(mode)
        if how == "control":
            command = f"path={shlex.quote(self.rel)} mode={mode} offset={offset} length={length}"
            os.write(self._falloc_fd, command.encode())
        elif how == "syscall":
            kernel_fallocate(self.fd, mode, offset, length)
        else:
            raise OSError(errno.EOPNOTSUPP, f"fallocate {mode} is turned off here")

    def seek(self, offset: int, whence: int) -> int | None:
        """lseek(2) with SEEK_DATA or SEEK_HOLE; None for ENXIO (no data, or past EOF)."""
        try:
            return os.lseek(self.fd, offset, whence)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return None
            raise

    def fsync(self) -> None:
        os.fsync(self.fd)

    def fdatasync(self) -> None:
        os.fdatasync(self.fd)

    def drop_caches(self) -> None:
        if self.control is None:
            raise OSError(errno.EOPNOTSUPP, "drop_caches needs a fusefs mount")
        self.control.write("drop_caches", "1")


# race readers:


class RaceReaders:
    """Threads reading the file while the main sequence changes it: buffered
    reads of a few blocks and sequential bursts that drive readahead.  They
    check nothing themselves; what they may wrongly put in a page cache, the
    main sequence's next read or ``-X`` check sees."""

    def __init__(self, path: str, count: int, seed: int, size: Callable[[], int]) -> None:
        self.path = path
        self._size = size
        self._stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(
                target=self._loop, args=(seed + i,), name=f"fsx-reader-{i}", daemon=True
            )
            for i in range(count)
        ]

    def __enter__(self) -> RaceReaders:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            self.errors.append(f"open: {e.strerror}")
            return
        try:
            while not self._stop.is_set():
                blocks = max(1, self._size() // BS)
                start = rng.randrange(blocks)
                try:
                    if rng.random() < 0.5:
                        # A burst: sequential from the file's start or a random
                        # block, one block a read, so readahead ramps up.
                        pos = 0 if rng.random() < 0.3 else start * BS
                        for _ in range(rng.randint(4, 24)):
                            if self._stop.is_set() or not os.pread(fd, BS, pos):
                                break
                            pos += BS
                            self.reads += 1
                    else:
                        os.pread(fd, rng.randint(1, 4) * BS, start * BS)
                        self.reads += 1
                except OSError as e:
                    self.errors.append(f"pread: {e.strerror}")
                    if len(self.errors) > 100:
                        return
        finally:
            os.close(fd)


# switches on the mount:


_ACTIONS: Final = frozenset(
    {"enable", "disable", "oneshot", "frequency", "probability", "times", "delay"}
)


def fault_query(spec: str) -> str:
    """The query part of a fault command (``name x delay 5`` → ``name x``)."""
    words = spec.split()
    for i, word in enumerate(words):
        if word in _ACTIONS:
            return " ".join(words[:i])
    return spec


class MountSettings:
    """Fault commands and the pagecache lock switched for a run, and put back
    afterwards: the sites it armed are disabled, the lock is set to what it was."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self._specs: list[str] = []
        self._armed: list[str] = []
        self._lock_before: str | None = None

    def fault(self, spec: str) -> None:
        self.control.write("dynamic_fault", spec)
        self._specs.append(spec)
        self._armed.append(fault_query(spec))

    def chaos(self, seed: int, probability: float, delay: str) -> None:
        """Every race site fires with ``probability`` and holds its window for
        a time drawn from ``delay`` (``MIN-MAX`` ms), from RNGs seeded by
        ``seed``: interleavings nobody wrote a test for, reproducible by seed."""
        self.control.write("dynamic_fault", f"seed {seed}")
        self.fault(f"class race probability {probability} delay {delay}")

    def rearm(self) -> None:
        """Send every fault command again (counters and ``times`` start over):
        each replay of ``--minimize`` runs in the same conditions as the first."""
        for spec in self._specs:
            self.control.write("dynamic_fault", spec)

    def lock(self, state: str) -> None:
        if self._lock_before is None:
            self._lock_before = self.control.read("pagecache_lock").strip()
        self.control.write("pagecache_lock", state)

    def restore(self) -> None:
        for query in self._armed:
            with contextlib.suppress(OSError):
                self.control.write("dynamic_fault", f"{query} disable".strip())
        self._armed.clear()
        self._specs.clear()
        if self._lock_before is not None:
            with contextlib.suppress(OSError):
                self.control.write("pagecache_lock", self._lock_before)
            self._lock_before = None
