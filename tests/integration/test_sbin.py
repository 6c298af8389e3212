"""The Linux conventions, through the real commands: ``mount -t fuse.fusefs`` and
fstab lines (mount.fuse.fusefs), ``umount`` (umount.fuse.fusefs), ``mkfs -t fusefs``
(mkfs.fusefs), ``fsck -t fusefs`` (fsck.fusefs), and mount.fuse3 running ``fusefs
SOURCE DIR -o OPTIONS`` for the subtype.  The helpers are the package's console
scripts, linked into /sbin by ``scripts/setup``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import FuseMount, control_read, fusefs, stats

pytestmark = pytest.mark.mount

HELPERS = ("mount.fuse.fusefs", "mount.fusefs", "umount.fuse.fusefs", "mkfs.fusefs", "fsck.fusefs")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _helpers_linked() -> None:
    if os.getuid() != 0:
        pytest.skip("mount(8), mkfs(8) and fsck(8) helpers need root")
    for helper in HELPERS:
        link = Path("/sbin") / helper
        if not link.exists() or link.resolve() != (VENV_BIN / helper).resolve():
            pytest.fail(f"{link} is not this checkout's {helper}: run scripts/setup")


def run(
    *argv: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def mount_options(mountpoint: Path) -> set[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == os.fspath(mountpoint):
                assert fields[2] == "fuse.fusefs", line
                return set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


@pytest.fixture
def place(tmp_path: Path) -> Iterator[FuseMount]:
    """An image path (not made yet) and a mount point; whatever is mounted there at
    the end is unmounted, then the image must pass fsck."""
    (tmp_path / "mnt").mkdir()
    m = FuseMount(tmp_path / "fs.img", tmp_path / "mnt")
    yield m
    if os.path.ismount(m.mountpoint) or m.image.exists():
        m.teardown()


def test_mkfs_and_fsck_t_fusefs(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)  # mkfs.fusefs without a size takes the file's
    done = run("mkfs", "-t", "fusefs", image)
    assert done.returncode == 0, done.stderr
    assert image.stat().st_size == 64 << 20
    sized = tmp_path / "sized.img"
    for size, nbytes in (("32M", 32 << 20), ("2048", 2 << 20)):  # a bare number is KiB
        done = run("mkfs", "-t", "fusefs", sized, size)
        assert done.returncode == 0, done.stderr
        assert sized.stat().st_size == nbytes
        sized.unlink()
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    done = run("mkfs", "-t", "fusefs", notes, "1M")
    assert done.returncode != 0
    assert "not a fusefs image; use --force" in done.stderr
    assert run("mkfs.fusefs", "-F", notes, "1M").returncode == 0

    # fsck(8) takes a path starting with / as the device; the rest go to the checker.
    done = run("fsck", "-t", "fusefs", image)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 errors" in done.stdout
    with open(image, "r+b") as f:
        f.seek(4096 + 16)
        f.write(b"\xde\xad")  # damage superblock copy B
    for flags, code in ((["-n"], 4), ([], 4), (["-y"], 1), (["-f"], 0)):
        done = run("fsck", "-t", "fusefs", *flags, image)
        assert done.returncode == code, (flags, done.stdout, done.stderr)
    with open(image, "r+b") as f:
        f.seek(4096 + 16)
        f.write(b"\xde\xad")
    for flags in (["-a"], ["-p", "-f"]):
        done = run("fsck", "-t", "fusefs", *flags, image)
        assert done.returncode == 1, (flags, done.stdout, done.stderr)
        with open(image, "r+b") as f:
            f.seek(4096 + 16)
            f.write(b"\xde\xad")
    done = run("fsck.fusefs", "-n", "-y", image)
    assert done.returncode == 16  # a usage error, as e2fsck
    assert run("fsck", "-t", "fusefs", "-y", image).returncode == 1


def test_mount_t_fuse_fusefs_and_umount(place: FuseMount) -> None:
    assert run("mkfs", "-t", "fusefs", place.image, "64M").returncode == 0
    opts = (
        "cache_size=32M,commit=30,noatime,nosuid,defaults,nofail,_netdev,x-systemd.device-timeout=9"
    )
    done = run("mount", "-t", "fuse.fusefs", place.image, place.mountpoint, "-o", opts)
    assert done.returncode == 0, done.stderr
    assert os.path.ismount(place.mountpoint)
    assert {"rw", "noatime", "nosuid"} <= mount_options(place.mountpoint)
    assert stats(place.mountpoint)["cache_limit_bytes"] == str(32 << 20)
    (place.mountpoint / "f").write_bytes(b"through mount(8)")
    done = run("umount", place.mountpoint)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(place.mountpoint)
    # umount.fuse.fusefs returned after the daemon's final commit.
    assert place.image.with_name("fs.img.status").read_text().startswith("clean ")
    assert fusefs("fsck", place.image).returncode == 0

    done = run("mount", "-t", "fusefs", "-o", "ro", place.image, place.mountpoint)
    assert done.returncode == 0, done.stderr
    assert "ro" in mount_options(place.mountpoint)
    assert (place.mountpoint / "f").read_bytes() == b"through mount(8)"
    assert run("umount", place.mountpoint).returncode == 0


def test_fstab_line(place: FuseMount, tmp_path: Path) -> None:
    assert run("mkfs", "-t", "fusefs", place.image, "64M").returncode == 0
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# an fstab line as one would write it\n"
        f"{place.image} {place.mountpoint} fuse.fusefs "
        "defaults,noauto,nofail,_netdev,x-systemd.automount,cache_size=16M,ro,nodev 0 0\n"
    )
    done = run("mount", "-T", fstab, place.mountpoint)
    assert done.returncode == 0, done.stderr
    assert {"ro", "nodev"} <= mount_options(place.mountpoint)
    assert stats(place.mountpoint)["cache_limit_bytes"] == str(16 << 20)
    assert control_read(place.mountpoint, "pagecache_lock") == "on\n"
    assert run("umount", place.mountpoint).returncode == 0


def test_mount_fuse3_runs_fusefs_for_the_subtype(place: FuseMount) -> None:
    """Without mount.fuse.fusefs, mount(8) hands fuse.fusefs to mount.fuse3, which
    runs ``fusefs SOURCE DIR -o OPTIONS`` from PATH."""
    assert run("mkfs", "-t", "fusefs", place.image, "64M").returncode == 0
    helper = shutil.which("mount.fuse3")
    assert helper is not None, "mount.fuse3 missing: scripts/setup installs fuse3"
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    done = run(
        helper, place.image, place.mountpoint, "-t", "fuse.fusefs", "-o", "cache_size=16M", env=env
    )
    assert done.returncode == 0, done.stderr
    assert stats(place.mountpoint)["cache_limit_bytes"] == str(16 << 20)
    assert fusefs("umount", place.mountpoint).returncode == 0


def test_mount_errors_are_one_line(place: FuseMount) -> None:
    done = run("mount", "-t", "fuse.fusefs", place.image, place.mountpoint)
    assert done.returncode == 32
    assert "fusefs mount: " in done.stderr
    assert f"{place.image}: no such image file" in done.stderr
    assert "Traceback" not in done.stderr
    assert run("mkfs", "-t", "fusefs", place.image, "64M").returncode == 0
    done = run("mount", "-t", "fuse.fusefs", "-o", "bogus=1", place.image, place.mountpoint)
    assert done.returncode == 32
    assert "unknown mount option 'bogus'" in done.stderr
    done = run("mount.fuse.fusefs", "-s", "-o", "bogus=1,ro", place.image, place.mountpoint)
    assert done.returncode == 0, done.stderr  # sloppy: the unknown option is dropped
    assert "ro" in mount_options(place.mountpoint)
    assert run("umount", place.mountpoint).returncode == 0
    done = run("mount", "-f", "-t", "fuse.fusefs", place.image, place.mountpoint)
    assert done.returncode == 0, done.stderr  # fake: checks, mounts nothing
    assert not os.path.ismount(place.mountpoint)
