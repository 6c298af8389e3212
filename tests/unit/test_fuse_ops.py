"""The FUSE translation layer without a mount: `FuseOperations` over the real core
(and over a failing fake where the error boundary is the subject)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyfuse3
import pytest
import trio

from fusefs.control import CONTROL_BASE, CONTROL_NAME, ControlDir
from fusefs.errors import FsError, NotFound
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.fuse_ops import CACHE_TIMEOUT, FuseOperations, errno_boundary
from fusefs.namespace import ROOT_INO

from .conftest import assert_fsck_clean

CTX = pyfuse3.RequestContext()  # uid 0, gid 0


@dataclass
class Fields:
    """Stands in for pyfuse3.SetattrFields, whose attributes are read-only."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def fields(**kwargs: bool) -> pyfuse3.SetattrFields:
    return cast(pyfuse3.SetattrFields, Fields(**kwargs))


@pytest.fixture
async def ops(image: Path) -> AsyncIterator[FuseOperations]:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    yield FuseOperations(fs, ControlDir(fs, pid=4242))
    await fs.unmount()
    assert_fsck_clean(image)


async def fuse_errno(coro: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await coro
    return exc.value.errno


async def create(ops: FuseOperations, name: bytes, parent: int = ROOT_INO) -> int:
    fi, entry = await ops.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    await ops.release(fi.fh)
    return entry.st_ino


# translation:


async def test_create_open_read_write_attributes(ops: FuseOperations) -> None:
    fi, entry = await ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o640, os.O_RDWR, CTX)
    assert fi.direct_io
    assert not fi.keep_cache
    assert entry.entry_timeout == entry.attr_timeout == CACHE_TIMEOUT
    assert stat.S_ISREG(entry.st_mode)
    assert stat.S_IMODE(entry.st_mode) == 0o640
    assert await ops.write(fi.fh, 0, b"hello") == 5
    await ops.fsync(fi.fh, False)
    await ops.release(fi.fh)
    looked = await ops.lookup(ROOT_INO, b"f", CTX)
    assert looked.st_ino == entry.st_ino
    assert looked.st_size == 5
    assert looked.st_blocks == 4096 // 512
    fi = await ops.open(entry.st_ino, os.O_RDONLY | os.O_DIRECT, CTX)
    assert fi.direct_io
    assert await ops.read(fi.fh, 0, 4096) == b"hello"  # O_DIRECT: aligned, stops at EOF
    assert await fuse_errno(ops.read(fi.fh, 1, 100)) == errno.EINVAL  # unaligned
    await ops.release(fi.fh)


async def test_a_missing_name_is_a_negative_entry_the_kernel_does_not_cache(
    ops: FuseOperations,
) -> None:
    # Inode number 0 is FUSE's negative entry: ENOENT to the caller of open()/stat().
    missing = await ops.lookup(ROOT_INO, b"missing", CTX)
    assert (missing.st_ino, missing.entry_timeout) == (0, 0)
    assert await fuse_errno(ops.lookup(ROOT_INO, b"n" * 256, CTX)) == errno.ENAMETOOLONG
    ino = await create(ops, b"f")
    assert await fuse_errno(ops.lookup(ino, b"x", CTX)) == errno.ENOTDIR
    assert ops.fs.ns.get(ino).lookups == 1  # the create's; the misses took none
    await ops.forget([(ino, 1)])


async def test_core_errors_become_their_errno(ops: FuseOperations) -> None:
    await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)
    assert await fuse_errno(ops.mkdir(ROOT_INO, b"d", 0o755, CTX)) == errno.EEXIST
    assert await fuse_errno(ops.mkdir(ROOT_INO, b"n" * 256, 0o755, CTX)) == errno.ENAMETOOLONG
    ino = await create(ops, b"f", (await ops.lookup(ROOT_INO, b"d", CTX)).st_ino)
    assert await fuse_errno(ops.rmdir(ROOT_INO, b"d", CTX)) == errno.ENOTEMPTY
    assert await fuse_errno(ops.readlink(ino, CTX)) == errno.EINVAL
    assert await fuse_errno(ops.getxattr(ino, b"user.x", CTX)) == errno.ENODATA


async def test_setattr_maps_the_fields(ops: FuseOperations) -> None:
    ino = await create(ops, b"f")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o4700
    attr.st_uid = 7
    attr.st_atime_ns = 1_000_000_000_000_000_001
    attr.st_mtime_ns = 1_000_000_000_000_000_002
    attr.st_size = 12345
    out = await ops.setattr(ino, attr, fields(update_mode=True, update_uid=True), None, CTX)
    assert out.st_mode == stat.S_IFREG | 0o4700
    assert out.st_uid == 7
    assert out.st_gid == 0
    assert out.st_size == 0
    out = await ops.setattr(
        ino, attr, fields(update_atime=True, update_mtime=True, update_size=True), None, CTX
    )
    assert out.st_atime_ns == 1_000_000_000_000_000_001
    assert out.st_mtime_ns == 1_000_000_000_000_000_002
    assert out.st_size == 12345
    assert out.st_mode == stat.S_IFREG | 0o4700


async def test_rename_flags_pass_through(ops: FuseOperations) -> None:
    await create(ops, b"a")
    await create(ops, b"b")
    code = await fuse_errno(ops.rename(ROOT_INO, b"a", ROOT_INO, b"b", 1, CTX))
    assert code == errno.EEXIST
    a = (await ops.lookup(ROOT_INO, b"a", CTX)).st_ino
    await ops.rename(ROOT_INO, b"a", ROOT_INO, b"b", pyfuse3.RENAME_EXCHANGE, CTX)
    assert (await ops.lookup(ROOT_INO, b"b", CTX)).st_ino == a


async def test_fallocate_reaches_the_core_and_invalidates_attributes(
    ops: FuseOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    invalidated: list[tuple[int, bool]] = []

    def invalidate(inode: int, attr_only: bool = False) -> None:
        invalidated.append((inode, attr_only))

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate)
    fi, entry = await ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    ino = entry.st_ino
    assert await ops.write(fi.fh, 0, b"x" * 10000) == 10000
    await ops.fallocate(ino, fi.fh, 0, 0, 20000)  # mode 0 past EOF grows the file
    assert (await ops.getattr(ino, CTX)).st_size == 20000
    assert invalidated == [(ino, True)]
    await ops.fallocate(ino, fi.fh, 0x3, 0, 4096)  # PUNCH_HOLE | KEEP_SIZE
    assert await ops.read(fi.fh, 0, 8192) == bytes(4096) + b"x" * 4096
    assert (await ops.getattr(ino, CTX)).st_size == 20000
    assert await fuse_errno(ops.fallocate(ino, fi.fh, 0x2, 0, 4096)) == errno.EOPNOTSUPP
    assert await fuse_errno(ops.fallocate(ino, fi.fh, 0x9, 0, 4096)) == errno.EINVAL
    assert await fuse_errno(ops.fallocate(ino, fi.fh, 0, 0, 0)) == errno.EINVAL
    await ops.release(fi.fh)
    assert len(invalidated) == 2  # after each success only
    control = (await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)).st_ino
    assert await fuse_errno(ops.fallocate(control, control, 0, 0, 4096)) == errno.EOPNOTSUPP


async def test_statfs(ops: FuseOperations) -> None:
    st = await ops.statfs(CTX)
    assert st.f_bsize == st.f_frsize == 4096
    assert st.f_blocks == (64 << 20) // 4096
    assert 0 < st.f_bavail <= st.f_bfree < st.f_blocks
    assert st.f_namemax == 255


class Replies:
    """A stand-in for pyfuse3.readdir_reply: records names, takes at most `room`."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.names: list[bytes] = []
        self.next_ids: list[int] = []

    def __call__(self, token: object, name: bytes, attr: object, next_id: int) -> bool:
        if len(self.names) >= self.room:
            return False
        self.names.append(name)
        self.next_ids.append(next_id)
        return True


async def test_readdir_stops_when_the_buffer_is_full_and_resumes(
    ops: FuseOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (b"a", b"b", b"c"):
        await create(ops, name)
    token = cast(pyfuse3.ReaddirToken, object())
    fh = await ops.opendir(ROOT_INO, CTX)
    first = Replies(room=2)
    monkeypatch.setattr(pyfuse3, "readdir_reply", first)
    await ops.readdir(fh, 0, token)
    rest = Replies(room=10)
    monkeypatch.setattr(pyfuse3, "readdir_reply", rest)
    await ops.readdir(fh, first.next_ids[-1], token)
    await ops.releasedir(fh)
    assert sorted(first.names + rest.names) == [b"a", b"b", b"c"]


async def test_readdir_builds_attributes_only_for_the_entries_that_fit(
    ops: FuseOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing a directory in replies of k entries costs each entry once, not
    the rest of the directory on every reply (a quadratic listdir)."""
    for i in range(200):
        await create(ops, f"f{i:03d}".encode())
    token = cast(pyfuse3.ReaddirToken, object())
    built = 0
    attr = ops.fs.attr

    def counting(inode: Any) -> Any:
        nonlocal built
        built += 1
        return attr(inode)

    monkeypatch.setattr(ops.fs, "attr", counting)
    fh = await ops.opendir(ROOT_INO, CTX)
    names: list[bytes] = []
    start = 0
    while True:
        replies = Replies(room=10)
        monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
        await ops.readdir(fh, start, token)
        if not replies.names:
            break
        names += replies.names
        start = replies.next_ids[-1]
    await ops.releasedir(fh)
    assert len(names) == 200
    assert built <= 200 + 21  # each entry once, plus the one that did not fit, per reply


# the error boundary:


class Failing:
    """A core whose every call fails the way it is told to."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: object, **kwargs: object) -> None:
            raise self.exc

        return fail


def failing_ops(exc: BaseException) -> FuseOperations:
    fs = cast(Filesystem, Failing(exc))
    return FuseOperations(fs, ControlDir(fs))


async def test_unexpected_exceptions_become_eio_with_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ops = failing_ops(KeyError("bug"))
    with caplog.at_level(logging.ERROR, logger="fusefs.fuse_ops"):
        assert await fuse_errno(ops.getattr(5, CTX)) == errno.EIO
    (record,) = caplog.records
    assert "getattr" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError


async def test_fs_errors_keep_their_code_and_fuse_errors_pass() -> None:
    assert await fuse_errno(failing_ops(NotFound("x")).unlink(1, b"x", CTX)) == errno.ENOENT
    custom = FsError("x", errno=errno.EXDEV)
    assert await fuse_errno(failing_ops(custom).unlink(1, b"x", CTX)) == errno.EXDEV
    passed = pyfuse3.FUSEError(errno.ENOSYS)
    assert await fuse_errno(failing_ops(passed).unlink(1, b"x", CTX)) == errno.ENOSYS


async def test_cancellation_is_not_an_error() -> None:
    @errno_boundary
    async def handler() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0.01) as scope:
        await handler()
    assert scope.cancelled_caught


async def test_forget_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    ops = failing_ops(RuntimeError("bug"))
    with caplog.at_level(logging.ERROR, logger="fusefs.fuse_ops"):
        await ops.forget([(5, 1)])
        await ops.forget([(CONTROL_BASE, 1)])  # virtual: never reaches the core
    assert len(caplog.records) == 1


def test_invalidate_attr_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ops = failing_ops(RuntimeError("unused"))
    codes = iter([errno.ENOENT, errno.EIO])

    def invalidate(inode: int, attr_only: bool = False) -> None:
        assert attr_only
        code = next(codes)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate)
    with caplog.at_level(logging.WARNING, logger="fusefs.fuse_ops"):
        ops.invalidate_attr(5)  # the kernel does not know it: fine, silent
        ops.invalidate_attr(6)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


# the control directory through the operations:


async def test_control_directory_is_hidden_but_reachable(
    ops: FuseOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create(ops, b"visible")
    replies = Replies(room=100)
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    token = cast(pyfuse3.ReaddirToken, object())
    fh = await ops.opendir(ROOT_INO, CTX)
    await ops.readdir(fh, 0, token)
    await ops.releasedir(fh)
    assert replies.names == [b"visible"]

    entry = await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)
    assert entry.st_ino >= CONTROL_BASE
    assert entry.st_mode == stat.S_IFDIR | 0o700
    assert (entry.st_uid, entry.st_gid) == (os.getuid(), os.getgid())
    assert (await ops.lookup(entry.st_ino, b"..", CTX)).st_ino == ROOT_INO
    replies = Replies(room=100)
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    fh = await ops.opendir(entry.st_ino, CTX)
    await ops.readdir(fh, 0, token)
    await ops.releasedir(fh)
    assert replies.names == [
        b"dynamic_fault",
        b"stats",
        b"pid",
        b"fallocate",
        b"drop_caches",
        b"cache_size",
        b"pagecache_lock",
        b"log_path",
    ]
    modes = [stat.S_IMODE((await ops.lookup(entry.st_ino, n, CTX)).st_mode) for n in replies.names]
    assert modes == [0o600, 0o400, 0o400, 0o600, 0o200, 0o600, 0o600, 0o400]


async def read_control(ops: FuseOperations, name: bytes) -> bytes:
    control = (await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)).st_ino
    ino = (await ops.lookup(control, name, CTX)).st_ino
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert fi.direct_io
    try:
        return await ops.read(fi.fh, 0, 1 << 20)
    finally:
        await ops.release(fi.fh)


async def test_control_fallocate_returns_after_the_kernel_invalidation(
    ops: FuseOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.fusefs/fallocate`` write replies only once the worker thread has told
    the kernel to drop the file's pages: a private mapping sees the change as
    soon as write() returns.  The invalidation is slow here; the write waits."""
    sent: list[tuple[int, bool]] = []

    def invalidate(inode: int, attr_only: bool = False) -> None:
        threading.Event().wait(0.2)  # a kernel busy locking pages
        sent.append((inode, attr_only))

    monkeypatch.setattr(pyfuse3, "invalidate_inode", invalidate)
    ino = await create(ops, b"f")
    control = (await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)).st_ino
    falloc = (await ops.lookup(control, b"fallocate", CTX)).st_ino
    fi = await ops.open(falloc, os.O_WRONLY, CTX)
    request = b"path=f mode=alloc offset=0 length=8192"
    async with trio.open_nursery() as nursery:
        await nursery.start(ops.run_invalidations)
        assert await ops.write(fi.fh, 0, request) == len(request)
        assert (ino, False) in sent  # done before the reply
        sent.clear()
        # A failed request that changed nothing queues nothing and does not wait.
        bad = b"path=f mode=collapse offset=0 length=1M"
        assert await fuse_errno(ops.write(fi.fh, 0, bad)) == errno.EINVAL
        assert sent == []
        nursery.cancel_scope.cancel()
    # Without the invalidation task (in-process use) nothing waits.
    assert await ops.write(fi.fh, 0, request) == len(request)
    await ops.release(fi.fh)


async def test_control_files_read_and_write(ops: FuseOperations) -> None:
    assert await read_control(ops, b"pid") == b"4242\n"
    assert b"\ninodes: 1\n" in b"\n" + await read_control(ops, b"stats")
    assert (await read_control(ops, b"dynamic_fault")).startswith(b"# sites:")
    control = (await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)).st_ino
    ino = (await ops.lookup(control, b"dynamic_fault", CTX)).st_ino
    fi = await ops.open(ino, os.O_WRONLY, CTX)
    try:
        assert await fuse_errno(ops.write(fi.fh, 0, b"name blockdev_write bogus")) == errno.EINVAL
        assert await fuse_errno(ops.write(fi.fh, 0, b"name nope_nope enable")) == errno.ENOENT
        assert await fuse_errno(ops.write(fi.fh, 0, b"\xff\xfe")) == errno.EINVAL
        cmd = b"name blockdev_write frequency 9\nname blockdev_read disable"
        assert await ops.write(fi.fh, 0, cmd) == len(cmd)
    finally:
        await ops.release(fi.fh)
    assert b"name:blockdev_write frequency=9 " in await read_control(ops, b"dynamic_fault")
    stats = (await ops.lookup(control, b"stats", CTX)).st_ino
    assert await fuse_errno(ops.open(stats, os.O_WRONLY, CTX)) == errno.EACCES


async def test_a_refused_command_reads_back_its_reason(ops: FuseOperations) -> None:
    control = (await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)).st_ino
    ino = (await ops.lookup(control, b"dynamic_fault", CTX)).st_ino
    fi = await ops.open(ino, os.O_RDWR, CTX)
    try:
        assert await fuse_errno(ops.write(fi.fh, 0, b"name blockdev_write bogus")) == errno.EINVAL
        assert await ops.read(fi.fh, 0, 4096) == (
            b"error EINVAL: dynamic_fault: unknown keyword 'bogus' in 'name blockdev_write bogus'\n"
        )
        assert await fuse_errno(ops.write(fi.fh, 0, b"name nope_nope enable")) == errno.ENOENT
        assert await ops.read(fi.fh, 0, 4096) == (
            b"error ENOENT: dynamic_fault: no site matches 'name nope_nope'\n"
        )
        assert await ops.write(fi.fh, 0, b"name blockdev_write disable") > 0
        assert (await ops.read(fi.fh, 0, 4096)).startswith(b"# sites:")
    finally:
        await ops.release(fi.fh)
    assert await read_control(ops, b"log_path") == b"-\n"


async def test_control_directory_cannot_be_changed(ops: FuseOperations) -> None:
    control = (await ops.lookup(ROOT_INO, CONTROL_NAME, CTX)).st_ino
    ino = await create(ops, b"f")
    denied = [
        ops.mkdir(control, b"x", 0o755, CTX),
        ops.create(control, b"x", 0o644, os.O_RDWR, CTX),
        ops.unlink(control, b"stats", CTX),
        ops.rmdir(ROOT_INO, CONTROL_NAME, CTX),
        ops.rename(ROOT_INO, b"f", ROOT_INO, CONTROL_NAME, 0, CTX),
        ops.rename(ROOT_INO, CONTROL_NAME, ROOT_INO, b"g", 0, CTX),
        ops.link(ino, control, b"x", CTX),
        ops.setxattr(control, b"user.x", b"1", CTX),
    ]
    for coro in denied:
        assert await fuse_errno(coro) == errno.EPERM
    assert await ops.listxattr(control, CTX) == []
    assert await fuse_errno(ops.getxattr(control, b"user.x", CTX)) == errno.ENODATA
    pid = (await ops.lookup(control, b"pid", CTX)).st_ino
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    out = await ops.setattr(pid, attr, fields(update_size=True), None, CTX)  # O_TRUNC
    assert out.st_ino == pid
    attr.st_mode = 0o777
    assert await fuse_errno(ops.setattr(pid, attr, fields(update_mode=True), None, CTX)) == (
        errno.EPERM
    )
