"""SEEK_DATA / SEEK_HOLE through the mount: the kernel forwards them to fusefs
(FUSE_LSEEK, the patched pyfuse3), which answers from the extent map and the
page cache."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from .conftest import FuseMount, control_write

pytestmark = pytest.mark.mount

BS = 4096
MiB = 1 << 20


def test_seek_data_and_hole_see_dirty_pages_and_holes(mnt: FuseMount) -> None:
    fd = os.open(mnt.path("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a" * BS, 0)
        os.pwrite(fd, b"z" * BS, 10 * MiB)
        os.fsync(fd)
        control_write(mnt.mountpoint, "drop_caches", "1")
        os.pwrite(fd, b"d" * 10, 5 * MiB + 3)  # dirty, over a hole, not written back
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == BS
        assert os.lseek(fd, BS, os.SEEK_DATA) == 5 * MiB  # the dirty page is data
        assert os.lseek(fd, 5 * MiB, os.SEEK_HOLE) == 5 * MiB + BS
        assert os.lseek(fd, 5 * MiB + BS, os.SEEK_DATA) == 10 * MiB
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 10 * MiB + BS  # EOF
        with pytest.raises(OSError, match="No such device or address") as e:
            os.lseek(fd, 10 * MiB + BS, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        # A punched range is a hole again.
        control_write(mnt.mountpoint, "fallocate", f"path=sparse mode=punch offset=0 length={BS}")
        assert os.lseek(fd, 0, os.SEEK_DATA) == 5 * MiB
    finally:
        os.close(fd)


def test_cp_sparse_keeps_holes(mnt: FuseMount) -> None:
    src, dst = mnt.path("src"), mnt.path("dst")
    with open(src, "wb") as f:
        f.write(b"x" * BS)
        f.seek(64 * MiB)
        f.write(b"y" * BS)
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
    os.sync()
    st = os.stat(dst)
    assert st.st_size == 64 * MiB + BS
    assert st.st_blocks * 512 <= 4 * BS, st.st_blocks  # the 64 MiB hole stayed a hole
