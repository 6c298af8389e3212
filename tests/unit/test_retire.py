"""An idle inode keeps no mapping and no lock (`PageCache.retire_if_idle`).

A mapping, its page index and its add lock cost about 2 KiB; kept for every
file ever opened they were most of the daemon's memory per file.  They go when
the file is closed and its last page leaves the cache, and come back, new, on
the next use -- never while anything could still be using the old ones.
"""

from __future__ import annotations

import os

import trio

from fusefs.filesystem import Filesystem
from fusefs.io import readahead
from fusefs.namespace import ROOT_INO

BS = 4096


async def create(fs: Filesystem, name: bytes) -> tuple[int, int]:
    fh, attr = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
    return fh, attr.ino


async def written_and_closed(fs: Filesystem, name: bytes, data: bytes) -> int:
    fh, ino = await create(fs, name)
    assert await fs.write(fh, 0, data) == len(data)
    await fs.fsync(fh, False)
    await fs.release(fh)
    return ino


async def test_closed_file_without_pages_keeps_no_mapping_or_lock(fs: Filesystem) -> None:
    ino = await written_and_closed(fs, b"f", b"a" * (3 * BS))
    inode = fs.ns.get(ino)
    assert ino in fs.cache.mappings  # its clean pages are still cached
    await fs.drop_caches()
    assert ino not in fs.cache.mappings
    assert inode._lock is None
    # The next use makes new ones and sees the data.
    fh = await fs.open(ino, os.O_RDONLY)
    assert await fs.read(fh, 0, 3 * BS) == b"a" * (3 * BS)
    assert ino in fs.cache.mappings
    await fs.release(fh)


async def test_close_of_an_uncached_file_retires_at_once(fs: Filesystem) -> None:
    ino = await written_and_closed(fs, b"f", b"b" * BS)
    await fs.drop_caches()
    fh = await fs.open(ino, os.O_RDONLY)
    fs.cache.mapping(fs.ns.get(ino))  # opened, not read: an empty mapping
    await fs.release(fh)
    assert ino not in fs.cache.mappings
    assert fs.ns.get(ino)._lock is None


async def test_open_dirty_or_locked_mappings_stay(fs: Filesystem) -> None:
    fh, ino = await create(fs, b"open")
    assert await fs.write(fh, 0, b"c" * BS) == BS
    m = fs.cache.mappings[ino]
    await fs.drop_caches()  # written back and dropped, but the file is open
    assert fs.cache.mappings[ino] is m
    assert not fs.cache.retire_if_idle(m)
    # Dirty pages of a closed file keep the mapping until written back.
    assert await fs.write(fh, 0, b"d" * BS) == BS
    await fs.release(fh)
    assert fs.cache.mappings[ino] is m
    assert m.nr_dirty == 1
    assert not fs.cache.retire_if_idle(m)
    # A task holding the add lock (a truncate, a fallocate) keeps it too.
    await fs.sync_data()
    holder_in = trio.Event()
    release = trio.Event()

    async def holder() -> None:
        async with m.lock.block():
            holder_in.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await holder_in.wait()
        fs.cache.evict(len(fs.cache.lru))  # its last page goes, the lock is held
        assert not m.pages
        assert fs.cache.mappings[ino] is m
        assert not fs.cache.retire_if_idle(m)
        release.set()
    assert fs.cache.retire_if_idle(m)
    assert ino not in fs.cache.mappings


async def test_lock_statistics_survive_retirement(fs: Filesystem) -> None:
    ino = await written_and_closed(fs, b"f", b"e" * BS)
    m = fs.cache.mapping(fs.ns.get(ino))
    inside = trio.Event()
    release = trio.Event()

    async def blocker() -> None:
        async with m.lock.block():
            inside.set()
            await release.wait()

    async def adder() -> None:
        async with m.lock.add():
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocker)
        await inside.wait()
        nursery.start_soon(adder)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    before = fs.lock_statistics()
    assert before["add_waits"] >= 1
    await fs.drop_caches()
    assert ino not in fs.cache.mappings
    after = fs.lock_statistics()
    assert after["add_waits"] == before["add_waits"]
    assert after["add_wait_seconds"] == before["add_wait_seconds"]


async def test_prefetch_for_a_retired_mapping_is_abandoned(fs: Filesystem) -> None:
    """A readahead task spawned before the file was closed and its pages
    evicted starts after the mapping is gone: it must not fill pages nobody
    can find (they would hide from the new mapping)."""
    ino = await written_and_closed(fs, b"f", b"f" * (8 * BS))
    await fs.drop_caches()
    old = fs.cache.mapping(fs.ns.get(ino))
    assert fs.cache.retire_if_idle(old)
    abandoned = fs.cache.counters["readahead_abandoned"]
    await readahead.prefetch(fs, old, 0, 8)
    assert not old.pages
    assert fs.cache.nr_pages == 0
    assert fs.cache.counters["readahead_abandoned"] == abandoned + 8


async def test_truncate_of_a_retired_file(fs: Filesystem) -> None:
    ino = await written_and_closed(fs, b"f", b"g" * (4 * BS))
    await fs.drop_caches()
    assert ino not in fs.cache.mappings
    await fs.truncate(fs.ns.get(ino), BS + 10)
    fh = await fs.open(ino, os.O_RDONLY)
    assert await fs.read(fh, 0, 4 * BS) == b"g" * (BS + 10)
    await fs.release(fh)
