"""The pyfuse3 patch (patches/pyfuse3/) through a real mount: fallocate(2),
posix_fallocate(3) and lseek(2) SEEK_DATA/SEEK_HOLE reach `Operations.fallocate` and
`Operations.lseek` of a tiny filesystem (pyfuse3_patchfs.py), and a filesystem that
does not define them sees the kernel behave as with the unpatched release."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from . import pyfuse3_patchfs as patchfs
from .conftest import MOUNT_DEADLINE, detach

pytestmark = pytest.mark.mount

KEEP_SIZE: Final = 0x01
PUNCH_HOLE: Final = 0x02
COLLAPSE_RANGE: Final = 0x08
ZERO_RANGE: Final = 0x10
INSERT_RANGE: Final = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate_errno(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) itself (posix_fallocate would fall back to writing zeros): 0 or
    the errno."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        return ctypes.get_errno()
    return 0


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    e = fallocate_errno(fd, mode, offset, length)
    if e:
        raise OSError(e, os.strerror(e))


@dataclass
class PatchMount:
    mountpoint: Path
    record: Path
    process: subprocess.Popen[bytes]

    @property
    def file(self) -> str:
        return os.path.join(self.mountpoint, patchfs.FILE_NAME.decode())

    def calls(self) -> list[tuple[int, int, int]]:
        """The fallocate requests the filesystem saw, in order."""
        if not self.record.exists():
            return []
        out = []
        for line in self.record.read_text().splitlines():
            mode, offset, length = (int(x) for x in line.split())
            out.append((mode, offset, length))
        return out


def _serve(tmp_path: Path, *extra: str) -> Iterator[PatchMount]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    record = tmp_path / "fallocate.calls"
    log = tmp_path / "patchfs.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, patchfs.__file__, str(mountpoint), str(record), *extra],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not os.path.ismount(mountpoint):
            if process.poll() is not None:
                pytest.fail(f"patchfs exited ({process.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"patchfs not mounted after {MOUNT_DEADLINE} s:\n{log.read_text()}")
            time.sleep(0.05)
        yield PatchMount(mountpoint, record, process)
    finally:
        if os.path.ismount(mountpoint):
            detach(mountpoint)
        try:
            process.wait(timeout=MOUNT_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("patchfs still running after the unmount")
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert process.returncode == 0, text


@pytest.fixture
def patched(tmp_path: Path) -> Iterator[PatchMount]:
    yield from _serve(tmp_path)


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[PatchMount]:
    yield from _serve(tmp_path, "--plain")


# fallocate:


@pytest.mark.parametrize(
    "mode",
    [0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE],
    ids=["0", "KEEP_SIZE", "PUNCH_HOLE|KEEP_SIZE"],
)
def test_fallocate_mode_reaches_the_filesystem(patched: PatchMount, mode: int) -> None:
    fd = os.open(patched.file, os.O_RDWR)
    try:
        fallocate(fd, mode, 4096, 8192)
    finally:
        os.close(fd)
    assert patched.calls() == [(mode, 4096, 8192)]


def test_fallocate_beyond_eof_extends_the_file(patched: PatchMount) -> None:
    fd = os.open(patched.file, os.O_RDWR)
    try:
        fallocate(fd, 0, patchfs.FILE_SIZE, 1 << 20)
        assert os.fstat(fd).st_size == 2 << 20
        fallocate(fd, KEEP_SIZE, 2 << 20, 1 << 20)
        assert os.fstat(fd).st_size == 2 << 20
    finally:
        os.close(fd)
    assert patched.calls() == [(0, 1 << 20, 1 << 20), (KEEP_SIZE, 2 << 20, 1 << 20)]


def test_posix_fallocate_is_one_request(patched: PatchMount) -> None:
    fd = os.open(patched.file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 3 << 20)
        assert os.fstat(fd).st_size == 3 << 20
    finally:
        os.close(fd)
    # One FUSE_FALLOCATE, not glibc's fallback of writing a byte per block.
    assert patched.calls() == [(0, 0, 3 << 20)]


@pytest.mark.parametrize(
    "mode", [ZERO_RANGE, ZERO_RANGE | KEEP_SIZE], ids=["ZERO_RANGE", "ZERO_RANGE|KEEP_SIZE"]
)
def test_zero_range_is_forwarded_or_refused_before_the_filesystem(
    patched: PatchMount, mode: int
) -> None:
    """Newer kernels forward ZERO_RANGE to FUSE (6.18 does: docs/fallocate.md); older
    ones refuse it in fuse_file_fallocate.  Either way the answer matches what the
    filesystem saw."""
    fd = os.open(patched.file, os.O_RDWR)
    try:
        result = fallocate_errno(fd, mode, 4096, 8192)
    finally:
        os.close(fd)
    if result:
        assert result == errno.EOPNOTSUPP
        assert patched.calls() == []
    else:
        assert patched.calls() == [(mode, 4096, 8192)]


@pytest.mark.parametrize(
    "mode", [COLLAPSE_RANGE, INSERT_RANGE], ids=["COLLAPSE_RANGE", "INSERT_RANGE"]
)
def test_collapse_and_insert_never_reach_the_filesystem(patched: PatchMount, mode: int) -> None:
    fd = os.open(patched.file, os.O_RDWR)
    try:
        with pytest.raises(OSError, match="Operation not supported") as e:
            fallocate(fd, mode, 4096, 4096)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert patched.calls() == []


def test_default_fallocate_is_eopnotsupp(plain: PatchMount) -> None:
    fd = os.open(plain.file, os.O_RDWR)
    try:
        for _ in range(2):  # the kernel remembers: the second never reaches pyfuse3
            with pytest.raises(OSError, match="Operation not supported"):
                fallocate(fd, 0, 0, 4096)
        assert os.fstat(fd).st_size == patchfs.FILE_SIZE
    finally:
        os.close(fd)
    assert plain.calls() == []


# lseek:


def _seek(path: str, offset: int, whence: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, whence)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "data", "hole"),
    [
        (0, 0, 64 << 10),
        (100, 100, 64 << 10),
        (64 << 10, 256 << 10, 64 << 10),
        (100 << 10, 256 << 10, 100 << 10),
        (300 << 10, 300 << 10, 320 << 10),
        (320 << 10, None, 320 << 10),
        ((1 << 20) - 1, None, (1 << 20) - 1),
    ],
)
def test_seek_data_and_hole_come_from_the_filesystem(
    patched: PatchMount, offset: int, data: int | None, hole: int
) -> None:
    if data is None:
        with pytest.raises(OSError, match="No such device or address") as e:
            _seek(patched.file, offset, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    else:
        assert _seek(patched.file, offset, os.SEEK_DATA) == data
    assert _seek(patched.file, offset, os.SEEK_HOLE) == hole


@pytest.mark.parametrize("whence", [os.SEEK_DATA, os.SEEK_HOLE], ids=["SEEK_DATA", "SEEK_HOLE"])
def test_seek_past_eof_is_enxio(patched: PatchMount, whence: int) -> None:
    with pytest.raises(OSError, match="No such device or address") as e:
        _seek(patched.file, patchfs.FILE_SIZE, whence)
    assert e.value.errno == errno.ENXIO


def test_plain_seeks_stay_in_the_kernel(patched: PatchMount) -> None:
    fd = os.open(patched.file, os.O_RDONLY)
    try:
        assert os.lseek(fd, 5000, os.SEEK_SET) == 5000
        assert os.lseek(fd, 10, os.SEEK_CUR) == 5010
        assert os.lseek(fd, 0, os.SEEK_END) == patchfs.FILE_SIZE
    finally:
        os.close(fd)


def test_default_lseek_falls_back_to_the_kernel(plain: PatchMount) -> None:
    """ENOSYS from the default: the kernel's generic answer, all data up to EOF."""
    for _ in range(2):
        assert _seek(plain.file, 100 << 10, os.SEEK_DATA) == 100 << 10
        assert _seek(plain.file, 100 << 10, os.SEEK_HOLE) == patchfs.FILE_SIZE
