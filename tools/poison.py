"""Free blocks filled with a pattern no workload writes, for power-cut checks.

A file that shows the pattern after a cut maps a block whose data never reached
the disk: the commit that mapped it was durable before the data (the ordering
bug a journal's data=ordered flush exists to prevent).  Without the poison such
a block reads as zeros, or as a deleted file's old bytes, and a checker that
only compares fsynced files never sees it: the file being fsynced at the cut
is allowed any of its old or new contents, but not bytes nobody wrote to it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

from fusefs.blockdev import BlockDevice
from fusefs.commit import load_checkpoint
from fusefs.errors import InUse
from fusefs.filesystem import mapped_runs
from fusefs.format import normalize_runs, probe_block_size

POISON: Final = b"\xdePOISON-FREE-BLOCK\xad"  # no workload writes it

#: How long to wait for an image whose lock a forked child still holds: a
#: campaign thread's subprocess inherits, until it execs, every descriptor open
#: in the process at the fork, this one's lock included.
LOCK_WAIT: Final = 5.0


def poison_block(block_size: int) -> bytes:
    return (POISON * (block_size // len(POISON) + 1))[:block_size]


def _open(path: str) -> BlockDevice:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return BlockDevice(path, probe_block_size(path))
        except InUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def poison_free_blocks(image: str | os.PathLike[str]) -> int:
    """Fill every block of an unmounted image's data area that nothing maps
    with `POISON`; returns how many."""
    dev = _open(os.fspath(image))
    try:
        loaded = load_checkpoint(dev)
        sb = loaded.superblock
        used = normalize_runs(list(mapped_runs(loaded.inodes.values())) + list(loaded.runs))
        poison = poison_block(sb.block_size)
        count = 0
        pos = sb.first_data_block
        for pblk, n in [*used, (sb.device_blocks, 0)]:
            for b in range(pos, pblk):
                dev.write_sync(b, poison)
                count += 1
            pos = max(pos, pblk + n)
        dev.flush_sync()
        return count
    finally:
        dev.close()


def poisoned_files(root: Path) -> list[str]:
    """The files under ``root`` (a mount) that show the poison, relative paths."""
    found = []
    for dirpath, _, files in os.walk(root):
        if ".fusefs" in Path(dirpath).relative_to(root).parts:
            continue
        for name in files:
            path = Path(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if POISON in data:
                found.append(str(path.relative_to(root)))
    return sorted(found)


__all__ = ["POISON", "poison_free_blocks", "poisoned_files"]
