"""Direct IO: file ranges read and written straight through the extent map.

Locks (taken by `Filesystem` around these functions):

* direct read — the inode lock, shared (keeps punch and truncate from freeing
  blocks under the read); dirty cached pages of the range are written back
  first, so the device holds the latest data;
* direct write — the inode lock, exclusive, and the mapping's pagecache lock,
  BLOCK side: cached pages of the range are written back and dropped, the data
  goes to the device, and the range is dropped again, so no page read before
  the write can survive it.

Reads gather the mapped runs of the range and read each physical run with one
device call; holes and unwritten (preallocated) extents read as zeros.  Writes
overwrite mapped blocks in place, read-modify-write partial blocks, allocate one
contiguous run (when the allocator can) for the unmapped blocks of the range,
write the data, and only then map it — so a block is never mapped before its
data is on the device, and the commit that maps it flushes it first.  An
allocation that finds the filesystem full while frees wait for a commit commits
and tries once more (`fusefs.reclaim`).

Invariant kept by every path: the bytes of a file's last block past EOF are
zero, so growing a file (by write or truncate) exposes zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusefs.alloc import Run, place_runs
from fusefs.blockdev import BlockDevice
from fusefs.errors import FileTooBig, InvalidArgument
from fusefs.extents import MAX_FILE_BLOCKS, ExtentMap
from fusefs.faults import alloc_buffer, race_fault

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem

MAX_FILE_SIZE_BLOCKS = MAX_FILE_BLOCKS


def check_file_range(offset: int, length: int, block_size: int) -> None:
    if offset < 0 or length < 0:
        raise FileTooBig(f"negative range {offset}+{length}")
    if offset + length > MAX_FILE_BLOCKS * block_size:
        raise FileTooBig(f"range {offset}+{length} past the maximum file size")


async def read_blocks(dev: BlockDevice, emap: ExtentMap, first: int, count: int) -> bytearray:
    """Blocks [first, first + count) of a file: zeros for holes and unwritten extents."""
    bs = dev.block_size
    out = alloc_buffer("direct_read_buffer", count * bs)
    end = first + count
    for ext in emap.extents(first, end):
        if ext.unwritten or ext.pblk is None:
            continue
        data = await dev.read(ext.pblk, ext.length)
        pos = (ext.start - first) * bs
        out[pos : pos + len(data)] = data
    return out


async def read_range(
    dev: BlockDevice, emap: ExtentMap, size: int, offset: int, length: int
) -> bytes:
    """Up to ``length`` bytes at ``offset``, stopping at EOF (``size``)."""
    if offset >= size or length <= 0:
        return b""
    length = min(length, size - offset)
    bs = dev.block_size
    first = offset // bs
    last = (offset + length - 1) // bs
    buf = await read_blocks(dev, emap, first, last - first + 1)
    skip = offset - first * bs
    return bytes(buf[skip : skip + length])


async def write_range(
    fs: Filesystem, emap: ExtentMap, offset: int, data: bytes | memoryview
) -> None:
    """Write ``data`` at ``offset``, allocating blocks for holes.

    Caller holds the inode lock exclusive and BLOCK, and dropped the range's
    pages: the holes stay holes across the commit that an allocation on a full
    filesystem may wait for (`Reclaimer.allocate`).
    """
    if not data:
        return
    dev = fs.dev
    bs = dev.block_size
    check_file_range(offset, len(data), bs)
    first = offset // bs
    last = (offset + len(data) - 1) // bs
    count = last - first + 1
    head = offset - first * bs
    tail = (last + 1) * bs - (offset + len(data))
    view = memoryview(data)

    # Build the new content of every block of the range.  Only the first and
    # last block can be partial; their old content comes from the device
    # (zeros for holes), so the bytes around the write are kept.
    if head == 0 and tail == 0:
        buf: bytearray | memoryview = view
    else:
        buf = alloc_buffer("direct_write_buffer", count * bs)
        if head:
            buf[:bs] = await read_blocks(dev, emap, first, 1)
        if tail and (last != first or not head):
            buf[(count - 1) * bs :] = await read_blocks(dev, emap, last, 1)
        buf[head : head + len(data)] = view

    # Allocate one run for all the unmapped blocks, next to the previous mapping.
    holes = emap.holes(first, count)
    need = sum(n for _, n in holes)
    new_runs: list[Run] = []
    if need:
        prev = emap.lookup(first - 1) if first > 0 else None
        hint = prev.pblk + (first - prev.start) if prev and prev.pblk is not None else None
        new_runs = await fs.reclaim.allocate(need, hint=hint)
    try:
        # Pair the holes with the new runs, block for block.
        placements = place_runs(holes, new_runs)
        for ext in emap.extents(first, first + count):
            if ext.pblk is None:
                continue
            pos = (ext.start - first) * bs
            await dev.write(ext.pblk, buf[pos : pos + ext.length * bs])
        for lblk, pblk, n in placements:
            pos = (lblk - first) * bs
            await dev.write(pblk, buf[pos : pos + n * bs])
    except BaseException:
        for pblk, n in new_runs:
            fs.alloc.free_now(pblk, n)
        raise
    for lblk, pblk, n in placements:
        emap.map(lblk, pblk, n)
    emap.mark_written(first, count)


async def zero_tail(dev: BlockDevice, emap: ExtentMap, size: int) -> None:
    """Zero the bytes of the block holding EOF past ``size`` (truncate down)."""
    bs = dev.block_size
    if size % bs == 0:
        return
    lblk = size // bs
    ext = emap.lookup(lblk)
    if ext.pblk is None or ext.unwritten:
        return
    pblk = ext.pblk + (lblk - ext.start)
    block = bytearray(await dev.read(pblk, 1))
    # Between the read and the write: nothing may write this block (the
    # caller made sure no dirty page of it exists, see truncate).
    await race_fault("truncate_zero_tail")
    block[size % bs :] = bytes(bs - size % bs)
    await dev.write(pblk, block)


def blocks_for(size: int, block_size: int) -> int:
    return -(-size // block_size)


# O_DIRECT handles:


def check_aligned(offset: int, length: int, block_size: int) -> None:
    """O_DIRECT offsets and lengths are multiples of the block size (EINVAL)."""
    if offset % block_size or length % block_size:
        raise InvalidArgument(
            f"O_DIRECT request {offset}+{length} not aligned to the {block_size}-byte block size"
        )
