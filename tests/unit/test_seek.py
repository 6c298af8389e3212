"""SEEK_DATA / SEEK_HOLE from the extent map and the page cache (`fusefs.io.seek`),
checked against a block model: written blocks and dirty pages are data,
holes, unwritten extents and clean pages over holes are not."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem
from fusefs.io.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from fusefs.namespace import ROOT_INO

BS = 4096
DATA, HOLE = os.SEEK_DATA, os.SEEK_HOLE


def model_seek(data: list[bool], size: int, offset: int, whence: int) -> int | None:
    """lseek(2) over per-block data flags; None for ENXIO."""
    if offset >= size:
        return None
    for b in range(offset // BS, len(data)):
        if data[b] == (whence == DATA):
            return min(max(offset, b * BS), size)
    return None if whence == DATA else size


async def check_seeks(
    fs: Filesystem, fh: int, data: list[bool], size: int, offsets: list[int]
) -> None:
    """SEEK_DATA and SEEK_HOLE from each offset agree with `model_seek`."""
    for offset in offsets:
        for whence in (DATA, HOLE):
            want = model_seek(data, size, offset, whence)
            if want is None:
                with pytest.raises(FsError) as e:
                    await fs.lseek(fh, offset, whence)
                assert e.value.code == errno.ENXIO
            else:
                assert await fs.lseek(fh, offset, whence) == want, (offset, whence)


async def layout(fs: Filesystem) -> tuple[int, int]:
    """Blocks: 0 written (on disk), 1 hole, 2 dirty over a hole, 3 unwritten,
    4 dirty over unwritten, 5 clean page over a hole, 6 hole, 7 written; size
    7 blocks + 100 bytes."""
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    ino = attr.ino
    await fs.write(fh, 0, b"a" * BS)
    await fs.write(fh, 7 * BS, b"h" * 100)
    await fs.fsync(fh, False)
    await fs.fallocate(ino, 0, 3 * BS, 2 * BS)  # 3, 4 unwritten
    await fs.drop_caches()
    await fs.write(fh, 2 * BS, b"c" * BS)  # dirty over a hole
    await fs.write(fh, 4 * BS + 10, b"e")  # dirty over unwritten
    assert await fs.read(fh, 5 * BS, BS) == bytes(BS)  # a clean page over a hole
    return fh, ino


async def test_seek_data_and_hole_follow_the_map_and_the_cache(fs: Filesystem) -> None:
    fh, _ = await layout(fs)
    data = [True, False, True, False, True, False, False, True]
    size = 7 * BS + 100
    await check_seeks(fs, fh, data, size, [*range(0, size, 1000), size - 1, size, size + 5000])
    # Written back, the dirty pages stay data (now mapped and written).
    await fs.fsync(fh, False)
    await fs.drop_caches()
    assert await fs.lseek(fh, BS, DATA) == 2 * BS
    assert await fs.lseek(fh, 3 * BS, DATA) == 4 * BS
    # A punch makes a hole of them again.
    await fs.fallocate(
        fs._file(fh).inode.ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8 * BS
    )
    with pytest.raises(FsError) as e:
        await fs.lseek(fh, 0, DATA)
    assert e.value.code == errno.ENXIO
    assert await fs.lseek(fh, 0, HOLE) == 0
    with pytest.raises(FsError) as e:
        await fs.lseek(fh, 0, 0)  # SEEK_SET is the kernel's
    assert e.value.code == errno.EINVAL
    fs.cache.check()
    await fs.release(fh)


@pytest.mark.parametrize("seed", range(12))
async def test_seek_matches_the_model(fs: Filesystem, seed: int) -> None:
    """Random writes (some written back and dropped, some still dirty), then
    SEEK_DATA and SEEK_HOLE from random offsets against the block model."""
    rng = random.Random(seed)
    fh, _ = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    data = [False] * 40
    size = 0
    for _ in range(rng.randint(0, 8)):
        block, length = rng.randint(0, 31), rng.randint(1, 3 * BS)
        await fs.write(fh, block * BS + 7, b"x" * length)
        end = block * BS + 7 + length
        for b in range(block, -(-end // BS)):
            data[b] = True
        size = max(size, end)
        if rng.random() < 0.3:
            await fs.fsync(fh, False)
            await fs.drop_caches()
    await check_seeks(fs, fh, data, size, [rng.randint(0, 34 * BS) for _ in range(8)])
    fs.cache.check()
    await fs.release(fh)


async def test_seek_sees_the_file_before_or_after_a_punch_never_during(fs: Filesystem) -> None:
    """A SEEK_DATA held in its window while a punch of its data is asked for:
    the punch waits for the shared inode lock, so the answer is the file
    before the punch, and the punch then happens."""
    fh, ino = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    await fs.write(fh, 0, b"a" * 2 * BS)
    await fs.fsync(fh, False)
    REGISTRY.control("name seek_before_lookup delay 200 times 1")
    order: list[str] = []
    async with trio.open_nursery() as nursery:

        async def seek() -> None:
            order.append(f"seek {await fs.lseek(fh, 0, DATA)}")

        async def punch() -> None:
            await fs.fallocate(ino.ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2 * BS)
            order.append("punched")

        nursery.start_soon(seek)
        await wait_all_tasks_blocked()
        assert REGISTRY.site("seek_before_lookup").fired == 1
        nursery.start_soon(punch)
    assert order == ["seek 0", "punched"]
    with pytest.raises(FsError) as e:
        await fs.lseek(fh, 0, DATA)
    assert e.value.code == errno.ENXIO
    await fs.release(fh)
