"""ENOSPC only when space is really gone (`fusefs.reclaim`).

On a full filesystem, the blocks of a file just removed wait for a commit before
they can be reused (DESIGN §6).  Every path that takes blocks -- buffered write
reservations, direct writes, fallocate, writeback without a reservation -- then
commits and tries once more instead of failing, and ``statfs`` counts those
blocks as free at once.  A real ENOSPC still comes, after at most one commit
and without one when nothing waits for a commit; tasks that run out together
share one commit; the ``nospace_commit_retry`` fault site makes the retry give
the caller its ENOSPC.

Every test runs on a 1 MiB image (256 blocks) with no periodic commit (the
filesystem's ``run`` is not started, and the interval is an hour), checks the
allocator and the cache after each step, and ends with fsck.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from fusefs.alloc import Allocator
from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem
from fusefs.io.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from fusefs.namespace import ROOT_INO
from fusefs.pagecache import RESERVED, UNALLOCATED
from fusefs.reclaim import Reclaimer

UID, GID = os.getuid(), os.getgid()
BS = 4096
MiB = 1 << 20


def check(fs: Filesystem) -> None:
    fs.alloc.check()
    fs.cache.check()


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def create(fs: Filesystem, name: bytes, flags: int = os.O_RDWR) -> tuple[int, int]:
    fh, attr = await fs.create(ROOT_INO, name, 0o644, flags, UID, GID)
    return fh, attr.ino


async def fill(fs: Filesystem, name: bytes, seed: int = 1) -> int:
    """A file that takes every free block, written back and committed; the
    bytes it holds.  The commit of its fsync may leave a few blocks free (the
    old checkpoint's): preallocation past EOF takes those."""
    fh, ino = await create(fs, name)
    size = 0
    if fs.alloc.statistics().free:
        size = await fs.write(fh, 0, pattern(2 * MiB, seed))
        assert size < 2 * MiB  # short: the filesystem is full
    await fs.fsync(fh, False)
    left = fs.alloc.statistics().free
    if left:
        await fs.fallocate(ino, FALLOC_FL_KEEP_SIZE, size, left * BS)
    await fs.release(fh)
    assert fs.alloc.statistics().free == 0
    return size + left * BS


async def assert_enospc(fs: Filesystem, fh: int, offset: int, data: bytes) -> None:
    with pytest.raises(FsError) as e:
        await fs.write(fh, offset, data)
    assert e.value.code == errno.ENOSPC


async def test_write_after_unlink_succeeds_at_once(tiny_fs: Filesystem) -> None:
    """The motivating case: rm of a big file on a full filesystem, then a write
    of as much as it held succeeds -- by one commit, not by waiting for the
    periodic one."""
    fs = tiny_fs
    size = await fill(fs, b"big")
    fh, _ = await create(fs, b"new")
    commits = fs.committer.commits
    await assert_enospc(fs, fh, 0, b"x")  # really full: nothing waits for a commit
    assert fs.committer.commits == commits  # and no commit was tried
    await fs.unlink(ROOT_INO, b"big")
    assert fs.alloc.statistics().free == 0  # the frees wait for a commit
    # What df shows: the file's blocks, less what the metadata reservation
    # lacks (the full filesystem left it short; the commit tops it up).
    avail = (await fs.statfs()).blocks_avail
    assert avail == size // BS - fs.committer.reserve_shortfall() > 0
    data = pattern(avail * BS, 2)
    with trio.fail_after(5):
        assert await fs.write(fh, 0, data) == len(data)
    assert fs.committer.commits == commits + 1
    assert (await fs.statfs()).blocks_avail == 0
    await assert_enospc(fs, fh, len(data), b"x")  # every block df showed was there
    st = fs.reclaim.statistics()
    assert (st.commits, st.retries, st.waiting, st.commit_in_flight) == (1, 1, 0, False)
    # Refused at once, nothing waiting for a commit: fill's short write, the
    # write before the unlink, the write after the last block.
    assert st.refused == 3
    check(fs)
    await fs.fsync(fh, False)
    await fs.drop_caches()
    assert await fs.read(fh, 0, len(data)) == data
    await fs.release(fh)


async def test_statfs_counts_frees_waiting_for_a_commit(tiny_fs: Filesystem) -> None:
    fs = tiny_fs
    size = await fill(fs, b"big")
    full = await fs.statfs()
    assert (full.blocks_free, full.blocks_avail) == (0, 0)
    await fs.unlink(ROOT_INO, b"big")
    assert fs.alloc.statistics().deferred == size // BS
    # Before any commit; less what the metadata reservation lacks.
    blocks = size // BS - fs.committer.reserve_shortfall()
    st = await fs.statfs()
    assert (st.blocks_free, st.blocks_avail) == (blocks, blocks)
    # Reservations still count as used: dirty pages over holes take their blocks.
    fh, _ = await create(fs, b"small")
    assert await fs.write(fh, 0, pattern(3 * BS, 3)) == 3 * BS
    st = await fs.statfs()
    assert (st.blocks_free, st.blocks_avail) == (blocks - 3, blocks - 3)
    await fs.commit()  # the frees become free blocks: the numbers do not move
    assert fs.alloc.statistics().deferred == 0
    assert (await fs.statfs()).blocks_avail == blocks - 3
    check(fs)
    await fs.release(fh)


async def test_real_enospc_comes_quickly(tiny_fs: Filesystem) -> None:
    """Frees smaller than the write: one commit, a short write, then ENOSPC
    without another commit -- never a loop of commits."""
    fs = tiny_fs
    fh, _ = await create(fs, b"small")
    assert await fs.write(fh, 0, pattern(8 * BS, 4)) == 8 * BS
    await fs.fsync(fh, False)
    await fs.release(fh)
    await fill(fs, b"big")
    await fs.unlink(ROOT_INO, b"small")
    commits = fs.committer.commits
    fh, _ = await create(fs, b"new")
    with trio.fail_after(5):
        done = await fs.write(fh, 0, pattern(64 * BS, 5))
        assert 0 < done < 64 * BS
        assert fs.committer.commits == commits + 1
        await assert_enospc(fs, fh, done, b"y" * BS)
        await assert_enospc(fs, fh, done, b"y" * BS)
    assert fs.committer.commits == commits + 1
    st = fs.reclaim.statistics()
    assert (st.commits, st.retries, st.refused) == (1, 1, 3)  # fill's short write, 2 ENOSPCs
    check(fs)
    await fs.fsync(fh, False)
    await fs.release(fh)


async def test_concurrent_writers_share_one_commit(tiny_fs: Filesystem) -> None:
    fs = tiny_fs
    quarter = (fs.alloc.statistics().free // 4) * BS
    for i in range(4):
        fh, _ = await create(fs, b"old%d" % i)
        assert await fs.write(fh, 0, pattern(quarter, i)) == quarter
        await fs.fsync(fh, False)
        await fs.release(fh)
    await fill(fs, b"rest")  # the few blocks left over
    for i in range(4):
        await fs.unlink(ROOT_INO, b"old%d" % i)
    quarter = (await fs.statfs()).blocks_avail // 4 * BS
    commits = fs.committer.commits
    handles = [(await create(fs, b"new%d" % i))[0] for i in range(4)]
    results: dict[int, int] = {}

    async def writer(i: int) -> None:
        results[i] = await fs.write(handles[i], 0, pattern(quarter, 10 + i))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(writer, i)
    assert results == dict.fromkeys(range(4), quarter)
    assert fs.committer.commits == commits + 1
    st = fs.reclaim.statistics()
    assert (st.commits, st.retries) == (1, 4)
    check(fs)
    for i, fh in enumerate(handles):
        await fs.fsync(fh, False)
        assert await fs.read(fh, 0, quarter) == pattern(quarter, 10 + i)
        await fs.release(fh)


async def test_a_later_free_gets_the_next_commit() -> None:
    """The primitive alone: a task whose frees came after the reclaim commit in
    flight began waits for that commit, then shares the next one with a third
    task; three tasks, two commits."""
    alloc = Allocator(64)
    alloc.allocate(64)
    alloc.free(0, 10)
    gates: list[trio.Event] = []

    async def commit() -> None:
        token = alloc.commit_begin()
        gate = trio.Event()
        gates.append(gate)
        await gate.wait()
        alloc.commit_durable(token)

    reclaimer = Reclaimer(alloc, commit, lambda: True)
    answers: list[bool] = []

    async def reclaim() -> None:
        answers.append(await reclaimer.reclaim())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reclaim)
            await wait_all_tasks_blocked()
            assert len(gates) == 1  # commit 1 began: it releases blocks 0-9
            alloc.free(10, 5)  # after it began: commit 2's
            nursery.start_soon(reclaim)
            nursery.start_soon(reclaim)
            await wait_all_tasks_blocked()
            assert reclaimer.statistics().waiting == 3
            gates[0].set()
            await wait_all_tasks_blocked()
            assert len(gates) == 2  # one more commit, for both later tasks
            assert answers == [True]
            gates[1].set()
    assert answers == [True, True, True]
    assert alloc.statistics().free == 15
    assert alloc.durable_sequence == 2
    st = reclaimer.statistics()
    assert (st.commits, st.retries, st.waiting, st.commit_in_flight) == (2, 3, 0, False)
    assert await reclaimer.reclaim() is False  # nothing waits for a commit now
    alloc.check()


async def test_fault_site_gives_enospc_without_a_commit(tiny_fs: Filesystem) -> None:
    fs = tiny_fs
    await fill(fs, b"big")
    await fs.unlink(ROOT_INO, b"big")
    size = (await fs.statfs()).blocks_avail * BS
    commits = fs.committer.commits
    fh, _ = await create(fs, b"new")
    REGISTRY.control("name nospace_commit_retry oneshot")
    await assert_enospc(fs, fh, 0, b"z" * BS)
    site = REGISTRY.site("nospace_commit_retry")
    assert (site.fired, site.cls) == (1, "error")
    assert fs.committer.commits == commits
    assert not fs.read_only
    check(fs)
    assert await fs.write(fh, 0, b"z" * size) == size  # the next write commits
    assert fs.committer.commits == commits + 1
    await fs.fsync(fh, False)
    await fs.release(fh)


async def test_failed_reclaim_commit_is_eio_and_read_only(tiny_fs: Filesystem) -> None:
    """A commit that fails turns the filesystem read-only (errors=remount-ro);
    the write that ran it gets the commit's EIO, and nothing it wrote is kept."""
    fs = tiny_fs
    await fill(fs, b"big")
    await fs.unlink(ROOT_INO, b"big")
    fh, ino = await create(fs, b"new")
    REGISTRY.control("name commit_write_journal oneshot")
    with pytest.raises(FsError) as e:
        await fs.write(fh, 0, b"w" * 4 * BS)
    assert e.value.code == errno.EIO
    assert fs.read_only
    assert (await fs.getattr(ino)).size == 0
    check(fs)
    await fs.release(fh)
    with pytest.raises(FsError) as e:
        await fs.unmount()
    assert e.value.code == errno.EROFS


async def test_failed_reclaim_commit_after_progress_is_a_short_write(tiny_fs: Filesystem) -> None:
    """A write that got some pages in before it needed the commit returns short
    when the commit fails: an error would say none of its bytes went in, while
    the size already covers them.  The next write gets EROFS."""
    fs = tiny_fs
    for name in (b"a", b"b"):
        fh, _ = await create(fs, name)
        assert await fs.write(fh, 0, pattern(8 * BS, 7)) == 8 * BS
        await fs.fsync(fh, False)
        await fs.release(fh)
    await fill(fs, b"big")
    await fs.unlink(ROOT_INO, b"a")
    await fs.commit()  # a's blocks are free
    await fs.unlink(ROOT_INO, b"b")  # b's wait for a commit
    fh, ino = await create(fs, b"new")
    REGISTRY.control("name commit_write_journal oneshot")
    assert await fs.write(fh, 0, pattern(16 * BS, 8)) == 8 * BS
    assert fs.read_only
    assert (await fs.getattr(ino)).size == 8 * BS
    with pytest.raises(FsError) as e:
        await fs.write(fh, 8 * BS, b"more")
    assert e.value.code == errno.EROFS
    check(fs)
    await fs.release(fh)
    with pytest.raises(FsError) as e:
        await fs.unmount()
    assert e.value.code == errno.EROFS


async def test_direct_write_after_unlink(tiny_fs: Filesystem) -> None:
    fs = tiny_fs
    await fill(fs, b"big")
    await fs.unlink(ROOT_INO, b"big")
    size = (await fs.statfs()).blocks_avail * BS
    fh, _ = await create(fs, b"direct", os.O_RDWR | os.O_DIRECT)
    data = pattern(size, 6)
    assert await fs.write(fh, 0, data) == size
    assert fs.reclaim.statistics().commits == 1
    assert await fs.read(fh, 0, size) == data
    check(fs)
    await fs.release(fh)


async def test_fallocate_after_punch(tiny_fs: Filesystem) -> None:
    """Punch frees too; fallocate's allocation reclaims them, all or nothing."""
    fs = tiny_fs
    size = await fill(fs, b"big")
    big = (await fs.lookup(ROOT_INO, b"big")).ino
    await fs.fallocate(big, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size // 2)
    avail = (await fs.statfs()).blocks_avail
    assert avail == size // 2 // BS - fs.committer.reserve_shortfall() > 0
    fh, ino = await create(fs, b"prealloc")
    with pytest.raises(FsError) as e:  # more than the punch freed: nothing allocated
        await fs.fallocate(ino, 0, 0, (avail + 1) * BS)
    assert e.value.code == errno.ENOSPC
    assert fs.reclaim.statistics().commits == 1
    assert (await fs.statfs()).blocks_avail == avail
    await fs.fallocate(ino, 0, 0, avail * BS)  # exactly what df shows
    assert fs.reclaim.statistics().commits == 1  # the first one released it already
    assert (await fs.statfs()).blocks_avail == 0
    check(fs)
    await fs.release(fh)


async def test_writeback_without_a_reservation_reclaims(tiny_fs: Filesystem) -> None:
    """A dirty page over a hole that holds no reservation (the state race 6 of
    DESIGN §3 leaves; made here directly) allocates at writeback: on a full
    filesystem with frees waiting, that commits rather than fails."""
    fs = tiny_fs
    fh, ino = await create(fs, b"f")
    assert await fs.write(fh, 0, b"p" * BS) == BS
    page = fs.cache.mappings[ino].pages[0]
    assert page.space_at(0) == RESERVED
    fs.cache.unreserve(page, page.bit(0))
    assert page.space_at(0) == UNALLOCATED
    await fill(fs, b"big")  # its fsync writes back only its own pages
    await fs.unlink(ROOT_INO, b"big")
    await fs.fsync(fh, False)
    cache = fs.cache.statistics()
    assert (cache.writeback_unreserved, cache.writeback_errors, cache.dirty) == (1, 0, 0)
    assert fs.reclaim.statistics().commits == 1
    check(fs)
    await fs.drop_caches()
    assert await fs.read(fh, 0, BS) == b"p" * BS
    await fs.release(fh)
