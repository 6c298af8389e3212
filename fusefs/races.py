"""The six races the pagecache add lock closes (DESIGN §3), as runnable scenarios.

Each scenario builds a fresh image, mounts the core in-process, and forces one
interleaving: a task that may add pages to the cache is held inside its race
window (a ``race_fault`` site with a ``delay``), and, once it is inside, a task
that removes pages and changes the mapping underneath runs.  With the lock on,
the second task waits for the first to leave the window, then drops what it
inserted; with the lock off it runs inside the window, and the first task then
inserts pages that no longer match the file.

A scenario returns what it observed and whether that is wrong.  The tests
(`tests/unit/test_races.py`) assert wrong-with-the-lock-off and
right-with-it-on for every race; ``fusefs demo races`` prints the table.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from fusefs.errors import FsError
from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.namespace import ROOT_INO

BS = 4096
WINDOW_MS = 800  # wide enough for the conflicting operation on a loaded machine
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_COLLAPSE_RANGE = 0x08
FALLOC_INSERT_RANGE = 0x20


@dataclass(frozen=True)
class RaceOutcome:
    race: int
    lock: bool
    wrong: bool
    observed: str


@dataclass(frozen=True)
class Race:
    number: int
    title: str
    run: Callable[[Filesystem], Awaitable[tuple[bool, str]]]
    image_size: int = 16 << 20


def stamp(block: int) -> bytes:
    """A block whose contents say which block of the original file it was."""
    line = f"block {block:06d} ".encode()
    return (line * (BS // len(line) + 1))[:BS]


def describe(data: bytes) -> str:
    if not any(data):
        return "zeros"
    if data[:6] == b"block ":
        return f"old block {int(data[6:12])}"
    if data.count(data[0]) == len(data):
        return f"new data (0x{data[0]:02x} x {len(data)})"
    return repr(data[:12])


async def _file(fs: Filesystem, name: bytes, blocks: int) -> tuple[int, int]:
    """A file of stamped blocks, written back; returns (ino, fh)."""
    fh, attr = await fs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
    await fs.write(fh, 0, b"".join(stamp(i) for i in range(blocks)))
    await fs.fsync(fh, False)
    await fs.drop_caches()
    return attr.ino, fh


async def _readahead_done(fs: Filesystem) -> None:
    """Wait until no readahead is in flight (it finished its insert, or gave up)."""
    with trio.fail_after(10):
        while fs.cache.readahead_inflight:  # noqa: ASYNC110 - a counter, no event
            await trio.sleep(0.001)


async def _when_fired(site: str) -> None:
    """Wait until the race site has fired: the other task is inside its window."""
    with trio.fail_after(10):
        while REGISTRY.site(site).fired == 0:  # noqa: ASYNC110 - the site has no event
            await trio.sleep(0.001)


def _hold_window(site: str, *, times: int = 1) -> None:
    REGISTRY.control(f"name {site} delay {WINDOW_MS} times {times}")


async def _while_reading(
    fs: Filesystem, fh: int, block: int, change: Callable[[], Awaitable[object]]
) -> None:
    """Run ``change`` while a buffered read of ``block`` is inside its window
    (blocks read from the device, pages not yet inserted)."""
    _hold_window("buffered_read_before_insert")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.read, fh, block * BS, BS)
        await _when_fired("buffered_read_before_insert")
        await change()


async def _while_reading_ahead(
    fs: Filesystem, fh: int, change: Callable[[], Awaitable[object]]
) -> None:
    """Run ``change`` while readahead of blocks 1-4 is inside its window, then
    wait for the readahead to finish."""
    _hold_window("readahead_before_insert")
    await fs.read(fh, 0, BS)  # sequential from 0: readahead of blocks 1-4 starts
    await _when_fired("readahead_before_insert")
    await change()
    await _readahead_done(fs)


# 1: readahead vs collapse


async def race_readahead_collapse(fs: Filesystem) -> tuple[bool, str]:
    ino, fh = await _file(fs, b"f", 16)
    await _while_reading_ahead(
        fs, fh, lambda: fs.fallocate(ino, FALLOC_COLLAPSE_RANGE, 2 * BS, 2 * BS)
    )
    got = describe(await fs.read(fh, 2 * BS, BS))
    return got != "old block 4", f"block 2 after collapsing 2-3 reads {got} (want old block 4)"


# 2: buffered read vs punch hole (and the freed block reused)


async def race_read_punch(fs: Filesystem) -> tuple[bool, str]:
    ino, fh = await _file(fs, b"f", 4)

    async def punch_and_reuse() -> None:
        await fs.fallocate(ino, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 2 * BS, BS)
        await fs.commit()  # the freed block is free for real now
        ofh, _ = await fs.create(ROOT_INO, b"other", 0o644, os.O_RDWR, 0, 0)
        await fs.write(ofh, 0, b"\xee" * (8 * BS))
        await fs.fsync(ofh, False)

    await _while_reading(fs, fh, 2, punch_and_reuse)
    got = describe(await fs.read(fh, 2 * BS, BS))
    return got != "zeros", f"punched block 2 reads {got} (want zeros)"


# 3: buffered read vs direct write


async def race_read_direct_write(fs: Filesystem) -> tuple[bool, str]:
    ino, fh = await _file(fs, b"f", 4)
    dfh = await fs.open(ino, os.O_RDWR | os.O_DIRECT)
    await _while_reading(fs, fh, 1, lambda: fs.write(dfh, BS, b"\xd1" * BS))
    got = describe(await fs.read(fh, BS, BS))
    want = describe(b"\xd1" * BS)
    return got != want, f"block 1 after the direct write reads {got} (want {want})"


# 4: readahead vs truncate down, then up


async def race_readahead_truncate(fs: Filesystem) -> tuple[bool, str]:
    ino, fh = await _file(fs, b"f", 16)
    inode = fs.ns.get(ino)
    await _while_reading_ahead(fs, fh, lambda: fs.truncate(inode, BS))
    await fs.truncate(inode, 16 * BS)
    got = describe(await fs.read(fh, 2 * BS, BS))
    return got != "zeros", f"block 2 after truncate to 1 block and back reads {got} (want zeros)"


# 5: a partial-page write's read-modify-write vs insert range


async def race_write_insert(fs: Filesystem) -> tuple[bool, str]:
    ino, fh = await _file(fs, b"f", 8)
    await _while_reading(fs, fh, 3, lambda: fs.fallocate(ino, FALLOC_INSERT_RANGE, 3 * BS, BS))
    # Block 3 is now a hole; a small write into it must leave zeros around it.
    await fs.write(fh, 3 * BS + 100, b"NEW")
    await fs.fsync(fh, False)
    await fs.drop_caches()
    block = await fs.read(fh, 3 * BS, BS)
    wrong = block != bytes(100) + b"NEW" + bytes(BS - 103)
    around = describe(block[:100] + block[103:])
    return wrong, f"bytes around the write in the inserted block are {around} (want zeros)"


# 6: the motivating bug: a page believed allocated after its block was punched


async def race_punch_reservation(fs: Filesystem) -> tuple[bool, str]:
    ino, fh = await _file(fs, b"f", 4)
    await _while_reading(
        fs, fh, 2, lambda: fs.fallocate(ino, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 2 * BS, BS)
    )
    await fs.commit()
    # Fill the filesystem: every free block is reserved by another file's dirty pages.
    ofh, _ = await fs.create(ROOT_INO, b"filler", 0o644, os.O_RDWR, 0, 0)
    pos = 0
    while True:
        try:
            pos += await fs.write(ofh, pos, b"\xff" * (64 * BS))
        except FsError:
            break
    try:
        await fs.write(fh, 2 * BS, b"W" * BS)
    except FsError as e:
        return False, f"write into the punched block: {os.strerror(e.code)} at write() (right)"
    unreserved = fs.cache.counters["writeback_unreserved"]
    try:
        await fs.fsync(fh, False)
    except FsError as e:
        return True, (
            f"write() took no reservation; writeback allocated without one "
            f"({unreserved + fs.cache.counters['writeback_unreserved']} page) and failed: "
            f"{os.strerror(e.code)} — acknowledged data lost"
        )
    after = fs.cache.counters["writeback_unreserved"]
    if after:
        return True, f"writeback allocated {after} block(s) without a reservation"
    return False, "write reserved its block; writeback had what it needed"


RACES: tuple[Race, ...] = (
    Race(1, "readahead vs collapse range", race_readahead_collapse),
    Race(2, "buffered read vs punch hole + block reuse", race_read_punch),
    Race(3, "buffered read vs direct write", race_read_direct_write),
    Race(4, "readahead vs truncate down and up", race_readahead_truncate),
    Race(5, "write read-modify-write vs insert range", race_write_insert),
    Race(6, "page believed allocated after punch (reservations)", race_punch_reservation, 1 << 20),
)


async def run_race(race: Race, lock: bool, workdir: Path | None = None) -> RaceOutcome:
    """Run one scenario on a fresh image with the lock on or off."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"race{race.number}-") as tmp:
        image = Path(tmp) / "race.img"
        mkfs(image, race.image_size)
        REGISTRY.reset()
        options = MountOptions(commit_interval=3600, pagecache_lock=lock)
        fs = await Filesystem.mount(image, options)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                try:
                    wrong, observed = await race.run(fs)
                finally:
                    REGISTRY.reset()
                    nursery.cancel_scope.cancel()
        finally:
            if not fs.dev.closed:
                try:
                    await fs.unmount()
                except FsError:
                    fs.dev.close()
    return RaceOutcome(race.number, lock, wrong, observed)
