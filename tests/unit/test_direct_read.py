"""Direct reads (`fusefs.io.direct.read_range`) against a real block device and a
hand-built extent map: one device read for a range in one run, gathering for
holes, unwritten extents and fragments, EOF and unaligned cuts, the readahead
hint of a sequential stream, and the error and fault paths."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.blockdev import BlockDevice
from fusefs.errors import FsError, IOFailure, OutOfMemory
from fusefs.extents import MAX_EXTENT_BLOCKS, ExtentMap
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem
from fusefs.format import mkfs
from fusefs.io.direct import DIRECT_READAHEAD_BYTES, DirectReadahead, device_runs, read_range
from fusefs.namespace import ROOT_INO
from fusefs.powercut import ENV_VAR

BS = 4096
AHEAD = DIRECT_READAHEAD_BYTES // BS  # the readahead window, in blocks


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockDevice]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "img"
    mkfs(path, 8 << 20)  # 2,048 blocks
    dev = BlockDevice(path, BS)
    yield dev
    dev.close()


def fill(dev: BlockDevice, pblk: int, count: int) -> bytes:
    data = os.urandom(count * BS)
    dev.write_sync(pblk, data)
    return data


def reads(dev: BlockDevice) -> int:
    return dev.statistics().reads


async def test_a_range_in_one_run_is_one_device_read_returned_as_is(dev: BlockDevice) -> None:
    emap = ExtentMap()
    data = fill(dev, 1000, 8)
    emap.map(0, 1000, 8)
    before = reads(dev)
    out = await read_range(dev, emap, 8 * BS, 0, 8 * BS)
    assert out == data
    assert type(out) is bytes
    assert reads(dev) - before == 1


async def test_physically_contiguous_runs_merge_into_one_read(dev: BlockDevice) -> None:
    # Two stored runs (the map caps a run at MAX_EXTENT_BLOCKS) on consecutive blocks.
    n = MAX_EXTENT_BLOCKS + 4
    emap = ExtentMap()
    data = fill(dev, 1000, n)
    emap.map(0, 1000, n)
    assert len(list(emap.extents(0, n))) == 2
    assert device_runs(emap, 0, n) == [(0, 1000, n)]
    before = reads(dev)
    assert await read_range(dev, emap, n * BS, 0, n * BS) == data
    assert reads(dev) - before == 1


async def test_holes_unwritten_and_fragments_are_gathered(dev: BlockDevice) -> None:
    emap = ExtentMap()
    a = fill(dev, 1000, 2)
    b = fill(dev, 1500, 3)
    fill(dev, 1200, 2)  # stale data under the unwritten extent
    emap.map(0, 1000, 2)  # blocks 0-1
    # blocks 2-3: a hole
    emap.map(4, 1200, 2, unwritten=True)  # blocks 4-5: preallocated
    emap.map(6, 1500, 3)  # blocks 6-8, elsewhere on the device
    assert device_runs(emap, 0, 9) == [(0, 1000, 2), (6, 1500, 3)]
    before = reads(dev)
    out = await read_range(dev, emap, 9 * BS, 0, 9 * BS)
    assert out == a + bytes(4 * BS) + b
    assert type(out) is bytes
    assert reads(dev) - before == 2  # one read a run, none for the zeros


async def test_a_range_of_holes_reads_no_block(dev: BlockDevice) -> None:
    emap = ExtentMap()
    emap.map(4, 1200, 2, unwritten=True)
    before = reads(dev)
    assert await read_range(dev, emap, 8 * BS, 0, 8 * BS) == bytes(8 * BS)
    assert reads(dev) == before


async def test_eof_and_unaligned_offsets_cut_the_blocks_read(dev: BlockDevice) -> None:
    emap = ExtentMap()
    data = fill(dev, 1000, 4)
    emap.map(0, 1000, 4)
    size = 3 * BS + 100
    assert await read_range(dev, emap, size, 0, 4 * BS) == data[:size]
    assert await read_range(dev, emap, size, 2 * BS, 4 * BS) == data[2 * BS : size]
    assert await read_range(dev, emap, size, 10, 20) == data[10:30]
    assert await read_range(dev, emap, size, BS - 5, 10) == data[BS - 5 : BS + 5]
    assert await read_range(dev, emap, size, size, BS) == b""
    assert await read_range(dev, emap, size, 0, 0) == b""


async def test_a_sequential_stream_asks_for_the_window_ahead_once(
    dev: BlockDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(dev, "prefetch_sync", asked.extend)
    n = AHEAD + 16
    emap = ExtentMap()
    data = fill(dev, 100, n)
    emap.map(0, 100, n)
    size = n * BS
    ahead = DirectReadahead()
    # The first read of the file starts the stream: the window after it is asked for.
    assert await read_range(dev, emap, size, 0, 4 * BS, ahead) == data[: 4 * BS]
    assert asked == [(104, AHEAD)]
    # The next read asks only for what is new at the far end of the window.
    asked.clear()
    assert await read_range(dev, emap, size, 4 * BS, 4 * BS, ahead) == data[4 * BS : 8 * BS]
    assert asked == [(104 + AHEAD, 4)]
    # The window stops at EOF.
    asked.clear()
    await read_range(dev, emap, size, 8 * BS, 8 * BS, ahead)
    assert asked == [(104 + AHEAD + 4, n - AHEAD - 8)]
    asked.clear()
    await read_range(dev, emap, size, 16 * BS, 8 * BS, ahead)
    assert asked == []
    # A jump ends the stream: no hint until reads follow on from each other again.
    await read_range(dev, emap, size, 0, BS, ahead)
    assert asked == []
    await read_range(dev, emap, size, BS, BS, ahead)
    assert asked == [(102, AHEAD)]


def test_the_window_skips_holes_and_unwritten_extents() -> None:
    emap = ExtentMap()
    emap.map(0, 100, 2)
    emap.map(4, 300, 2, unwritten=True)
    emap.map(8, 500, 4)
    ahead = DirectReadahead()
    assert ahead.advance(emap, 0, BS, 12 * BS, BS) == [(101, 1), (500, 4)]


async def test_the_hint_changes_no_byte_read(dev: BlockDevice) -> None:
    emap = ExtentMap()
    data = fill(dev, 1000, 8)
    emap.map(0, 1000, 8)
    ahead = DirectReadahead()
    out = [await read_range(dev, emap, 8 * BS, i * BS, BS, ahead) for i in range(8)]
    assert b"".join(out) == data


async def test_the_buffer_fault_sites_fail_with_enomem(dev: BlockDevice) -> None:
    emap = ExtentMap()
    fill(dev, 1000, 4)
    emap.map(0, 1000, 2)
    emap.map(3, 1002, 1)
    REGISTRY.control("name direct_read_buffer oneshot")
    with pytest.raises(OutOfMemory) as e:
        await read_range(dev, emap, 4 * BS, 0, 2 * BS)  # one run
    assert e.value.code == errno.ENOMEM
    REGISTRY.control("name direct_read_gather_buffer oneshot")
    with pytest.raises(OutOfMemory):
        await read_range(dev, emap, 4 * BS, 0, 4 * BS)  # a hole to gather around
    for name in ("direct_read_buffer", "direct_read_gather_buffer"):
        site = REGISTRY.site(name)
        assert (site.cls, site.func, site.fired) == ("memory:buffer", "read_blocks", 1)


@pytest.mark.parametrize("gather", [False, True])
async def test_a_device_error_fails_the_read_with_eio(dev: BlockDevice, gather: bool) -> None:
    emap = ExtentMap()
    fill(dev, 1000, 4)
    emap.map(0, 1000, 4 if not gather else 1)
    REGISTRY.control("name blockdev_read oneshot")
    with pytest.raises(IOFailure) as e:
        await read_range(dev, emap, 4 * BS, 0, 4 * BS)
    assert e.value.code == errno.EIO
    assert REGISTRY.site("blockdev_read").fired == 1


def test_a_failed_allocation_in_the_device_read_is_enomem(
    dev: BlockDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(fd: int, n: int, offset: int) -> bytes:
        raise MemoryError

    monkeypatch.setattr(dev, "_pread", no_memory)
    with pytest.raises(FsError) as e:
        dev.read_sync(10, 256)
    assert isinstance(e.value, OutOfMemory)


async def test_o_direct_handles_read_holes_preallocation_and_eof(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(fs.dev, "prefetch_sync", asked.extend)
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR | os.O_DIRECT, 0, 0)
    head = os.urandom(8 * BS)
    tail = os.urandom(4 * BS)
    await fs.write(fh, 0, head)
    await fs.write(fh, 16 * BS, tail)  # blocks 8-15 a hole
    await fs.fallocate(attr.ino, 0, 20 * BS, 4 * BS)  # blocks 20-23 unwritten
    await fs.truncate(fs.ns.get(attr.ino), 22 * BS + 7)
    dfh = await fs.open(attr.ino, os.O_RDONLY | os.O_DIRECT)
    got = [await fs.read(dfh, off, 4 * BS) for off in range(0, 24 * BS, 4 * BS)]
    assert b"".join(got) == head + bytes(8 * BS) + tail + bytes(2 * BS + 7)
    assert asked  # the stream asked for the image ahead of it
    with pytest.raises(FsError) as e:
        await fs.read(dfh, 10, BS)  # O_DIRECT: aligned or EINVAL
    assert e.value.code == errno.EINVAL
    await fs.release(dfh)
    await fs.release(fh)
