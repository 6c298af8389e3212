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
from pathlib import Path
from typing import Final

from fusefs.blockdev import BlockDevice
from fusefs.commit import load_checkpoint
from fusefs.format import probe_block_size

POISON: Final = b"\xee\x5a\xa5\xee" * 16  # 64 bytes no workload writes


def poison_free_blocks(image: str | os.PathLike[str]) -> None:
    """Fill every block of an unmounted image that no metadata uses (a fresh
    image's data area) with `POISON`."""
    dev = BlockDevice(image, probe_block_size(image))
    try:
        loaded = load_checkpoint(dev)
        taken = {b for p, n in (*loaded.runs, loaded.journal_run) for b in range(p, p + n)}
        for inode in loaded.inodes.values():
            if inode.extents is not None:
                for ext in inode.extents.extents():
                    if ext.pblk is not None:
                        taken.update(range(ext.pblk, ext.pblk + ext.length))
        fill = POISON * (dev.block_size // len(POISON))
        for blk in range(loaded.superblock.first_data_block, dev.blocks):
            if blk not in taken:
                dev.write_sync(blk, fill)
        dev.flush_sync()
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
            if POISON[:16] in data:
                found.append(str(path.relative_to(root)))
    return sorted(found)


__all__ = ["POISON", "poison_free_blocks", "poisoned_files"]
