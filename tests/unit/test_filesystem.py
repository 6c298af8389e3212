"""The core driven in-process: namespace, data, durability, errors; each test ends in fsck."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import NOW, Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.fsck import fsck
from fusefs.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO

from .conftest import assert_fsck_clean

UID, GID = os.getuid(), os.getgid()


def errno_of(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.code


async def make_file(fs: Filesystem, name: bytes, data: bytes = b"", parent: int = ROOT_INO) -> int:
    fh, attr = await fs.create(parent, name, 0o644, os.O_RDWR, UID, GID)
    if data:
        assert await fs.write(fh, 0, data) == len(data)
    await fs.release(fh)
    return attr.ino


async def read_all(fs: Filesystem, ino: int) -> bytes:
    fh = await fs.open(ino, os.O_RDONLY)
    try:
        return await fs.read(fh, 0, (await fs.getattr(ino)).size + 1)
    finally:
        await fs.release(fh)


async def remount(fs: Filesystem, image: Path) -> Filesystem:
    await fs.unmount()
    assert_fsck_clean(image)
    return await Filesystem.mount(image, MountOptions(commit_interval=3600))


# namespace:


async def test_create_lookup_getattr(fs: Filesystem) -> None:
    ino = await make_file(fs, b"a")
    attr = await fs.lookup(ROOT_INO, b"a")
    assert attr.ino == ino
    assert stat.S_ISREG(attr.mode)
    assert stat.S_IMODE(attr.mode) == 0o644
    assert attr.nlink == 1
    with pytest.raises(FsError) as e:
        await fs.lookup(ROOT_INO, b"missing")
    assert errno_of(e) == errno.ENOENT


async def test_create_existing_and_long_names(fs: Filesystem) -> None:
    await make_file(fs, b"a")
    with pytest.raises(FsError) as e:
        await fs.create(ROOT_INO, b"a", 0o644, os.O_RDWR, UID, GID)
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        await fs.create(ROOT_INO, b"x" * 256, 0o644, os.O_RDWR, UID, GID)
    assert errno_of(e) == errno.ENAMETOOLONG
    fh, _ = await fs.create(ROOT_INO, b"y" * 255, 0o644, os.O_RDWR, UID, GID)
    await fs.release(fh)


async def test_mkdir_rmdir_errors(fs: Filesystem) -> None:
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)
    assert (await fs.getattr(ROOT_INO)).nlink == 3
    await make_file(fs, b"f", parent=d.ino)
    with pytest.raises(FsError) as e:
        await fs.rmdir(ROOT_INO, b"d")
    assert errno_of(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        await fs.unlink(ROOT_INO, b"d")
    assert errno_of(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        await fs.rmdir(d.ino, b"f")
    assert errno_of(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        await fs.lookup((await fs.lookup(d.ino, b"f")).ino, b"x")
    assert errno_of(e) == errno.ENOTDIR
    await fs.unlink(d.ino, b"f")
    await fs.rmdir(ROOT_INO, b"d")
    assert (await fs.getattr(ROOT_INO)).nlink == 2
    with pytest.raises(FsError) as e:
        await fs.rmdir(ROOT_INO, b"d")
    assert errno_of(e) == errno.ENOENT


async def test_hard_links_and_symlinks(fs: Filesystem) -> None:
    ino = await make_file(fs, b"a", b"hello")
    attr = await fs.link(ino, ROOT_INO, b"b")
    assert attr.nlink == 2
    await fs.unlink(ROOT_INO, b"a")
    assert await read_all(fs, (await fs.lookup(ROOT_INO, b"b")).ino) == b"hello"
    s = await fs.symlink(ROOT_INO, b"s", b"b", UID, GID)
    assert stat.S_ISLNK(s.mode)
    assert await fs.readlink(s.ino) == b"b"
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)
    with pytest.raises(FsError) as e:
        await fs.link(d.ino, ROOT_INO, b"dlink")
    assert errno_of(e) == errno.EPERM


async def test_rename_plain_replace_noreplace_exchange(fs: Filesystem) -> None:
    a = await make_file(fs, b"a", b"A")
    b = await make_file(fs, b"b", b"B")
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE)
    assert errno_of(e) == errno.EEXIST
    await fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert (await fs.lookup(ROOT_INO, b"a")).ino == b
    assert (await fs.lookup(ROOT_INO, b"b")).ino == a
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"a", ROOT_INO, b"nope", RENAME_EXCHANGE)
    assert errno_of(e) == errno.ENOENT
    await fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)  # replaces, frees old "b"
    assert await read_all(fs, (await fs.lookup(ROOT_INO, b"b")).ino) == b"B"
    with pytest.raises(FsError) as e:
        await fs.lookup(ROOT_INO, b"a")
    assert errno_of(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"b", ROOT_INO, b"c", RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert errno_of(e) == errno.EINVAL


async def test_rename_directories(fs: Filesystem) -> None:
    d1 = await fs.mkdir(ROOT_INO, b"d1", 0o755, UID, GID)
    d2 = await fs.mkdir(d1.ino, b"d2", 0o755, UID, GID)
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"d1", d2.ino, b"x", 0)
    assert errno_of(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"d1", d1.ino, b"x", 0)
    assert errno_of(e) == errno.EINVAL
    await make_file(fs, b"f")
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"f", d1.ino, b"d2", 0)
    assert errno_of(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        await fs.rename(d1.ino, b"d2", ROOT_INO, b"f", 0)
    assert errno_of(e) == errno.ENOTDIR
    e3 = await fs.mkdir(ROOT_INO, b"e3", 0o755, UID, GID)
    await make_file(fs, b"g", parent=e3.ino)
    with pytest.raises(FsError) as e:
        await fs.rename(d1.ino, b"d2", ROOT_INO, b"e3", 0)
    assert errno_of(e) == errno.ENOTEMPTY
    await fs.rename(d1.ino, b"d2", ROOT_INO, b"moved", 0)
    assert (await fs.getattr(d1.ino)).nlink == 2
    assert (await fs.getattr(ROOT_INO)).nlink == 5
    assert (await fs.lookup(d2.ino, b"..")).ino == ROOT_INO


async def test_setattr_times_mode_owner(fs: Filesystem) -> None:
    ino = await make_file(fs, b"a")
    before = await fs.getattr(ino)
    attr = await fs.setattr(ino, mode=0o600, atime_ns=1_234_567_891, mtime_ns=9_876_543_219)
    assert stat.S_IMODE(attr.mode) == 0o600
    assert attr.atime_ns == 1_234_567_891
    assert attr.mtime_ns == 9_876_543_219
    assert attr.ctime_ns >= before.ctime_ns
    attr = await fs.setattr(ino, uid=123, gid=456, mtime_ns=NOW)
    assert (attr.uid, attr.gid) == (123, 456)
    assert attr.mtime_ns >= before.mtime_ns


# set-id bits: mode before -> after a write, a size change or a chown that clears them.
SETID = {0o4777: 0o777, 0o2777: 0o777, 0o6777: 0o777, 0o6767: 0o2767, 0o777: 0o777}
NOBODY = 65534


async def setid_file(fs: Filesystem, name: bytes, mode: int) -> int:
    ino = await make_file(fs, name, b"0123456789")
    await fs.setattr(ino, mode=mode)
    assert stat.S_IMODE((await fs.getattr(ino)).mode) == mode
    return ino


async def mode_of(fs: Filesystem, ino: int) -> int:
    return stat.S_IMODE((await fs.getattr(ino)).mode)


@pytest.mark.parametrize(("before", "after"), SETID.items())
async def test_unprivileged_write_and_truncate_clear_setid(
    fs: Filesystem, image: Path, before: int, after: int
) -> None:
    buffered = await setid_file(fs, b"buffered", before)
    fh = await fs.open(buffered, os.O_WRONLY, NOBODY)
    await fs.write(fh, 10, b"x")
    await fs.release(fh)
    direct = await setid_file(fs, b"direct", before)
    fh = await fs.open(direct, os.O_WRONLY | os.O_DIRECT, NOBODY)
    await fs.write(fh, 0, bytes(fs.block_size))
    await fs.release(fh)
    truncated = await setid_file(fs, b"truncated", before)
    await fs.setattr(truncated, size=4, caller_uid=NOBODY)
    opened = await setid_file(fs, b"opened", before)
    fh = await fs.open(opened, os.O_WRONLY | os.O_TRUNC, NOBODY)
    await fs.release(fh)
    created = await setid_file(fs, b"created", before)
    fh = await fs.open(created, os.O_WRONLY, UID)  # the opener counts, as the writer
    await fs.release(fh)
    inodes = (buffered, direct, truncated, opened)
    assert [await mode_of(fs, ino) for ino in inodes] == [after] * 4
    assert await mode_of(fs, created) == before  # opening alone changes nothing
    fs = await remount(fs, image)
    assert [await mode_of(fs, ino) for ino in inodes] == [after] * 4
    await fs.unmount()


@pytest.mark.parametrize(("before", "after"), SETID.items())
async def test_root_keeps_setid_on_write_and_truncate_not_on_chown(
    fs: Filesystem, before: int, after: int
) -> None:
    ino = await setid_file(fs, b"a", before)
    fh = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, 0)
    await fs.write(fh, 0, b"x")
    await fs.release(fh)
    await fs.setattr(ino, size=100, caller_uid=0)
    assert await mode_of(fs, ino) == before
    await fs.setattr(ino, uid=NOBODY, caller_uid=0)
    assert await mode_of(fs, ino) == after
    ino = await setid_file(fs, b"b", before)
    await fs.setattr(ino, gid=NOBODY, caller_uid=NOBODY)
    assert await mode_of(fs, ino) == after
    # A chmod that sets the bits again, after the chown, keeps them.
    attr = await fs.setattr(ino, gid=NOBODY, mode=before)
    assert stat.S_IMODE(attr.mode) == before


async def test_chown_leaves_directory_setgid_alone(fs: Filesystem) -> None:
    d = await fs.mkdir(ROOT_INO, b"d", 0o2775, UID, GID)
    attr = await fs.setattr(d.ino, gid=NOBODY)
    assert stat.S_IMODE(attr.mode) == 0o2775


async def test_xattrs(fs: Filesystem) -> None:
    ino = await make_file(fs, b"a")
    await fs.setxattr(ino, b"user.k", b"v", 0)
    assert await fs.getxattr(ino, b"user.k") == b"v"
    assert await fs.listxattr(ino) == [b"user.k"]
    with pytest.raises(FsError) as e:
        await fs.setxattr(ino, b"user.k", b"w", 1)  # XATTR_CREATE
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        await fs.setxattr(ino, b"user.new", b"w", 2)  # XATTR_REPLACE
    assert errno_of(e) == errno.ENODATA
    with pytest.raises(FsError) as e:
        await fs.setxattr(ino, b"trusted.k", b"w", 0)
    assert errno_of(e) == errno.EOPNOTSUPP
    await fs.removexattr(ino, b"user.k")
    with pytest.raises(FsError) as e:
        await fs.getxattr(ino, b"user.k")
    assert errno_of(e) == errno.ENODATA


async def test_readdir_skips_entries_removed_since_opendir(fs: Filesystem) -> None:
    names = {b"n%d" % i for i in range(20)}
    for n in names:
        await make_file(fs, n)
    fh = await fs.opendir(ROOT_INO)
    first = await fs.readdir(fh, 0)
    assert {n for n, _, _ in first} == names
    await fs.unlink(ROOT_INO, b"n5")
    rest = await fs.readdir(fh, first[3][2])
    assert b"n5" not in {n for n, _, _ in rest}
    await fs.releasedir(fh)


# data:


async def test_write_read_holes_and_eof(fs: Filesystem) -> None:
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    await fs.write(fh, 10_000, b"xyz")
    assert (await fs.getattr(attr.ino)).size == 10_003
    data = await fs.read(fh, 0, 20_000)
    assert data == bytes(10_000) + b"xyz"
    assert await fs.read(fh, 10_003, 10) == b""
    assert (await fs.getattr(attr.ino)).blocks == 8  # one 4 KiB block mapped
    await fs.write(fh, 4095, b"ab")  # straddles blocks 0 and 1
    data = await fs.read(fh, 4090, 10)
    assert data == bytes(5) + b"ab" + bytes(3)
    await fs.release(fh)


async def test_large_write_is_contiguous(fs: Filesystem) -> None:
    payload = os.urandom(1 << 20)
    fh, attr = await fs.create(ROOT_INO, b"big", 0o644, os.O_RDWR, UID, GID)
    await fs.write(fh, 0, payload)
    assert await fs.read(fh, 0, 1 << 20) == payload
    await fs.fsync(fh, False)  # writeback allocates and maps
    inode = fs.ns.get(attr.ino)
    assert inode.extents is not None
    extents = list(inode.extents.extents())
    assert sum(e.length for e in extents) == 256
    pblks = [e.pblk for e in extents]
    assert all(p is not None for p in pblks)
    await fs.release(fh)


async def test_truncate_down_zeroes_tail_and_frees(fs: Filesystem) -> None:
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    await fs.write(fh, 0, b"\xff" * 20_000)
    await fs.fsync(fh, False)
    used_before = fs.alloc.statistics().allocated
    await fs.setattr(attr.ino, size=5000)
    assert (await fs.getattr(attr.ino)).size == 5000
    await fs.setattr(attr.ino, size=20_000)
    data = await fs.read(fh, 0, 20_000)
    assert data == b"\xff" * 5000 + bytes(15_000)
    assert fs.alloc.statistics().allocated == used_before - 3
    await fs.release(fh)


async def test_unlinked_open_file_keeps_data(fs: Filesystem, image: Path) -> None:
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    await fs.write(fh, 0, b"still here")
    await fs.fsync(fh, False)
    await fs.unlink(ROOT_INO, b"f")
    await fs.commit()
    assert await fs.read(fh, 0, 100) == b"still here"
    allocated = fs.alloc.statistics().allocated
    await fs.release(fh)
    assert attr.ino not in fs.ns.inodes
    await fs.commit()
    stats = fs.alloc.statistics()
    assert stats.allocated < allocated


async def test_orphan_reclaimed_at_mount(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    await fs.write(fh, 0, os.urandom(50_000))
    await fs.unlink(ROOT_INO, b"f")
    await fs.commit()
    fs.dev.close()  # the daemon dies with the file open
    result = fsck(image)
    assert result.exit_code == 0
    assert any("orphan" in m for m in result.messages)
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    assert attr.ino not in fs.ns.inodes
    await fs.unmount()
    result = fsck(image)
    assert result.exit_code == 0
    assert not any("orphan" in m for m in result.messages)


async def test_persistence_across_remount(fs: Filesystem, image: Path) -> None:
    payload = os.urandom(300_000)
    ino = await make_file(fs, b"data", payload)
    d = await fs.mkdir(ROOT_INO, b"dir", 0o700, UID, GID)
    await fs.symlink(d.ino, b"link", b"../data", UID, GID)
    await fs.setxattr(ino, b"user.name", b"\x00\xff", 0)
    await fs.setattr(ino, mtime_ns=1_700_000_000_123_456_789)
    fs2 = await remount(fs, image)
    try:
        assert await read_all(fs2, ino) == payload
        link = await fs2.lookup(d.ino, b"link")
        assert await fs2.readlink(link.ino) == b"../data"
        assert await fs2.getxattr(ino, b"user.name") == b"\x00\xff"
        assert (await fs2.getattr(ino)).mtime_ns == 1_700_000_000_123_456_789
        assert stat.S_IMODE((await fs2.getattr(d.ino)).mode) == 0o700
        new = await make_file(fs2, b"new")
        assert new > ino  # inode numbers are never reused
    finally:
        await fs2.unmount()


async def test_uncommitted_changes_lost_committed_kept(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    ino = await make_file(fs, b"kept", b"durable")
    await fs.sync()
    await make_file(fs, b"lost", b"volatile")
    fs.dev.close()  # crash: no final commit
    assert_fsck_clean(image)
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    assert await read_all(fs, ino) == b"durable"
    with pytest.raises(FsError):
        await fs.lookup(ROOT_INO, b"lost")
    await fs.unmount()
    assert_fsck_clean(image)


async def test_freed_blocks_not_reused_before_commit(fs: Filesystem) -> None:
    a = await make_file(fs, b"a", os.urandom(8192))
    await fs.sync_data()
    inode = fs.ns.get(a)
    assert inode.extents is not None
    old = {e.pblk for e in inode.extents.extents()}
    await fs.commit()
    await fs.unlink(ROOT_INO, b"a")
    b = await make_file(fs, b"b", os.urandom(1 << 20))
    await fs.sync_data()
    binode = fs.ns.get(b)
    assert binode.extents is not None
    new: set[int] = set()
    for e in binode.extents.extents():
        assert e.pblk is not None
        new.update(range(e.pblk, e.pblk + e.length))
    assert not (old & new)


async def test_background_commit(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=0.05))
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        await make_file(fs, b"a", b"x")
        with trio.fail_after(5):
            while fs.committer.commits == 0:  # noqa: ASYNC110 - polls a counter, no event
                await trio.sleep(0.01)
        assert not fs.dirty
        await fs.unmount()
    assert_fsck_clean(image)


# errors and faults:


async def test_commit_failure_goes_read_only_and_keeps_last_state(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    ino = await make_file(fs, b"kept", b"durable")
    await fs.sync()
    await make_file(fs, b"later", b"x")
    REGISTRY.control("name blockdev_write enable")
    with pytest.raises(FsError) as e:
        await fs.commit()
    assert errno_of(e) == errno.EIO
    REGISTRY.control("name blockdev_write disable")
    with pytest.raises(FsError) as e:
        await fs.create(ROOT_INO, b"another", 0o644, os.O_RDWR, UID, GID)
    assert errno_of(e) == errno.EROFS
    assert await read_all(fs, ino) == b"durable"  # reads still work
    with pytest.raises(FsError) as e:
        await fs.unmount()
    assert errno_of(e) == errno.EROFS
    assert_fsck_clean(image)
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    assert await read_all(fs, ino) == b"durable"
    await fs.unmount()


async def test_fsyncdir_after_a_failed_commit_reports_the_error(image: Path) -> None:
    """Gone read-only after a failed commit, the filesystem made nothing durable
    since its last commit: fsyncdir must fail as fsync does, not return success
    (found by the metaheavy campaign workload: blockdev_flush x oneshot)."""
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)
    REGISTRY.control("name blockdev_flush oneshot")
    with pytest.raises(FsError):
        await fs.commit()
    assert fs.read_only
    fh = await fs.opendir(ROOT_INO)
    try:
        with pytest.raises(FsError) as e:
            await fs.fsyncdir(fh, False)
        assert errno_of(e) == errno.EIO
    finally:
        await fs.releasedir(fh)
    with pytest.raises(FsError):
        await fs.unmount()
    assert_fsck_clean(image)


async def test_writeback_error_frees_new_blocks_and_reports_once(fs: Filesystem) -> None:
    fh, _ = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    allocated = fs.alloc.statistics().allocated
    await fs.write(fh, 0, b"x" * 9000)
    REGISTRY.control("name blockdev_write oneshot")
    with pytest.raises(FsError) as e:
        await fs.fsync(fh, False)
    assert errno_of(e) == errno.EIO
    assert fs.alloc.statistics().allocated == allocated  # the new blocks went back
    fs.alloc.check()
    fs.cache.check()
    assert fs.cache.nr_dirty == 3  # nothing acknowledged was dropped
    await fs.fsync(fh, False)  # reported once; the retry writes the pages
    assert await fs.read(fh, 0, 9000) == b"x" * 9000
    assert fs.cache.nr_dirty == 0
    await fs.release(fh)


async def test_enospc_from_write(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    mkfs(image, 1 << 20)  # 256 blocks
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    fh, _ = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    done = await fs.write(fh, 0, bytes(2 << 20))
    assert 0 < done < 2 << 20  # a short write, as Linux gives near ENOSPC
    with pytest.raises(FsError) as e:
        await fs.write(fh, done, bytes(4096))
    assert errno_of(e) == errno.ENOSPC
    await fs.fsync(fh, False)  # every acknowledged byte has its block
    assert await fs.read(fh, 0, done) == bytes(done)
    fs.cache.check()
    st = await fs.statfs()
    assert st.blocks_avail == st.blocks_free == 0 < st.blocks  # full: the write came back short
    await fs.release(fh)
    await fs.unlink(ROOT_INO, b"f")
    st = await fs.statfs()
    assert 0 < st.blocks_avail == st.blocks_free < st.blocks  # the unlink's, before a commit
    await fs.unmount()
    assert_fsck_clean(image)


async def test_mount_refuses_corrupt_and_foreign_images(tmp_path: Path, image: Path) -> None:
    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(os.urandom(1 << 20))
    with pytest.raises(FsError, match="not a fusefs image"):
        await Filesystem.mount(foreign)
    fd = os.open(image, os.O_RDWR)
    os.pwrite(fd, b"\xde\xad\xbe\xef", 40)
    os.close(fd)
    fs = await Filesystem.mount(image)  # from copy B: mkfs writes both
    await fs.unmount()
    fd = os.open(image, os.O_RDWR)
    for copy in (0, 1):
        os.pwrite(fd, b"\xde\xad\xbe\xef", copy * 4096 + 40)
    os.close(fd)
    with pytest.raises(FsError, match="checksum"):
        await Filesystem.mount(image)
    truncated = tmp_path / "trunc.img"
    mkfs(truncated, 4 << 20)
    os.truncate(truncated, 1 << 20)
    with pytest.raises(FsError, match="truncated"):
        await Filesystem.mount(truncated)
    assert fsck(foreign).exit_code == 8


async def test_fsck_finds_and_repairs_link_count(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    ino = await make_file(fs, b"a", b"data")
    fs.ns.get(ino).nlink = 5  # damage
    await fs.unmount()
    result = fsck(image)
    assert result.exit_code == 4
    assert any(f"inode {ino}: link count 5, should be 1" in m for m in result.messages)
    result = await trio.to_thread.run_sync(fsck, image, True)
    assert result.exit_code == 1
    assert_fsck_clean(image)


async def test_fsck_finds_double_mapping(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    a = await make_file(fs, b"a", b"x" * 4096)
    b = await make_file(fs, b"b")
    await fs.sync()
    ea = fs.ns.get(a).extents
    eb = fs.ns.get(b).extents
    assert ea is not None
    assert eb is not None
    ext = next(iter(ea.extents()))
    assert ext.pblk is not None
    eb.map(0, ext.pblk, 1)  # damage: the same block in two files
    fs.ns.get(b).size = 4096
    await fs.unmount()
    result = fsck(image)
    assert result.exit_code == 4
    assert any("mapped by inode" in m for m in result.messages)
    assert (await trio.to_thread.run_sync(fsck, image, True)).exit_code == 1
    assert_fsck_clean(image)


async def test_direct_read_after_failed_writeback_fails_instead_of_stale(fs: Filesystem) -> None:
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, UID, GID)
    await fs.write(fh, 0, b"old!" * 1024)
    await fs.fsync(fh, False)
    await fs.write(fh, 0, b"new!" * 1024)  # dirty in the cache
    dfh = await fs.open(attr.ino, os.O_RDONLY | os.O_DIRECT)
    REGISTRY.control("name blockdev_write oneshot")
    with pytest.raises(FsError) as e:
        await fs.read(dfh, 0, 4096)  # the device still holds "old!"
    assert errno_of(e) == errno.EIO
    assert await fs.read(dfh, 0, 4096) == b"new!" * 1024  # the retry wrote it back
    with pytest.raises(FsError):
        await fs.fsync(fh, False)  # the writeback error is still reported, once
    await fs.fsync(fh, False)
    await fs.release(dfh)
    await fs.release(fh)
