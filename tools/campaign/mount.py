"""One image under test, driven through the real command line (fault campaigns).

A campaign run makes an image, mounts it with ``fusefs mount`` (optionally with
``--fault`` specs and a power-cut plan in the environment), talks to the
``.fusefs/`` control files and unmounts with ``fusefs umount``, each a subprocess
with a timeout, and checks the image with fsck.  A step that overruns is a
*hang*, and the campaign kills the daemon (the pid it read from ``.fusefs/pid``,
or found by its exact command line while the mount was still starting), detaches
the mount and, should requests still be stuck, aborts the FUSE connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fusefs.format import mkfs
from fusefs.fsck import fsck
from fusefs.process import pid_alive, wait_exit

FUSEFS: Final = (sys.executable, "-m", "fusefs.cli")
GONE_ERRNOS: Final = frozenset({errno.ENOTCONN, errno.ECONNABORTED})
"""A mount whose daemon died answers every call with these."""


class StepTimeout(Exception):
    """A command-line step overran its timeout."""


@dataclass(frozen=True, slots=True)
class StepResult:
    ok: bool
    message: str  # stderr's last line, or stdout for fsck


def fusefs(
    *args: str | os.PathLike[str], timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*FUSEFS, *(os.fspath(a) for a in args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise StepTimeout(
            f"fusefs {' '.join(map(str, args[:1]))} overran {timeout:.0f} s"
        ) from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def daemon_pids(image: str) -> list[int]:
    """The daemons serving ``image``: processes whose command line is the one
    ``fusefs mount`` starts (``-m fusefs mount --foreground ... IMAGE MNT``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--foreground" in argv and os.fsencode(image) in argv and b"fusefs" in argv:
            pids.append(int(entry))
    return pids


ACTIVE: Final[set[Image]] = set()
"""Images with a daemon that may be running: what an interrupted campaign kills."""
_ACTIVE_LOCK: Final = threading.Lock()


def kill_all() -> None:
    """Kill every daemon a campaign started and detach its mount (on interrupt)."""
    with _ACTIVE_LOCK:
        images = list(ACTIVE)
    for image in images:
        image.kill()


class Image:
    """An image, its mount point and its daemon's log, in one directory."""

    def __init__(self, workdir: Path, size: str, *, timeout: float) -> None:
        self.dir = workdir
        self.image = workdir / "fs.img"
        self.mountpoint = workdir / "mnt"
        self.log = Path(f"{self.image}.log")
        self.timeout = timeout
        self.pid: int | None = None
        self.dev: int | None = None  # st_dev of the mount, for the connection's abort file
        self.size = size

    def __repr__(self) -> str:
        return f"<Image {self.image} pid={self.pid}>"

    def mkfs(self) -> None:
        from fusefs.format import parse_size

        self.dir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        mkfs(self.image, parse_size(self.size), force=True)

    @property
    def mounted(self) -> bool:
        return os.path.ismount(self.mountpoint)

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    # mount and unmount:

    def mount(
        self,
        faults: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        options: str = "",
    ) -> StepResult:
        """``fusefs mount``; on success the daemon's pid is known."""
        args: list[str] = []
        for spec in faults:
            args += ["--fault", spec]
        if options:
            args += ["-o", options]
        self.pid = None
        with _ACTIVE_LOCK:
            ACTIVE.add(self)
        try:
            done = fusefs(
                "mount", self.image, self.mountpoint, *args, timeout=self.timeout, env=env
            )
        except StepTimeout:
            self.kill()
            raise
        if done.returncode != 0:
            return StepResult(False, _last_line(done.stderr) or f"exit {done.returncode}")
        try:
            self.pid = int(self.path(".fusefs", "pid").read_text())
            self.dev = os.stat(self.mountpoint).st_dev
        except (OSError, ValueError) as e:
            return StepResult(False, f"mounted, but no daemon pid: {e}")
        return StepResult(True, "")

    def umount(self) -> StepResult:
        """``fusefs umount``: ok only after a clean shutdown."""
        try:
            done = fusefs("umount", self.mountpoint, timeout=self.timeout)
        except StepTimeout:
            self.kill()
            raise
        if done.returncode == 0:
            self.pid = None
            return StepResult(True, "")
        message = _last_line(done.stderr) or f"exit {done.returncode}"
        if self.mounted or not self.daemon_alive() or "daemon had died" in message:
            # A dead (or dying) daemon: make sure it is gone and nothing is left mounted.
            self.kill()
        return StepResult(False, message)

    def daemon_alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def detach(self) -> None:
        subprocess.run(
            ["fusermount3", "-u", "-z", os.fspath(self.mountpoint)],
            capture_output=True,
            check=False,
            timeout=30,
        )

    def kill(self) -> None:
        """Kill the daemon (a hang's end, or cleanup), then detach the mount."""
        pids = {self.pid} if self.pid is not None else set()
        pids.update(daemon_pids(os.fspath(self.image)))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        for pid in pids:
            wait_exit(pid, max(0.0, deadline - time.monotonic()))
        self.abort_connection()
        self.detach()
        self.pid = None

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no daemon serves the image any more (one that died may
        still be closing its files, the image's lock among them); kill stragglers."""
        deadline = time.monotonic() + timeout
        for pid in daemon_pids(os.fspath(self.image)):
            if not wait_exit(pid, max(0.0, deadline - time.monotonic())):
                self.kill()
                return

    def abort_connection(self) -> None:
        """Fail every request still queued on the mount's FUSE connection."""
        if self.dev is None:
            return
        path = f"/sys/fs/fuse/connections/{os.minor(self.dev)}/abort"
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write("1")

    def cleanup(self) -> None:
        if self.mounted or self.daemon_alive():
            self.kill()
        with _ACTIVE_LOCK:
            ACTIVE.discard(self)

    # checks:

    def fsck(self) -> StepResult:
        """``fusefs fsck`` (its `fusefs.fsck.fsck`, run here: a process start is
        the larger part of its cost on a small image); ok only when clean."""
        self.settle()
        deadline = time.monotonic() + 10
        while True:
            try:
                result = fsck(self.image)
            except Exception as e:  # a bug in fsck is a failed check, not a dead campaign
                return StepResult(False, f"fsck raised {type(e).__name__}: {e}")
            # A daemon that died a moment ago may still hold the image's lock while
            # the kernel closes its files: that is the campaign's race, not an error.
            busy = any("in use by another fusefs process" in m for m in result.messages)
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if result.exit_code == 0:
            return StepResult(True, result.messages[-1] if result.messages else "")
        summary = "; ".join(result.messages[:3])
        return StepResult(False, f"fsck exit {result.exit_code}: {summary}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # control files:

    def control_write(self, name: str, text: str) -> None:
        fd = os.open(self.path(".fusefs", name), os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def control_read(self, name: str) -> str:
        return self.path(".fusefs", name).read_text()

    def fired(self, site: str) -> int | None:
        """How often ``site`` fired on this mount (None if the listing is unreadable)."""
        try:
            listing = self.control_read("dynamic_fault")
        except OSError:
            return None
        return listing_fired(listing, site)


_LISTING_RE: Final = re.compile(
    r"^(?P<file>\S+):(?P<line>\d+) class:(?P<cls>\S+) module:(?P<module>\S+) "
    r"func:(?P<func>\S+) name:(?P<name>\S+) (?P<state>.*?) hits:(?P<hits>\d+) "
    r"fired:(?P<fired>\d+)$"
)


@dataclass(frozen=True, slots=True)
class SiteInfo:
    """A fault site as the mounted filesystem lists it."""

    name: str
    cls: str
    module: str
    file: str
    line: int
    func: str

    @property
    def root_class(self) -> str:
        return self.cls.partition(":")[0]

    @property
    def is_selftest(self) -> bool:
        return "selftest" in self.cls.split(":")

    @property
    def is_mount_site(self) -> bool:
        """Mount and recovery sites are armed with ``--fault`` at mount."""
        return self.cls.startswith("error:mount")


def parse_listing(text: str) -> list[SiteInfo]:
    sites = []
    for line in text.splitlines():
        m = _LISTING_RE.match(line.strip())
        if m:
            sites.append(
                SiteInfo(
                    name=m["name"],
                    cls=m["cls"],
                    module=m["module"],
                    file=m["file"],
                    line=int(m["line"]),
                    func=m["func"],
                )
            )
    return sites


def listing_fired(text: str, site: str) -> int | None:
    for line in text.splitlines():
        m = _LISTING_RE.match(line.strip())
        if m and m["name"] == site:
            return int(m["fired"])
    return None


__all__ = [
    "GONE_ERRNOS",
    "Image",
    "SiteInfo",
    "StepResult",
    "StepTimeout",
    "daemon_pids",
    "listing_fired",
    "parse_listing",
]
