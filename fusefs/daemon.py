"""The mount daemon: one process serving one mounted image.

``fusefs mount`` (cli.py) starts this in the background -- ``python -m fusefs mount
--foreground --ready-fd N ...`` in a new session, stdio on /dev/null, stderr on
the log -- and waits on the pipe ``N`` for one line: ``ok`` once the mount is
ready, or ``error: <reason>``.  EOF without a line means the daemon died before
it could say why (the log's last lines do).

Life of the daemon, all inside one `trio.run`:

1. fault specs (``FUSEFS_FAULTS``, then ``--fault``) are applied before anything
   else, so mount and recovery sites can fire;
2. `Filesystem.mount` (verify, recover), its background task started;
3. `pyfuse3.init` mounts the kernel side; the task that invalidates the kernel's
   caches off the request path starts (`FuseOperations.run_invalidations`);
   readiness is signalled;
4. `pyfuse3.main` serves requests until either the kernel unmounts
   (``fusermount3 -u``, ``fusefs umount``) or SIGTERM/SIGINT/SIGHUP arrives, which
   calls `pyfuse3.terminate`;
5. `Filesystem.unmount` commits a last time; `pyfuse3.close` unmounts the kernel
   side if it is still mounted (the signal case).

The exit status is 0 only when the final commit succeeded.  The outcome is left
in two places: the log's last line (``fusefs: clean shutdown`` or ``fusefs:
shutdown with errors: ...``) and the *status file* ``IMAGE.status``, one line::

    running PID                 while mounted
    clean PID                   after a clean shutdown
    error PID: MESSAGE          after a shutdown with errors

``fusefs umount`` reads it after the daemon has exited (it finds the image from the
mount's source, ``fusefs:IMAGE``, in /proc/self/mountinfo).  A status file still
saying ``running`` for a pid that is gone means the daemon was killed.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Final

import pyfuse3
import trio

from fusefs.control import ControlDir
from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.fuse_ops import FuseOperations

log = logging.getLogger("fusefs")

_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LOG_FORMAT: Final = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# The marker of the pyfuse3 build scripts/setup makes from patches/pyfuse3/: only that
# build passes the kernel's fallocate(2) and SEEK_DATA/SEEK_HOLE on to fusefs.
PYFUSE3_PATCH: Final = "fallocate+lseek 1"


def pyfuse3_problem() -> str | None:
    """Why the installed pyfuse3 cannot serve fusefs (one line), or None."""
    found = getattr(pyfuse3, "FUSEFS_PATCH", None)
    if found == PYFUSE3_PATCH:
        return None
    build = "unpatched" if found is None else f"patched as {found!r}"
    return (
        f"pyfuse3 {pyfuse3.__version__} is {build}; fusefs needs the build with "
        f"{PYFUSE3_PATCH!r} (patches/pyfuse3/): run scripts/setup"
    )


def status_path(image: str) -> str:
    return image + ".status"


def default_log_path(image: str) -> str:
    return image + ".log"


def fuse_options(image: str, extra: Iterable[str]) -> set[str]:
    """The kernel-side mount options; the image path becomes the mount's source."""
    # libfuse splits -o at commas and honours backslash escapes.
    source = image.replace("\\", "\\\\").replace(",", "\\,")
    return {"default_permissions", f"fsname=fusefs:{source}", "subtype=fusefs", *extra}


@dataclass
class DaemonConfig:
    image: str  # absolute
    mountpoint: str  # absolute
    options: MountOptions
    fuse_options: set[str]
    log_path: str
    faults: list[str] = field(default_factory=list)
    ready_fd: int | None = None
    debug: bool = False


class Readiness:
    """The one line the daemon owes the ``fusefs mount`` that started it."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line.encode() + b"\n")
        except OSError as e:  # the parent gave up waiting: nobody to tell
            log.warning("readiness pipe: %s", e.strerror)
        finally:
            os.close(fd)

    def ok(self) -> None:
        self._send("ok")

    def fail(self, message: str) -> None:
        self._send("error: " + " ".join(message.split()))


def write_status(image: str, text: str) -> None:
    """Replace the status file atomically; a failure costs only `fusefs umount`'s verdict."""
    path = status_path(image)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(" ".join(text.split()) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write status file %s: %s", path, e.strerror)


def setup_logging(path: str, *, foreground: bool, debug: bool) -> None:
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=LOG_FORMAT,
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)


def run(config: DaemonConfig) -> int:
    """Serve the mount until it ends; return the process exit status."""
    interactive = config.ready_fd is None
    setup_logging(config.log_path, foreground=interactive, debug=config.debug)
    faulthandler.enable()  # stderr: the log when started by `fusefs mount`
    if not interactive:
        os.chdir("/")  # hold no directory busy
    ready = Readiness(config.ready_fd)
    log.info("starting: %s on %s (pid %d)", config.image, config.mountpoint, os.getpid())
    try:
        try:
            REGISTRY.apply_environment()
            REGISTRY.apply_startup(config.faults)
        except FsError as e:
            return _refuse(ready, f"bad fault spec: {e}")
        return trio.run(_serve, config, ready)
    except Exception as e:
        # A bug: the traceback goes to the log, `fusefs mount` gets one line.
        log.exception("internal error")
        ready.fail(f"internal error: {type(e).__name__}: {e} (see {config.log_path})")
        return 1


def _refuse(ready: Readiness, message: str) -> int:
    log.error("mount failed: %s", message)
    ready.fail(message)
    return 1


@dataclass
class _Stopper:
    """Turns signals into `pyfuse3.terminate`, or into "do not start" before serving."""

    requested: bool = False
    serving: bool = False

    async def watch(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            self.requested = True
            if self.serving:
                pyfuse3.terminate()


async def _serve(config: DaemonConfig, ready: Readiness) -> int:
    stopper = _Stopper()
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper.watch, signals)
            try:
                return await _mount_and_serve(config, ready, stopper)
            finally:
                nursery.cancel_scope.cancel()


async def _mount_and_serve(config: DaemonConfig, ready: Readiness, stopper: _Stopper) -> int:
    try:
        fs = await Filesystem.mount(config.image, config.options)
    except FsError as e:
        return _refuse(ready, str(e))
    # The loaded inode table lives as long as the daemon: out of the cyclic
    # collector's sight, a full collection never walks a million inodes in
    # the middle of a request (it would stall the loop for a second).
    gc.collect()
    gc.freeze()
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        if stopper.requested:
            ready.fail("stopped by a signal before the mount was ready")
            return await _shutdown(config, fs, session=False)
        ops = FuseOperations(fs, ControlDir(fs, log_path=config.log_path))
        try:
            pyfuse3.init(ops, config.mountpoint, config.fuse_options)
        except RuntimeError as e:
            # libfuse has printed the reason to stderr, which is the log.
            await _shutdown(config, fs, session=False, status=False)
            reason = f"cannot mount on {config.mountpoint}: {e} (see {config.log_path})"
            return _refuse(ready, reason)
        # Invalidations of the kernel's caches, off the request path (fuse_ops).
        await nursery.start(ops.run_invalidations)
        stopper.serving = True
        write_status(config.image, f"running {os.getpid()}")
        log.info("mounted %s on %s", config.image, config.mountpoint)
        ready.ok()
        errors: list[str] = []
        try:
            await pyfuse3.main()
        except Exception as e:
            log.exception("FUSE main loop failed")
            errors.append(f"FUSE main loop: {type(e).__name__}: {e}")
        stopper.serving = False
        # The loop also ends when the kernel side was unmounted: nothing left to unmount.
        status = await _shutdown(
            config, fs, errors, session=True, unmount=stopper.requested or bool(errors)
        )
        nursery.cancel_scope.cancel()  # run_invalidations (fs.run has ended)
        return status


async def _shutdown(
    config: DaemonConfig,
    fs: Filesystem,
    errors: list[str] | None = None,
    *,
    session: bool,
    unmount: bool = False,
    status: bool = True,
) -> int:
    """Final commit, then the kernel side; record the outcome; return the exit status."""
    errors = list(errors or ())
    try:
        await fs.unmount()
    except FsError as e:
        errors.append(f"final commit failed: {e}")
    except Exception as e:
        log.exception("unmount failed")
        errors.append(f"unmount: {type(e).__name__}: {e}")
    if session:
        try:
            pyfuse3.close(unmount=unmount)
        except Exception as e:
            log.exception("pyfuse3.close failed")
            errors.append(f"closing the FUSE session: {e}")
    if errors:
        message = "; ".join(errors)
        log.error("shutdown with errors: %s", message)
        if status:
            write_status(config.image, f"error {os.getpid()}: {message}")
        return 1
    log.info("clean shutdown")
    if status:
        write_status(config.image, f"clean {os.getpid()}")
    return 0
