"""``fusefs``: the command line (mkfs, mount, umount, fsck, fault, stats, fallocate,
drop-caches, lock).

Every command reports an error as one line, ``fusefs <command>: <message>``, on
stderr and exits non-zero; a traceback is a bug (set ``FUSEFS_DEBUG=1`` to see
one anyway).

``mount`` starts the daemon (daemon.py) in the background and returns once the
mount is ready, or fails with the daemon's reason; ``-f`` serves in the
foreground instead.  ``umount`` runs ``fusermount3 -u``, waits for the daemon to
commit and exit, and reads its verdict from the status file ``IMAGE.status``
(described in daemon.py): exit 0 only after a clean shutdown.

``fallocate`` takes util-linux fallocate(1)'s flags and sizes.  A mode the
kernel's FUSE driver forwards (allocate, keep size, punch hole, zero range) goes
through fallocate(2) on the file, like util-linux; collapse and insert range
through the ``.fusefs/fallocate`` control file of the mount holding the file
(the kernel forwards neither to FUSE: docs/fallocate.md), and so does a
forwarded mode that fallocate(2) refuses with EOPNOTSUPP (an older kernel
without zero range), with a line on stderr saying so.  ``--route`` forces
either way.  ``drop-caches`` and ``lock`` write ``.fusefs/drop_caches`` and
``.fusefs/pagecache_lock``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from fusefs.errors import FsError
from fusefs.process import wait_exit

READY_TIMEOUT: Final = 120.0
UMOUNT_TIMEOUT: Final = 60.0
CONTROL_DIR: Final = ".fusefs"
# Kernel-side options `-o` accepts besides the core's (MountOptions.parse): allow_other
# and the mount(2) flags libfuse knows.
_FUSE_ONLY_OPTIONS: Final = frozenset(
    {"allow_other", "suid", "nosuid", "dev", "nodev", "exec", "noexec"}
    | {"async", "sync", "atime", "noatime", "dirsync"}
)
# Options that mean something to mount(8) or fstab only, or that fusefs has no use
# for (it keeps no atime policy of its own): accepted and dropped, so that an fstab
# line written for any filesystem mounts.
_IGNORED_OPTIONS: Final = frozenset(
    {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"}
    | {"owner", "group", "relatime", "norelatime", "strictatime", "nostrictatime"}
    | {"lazytime", "nolazytime", "diratime", "nodiratime", "iversion", "noiversion"}
    | {"loud", "silent"}
)
_IGNORED_PREFIXES: Final = ("x-", "comment=")


class CliError(Exception):
    """A one-line failure of a command, with its exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _fail(message: str, exit_code: int = 1) -> NoReturn:
    raise CliError(message, exit_code)


def _os_message(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "")
    text = f"{e.strerror} ({name})" if name else str(e.strerror or e)
    return f"{e.filename}: {text}" if e.filename else text


# /proc/self/mountinfo:


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal.
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        octal = raw[i + 1 : i + 4]
        if raw[i] == ord("\\") and len(octal) == 3 and octal.isdigit():
            out.append(int(octal, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly `path` (already resolved)."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            mountpoint = _unescape(fields[4])
            if mountpoint == path:
                found = MountEntry(mountpoint, rest[0], _unescape(rest[1]))
    return found


def _fusefs_mount(mountpoint: str) -> tuple[str, str]:
    """(resolved mount point, image) of a fusefs mount, or a one-line error."""
    path = os.path.realpath(mountpoint)
    entry = find_mount(path)
    if entry is None:
        _fail(f"{mountpoint}: not mounted")
    if entry.fstype != "fuse.fusefs" or not entry.source.startswith("fusefs:"):
        _fail(f"{mountpoint}: not a fusefs mount (it is {entry.fstype})")
    return path, entry.source.removeprefix("fusefs:")


def _control_path(mountpoint: str, name: str) -> str:
    return os.path.join(mountpoint, CONTROL_DIR, name)


def _read_control(mountpoint: str, name: str) -> str:
    path = _control_path(mountpoint, name)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        _fail(f"{mountpoint}: not a fusefs mount (no {CONTROL_DIR}/{name})")
    except OSError as e:
        _fail(_os_message(e))


# mkfs:


def cmd_mkfs(args: argparse.Namespace) -> int:
    from fusefs.format import mkfs, parse_size

    for entry in _mounts_of(os.path.abspath(args.image)):
        _fail(f"{args.image} is mounted on {entry.mountpoint}; unmount it first")
    size = parse_size(args.size)
    mkfs(args.image, size, block_size=args.block_size, force=args.force)
    blocks = size // args.block_size
    print(f"{args.image}: {blocks} blocks of {args.block_size} bytes")
    return 0


# mount:


def split_options(text: str) -> tuple[list[str], str]:
    """(options for the kernel's mount, options for the core)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    items = [s for s in items if s not in _IGNORED_OPTIONS and not s.startswith(_IGNORED_PREFIXES)]
    fuse_only = [s for s in items if s in _FUSE_ONLY_OPTIONS]
    core = ",".join(s for s in items if s not in _FUSE_ONLY_OPTIONS)
    return fuse_only, core


def check_mount_args(args: argparse.Namespace) -> None:
    if not os.path.exists(args.image):
        _fail(f"{args.image}: no such image file")
    if not os.path.isfile(args.image):
        _fail(f"{args.image}: not a regular file")
    if not os.path.exists(args.mountpoint):
        _fail(f"mount point {args.mountpoint}: No such file or directory")
    if not os.path.isdir(args.mountpoint):
        _fail(f"{args.mountpoint}: mount point is not a directory")
    if os.path.ismount(args.mountpoint):
        _fail(f"{args.mountpoint}: already a mount point")
    for entry in _mounts_of(args.image):
        _fail(f"{args.image} is already mounted on {entry.mountpoint}")


def cmd_mount(args: argparse.Namespace) -> int:
    from fusefs import daemon
    from fusefs.filesystem import MountOptions

    args.image = os.path.abspath(args.image)
    args.mountpoint = os.path.abspath(args.mountpoint)
    fuse_only, core = split_options(args.options)
    options = MountOptions.parse(core)  # a bad option fails here, before any fork
    problem = daemon.pyfuse3_problem()  # before any fork, too
    if problem is not None:
        _fail(problem)
    log_path = os.path.abspath(args.log) if args.log else daemon.default_log_path(args.image)
    if args.ready_fd is None:  # a user's command, not the daemon we started
        check_mount_args(args)
    if args.foreground:
        extra = [*fuse_only, "ro"] if options.read_only else fuse_only
        config = daemon.DaemonConfig(
            image=args.image,
            mountpoint=args.mountpoint,
            options=options,
            fuse_options=daemon.fuse_options(args.image, extra),
            log_path=log_path,
            faults=list(args.fault),
            ready_fd=args.ready_fd,
            debug=args.debug,
        )
        return daemon.run(config)
    return _spawn_daemon(args, log_path)


def _spawn_daemon(args: argparse.Namespace, log_path: str) -> int:
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        _fail(f"log file {_os_message(e)}")
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "fusefs", "mount", "--foreground"]
    argv += ["--ready-fd", str(write_fd), "--log", log_path, "-o", args.options]
    for spec in args.fault:
        argv += ["--fault", spec]
    if args.debug:
        argv.append("--debug")
    argv += ["--", args.image, args.mountpoint]
    try:
        os.set_inheritable(write_fd, True)
        # posix_spawn, not subprocess: the daemon outlives us and must not be our
        # child object (no wait, no ResourceWarning), and lives in its own session.
        pid = os.posix_spawn(
            sys.executable,
            argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(write_fd)
        os.close(log_fd)
    try:
        line = _read_line(read_fd, READY_TIMEOUT)
    finally:
        os.close(read_fd)
    if line == "ok":
        return 0
    if line is None:
        _fail(f"daemon (pid {pid}) not ready after {READY_TIMEOUT:.0f} s; see {log_path}")
    if line.startswith("error: "):
        _reap(pid)
        _fail(line.removeprefix("error: "))
    status = _reap(pid)
    last = _last_log_line(log_path)
    _fail(f"daemon (pid {pid}) died ({status}) before the mount was ready: {last}")


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to `fd`; "" at EOF without one; None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode("utf-8", "replace")


def _reap(pid: int) -> str:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _last_log_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError as e:
        return f"(cannot read the log: {e.strerror})"
    return lines[-1].strip() if lines else f"(nothing in {path})"


# umount:


def _read_status(image: str) -> tuple[str, int, str] | None:
    from fusefs.daemon import status_path

    try:
        with open(status_path(image), encoding="utf-8") as f:
            line = f.readline().strip()
    except OSError:
        return None
    head, _, message = line.partition(": ")
    state, _, pid = head.partition(" ")
    return (state, int(pid), message) if pid.isdigit() else None


def cmd_umount(args: argparse.Namespace) -> int:
    path, image = _fusefs_mount(args.mountpoint)
    try:
        with open(_control_path(path, "pid"), encoding="ascii") as f:
            pid = int(f.read())
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            _fail(_os_message(e))
        # The daemon is gone: all that is left to do is to detach the dead mount.
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)
        _fail(f"{path}: the daemon had died; mount removed; run fusefs fsck {image}")
    done = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        _fail(reason[0].removeprefix("fusermount3: "))
    if not wait_exit(pid, UMOUNT_TIMEOUT):
        _fail(f"daemon (pid {pid}) still running {UMOUNT_TIMEOUT:.0f} s after the unmount")
    status = _read_status(image)
    if status is None or status[1] != pid:
        _fail(f"no shutdown status from daemon pid {pid} (in {image}.status)")
    state, _, message = status
    if state == "clean":
        return 0
    if state == "error":
        _fail(f"shutdown with errors: {message}")
    _fail(f"daemon pid {pid} exited without a final status (killed?); run fusefs fsck {image}")


# fsck:


def cmd_fsck(args: argparse.Namespace) -> int:
    from fusefs.fsck import fsck

    image = os.path.abspath(args.image)
    for entry in _mounts_of(image):
        _fail(f"{args.image} is mounted on {entry.mountpoint}; unmount it first", 8)
    result = fsck(args.image, repair=args.repair)
    # Errors on stderr (each once, one line), then the notes and the summary.
    for message in result.errors:
        print(f"fusefs fsck: {message}", file=sys.stderr)
    sys.stderr.flush()
    for message in result.report:
        print(message)
    return result.exit_code


def _mounts_of(image: str) -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.partition(" - ")[2].split()
            if len(fields) >= 2 and fields[0] == "fuse.fusefs":
                source = _unescape(fields[1])
                if source == f"fusefs:{image}":
                    out.append(MountEntry(_unescape(line.split()[4]), fields[0], source))
    return out


# fault, stats:


def cmd_fault(args: argparse.Namespace) -> int:
    if not args.command:
        sys.stdout.write(_read_control(args.mountpoint, "dynamic_fault"))
        return 0
    text = " ".join(args.command)
    path = _control_path(args.mountpoint, "dynamic_fault")
    try:
        # Read-write: after a refused command, the handle reads back its reason.
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        _fail(f"{args.mountpoint}: not a fusefs mount (no {CONTROL_DIR}/dynamic_fault)")
    except OSError as e:
        _fail(_os_message(e))
    try:
        os.write(fd, text.encode())
    except OSError as e:
        reason = _result(fd).removeprefix("error ").partition(": ")[2]
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        _fail(f"{reason or e.strerror} ({name}; {_log_hint(args.mountpoint)})")
    finally:
        os.close(fd)
    return 0


def _log_hint(mountpoint: str) -> str:
    """Where the daemon of ``mountpoint`` logs, as the end of an error message."""
    try:
        with open(_control_path(mountpoint, "log_path"), encoding="utf-8") as f:
            log_path = f.read().strip()
    except OSError:
        log_path = ""
    return f"daemon log: {log_path}" if log_path not in ("", "-") else "see the daemon log"


def cmd_stats(args: argparse.Namespace) -> int:
    sys.stdout.write(_read_control(args.mountpoint, "stats"))
    return 0


def _write_control(mountpoint: str, name: str, text: str) -> None:
    path = _control_path(mountpoint, name)
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        _fail(f"{mountpoint}: not a fusefs mount (no {CONTROL_DIR}/{name})")
    except OSError as e:
        _fail(_os_message(e))
    try:
        os.write(fd, text.encode())
    except OSError as e:
        _fail(f"{text!r}: {e.strerror} ({_log_hint(mountpoint)})")
    finally:
        os.close(fd)


def cmd_drop_caches(args: argparse.Namespace) -> int:
    _write_control(args.mountpoint, "drop_caches", "1")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    if args.state is None:
        sys.stdout.write(_read_control(args.mountpoint, "pagecache_lock"))
    else:
        _write_control(args.mountpoint, "pagecache_lock", args.state)
    return 0


# fallocate:

_UTIL_SIZE: Final = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(?:([kmgtpezy])(ib|b)?)?$", re.IGNORECASE)


def parse_util_size(text: str) -> int:
    """A size as util-linux reads it: ``4096``, ``0x1000``, ``4K`` = ``4KiB`` = 4096,
    ``4KB`` = 4000, and so on up to Y."""
    m = _UTIL_SIZE.match(text.strip())
    if m is None:
        raise CliError(f"invalid size {text!r} (try 4096, 64K, 1MiB, 1MB)")
    number = int(m.group(1), 0)
    unit, suffix = m.group(2), (m.group(3) or "").lower()
    if unit is None:
        return number
    base = 1000 if suffix == "b" else 1024
    return int(number * base ** ("kmgtpezy".index(unit.lower()) + 1))


def _mount_root(path: str) -> str:
    """The root of the fusefs mount holding `path`: the nearest directory up from it
    where a ``.fusefs/dynamic_fault`` can be opened."""
    d = os.path.dirname(path)
    while True:
        if os.path.exists(os.path.join(d, CONTROL_DIR, "dynamic_fault")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            _fail(f"{path}: not on a fusefs mount (no {CONTROL_DIR} above it)")
        d = parent


def _fallocate_mode(args: argparse.Namespace) -> str:
    if args.keep_size and (args.collapse_range or args.insert_range):
        _fail("options --keep-size and --collapse-range/--insert-range are mutually exclusive")
    if args.collapse_range:
        return "collapse"
    if args.insert_range:
        return "insert"
    if args.punch_hole:
        return "punch"  # keeps the size: -p implies -n, as util-linux
    if args.zero_range:
        return "zero,keep_size" if args.keep_size else "zero"
    return "keep_size" if args.keep_size else "alloc"


# The modes the kernel's FUSE driver forwards to the filesystem (fuse_file_fallocate).
KERNEL_FALLOCATE_MODES: Final = frozenset({"alloc", "keep_size", "punch", "zero", "zero,keep_size"})
_libc: ctypes.CDLL | None = None


def fallocate_fd(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with the FALLOC_FL_* flags ``mode``; the errno raises as OSError.
    (Python has only ``os.posix_fallocate``, mode 0, which glibc turns into
    writes of zeros where the filesystem refuses.)"""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def cmd_fallocate(args: argparse.Namespace) -> int:
    mode = _fallocate_mode(args)
    if args.length is None:
        _fail("no length argument specified")
    length = parse_util_size(args.length)
    offset = parse_util_size(args.offset) if args.offset is not None else 0
    if length <= 0:
        _fail("invalid length value specified")
    # fallocate(1) creates the file; holding it open keeps it alive meanwhile.
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        _fail(_os_message(e))
    try:
        path = os.path.realpath(args.file)
        root = _mount_root(path)
        kernel = args.route == "kernel" or (args.route == "auto" and mode in KERNEL_FALLOCATE_MODES)
        result = None
        if kernel:
            result = _kernel_fallocate(fd, mode, offset, length, args)
        if result is None:
            target = os.path.relpath(path, root)
            command = f"path={shlex.quote(target)} mode={mode} offset={offset} length={length}"
            result = _run_fallocate(root, command, args.file) + " via .fusefs/fallocate"
    finally:
        os.close(fd)
    if args.verbose:
        print(f"{args.file}: {result}")
    return 0


def _kernel_fallocate(
    fd: int, mode: str, offset: int, length: int, args: argparse.Namespace
) -> str | None:
    """fallocate(2) on ``fd``: its result line, or None where ``auto`` should fall
    back to the control file (EOPNOTSUPP)."""
    from fusefs.io.fallocate import CANONICAL_MODES

    flags = {name: bits for bits, name in CANONICAL_MODES.items()}[mode]
    try:
        fallocate_fd(fd, flags, offset, length)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP and args.route == "auto":
            print(
                f"fusefs fallocate: fallocate(2) refused {mode} ({e.strerror}): "
                "through .fusefs/fallocate",
                file=sys.stderr,
            )
            return None
        _fail(
            f"{e.strerror}: {args.file}: fallocate(2) mode={mode} offset={offset} length={length}"
        )
    st = os.fstat(fd)
    return (
        f"ok ino={st.st_ino} mode={mode} offset={offset} length={length} size={st.st_size} "
        "via fallocate(2)"
    )


def _run_fallocate(root: str, command: str, name: str) -> str:
    """Write one request on a read-write handle; return its result line (the
    handle's own, whatever other processes write meanwhile)."""
    try:
        fd = os.open(_control_path(root, "fallocate"), os.O_RDWR)
    except OSError as e:
        _fail(_os_message(e))
    try:
        try:
            os.write(fd, command.encode())
        except OSError as e:
            reason = _result(fd).partition(": ")[2].removeprefix("fallocate: ")
            _fail(f"{e.strerror}: {name}: {reason or 'see the daemon log'}")
        return _result(fd)
    finally:
        os.close(fd)


def _result(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def cmd_demo(args: argparse.Namespace) -> int:
    from fusefs.demo import race_table  # the scenarios import the whole core

    return 0 if race_table(set(args.race) if args.race else None) else 1


# the parser:


def build_parser() -> argparse.ArgumentParser:
    from fusefs.format import MIN_BLOCKS, format_size, min_image_size

    parser = argparse.ArgumentParser(
        prog="fusefs", description="A userspace filesystem with its own page cache."
    )
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("mkfs", cmd_mkfs, "make a new filesystem image")
    p.add_argument("image")
    p.add_argument(
        "--size",
        required=True,
        help=(
            f"image size, at least {MIN_BLOCKS} blocks ({format_size(min_image_size(4096))} "
            "with 4096-byte blocks): 256K, 64M, 1G, 2GiB"
        ),
    )
    p.add_argument("--block-size", type=int, default=4096, help="bytes per block (default 4096)")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing fusefs image, or a file that holds other data",
    )

    p = command("mount", cmd_mount, "mount an image (returns once the mount is ready)")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="a fault command applied before mounting (repeatable)",
    )
    p.add_argument(
        "-o",
        dest="options",
        default="",
        metavar="OPTIONS",
        help=(
            "comma-separated: ro, rw, commit=SECONDS, cache_size=SIZE, readahead=on|off, "
            "pagecache_lock=on|off (off only to demonstrate races), allow_other, the "
            "mount flags nosuid, nodev, noexec, noatime, sync, dirsync (and their "
            "opposites); fstab-only options (defaults, noauto, nofail, _netdev, x-*) are "
            "ignored"
        ),
    )
    p.add_argument("--log", metavar="PATH", help="daemon log (default IMAGE.log)")
    p.add_argument("--debug", action="store_true", help="log at debug level")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    p = command("umount", cmd_umount, "commit, unmount and wait for the daemon to exit")
    p.add_argument("mountpoint")

    p = command("fsck", cmd_fsck, "check an unmounted image (exit codes as e2fsck)")
    p.add_argument("image")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")

    p = command("fault", cmd_fault, "list fault sites, or run a fault command")
    p.add_argument("mountpoint")
    p.add_argument("command", nargs="*", help="e.g.: name blockdev_write oneshot")

    p = command("stats", cmd_stats, "print the filesystem's statistics")
    p.add_argument("mountpoint")

    p = command(
        "fallocate",
        cmd_fallocate,
        "preallocate, punch, zero, collapse or insert a file range (util-linux flags)",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("-c", "--collapse-range", action="store_true", help="remove a range")
    kind.add_argument("-i", "--insert-range", action="store_true", help="insert a hole")
    kind.add_argument("-p", "--punch-hole", action="store_true", help="punch a hole (implies -n)")
    kind.add_argument("-z", "--zero-range", action="store_true", help="zero a range")
    p.add_argument("-n", "--keep-size", action="store_true", help="do not change the size")
    p.add_argument("-o", "--offset", metavar="N", help="where the range starts (default 0)")
    p.add_argument("-l", "--length", metavar="N", help="range length: 4096, 64K, 1MiB, 1MB")
    p.add_argument("-v", "--verbose", action="store_true", help="print the result line")
    p.add_argument(
        "--route",
        choices=["auto", "kernel", "control"],
        default="auto",
        help="fallocate(2) (kernel) or .fusefs/fallocate (control); auto (default): "
        "fallocate(2) for the modes the kernel forwards, else the control file",
    )
    p.add_argument("file")

    p = command("drop-caches", cmd_drop_caches, "write back dirty pages, drop clean ones")
    p.add_argument("mountpoint")

    p = command("lock", cmd_lock, "show or switch the pagecache add lock (on|off)")
    p.add_argument("mountpoint")
    p.add_argument("state", nargs="?", choices=["on", "off"])

    p = command("demo", cmd_demo, "demonstrations: 'races' forces each race, lock off and on")
    p.add_argument("what", choices=["races"])
    p.add_argument(
        "--race", type=int, action="append", metavar="N", help="only race N (repeatable)"
    )
    return parser


def _fuse_helper_call(argv: list[str], parser: argparse.ArgumentParser) -> bool:
    """Whether ``argv`` is ``SOURCE MOUNTPOINT [-o OPTIONS]``: how mount.fuse3 runs
    the program of a ``fuse.fusefs`` mount (type ``fuse.TYPE`` runs ``TYPE``)."""
    commands = next(a.choices for a in parser._actions if a.dest == "command_name") or ()
    return (
        len(argv) >= 2
        and argv[0] not in commands
        and not argv[0].startswith("-")
        and os.path.isdir(argv[1])
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if _fuse_helper_call(argv, parser):
        argv = ["mount", *argv]
    args = parser.parse_args(argv)
    prefix = f"fusefs {args.command_name}"
    try:
        code: int = args.func(args)
        return code
    except CliError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except FsError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 8 if args.command_name == "fsck" else 1
    except OSError as e:
        print(f"{prefix}: {_os_message(e)}", file=sys.stderr)
        return 8 if args.command_name == "fsck" else 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FUSEFS_DEBUG"):
            raise
        print(f"{prefix}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 8 if args.command_name == "fsck" else 1


if __name__ == "__main__":
    sys.exit(main())
