"""Direct IO: file ranges read and written straight through the extent map.

Locks (taken by `Filesystem` around these functions):

* direct read — the inode lock, shared (keeps punch and truncate from freeing
  blocks under the read); dirty cached pages of the range are written back
  first, so the device holds the latest data;
* direct write — the inode lock, exclusive, and the mapping's pagecache lock,
  BLOCK side: cached pages of the range are written back and dropped, the data
  goes to the device, and the range is dropped again, so no page read before
  the write can survive it.

Reads of a range that the device holds in one run (physically contiguous
neighbours merged) are one ``pread`` into a fresh buffer that goes back to the
FUSE reply as it is: no zero-fill, no copy.  Other ranges are gathered: one
zeroed buffer, each run read straight into its place (``preadv``), holes and
unwritten (preallocated) extents left as zeros.  A handle's sequential direct
reads also ask the host to read the image ahead of them (`DirectReadahead`).

Writes overwrite mapped blocks in place, read-modify-write partial blocks,
allocate one contiguous run (when the allocator can) for the unmapped blocks of
the range, write the data, and only then map it — so a block is never mapped
before its data is on the device, and the commit that maps it flushes it first.
An allocation that finds the filesystem full while frees wait for a commit
commits and tries once more (`fusefs.reclaim`).

Invariant kept by every path: the bytes of a file's last block past EOF are
zero, so growing a file (by write or truncate) exposes zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from fusefs.alloc import Run, place_runs
from fusefs.blockdev import BlockDevice
from fusefs.errors import FileTooBig, InvalidArgument
from fusefs.extents import MAX_FILE_BLOCKS, ExtentMap
from fusefs.faults import alloc_buffer, memory_fault, race_fault

if TYPE_CHECKING:
    from fusefs.filesystem import Filesystem

MAX_FILE_SIZE_BLOCKS = MAX_FILE_BLOCKS


def check_file_range(offset: int, length: int, block_size: int) -> None:
    if offset < 0 or length < 0:
        raise FileTooBig(f"negative range {offset}+{length}")
    if offset + length > MAX_FILE_BLOCKS * block_size:
        raise FileTooBig(f"range {offset}+{length} past the maximum file size")


# direct reads:

# How far a sequential stream of direct reads asks the host to read the image
# ahead of it (`DirectReadahead`), in bytes.
DIRECT_READAHEAD_BYTES: Final = 4 << 20


@dataclass(slots=True)
class DirectReadahead:
    """One handle's direct reads, and how far ahead of them the image has been asked for.

    Direct reads bypass fusefs's page cache, not the host's: the image file is
    read through the host page cache, and on a cold host cache its own
    readahead does not keep up with 1 MiB reads that arrive one FUSE round
    trip apart: 290-430 MB/s, where the disk gives O_DIRECT 1 MiB reads about
    1 GB/s.  Asking for 1 MiB ahead gave 550-790 MB/s, 4 MiB 920-1,140 and
    8 MiB no more (`scripts/bench --only direct_read_1m`, five runs each).
    So when a read starts where the handle's previous one ended, the image
    blocks of the next `DIRECT_READAHEAD_BYTES` of the file are asked for
    (`BlockDevice.prefetch_sync`, ``posix_fadvise(WILLNEED)``), each block
    once, and the disk works on them while fusefs answers this read.  It is a
    hint to the host: the data read is the image's either way, so no lock
    covers it.
    """

    next_offset: int = 0  # where a read continuing the stream starts
    asked_to: int = 0  # logical block: the window asked for so far ends here

    def advance(
        self, emap: ExtentMap, offset: int, end: int, size: int, block_size: int
    ) -> list[tuple[int, int]]:
        """The image runs ``(pblk, count)`` to ask for after a read of [offset, end)
        of a file of ``size`` bytes; none unless the read continues the stream."""
        sequential = offset == self.next_offset
        self.next_offset = end
        if not sequential:
            self.asked_to = 0
            return []
        start = max(blocks_for(end, block_size), self.asked_to)
        stop = min(
            blocks_for(end + DIRECT_READAHEAD_BYTES, block_size), blocks_for(size, block_size)
        )
        if start >= stop:
            return []
        self.asked_to = stop
        return [(pblk, n) for _, pblk, n in device_runs(emap, start, stop)]


def device_runs(emap: ExtentMap, first: int, end: int) -> list[tuple[int, int, int]]:
    """The written runs ``(lblk, pblk, count)`` of blocks [first, end), physically
    contiguous neighbours merged: one device read each."""
    runs: list[tuple[int, int, int]] = []
    for ext in emap.extents(first, end):
        if ext.unwritten or ext.pblk is None:
            continue
        if runs:
            lblk, pblk, n = runs[-1]
            if lblk + n == ext.start and pblk + n == ext.pblk:
                runs[-1] = (lblk, pblk, n + ext.length)
                continue
        runs.append((ext.start, ext.pblk, ext.length))
    return runs


async def read_blocks(
    dev: BlockDevice,
    emap: ExtentMap,
    first: int,
    count: int,
    prefetch: Sequence[tuple[int, int]] = (),
) -> bytes | bytearray:
    """Blocks [first, first + count) of a file: zeros for holes and unwritten extents.

    A range the device holds in one run (the common case) is one ``pread``
    into the buffer it returns, with no zero-fill and no copy after.  Other
    ranges are gathered into one zeroed buffer, each run read straight into
    its place.  The ``prefetch`` runs are asked for after the read, in the same
    worker call.
    """
    bs = dev.block_size
    runs = device_runs(emap, first, first + count)
    if len(runs) == 1 and runs[0][0] == first and runs[0][2] == count:
        memory_fault("direct_read_buffer", cls="memory:buffer")
        return await dev.read(runs[0][1], count, prefetch=prefetch)
    out = alloc_buffer("direct_read_gather_buffer", count * bs)
    if runs or prefetch:
        view = memoryview(out)
        reads = [
            (pblk, view[(lblk - first) * bs : (lblk - first + n) * bs]) for lblk, pblk, n in runs
        ]
        await dev.read_runs(reads, prefetch=prefetch)
    return out


async def read_range(
    dev: BlockDevice,
    emap: ExtentMap,
    size: int,
    offset: int,
    length: int,
    ahead: DirectReadahead | None = None,
) -> bytes:
    """Up to ``length`` bytes at ``offset``, stopping at EOF (``size``).

    With ``ahead``, a read that continues the stream also asks for the image
    blocks after it (`DirectReadahead`).  A range the device holds in one run
    comes back as the very buffer its ``pread`` filled, which the FUSE reply
    sends as it is; a gathered range, or one that EOF or an unaligned
    ``offset`` cuts, costs one copy.
    """
    if offset >= size or length <= 0:
        return b""
    length = min(length, size - offset)
    bs = dev.block_size
    first = offset // bs
    end = blocks_for(offset + length, bs)
    prefetch = [] if ahead is None else ahead.advance(emap, offset, offset + length, size, bs)
    buf = await read_blocks(dev, emap, first, end - first, prefetch)
    skip = offset - first * bs
    if type(buf) is bytes and skip == 0 and length == len(buf):
        return buf
    return bytes(memoryview(buf)[skip : skip + length])


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
