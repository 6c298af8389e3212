"""Real mounts through the real entry point (``python -m fusefs.cli``) in subprocesses.

After pyfuse3's ``test/util.py`` and S3QL's ``t4_fuse.py``: mount, poll
``os.path.ismount`` with a deadline, fail fast (with the log's tail) if the daemon
died, and always unmount in teardown -- ``fusefs umount`` first, ``fusermount3 -u
-z`` if that fails -- then require a clean ``fusefs fsck``.  The daemon log must
hold no traceback, and no ERROR line unless the test said it expects some.

Tests marked ``mount`` are skipped, with the reason, where FUSE is unusable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.process import wait_exit

FUSEFS = [sys.executable, "-m", "fusefs.cli"]
MOUNT_DEADLINE = 30.0
IMAGE_SIZE = "64M"


def fuse_unavailable() -> str | None:
    """Why real mounts cannot run here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def require_fuse() -> None:
    """Skip the test (or fixture) where real mounts cannot run."""
    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(f"needs a real FUSE mount: {reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("mount") is not None:
        require_fuse()


def fusefs(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``fusefs ARGS`` the way a user would; never raises on a non-zero exit."""
    return subprocess.run(
        [*FUSEFS, *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def mkfs(image: Path, size: str = IMAGE_SIZE) -> None:
    done = fusefs("mkfs", image, "--size", size)
    assert done.returncode == 0, done.stderr


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e.strerror})"


class FuseMount:
    """One image and its mount point, mounted and unmounted by the real CLI."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.log = Path(f"{image}.log")
        self.allow_log_errors = False
        self.mounted = False

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def mount(self, *extra: str) -> None:
        done = fusefs("mount", self.image, self.mountpoint, *extra)
        assert done.returncode == 0, f"mount failed: {done.stderr}\nlog:\n{tail(self.log)}"
        # fusefs mount returns once the daemon reports the mount ready.
        assert os.path.ismount(self.mountpoint), f"not mounted; log:\n{tail(self.log)}"
        self.mounted = True

    def daemon_pid(self) -> int:
        with open(self.path(".fusefs", "pid")) as f:
            return int(f.read())

    def umount(self) -> subprocess.CompletedProcess[str]:
        """``fusefs umount``; the caller checks the result."""
        done = fusefs("umount", self.mountpoint)
        if not os.path.ismount(self.mountpoint):
            self.mounted = False
        return done

    def umount_clean(self) -> None:
        done = self.umount()
        assert done.returncode == 0, f"umount: {done.stderr}\nlog:\n{tail(self.log)}"
        assert not self.mounted

    def remount(self, *extra: str) -> None:
        self.umount_clean()
        self.check_fsck()
        self.mount(*extra)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), then detach the dead mount."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_exit(pid, MOUNT_DEADLINE), f"daemon {pid} survived SIGKILL"
        detach(self.mountpoint)
        self.mounted = False

    def check_fsck(self) -> None:
        done = fusefs("fsck", self.image)
        assert done.returncode == 0, f"fsck: exit {done.returncode}\n{done.stdout}{done.stderr}"

    def check_log(self) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        assert "Traceback" not in text, f"traceback in the daemon log:\n{text}"
        if not self.allow_log_errors:
            errors = [
                ln
                for ln in text.splitlines()
                if (" ERROR " in ln or " CRITICAL " in ln) and not benign(ln)
            ]
            assert not errors, "errors in the daemon log:\n" + "\n".join(errors)

    def teardown(self) -> None:
        """Always leaves nothing mounted; then the image must be consistent."""
        if os.path.ismount(self.mountpoint):
            done = self.umount()
            if os.path.ismount(self.mountpoint):
                detach(self.mountpoint)
                pytest.fail(f"fusefs umount failed: {done.stderr}\nlog:\n{tail(self.log)}")
        self.check_fsck()
        self.check_log()


def control_write(mountpoint: str | os.PathLike[str], name: str, text: str) -> None:
    """One command to ``.fusefs/NAME``; its errno raises as OSError from the write."""
    fd = os.open(os.path.join(mountpoint, ".fusefs", name), os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def control_read(mountpoint: str | os.PathLike[str], name: str) -> str:
    with open(os.path.join(mountpoint, ".fusefs", name), encoding="utf-8") as f:
        return f.read()


def stats(mountpoint: str | os.PathLike[str]) -> dict[str, str]:
    """``.fusefs/stats`` as a dict of strings."""
    out = {}
    for line in control_read(mountpoint, "stats").splitlines():
        key, _, value = line.partition(": ")
        out[key] = value
    return out


def benign(line: str) -> bool:
    """libfuse's complaint when the kernel dropped a request before its reply
    (a release racing the unmount): nothing the filesystem did wrong."""
    return "fuse_reply_* failed with No such file or directory" in line


def detach(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], check=False)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "fs.img"
    mkfs(path)
    return path


@pytest.fixture
def mnt(image: Path, tmp_path: Path) -> Iterator[FuseMount]:
    """A freshly made image, mounted for this test alone."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    m = FuseMount(image, mountpoint)
    try:
        m.mount()
        yield m
    finally:
        m.teardown()


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuseMount]:
    """One mount for a module's tests that need no remount (each works in its own dir)."""
    require_fuse()
    base = tmp_path_factory.mktemp("shared")
    image = base / "fs.img"
    mkfs(image)
    (base / "mnt").mkdir()
    m = FuseMount(image, base / "mnt")
    try:
        m.mount()
        yield m
    finally:
        m.teardown()


@pytest.fixture
def work(shared_mount: FuseMount, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh directory inside the shared mount, removed afterwards."""
    path = shared_mount.path(request.node.name[:200])
    os.mkdir(path)
    yield path
    shutil.rmtree(path)
