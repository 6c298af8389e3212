"""fallocate through a real mount: every mode through ``.fusefs/fallocate`` (by path and
by inode) and through ``fusefs fallocate``; errors; the kernel's caches invalidated;
``drop_caches`` and ``pagecache_lock``; and the kernel's own fallocate(2) for the modes
it forwards (through the patched pyfuse3, docs/fallocate.md), util-linux fallocate(1)
and posix_fallocate(3) among the callers."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess

import pytest

from fusefs.io.fallocate import mode_name

from .conftest import FuseMount, control_read, control_write, fusefs, stats

pytestmark = pytest.mark.mount

BS = 4096
KEEP, PUNCH, COLLAPSE, ZERO, INSERT = 0x01, 0x02, 0x08, 0x10, 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def kernel_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + i // BS * 13) % 251 + 1 for i in range(n))


def model(data: bytes, mode: int, offset: int, length: int) -> bytes:
    out = bytearray(data)
    end = offset + length
    if mode & COLLAPSE:
        del out[offset:end]
    elif mode & INSERT:
        out[offset:offset] = bytes(length)
    elif mode & (PUNCH | ZERO):
        stop = min(end, len(out))
        out[offset:stop] = bytes(max(0, stop - offset))
    if not mode & (KEEP | COLLAPSE | INSERT) and end > len(out):
        out.extend(bytes(end - len(out)))
    return bytes(out)


def make(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def contents(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, size + BS, 0)
    finally:
        os.close(fd)


def errno_of_write(root: str, name: str, text: str) -> int | None:
    try:
        control_write(root, name, text)
    except OSError as e:
        return e.errno
    return None


# (mode name for the control file, flags, offset, length)
CASES = [
    ("alloc", 0, 3 * BS + 100, 6 * BS),
    ("keep_size", KEEP, BS, 20 * BS),
    ("punch", PUNCH | KEEP, BS + 10, 3 * BS),
    ("zero", ZERO, 2 * BS - 5, 10 * BS),
    ("zero,keep_size", ZERO | KEEP, 5, 30 * BS),
    ("zero+keep_size", ZERO | KEEP, 3 * BS, BS),
    ("collapse", COLLAPSE, BS, 2 * BS),
    ("insert", INSERT, 2 * BS, 3 * BS),
    ("0x3", PUNCH | KEEP, 0, BS),
]
SIZE = 6 * BS + 123


@pytest.mark.parametrize("by", ["path", "ino"])
def test_every_mode_through_the_control_file(shared_mount: FuseMount, work: str, by: str) -> None:
    root = str(shared_mount.mountpoint)
    for i, (name, flags, offset, length) in enumerate(CASES):
        path = os.path.join(work, f"f{i}")
        data = pattern(SIZE, i)
        make(path, data)
        contents(path)  # cached pages in the range, and the kernel's attributes
        target = (
            f"path={os.path.relpath(path, root)}" if by == "path" else f"ino={os.stat(path).st_ino}"
        )
        control_write(root, "fallocate", f"{target} mode={name} offset={offset} length={length}")
        want = model(data, flags, offset, length)
        assert os.stat(path).st_size == len(want), name
        assert contents(path) == want, name
        result = control_read(root, "fallocate")
        assert result.startswith(f"ok ino={os.stat(path).st_ino} "), result
        assert result.endswith(f" size={len(want)}\n"), result
    control_write(root, "drop_caches", "1")
    for i, (_, flags, offset, length) in enumerate(CASES):
        want = model(pattern(SIZE, i), flags, offset, length)
        assert contents(os.path.join(work, f"f{i}")) == want


def test_sizes_suffixes_and_keep_size_key(shared_mount: FuseMount, work: str) -> None:
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, pattern(BS))
    rel = os.path.relpath(path, root)
    control_write(root, "fallocate", f"path={rel} mode=zero keep_size=1 offset=0 length=64K")
    assert os.stat(path).st_size == BS
    control_write(root, "fallocate", f"path={rel} offset=1M length=1M")  # mode defaults to alloc
    assert os.stat(path).st_size == 2 << 20
    assert contents(path) == bytes(2 << 20)
    # A path with a space, quoted as a shell would.
    spaced = os.path.join(work, "a file")
    make(spaced, b"x" * 100)
    control_write(root, "fallocate", f"path='{os.path.relpath(spaced, root)}' length=8K")
    assert os.stat(spaced).st_size == 8192


def test_bad_commands_are_einval(shared_mount: FuseMount, work: str) -> None:
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, pattern(4 * BS))
    rel = os.path.relpath(path, root)
    # (An empty write() never reaches the filesystem.)
    for text in [
        "nonsense",
        f"path={rel}",  # no length
        f"path={rel} length=4096 length=8192",
        f"path={rel} ino=2 length=4096",
        f"path={rel} mode=sideways length=4096",
        f"path={rel} mode=-1 length=4096",
        f"path={rel} offset=lots length=4096",
        f"path={rel} length=4096 colour=blue",
        f"path={rel} keep_size=maybe length=4096",
        "ino=two length=4096",
        f"path='{rel} length=4096",
    ]:
        assert errno_of_write(root, "fallocate", text) == errno.EINVAL, text
        assert control_read(root, "fallocate").startswith("error EINVAL: "), text
    assert contents(path) == pattern(4 * BS)
    shared_mount.check_log()


def test_errno_passthrough(shared_mount: FuseMount, work: str) -> None:
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, pattern(4 * BS))
    rel = os.path.relpath(path, root)
    os.mkdir(os.path.join(work, "d"))
    os.symlink("f", os.path.join(work, "l"))
    cases = [
        (f"path={rel} mode=collapse offset=0 length=4M", errno.EINVAL),  # past EOF
        (f"path={rel} mode=collapse offset=0 length={4 * BS}", errno.EINVAL),  # to EOF
        (f"path={rel} mode=collapse offset=100 length={BS}", errno.EINVAL),  # unaligned
        (f"path={rel} mode=insert offset={4 * BS} length={BS}", errno.EINVAL),  # at EOF
        (f"path={rel} mode=2 offset=0 length={BS}", errno.EOPNOTSUPP),  # punch w/o keep_size
        (f"path={rel} mode=0x40 offset=0 length={BS}", errno.EOPNOTSUPP),
        (f"path={rel} mode=collapse,keep_size offset=0 length={BS}", errno.EINVAL),
        (f"path={rel} offset=0 length=0", errno.EINVAL),
        (f"path={rel} offset=4P length=1P", errno.EFBIG),
        (f"path={os.path.relpath(work, root)}/d length={BS}", errno.EISDIR),
        (f"path={os.path.relpath(work, root)}/l length={BS}", errno.ENODEV),  # not followed
        (f"path={os.path.relpath(work, root)}/missing length={BS}", errno.ENOENT),
        (f"path={rel}/below length={BS}", errno.ENOTDIR),
        (f"ino=999999 length={BS}", errno.ENOENT),
    ]
    for text, code in cases:
        assert errno_of_write(root, "fallocate", text) == code, text
        name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]
        assert control_read(root, "fallocate").startswith(f"error {name}: "), text
    assert contents(path) == pattern(4 * BS)


def test_stat_sees_the_new_size_at_once(shared_mount: FuseMount, work: str) -> None:
    """The kernel caches attributes for 60 s: the control file invalidates them."""
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, pattern(8 * BS))
    rel = os.path.relpath(path, root)
    fd = os.open(path, os.O_RDONLY)
    try:
        before = os.fstat(fd)
        control_write(root, "fallocate", f"path={rel} mode=collapse offset={BS} length={3 * BS}")
        assert os.stat(path).st_size == 5 * BS
        after = os.fstat(fd)
        assert after.st_size == 5 * BS
        assert after.st_mtime_ns > before.st_mtime_ns
        control_write(root, "fallocate", f"path={rel} mode=insert offset=0 length={4 * BS}")
        assert os.fstat(fd).st_size == 9 * BS
        control_write(root, "fallocate", f"path={rel} mode=alloc offset=0 length={12 * BS}")
        assert os.fstat(fd).st_size == 12 * BS
        assert os.fstat(fd).st_blocks >= 12 * BS // 512
    finally:
        os.close(fd)


def test_private_mapping_sees_the_punch(shared_mount: FuseMount, work: str) -> None:
    """Private mappings fill the kernel's page cache behind fusefs's back; the core
    invalidates it (from a worker thread) when it changes the data under it, and
    the control file's write() returns once that is done."""
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, b"A" * (4 * BS))
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 4 * BS, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
            assert m[BS : BS + 4] == b"AAAA"  # now in the kernel's page cache
            rel = os.path.relpath(path, root)
            control_write(root, "fallocate", f"path={rel} mode=punch offset={BS} length={BS}")
            assert m[BS : BS + 4] == bytes(4), "the kernel kept its stale page"
            assert m[0:4] == b"AAAA"
    finally:
        os.close(fd)


def test_a_read_write_handle_reads_its_own_result(shared_mount: FuseMount, work: str) -> None:
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, pattern(4 * BS))
    rel = os.path.relpath(path, root)
    fd = os.open(os.path.join(root, ".fusefs", "fallocate"), os.O_RDWR)
    try:
        os.write(fd, f"path={rel} mode=punch offset=0 length={BS}".encode())
        failing = f"path={rel} mode=collapse offset=0 length=1M"
        assert errno_of_write(root, "fallocate", failing) == errno.EINVAL
        assert os.pread(fd, 4096, 0).decode().startswith("ok ")
        assert control_read(root, "fallocate").startswith("error EINVAL")
    finally:
        os.close(fd)


# the command line:

CLI_CASES = [
    ([], 0, 3 * BS + 100, 6 * BS),
    (["-n"], KEEP, BS, 20 * BS),
    (["-p"], PUNCH | KEEP, BS + 10, 3 * BS),
    (["--punch-hole", "--keep-size"], PUNCH | KEEP, 0, BS),
    (["-z"], ZERO, 2 * BS - 5, 10 * BS),
    (["-z", "-n"], ZERO | KEEP, 5, 30 * BS),
    (["-c"], COLLAPSE, BS, 2 * BS),
    (["--insert-range"], INSERT, 2 * BS, 3 * BS),
]


def route_counts(root: str) -> dict[str, int]:
    return {k: int(v) for k, v in stats(root).items() if k.startswith("fallocate.")}


def one_request(before: dict[str, int], after: dict[str, int]) -> str:
    """The one ``fallocate.ROUTE.MODE`` counter that moved, by exactly one."""
    moved = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert list(moved.values()) == [1], moved
    return next(iter(moved))


@pytest.mark.parametrize("route", ["auto", "control"])
def test_cli_flags(shared_mount: FuseMount, work: str, route: str) -> None:
    """Every flag does what util-linux's does, and reaches fusefs the way it
    should: by default through fallocate(2) for every mode the kernel forwards
    and through the control file for collapse and insert; ``--route control``
    through the control file for all."""
    root = str(shared_mount.mountpoint)
    for i, (flags, mode, offset, length) in enumerate(CLI_CASES):
        path = os.path.join(work, f"f{i}")
        data = pattern(SIZE, i)
        make(path, data)
        before = route_counts(root)
        done = fusefs(
            "fallocate", "--route", route, *flags, "-o", str(offset), "-l", str(length), path
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        assert done.stderr == ""
        want = model(data, mode, offset, length)
        assert os.stat(path).st_size == len(want), flags
        assert contents(path) == want, flags
        name = mode_name(mode)
        kernel = route == "auto" and mode not in (COLLAPSE, INSERT)
        via = "kernel" if kernel else "control"
        assert one_request(before, route_counts(root)) == f"fallocate.{via}.{name}", flags


def test_cli_kernel_route_and_fallback(shared_mount: FuseMount, work: str) -> None:
    """``--route kernel`` is fallocate(2) alone: collapse and insert get the
    kernel's EOPNOTSUPP as a one-line error.  A forwarded mode that fallocate(2)
    refuses (the self-test site answers EOPNOTSUPP, as a kernel that does not
    forward zero range would) falls back to the control file, saying so."""
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    data = pattern(SIZE)
    make(path, data)
    done = fusefs("fallocate", "--route", "kernel", "-c", "-l", "4K", path)
    assert done.returncode == 1
    assert done.stderr == (
        f"fusefs fallocate: Operation not supported: {path}: fallocate(2) mode=collapse "
        "offset=0 length=4096\n"
    )
    assert contents(path) == data
    done = fusefs("fallocate", "-v", "-z", "-o", "100", "-l", "5000", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(" via fallocate(2)\n"), done.stdout
    data = model(data, ZERO, 100, 5000)
    control_write(root, "dynamic_fault", "name fallocate_kernel_unsupported enable")
    try:
        before = route_counts(root)
        done = fusefs("fallocate", "-v", "-p", "-o", str(BS), "-l", str(2 * BS), path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == (
            "fusefs fallocate: fallocate(2) refused punch (Operation not supported): "
            "through .fusefs/fallocate\n"
        )
        assert done.stdout.endswith(" via .fusefs/fallocate\n"), done.stdout
        assert one_request(before, route_counts(root)) == "fallocate.control.punch"
        data = model(data, PUNCH | KEEP, BS, 2 * BS)
        assert contents(path) == data
        done = fusefs("fallocate", "--route", "kernel", "-n", "-l", "1M", path)
        assert done.returncode == 1
        assert "Operation not supported" in done.stderr
    finally:
        control_write(root, "dynamic_fault", "name fallocate_kernel_unsupported disable")
    assert contents(path) == data


def test_cli_sizes_create_and_errors(shared_mount: FuseMount, work: str) -> None:
    path = os.path.join(work, "new")
    done = fusefs("fallocate", "-l", "1MiB", "-v", path)  # created, as fallocate(1) does
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: ok ino=")
    assert os.stat(path).st_size == 1 << 20
    done = fusefs("fallocate", "-c", "-o", "4KiB", "-l", "1MB", path)  # 1 MB = 10**6: unaligned
    assert done.returncode == 1
    assert done.stderr.startswith("fusefs fallocate: Invalid argument: ")
    assert "not aligned" in done.stderr
    assert done.stderr.count("\n") == 1
    done = fusefs("fallocate", "-c", "-o", "0", "-l", "2M", path)
    assert done.returncode == 1
    assert "reaches EOF" in done.stderr
    assert os.stat(path).st_size == 1 << 20
    done = fusefs("fallocate", "-c", "-l", "4K", "-o", "0x1000", path)
    assert done.returncode == 0, done.stderr
    assert os.stat(path).st_size == (1 << 20) - 4096
    for args, words in [
        (["-o", "0", path], "no length"),
        (["-l", "lots", path], "invalid size"),
        (["-l", "0", path], "invalid length"),
        (["-c", "-n", "-l", "4K", path], "mutually exclusive"),
    ]:
        done = fusefs("fallocate", *args)
        assert done.returncode == 1, args
        assert done.stderr.startswith("fusefs fallocate: "), done.stderr
        assert words in done.stderr, done.stderr
    done = fusefs("fallocate", "-p", "-z", "-l", "4K", path)
    assert done.returncode == 2  # argparse: mutually exclusive flags


# drop_caches, pagecache_lock, and the kernel's fallocate(2):


def test_drop_caches_file(shared_mount: FuseMount, work: str) -> None:
    root = str(shared_mount.mountpoint)
    path = os.path.join(work, "f")
    make(path, pattern(16 * BS))  # dirty pages
    assert int(stats(root)["cache_pages"]) >= 16
    control_write(root, "drop_caches", "1\n")
    st = stats(root)
    assert st["cache_dirty"] == "0"
    assert int(st["cache_pages"]) < 16
    assert contents(path) == pattern(16 * BS)
    # Linux's values: 2 and 3 drop what 1 drops (fusefs caches nothing else).
    for value in ("2", "3\n"):
        make(path, pattern(16 * BS, seed=len(value)))
        assert int(stats(root)["cache_dirty"]) >= 16
        control_write(root, "drop_caches", value)
        st = stats(root)
        assert st["cache_dirty"] == "0", value
        assert int(st["cache_pages"]) < 16, value
        assert contents(path) == pattern(16 * BS, seed=len(value))
    for bad in ("0", "4", "12", "yes", "1 2"):
        assert errno_of_write(root, "drop_caches", bad) == errno.EINVAL, bad
    with pytest.raises(PermissionError):
        control_read(root, "drop_caches")


def test_pagecache_lock_file(shared_mount: FuseMount) -> None:
    root = str(shared_mount.mountpoint)
    assert control_read(root, "pagecache_lock") == "on\n"
    try:
        control_write(root, "pagecache_lock", "off")
        assert control_read(root, "pagecache_lock") == "off\n"
        assert stats(root)["pagecache_lock"] == "off"
        for bad in ("1", "0", "enable", "on off"):
            assert errno_of_write(root, "pagecache_lock", bad) == errno.EINVAL, bad
    finally:
        control_write(root, "pagecache_lock", "on\n")
    assert control_read(root, "pagecache_lock") == "on\n"
    done = fusefs("lock", root)
    assert done.stdout == "on\n"
    assert fusefs("lock", root, "off").returncode == 0
    assert control_read(root, "pagecache_lock") == "off\n"
    assert fusefs("lock", root, "on").returncode == 0
    assert fusefs("drop-caches", root).returncode == 0


# The modes the kernel's FUSE driver forwards (docs/fallocate.md): (flags, offset, length).
KERNEL_CASES = [
    (0, 3 * BS + 100, 6 * BS),
    (KEEP, BS, 20 * BS),
    (PUNCH | KEEP, BS + 10, 3 * BS),
    (ZERO, 2 * BS - 5, 10 * BS),
    (ZERO | KEEP, 5, 30 * BS),
]


def test_kernel_fallocate_reaches_fusefs(shared_mount: FuseMount, work: str) -> None:
    """fallocate(2) of every forwarded mode, bytes and size compared with the model,
    through the patched pyfuse3 into `Filesystem.fallocate`."""
    for i, (flags, offset, length) in enumerate(KERNEL_CASES):
        path = os.path.join(work, f"f{i}")
        data = pattern(SIZE, i)
        make(path, data)
        contents(path)  # cached pages in the range, and the kernel's attributes
        fd = os.open(path, os.O_RDWR)
        try:
            kernel_fallocate(fd, flags, offset, length)
            want = model(data, flags, offset, length)
            assert os.fstat(fd).st_size == len(want), hex(flags)
        finally:
            os.close(fd)
        assert os.stat(path).st_size == len(want), hex(flags)
        assert contents(path) == want, hex(flags)
    control_write(str(shared_mount.mountpoint), "drop_caches", "1")
    for i, (flags, offset, length) in enumerate(KERNEL_CASES):
        want = model(pattern(SIZE, i), flags, offset, length)
        assert contents(os.path.join(work, f"f{i}")) == want, hex(flags)


def test_kernel_refuses_collapse_and_insert(shared_mount: FuseMount, work: str) -> None:
    """The FUSE driver never forwards them: EOPNOTSUPP, file untouched; the control
    file still does them."""
    path = os.path.join(work, "f")
    make(path, pattern(4 * BS))
    fd = os.open(path, os.O_RDWR)
    try:
        for mode in (COLLAPSE, INSERT, PUNCH):
            with pytest.raises(OSError, match="not supported") as e:
                kernel_fallocate(fd, mode, BS, BS)
            assert e.value.errno == errno.EOPNOTSUPP, hex(mode)
        assert os.fstat(fd).st_size == 4 * BS
        assert os.pread(fd, 5 * BS, 0) == pattern(4 * BS)
    finally:
        os.close(fd)


def test_kernel_fallocate_errno(shared_mount: FuseMount, work: str) -> None:
    """fusefs's own errors come back through fallocate(2) unchanged."""
    path = os.path.join(work, "f")
    make(path, pattern(BS))
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError, match="too large") as e:
            kernel_fallocate(fd, 0, 0, 1 << 53)  # past MAX_FILE_BLOCKS, not the kernel's limit
        assert e.value.errno == errno.EFBIG
        with pytest.raises(OSError, match="No space left") as e:
            kernel_fallocate(fd, 0, 0, 1 << 30)  # a 64 MiB image: all or nothing
        assert e.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == BS
        assert os.pread(fd, 2 * BS, 0) == pattern(BS)
    finally:
        os.close(fd)
    # A control file has no blocks to allocate.
    control = os.open(shared_mount.path(".fusefs", "fallocate"), os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="not supported") as e:
            kernel_fallocate(control, 0, 0, BS)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(control)
    # ... and a refusal there does not turn fallocate(2) off for the mount.
    fd = os.open(path, os.O_RDWR)
    try:
        kernel_fallocate(fd, KEEP, 0, 2 * BS)
    finally:
        os.close(fd)


def test_posix_fallocate_preallocates(shared_mount: FuseMount, work: str) -> None:
    """One FUSE_FALLOCATE: unwritten extents that read as zeros, not written zeros."""
    path = os.path.join(work, "f")
    make(path, pattern(4 * BS))
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 8 * BS)
        assert os.fstat(fd).st_size == 8 * BS
        assert os.pread(fd, 9 * BS, 0) == pattern(4 * BS) + bytes(4 * BS)
        assert os.fstat(fd).st_blocks >= 8 * BS // 512
    finally:
        os.close(fd)


def util_fallocate(*args: str) -> None:
    done = subprocess.run(["fallocate", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_util_linux_fallocate(shared_mount: FuseMount, work: str) -> None:
    """util-linux fallocate(1) -l, -n, -p, -z on the mount, bytes and sizes checked."""
    path = os.path.join(work, "f")
    data = pattern(SIZE)
    make(path, data)
    steps = [
        (["-l", "64KiB"], 0, 0, 64 * 1024),  # allocate from 0: grows the file
        (["-n", "-o", "64KiB", "-l", "32KiB"], KEEP, 64 * 1024, 32 * 1024),
        (["-p", "-o", "5000", "-l", "9000"], PUNCH | KEEP, 5000, 9000),
        (["-z", "-o", "60000", "-l", "10000"], ZERO, 60000, 10000),
        (["-z", "-n", "-o", "1000", "-l", "200000"], ZERO | KEEP, 1000, 200000),
    ]
    for args, flags, offset, length in steps:
        util_fallocate(*args, path)
        data = model(data, flags, offset, length)
        assert os.stat(path).st_size == len(data), args
        assert contents(path) == data, args
    # A new file, as fallocate(1) creates it.
    fresh = os.path.join(work, "new")
    util_fallocate("-l", "1MiB", fresh)
    assert os.stat(fresh).st_size == 1 << 20
    assert contents(fresh) == bytes(1 << 20)
