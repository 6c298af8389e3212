"""A real mount driven with real syscalls: namespace, data, errors, durability, the
control directory, and fault injection through it."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusefs.process import wait_exit

from .conftest import FuseMount, fusefs, mkfs, tail

pytestmark = pytest.mark.mount

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes.append(ctypes.c_uint)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old, None, new)


def errno_of(fn: Callable[..., Any], *args: Any) -> int | None:
    """The errno `fn(*args)` fails with, or None if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def assert_errno(code: int, fn: Callable[..., Any], *args: Any) -> None:
    got = errno_of(fn, *args)
    name = errno.errorcode.get(got, "success") if got is not None else "success"
    assert got == code, f"{fn.__name__}{args}: {name}, wanted {errno.errorcode[code]}"


def write_file(path: str, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# data:


def test_create_write_read(work: str) -> None:
    path = os.path.join(work, "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        assert os.pwrite(fd, b"hello", 0) == 5
        assert os.pwrite(fd, b"world", 10_000) == 5
        assert os.pread(fd, 5, 0) == b"hello"
        assert os.pread(fd, 20, 9_995) == b"\0" * 5 + b"world"
        assert os.pread(fd, 10, 20_000) == b""
        st = os.fstat(fd)
        assert st.st_size == 10_005
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()
        big = os.urandom(3 << 20)  # several 1 MiB FUSE requests
        assert os.pwrite(fd, big, 12_345) == len(big)
        assert os.pread(fd, len(big), 12_345) == big
    finally:
        os.close(fd)
    assert_errno(errno.EEXIST, os.open, path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    os.truncate(path, 3)
    assert read_file(path) == b"hel"
    os.truncate(path, 6)
    assert read_file(path) == b"hel\0\0\0"
    with open(path, "ab") as f:
        f.write(b"!")
    assert read_file(path) == b"hel\0\0\0!"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_shared_mmap_refused_private_works(work: str) -> None:
    path = os.path.join(work, "m")
    write_file(path, b"x" * 4096)
    with open(path, "r+b") as f:
        # DESIGN §2: the kernel refuses shared mappings of direct_io files, read-only
        # ones too (README says so).
        assert errno_of(mmap.mmap, f.fileno(), 4096, mmap.MAP_SHARED) == errno.ENODEV
        ro = mmap.PROT_READ
        assert errno_of(mmap.mmap, f.fileno(), 4096, mmap.MAP_SHARED, ro) == errno.ENODEV
        with mmap.mmap(f.fileno(), 4096, flags=mmap.MAP_PRIVATE) as m:
            assert m[:4] == b"xxxx"


def test_unlinked_open_file_keeps_data_until_close(work: str) -> None:
    path = os.path.join(work, "u")
    data = os.urandom(256 << 10)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        free_before = os.statvfs(work).f_bfree
        os.unlink(path)
        assert not os.path.exists(path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        assert os.statvfs(work).f_bfree == free_before  # blocks still held
        os.pwrite(fd, b"more", len(data))
        assert os.pread(fd, 4, len(data)) == b"more"
    finally:
        os.close(fd)
    # FUSE sends the release asynchronously, and freed blocks become free space
    # only once a commit makes the free durable: commit (fsync) until they are back.
    other = os.open(os.path.join(work, "other"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + 5
        while os.statvfs(work).f_bfree <= free_before:
            assert time.monotonic() < deadline, "blocks of the unlinked file never freed"
            os.fsync(other)
            time.sleep(0.01)
    finally:
        os.close(other)


# namespace:


def test_rename_plain_noreplace_exchange(work: str) -> None:
    a, b, c = (os.path.join(work, n) for n in "abc")
    write_file(a, b"A")
    write_file(b, b"B")
    ino_a = os.stat(a).st_ino
    os.rename(a, c)
    assert not os.path.exists(a)
    assert read_file(c) == b"A"
    assert os.stat(c).st_ino == ino_a
    assert_errno(errno.EEXIST, renameat2, c, b, RENAME_NOREPLACE)
    renameat2(c, a, RENAME_NOREPLACE)
    renameat2(a, b, RENAME_EXCHANGE)
    assert read_file(a) == b"B"
    assert read_file(b) == b"A"
    assert_errno(errno.ENOENT, renameat2, a, c, RENAME_EXCHANGE)
    os.rename(a, b)  # replaces
    assert os.listdir(work) == ["b"]
    assert read_file(b) == b"B"
    d1, d2 = os.path.join(work, "d1"), os.path.join(work, "d2")
    os.makedirs(os.path.join(d1, "sub"))
    os.rename(d1, d2)
    assert os.listdir(d2) == ["sub"]
    assert_errno(errno.EINVAL, os.rename, d2, os.path.join(d2, "sub", "inside"))


def test_link_unlink_symlink_readlink(work: str) -> None:
    f, g, s = (os.path.join(work, n) for n in ("f", "g", "s"))
    write_file(f, b"data")
    os.link(f, g)
    st_f, st_g = os.stat(f), os.stat(g)
    assert st_f.st_ino == st_g.st_ino
    assert st_f.st_nlink == st_g.st_nlink == 2
    os.unlink(f)
    assert os.stat(g).st_nlink == 1
    assert read_file(g) == b"data"
    os.symlink("g", s)
    assert os.readlink(s) == "g"
    assert stat.S_ISLNK(os.lstat(s).st_mode)
    assert read_file(s) == b"data"
    os.symlink("/" + "x" * 1000, os.path.join(work, "long"))
    assert os.readlink(os.path.join(work, "long")) == "/" + "x" * 1000
    assert_errno(errno.EEXIST, os.link, g, s)
    assert_errno(errno.ENOENT, os.unlink, f)
    assert sorted(os.listdir(work)) == ["g", "long", "s"]


def test_mkdir_rmdir_and_errnos(work: str) -> None:
    d = os.path.join(work, "d")
    f = os.path.join(work, "f")
    os.mkdir(d, 0o750)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750 & ~_umask()
    assert st.st_nlink == 2
    write_file(os.path.join(d, "x"), b"")
    write_file(f, b"")
    assert_errno(errno.ENOENT, os.rmdir, os.path.join(work, "missing"))
    assert_errno(errno.ENOENT, os.open, os.path.join(work, "missing"), os.O_RDONLY)
    assert_errno(errno.EEXIST, os.mkdir, d)
    assert_errno(errno.EEXIST, os.mkdir, f)
    assert_errno(errno.ENOTEMPTY, os.rmdir, d)
    assert_errno(errno.EISDIR, os.open, d, os.O_WRONLY)
    assert_errno(errno.EISDIR, os.unlink, d)
    assert_errno(errno.ENOTDIR, os.rmdir, f)
    assert_errno(errno.ENOTDIR, os.open, os.path.join(f, "x"), os.O_RDONLY)
    assert_errno(errno.ENOTDIR, os.rename, d, f)
    assert_errno(errno.EISDIR, os.rename, f, d)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, os.path.join(work, "n" * 256))
    assert_errno(errno.ENAMETOOLONG, write_file, os.path.join(work, "n" * 256), b"")
    os.mkdir(os.path.join(work, "n" * 255))
    assert_errno(errno.EINVAL, os.rename, d, os.path.join(d, "inner"))
    os.unlink(os.path.join(d, "x"))
    os.rmdir(d)
    assert not os.path.exists(d)


def test_xattrs(work: str) -> None:
    f = os.path.join(work, "f")
    write_file(f, b"")
    assert os.listxattr(f) == []
    assert_errno(errno.ENODATA, os.getxattr, f, "user.missing")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.b", b"\0binary\xff")
    assert os.getxattr(f, "user.a") == b"1"
    assert os.getxattr(f, "user.b") == b"\0binary\xff"
    assert sorted(os.listxattr(f)) == ["user.a", "user.b"]
    assert_errno(errno.EEXIST, os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    assert_errno(errno.ENODATA, os.setxattr, f, "user.c", b"2", os.XATTR_REPLACE)
    os.setxattr(f, "user.a", b"2", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.a") == b"2"
    os.removexattr(f, "user.a")
    assert os.listxattr(f) == ["user.b"]
    assert_errno(errno.ENODATA, os.removexattr, f, "user.a")


def test_chmod_chown_utime_ns(work: str) -> None:
    f = os.path.join(work, "f")
    write_file(f, b"")
    os.chmod(f, 0o4711)
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o4711
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    atime, mtime = 1_000_000_000_123_456_789, 1_200_000_000_987_654_321
    os.utime(f, ns=(atime, mtime))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    before = time.time_ns()
    os.utime(f)  # UTIME_NOW
    st = os.stat(f)
    assert st.st_mtime_ns >= before - 1_000_000_000
    assert st.st_ctime_ns >= before - 1_000_000_000


# set-user-ID and set-group-ID bits:

NOBODY = 65534
# mode before -> mode after a write, a truncate or a chown (Linux's rules: S_ISUID always
# goes, S_ISGID only with group-execute, which makes it more than a locking mark).
SETID_CASES = {0o4777: 0o777, 0o2777: 0o777, 0o6777: 0o777, 0o6767: 0o2767, 0o777: 0o777}


def as_nobody(cwd: str, *argv: str) -> None:
    """Run ``argv`` as uid/gid 65534 in ``cwd`` (entered before the ids change: the
    test's temporary directories are closed to others)."""
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def allow_other(tmp_path: Path, image: Path) -> Iterator[FuseMount]:
    (tmp_path / "mnt").mkdir()
    m = FuseMount(image, tmp_path / "mnt")
    try:
        m.mount("-o", "allow_other")
        yield m
    finally:
        m.teardown()


def _setid_files(root: str, prefix: str) -> dict[str, int]:
    names = {}
    for mode in SETID_CASES:
        name = f"{prefix}{mode:o}"
        write_file(os.path.join(root, name), b"0123456789")
        os.chmod(os.path.join(root, name), mode)
        assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == mode
        names[name] = mode
    return names


def _modes_after(root: str, names: dict[str, int]) -> dict[str, tuple[str, str]]:
    """name -> (mode now, mode expected), in octal, for the names that differ."""
    out = {}
    for name, before in names.items():
        now = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
        if now != SETID_CASES[before]:
            out[name] = (f"{now:o}", f"{SETID_CASES[before]:o}")
    return out


def test_unprivileged_write_and_truncate_clear_setid_bits(allow_other: FuseMount) -> None:
    root = str(allow_other.mountpoint)
    written = _setid_files(root, "w")
    truncated = _setid_files(root, "t")
    trunc_open = _setid_files(root, "o")
    for name in written:
        as_nobody(root, "sh", "-c", f'printf x >> "{name}"')
        assert read_file(os.path.join(root, name)) == b"0123456789x"
    for name in truncated:
        as_nobody(root, "truncate", "-s", "4", name)
        assert read_file(os.path.join(root, name)) == b"0123"
    for name in trunc_open:
        as_nobody(root, "sh", "-c", f': > "{name}"')
        assert read_file(os.path.join(root, name)) == b""
    assert _modes_after(root, written) == {}
    assert _modes_after(root, truncated) == {}
    assert _modes_after(root, trunc_open) == {}
    # What was cleared is what the image holds.
    allow_other.remount("-o", "allow_other")
    assert _modes_after(root, {**written, **truncated, **trunc_open}) == {}


def test_root_writes_keep_setid_bits_and_chown_clears_them(allow_other: FuseMount) -> None:
    root = str(allow_other.mountpoint)
    kept = _setid_files(root, "r")
    for name, mode in kept.items():
        path = os.path.join(root, name)
        with open(path, "ab") as f:
            f.write(b"x")
        os.truncate(path, 3)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode  # root holds CAP_FSETID
    for who in ("uid", "gid"):
        names = _setid_files(root, who)
        for name in names:
            path = os.path.join(root, name)
            os.chown(path, NOBODY if who == "uid" else -1, NOBODY if who == "gid" else -1)
        assert _modes_after(root, names) == {}


def test_statfs(work: str) -> None:
    sv = os.statvfs(work)
    assert sv.f_bsize == 4096
    assert sv.f_frsize == 4096
    assert sv.f_blocks == (64 << 20) // 4096
    assert 0 < sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert sv.f_namemax == 255
    write_file(os.path.join(work, "big"), b"z" * (1 << 20))
    assert os.statvfs(work).f_bfree <= sv.f_bfree - 256


def test_st_ino_is_the_inode_number(shared_mount: FuseMount, work: str) -> None:
    assert os.stat(shared_mount.mountpoint).st_ino == 1
    write_file(os.path.join(work, "a"), b"")
    os.mkdir(os.path.join(work, "b"))
    for entry in os.scandir(work):
        assert entry.inode() == os.stat(entry.path).st_ino
    st = os.stat(os.path.join(work, "a"))
    assert st.st_ino not in (0, 1, os.stat(os.path.join(work, "b")).st_ino)


# the control directory:


def test_control_directory(shared_mount: FuseMount) -> None:
    control = shared_mount.path(".fusefs")
    assert ".fusefs" not in os.listdir(shared_mount.mountpoint)
    st = os.stat(control)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert sorted(os.listdir(control)) == [
        "cache_size",
        "drop_caches",
        "dynamic_fault",
        "fallocate",
        "log_path",
        "pagecache_lock",
        "pid",
        "stats",
    ]
    modes = {
        n: stat.S_IMODE(os.stat(os.path.join(control, n)).st_mode) for n in os.listdir(control)
    }
    assert modes == {
        "dynamic_fault": 0o600,
        "pid": 0o400,
        "stats": 0o400,
        "fallocate": 0o600,
        "drop_caches": 0o200,
        "cache_size": 0o600,
        "pagecache_lock": 0o600,
        "log_path": 0o400,
    }
    listing = read_file(os.path.join(control, "dynamic_fault")).decode()
    assert listing.startswith("# sites:")
    assert "name:blockdev_write" in listing
    stats = read_file(os.path.join(control, "stats")).decode()
    assert "inodes: " in stats
    pid = int(read_file(os.path.join(control, "pid")))
    assert os.path.exists(f"/proc/{pid}")
    assert read_file(os.path.join(control, "log_path")).decode() == f"{shared_mount.log}\n"
    assert_errno(errno.EPERM, os.mkdir, os.path.join(control, "x"))
    assert_errno(errno.EPERM, os.rmdir, control)
    assert_errno(errno.EACCES, os.open, os.path.join(control, "stats"), os.O_WRONLY)


def _stats(text: bytes) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.decode().splitlines())


def test_control_reads_are_snapshots(shared_mount: FuseMount, work: str) -> None:
    path = shared_mount.path(".fusefs", "stats")
    with open(path, "rb", buffering=0) as f:
        head = f.read(3)
        write_file(os.path.join(work, "new"), b"")  # changes the inode count
        snapshot = head + f.read()
        assert os.pread(f.fileno(), 3, 0) == head
    before, after = _stats(snapshot), _stats(read_file(path))
    assert int(after["inodes"]) == int(before["inodes"]) + 1


def test_control_fault_commands(shared_mount: FuseMount) -> None:
    path = shared_mount.path(".fusefs", "dynamic_fault")
    fd = os.open(path, os.O_WRONLY)
    try:
        assert_errno(errno.EINVAL, os.write, fd, b"name blockdev_write explode")
        assert_errno(errno.ENOENT, os.write, fd, b"name no_such_site_anywhere enable")
        assert os.write(fd, b"name blockdev_write frequency 1000000\n") > 0
        assert "name:blockdev_write frequency=1000000" in read_file(path).decode()
        assert os.write(fd, b"name blockdev_write disable; name blockdev_read disable") > 0
    finally:
        os.close(fd)
    with open(path, "w") as f:  # the shell's `echo cmd > file` (O_TRUNC) works too
        f.write("name blockdev_write disable\n")
    listed = fusefs("fault", shared_mount.mountpoint)
    assert listed.returncode == 0
    assert "name:blockdev_write disabled" in listed.stdout
    bad = fusefs("fault", shared_mount.mountpoint, "name", "nothing_matches_this", "enable")
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("fusefs fault: ")
    assert "ENOENT" in bad.stderr
    stats = fusefs("stats", shared_mount.mountpoint)
    assert stats.returncode == 0
    assert "commits: " in stats.stdout


# durability:


ATIME, MTIME = 1_111_111_111_111_111_111, 1_222_222_222_222_222_222


def _populate(root: str) -> dict[str, object]:
    os.makedirs(os.path.join(root, "dir", "sub"))
    data = os.urandom(300_000)
    write_file(os.path.join(root, "dir", "data"), data)
    os.chmod(os.path.join(root, "dir", "data"), 0o600)
    os.utime(
        os.path.join(root, "dir", "data"), ns=(1_111_111_111_111_111_111, 1_222_222_222_222_222_222)
    )
    os.link(os.path.join(root, "dir", "data"), os.path.join(root, "dir", "sub", "hard"))
    os.symlink("../data", os.path.join(root, "dir", "sub", "sym"))
    os.setxattr(os.path.join(root, "dir"), "user.k", b"v")
    st = os.stat(os.path.join(root, "dir", "data"))
    return {"data": data, "ino": st.st_ino}


def _check_populated(root: str, expect: dict[str, object]) -> None:
    path = os.path.join(root, "dir", "data")
    assert read_file(path) == expect["data"]
    st = os.stat(path)
    assert st.st_ino == expect["ino"]
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_nlink == 2
    assert st.st_mtime_ns == MTIME
    assert os.stat(os.path.join(root, "dir", "sub", "hard")).st_ino == st.st_ino
    assert os.readlink(os.path.join(root, "dir", "sub", "sym")) == "../data"
    assert read_file(os.path.join(root, "dir", "sub", "sym")) == expect["data"]
    assert os.getxattr(os.path.join(root, "dir"), "user.k") == b"v"
    assert sorted(os.listdir(os.path.join(root, "dir"))) == ["data", "sub"]


def test_data_and_metadata_survive_remount(mnt: FuseMount) -> None:
    expect = _populate(mnt.path())
    mnt.remount()
    _check_populated(mnt.path(), expect)
    assert "commits: " in read_file(mnt.path(".fusefs", "stats")).decode()
    mnt.remount("-o", "ro")
    _check_populated(mnt.path(), expect)
    assert_errno(errno.EROFS, write_file, mnt.path("new"), b"")
    assert_errno(errno.EROFS, os.unlink, mnt.path("dir", "data"))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fsynced_data_survives_kill_9(mnt: FuseMount) -> None:
    expect = _populate(mnt.path())
    _fsync_path(mnt.path("dir", "data"))  # the populated tree is fsynced too
    fd = os.open(mnt.path("synced"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.close(fd)
    write_file(mnt.path("maybe"), b"not fsynced: may be lost")
    mnt.kill()
    assert not os.path.ismount(mnt.mountpoint)
    mnt.check_fsck()
    mnt.mount()
    assert read_file(mnt.path("synced")) == b"durable"
    _check_populated(mnt.path(), expect)


def test_sigterm_unmounts_cleanly(mnt: FuseMount) -> None:
    write_file(mnt.path("f"), b"kept")
    pid = mnt.daemon_pid()
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid, 30), f"daemon did not stop; log:\n{tail(mnt.log)}"
    assert not os.path.ismount(mnt.mountpoint)  # it unmounts before it exits
    mnt.mounted = False
    assert mnt.log.read_text().rstrip().endswith("fusefs: clean shutdown")
    assert Path(f"{mnt.image}.status").read_text() == f"clean {pid}\n"
    mnt.check_fsck()
    mnt.mount()
    assert read_file(mnt.path("f")) == b"kept"


def test_commit_write_error_fails_fsync_and_loses_nothing(mnt: FuseMount) -> None:
    mnt.allow_log_errors = True  # the failed commit is logged as an error
    expect = _populate(mnt.path())
    fd = os.open(mnt.path("committed"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"committed before the fault")
    os.fsync(fd)
    os.close(fd)
    _fsync_path(mnt.path("dir", "data"))
    fd = os.open(mnt.path("doomed"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 10_000)
        os.fsync(fd)  # the data is written back; the next fsync has only a commit to do
        os.fchmod(fd, 0o640)
        done = fusefs("fault", mnt.mountpoint, "name blockdev_write oneshot")
        assert done.returncode == 0, done.stderr
        assert errno_of(os.fsync, fd) in (errno.EIO, errno.EROFS)
    finally:
        os.close(fd)
    assert_errno(errno.EROFS, write_file, mnt.path("later"), b"")
    listing = fusefs("fault", mnt.mountpoint).stdout.splitlines()
    (site,) = [ln for ln in listing if "name:blockdev_write " in ln]
    assert site.endswith("fired:1")
    # Gone read-only: the final commit cannot succeed, and umount says so.
    done = mnt.umount()
    assert done.returncode != 0
    assert done.stderr.startswith("fusefs umount: shutdown with errors")
    assert not mnt.mounted
    mnt.check_fsck()
    mnt.mount()
    assert read_file(mnt.path("committed")) == b"committed before the fault"
    _check_populated(mnt.path(), expect)


# refused images:


@pytest.mark.parametrize("damage", ["superblock", "foreign"])
def test_bad_images_are_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    image = tmp_path / "fs.img"
    if damage == "superblock":
        mkfs(image)
        with open(image, "r+b") as f:
            f.write(os.urandom(8192))  # both superblock copies
    else:
        image.write_bytes(os.urandom(1 << 20))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = fusefs("mount", image, mountpoint)
    assert not os.path.ismount(mountpoint)
    assert done.returncode != 0
    assert done.stderr.startswith("fusefs mount: ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "Traceback" not in Path(f"{image}.log").read_text()


def test_faults_at_mount_time(tmp_path: Path, image: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = fusefs("mount", image, mountpoint, "--fault", "name mount_open enable")
    assert not os.path.ismount(mountpoint)
    assert done.returncode != 0
    assert done.stderr == "fusefs mount: mount: injected error opening the image\n"
    done = fusefs("mount", image, mountpoint, "--fault", "name mount_open explode")
    assert not os.path.ismount(mountpoint)
    assert done.stderr.startswith("fusefs mount: bad fault spec: ")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in Path(f"{image}.log").read_text()
