"""Where benchmarks run: a fusefs image mounted through the real command line, the
null pyfuse3 filesystem (`benchmarks.nullfs`) and a plain directory; the fusefs
daemon's pid and RSS; dropping caches; whether a filesystem takes O_DIRECT.

Every mount is undone when its context exits, whatever happened; a mount that fails
is a `BenchError`, which ends a benchmark with one line for the user.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
KiB: Final = 1 << 10
IMAGE_SIZE: Final = "2G"
MOUNT_TIMEOUT: Final = 150.0  # fusefs mount waits up to 120 s for its daemon
UMOUNT_TIMEOUT: Final = 120.0
NULLFS_READY_TIMEOUT: Final = 30.0
CONTROL_DROP_CACHES: Final = ".fusefs/drop_caches"
CONTROL_PID: Final = ".fusefs/pid"
HOST_DROP_CACHES: Final = "/proc/sys/vm/drop_caches"


# the targets:


class BenchError(Exception):
    """A failure that ends the run: one line for the user."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    root: Path  # the benchmark's files go here
    fusefs: bool = False  # a fusefs mount (fusefs, or the baseline build of it)

    def path(self, name: str) -> Path:
        return self.root / name


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _log_tail(path: Path) -> str:
    try:
        return _last_line(path.read_text(errors="replace")) or f"(nothing in {path})"
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"


def _run_command(argv: Sequence[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no answer after {timeout:.0f} s") from None
    except OSError as e:
        raise BenchError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
    if done.returncode != 0:
        reason = _last_line(done.stderr) or _last_line(done.stdout)
        if not reason.startswith(what):  # the fusefs CLI names itself already
            reason = f"{what}: {reason or f'exit status {done.returncode}'}"
        raise BenchError(reason)


def _lazy_unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


@contextmanager
def fusefs_mounted(
    cli: Sequence[str],
    work: Path,
    options: str,
    errors: list[str],
    *,
    prepare: Callable[[Path], None] | None = None,
    name: str = "fusefs",
    target: str = "fusefs",
) -> Iterator[Target]:
    """A fresh fusefs image mounted through the CLI; unmounted (and its daemon gone) after.
    ``prepare(image)`` runs between mkfs and mount (to fill the image in-process).
    The image is ``work/NAME.img``, the mount point ``work/mnt-NAME``; ``target`` is
    the Target's name (``baseline`` for another build compared with this one)."""
    image = work / f"{name}.img"
    mountpoint = work / f"mnt-{name}"
    mountpoint.mkdir()
    _run_command([*cli, "mkfs", str(image), "--size", IMAGE_SIZE], "fusefs mkfs", 120)
    if prepare is not None:
        prepare(image)
    mount = [*cli, "mount", str(image), str(mountpoint)]
    if options:
        mount += ["-o", options]
    try:
        _run_command(mount, "fusefs mount", MOUNT_TIMEOUT)
        if not os.path.ismount(mountpoint):
            raise BenchError(f"fusefs mount returned, but {mountpoint} is not a mount point")
        yield Target(target, mountpoint, fusefs=True)
    finally:
        fusefs_umount(cli, image, mountpoint, errors)


def fusefs_umount(cli: Sequence[str], image: Path, mountpoint: Path, errors: list[str]) -> None:
    """``fusefs umount`` if `mountpoint` is mounted, lazily if that fails (the error
    goes to `errors`)."""
    if os.path.ismount(mountpoint):
        try:
            _run_command([*cli, "umount", str(mountpoint)], "fusefs umount", UMOUNT_TIMEOUT)
        except BenchError as e:
            errors.append(f"{e} (daemon log: {image}.log)")
        if os.path.ismount(mountpoint):
            _lazy_unmount(mountpoint)


def _read_line(fd: int, deadline: float) -> str | None:
    """The first line on `fd`; "" at EOF without one; None at the deadline."""
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode(errors="replace")


@contextmanager
def nullfs_mounted(work: Path) -> Iterator[Target]:
    """`benchmarks.nullfs` in a subprocess, ready and mounted; stopped with SIGTERM after."""
    mountpoint = work / "mnt-nullfs"
    mountpoint.mkdir()
    log = work / "nullfs.log"
    argv = [sys.executable, "-m", "benchmarks.nullfs", str(mountpoint)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file
        )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + NULLFS_READY_TIMEOUT
        line = _read_line(proc.stdout.fileno(), deadline)
        if line != "ready":
            if line is None:
                raise BenchError(f"nullfs not ready after {NULLFS_READY_TIMEOUT:.0f} s")
            status = proc.wait(timeout=10)
            raise BenchError(f"nullfs exited ({status}) before it was ready: {_log_tail(log)}")
        while not os.path.ismount(mountpoint):  # "ready" follows the mount; belt and braces
            if proc.poll() is not None:
                raise BenchError(f"nullfs exited ({proc.returncode}): {_log_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"nullfs said ready, but {mountpoint} is not a mount point")
            time.sleep(0.01)
        yield Target("nullfs", mountpoint)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _lazy_unmount(mountpoint)
                proc.kill()
                proc.wait()
        if os.path.ismount(mountpoint):
            _lazy_unmount(mountpoint)
        proc.stdout.close()


# the fusefs daemon:


def daemon_pid(mountpoint: Path) -> int:
    return int((mountpoint / CONTROL_PID).read_text())


def parse_vmrss(status: str) -> int:
    """VmRSS, in bytes, from the text of /proc/PID/status."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB$", status, re.MULTILINE)
    if m is None:
        raise ValueError("no VmRSS line")
    return int(m.group(1)) * KiB


def vm_rss(pid: int) -> int:
    return parse_vmrss(Path(f"/proc/{pid}/status").read_text())


def parse_stats(text: str) -> dict[str, str]:
    """The ``key: value`` lines of ``.fusefs/stats``."""
    pairs = (line.partition(": ") for line in text.splitlines())
    return {key: value for key, sep, value in pairs if sep}


# dropping caches:


def drop_host_caches() -> str:
    os.sync()
    try:
        with open(HOST_DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"sync done, but cannot drop the host page cache ({e.strerror}): NOT cold"
    return "sync; echo 3 > /proc/sys/vm/drop_caches"


def drop_fusefs_caches(mountpoint: Path) -> str:
    path = mountpoint / CONTROL_DROP_CACHES
    if not path.exists():
        fusefs = f"no {CONTROL_DROP_CACHES} (skipped)"
    else:
        try:
            with open(path, "w") as f:
                f.write("1\n")
            fusefs = f"echo 1 > {CONTROL_DROP_CACHES}"
        except OSError as e:
            fusefs = f"writing 1 to {CONTROL_DROP_CACHES} failed ({e.strerror})"
    return f"{fusefs}; then for the image file: {drop_host_caches()}"


def o_direct_refusal(directory: Path) -> str | None:
    """Why `directory`'s filesystem refuses O_DIRECT, or None if it takes it."""
    probe = directory / ".o_direct_probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    except OSError as e:
        return f"open(O_DIRECT): {e.strerror}"
    try:
        with mmap.mmap(-1, 4096) as aligned:  # page-aligned, as O_DIRECT wants
            os.write(fd, aligned)
    except OSError as e:
        return f"an aligned O_DIRECT write: {e.strerror}"
    finally:
        os.close(fd)
        probe.unlink()
    return None
