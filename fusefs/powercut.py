"""A simulated power cut for the block device (DESIGN §6).

A real disk loses, at a power cut, the writes it had not yet made durable: those
issued since the last completed flush.  Which of them survive is up to the disk;
a write in flight may even be torn, a block left part old, part new.  fusefs
promises that no byte acknowledged by a returned ``fsync`` is lost that way and
that the image is then consistent; this module lets a campaign check it.

When armed, `PowerCut` stands in for the three system calls `BlockDevice` makes
(``pread``, ``pwrite``, ``fdatasync``), so the device's checks and fault sites run
exactly as without it and the path without a simulator is untouched:

- a write goes to an in-memory *overlay* (block -> newest contents) and to the
  journal of writes since the last flush; the image file is not touched;
- a read returns the image patched with the overlay, so the filesystem sees its
  own writes as a disk's cache would serve them;
- a flush applies the overlay to the image (``pwrite`` + ``fdatasync``) and
  clears the journal: those writes are durable now.

The cut falls on the N-th *event* -- a write or a flush, counted from 1 over the
device's life: the power goes out while that call is in flight, so it does not
complete.  (Flushes count because a cut during the flush that follows a commit's
superblock write is the one state in which the superblock and what it names are
pending together; cutting only at writes would never reach it.)  Of the writes
in the journal, *drop* mode persists none, *torn* mode a random subset (each
write kept with chance 1/2, in issue order) and, with chance 1/2, one journal
write torn: some 512-byte sectors new, the others as on the image.  The
survivors are written to the image and synced, a record of the cut is written
next to it (``IMAGE.powercut``, one JSON object), and the
machine is off: `on_cut` runs (the daemon's default ends the process at once
with `EXIT_POWERCUT`, so the mount dies as on a real cut) and every later call
fails with EIO.  Every choice comes from ``random.Random(seed)``: a cut is
reproduced by its plan.

Without a cut point the simulator only counts: at `close` it applies what is
left, and writes the record with the number of events and which of them were
flushes, which is how a campaign learns the range its cut points are drawn from.

The plan comes from the environment of the process that opens the device
(``FUSEFS_POWERCUT``; the daemon inherits the ``fusefs mount`` command's), comma
separated ``key=value``:

``at=N``        cut at the N-th event; ``at=random`` draws N from ``1..max``
``max=W``       the range for ``at=random``
``mode=M``      ``drop`` (default) or ``torn``
``seed=S``      seeds the draws (default 0)
``record=PATH`` where the record goes (default ``IMAGE.powercut``)

Only a device opened read-write is armed (fsck checks without it; mkfs does not
use `BlockDevice`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Final, Literal, final

from fusefs.errors import InvalidArgument

log = logging.getLogger(__name__)

ENV_VAR: Final = "FUSEFS_POWERCUT"
EXIT_POWERCUT: Final = 75
"""The daemon's exit status at a simulated cut."""

SECTOR: Final = 512
Mode = Literal["drop", "torn"]


@dataclass(frozen=True, slots=True)
class CutPlan:
    """When and how the power goes out; ``at=None`` only counts writes."""

    at: int | None = None
    mode: Mode = "drop"
    seed: int = 0
    record: str | None = None

    @classmethod
    def parse(cls, text: str) -> CutPlan:
        """``at=N|random,max=W,mode=drop|torn,seed=S,record=PATH`` (all optional)."""
        values: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("at", "max", "mode", "seed", "record"):
                raise InvalidArgument(f"{ENV_VAR}: bad item {item!r}")
            values[key] = value
        try:
            seed = int(values.get("seed", "0"))
            mode = values.get("mode", "drop")
            if mode not in ("drop", "torn"):
                raise InvalidArgument(f"{ENV_VAR}: mode is drop or torn, not {mode!r}")
            at_text = values.get("at")
            at: int | None
            if at_text is None:
                at = None
            elif at_text == "random":
                top = int(values.get("max", "0"))
                if top < 1:
                    raise InvalidArgument(f"{ENV_VAR}: at=random needs max=W (W >= 1)")
                at = random.Random(f"at:{seed}").randint(1, top)
            else:
                at = int(at_text)
                if at < 1:
                    raise InvalidArgument(f"{ENV_VAR}: at= counts writes from 1")
        except ValueError as e:
            raise InvalidArgument(f"{ENV_VAR}: {e}") from None
        return cls(at, "torn" if mode == "torn" else "drop", seed, values.get("record"))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> CutPlan | None:
        text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
        return cls.parse(text) if text else None

    def spec(self) -> str:
        """The plan in the language `parse` reads (the record path left out)."""
        at = "" if self.at is None else f"at={self.at},"
        return f"{at}mode={self.mode},seed={self.seed}"


@dataclass(slots=True)
class CutRecord:
    """What the simulator did: written as JSON to the record file."""

    plan: str
    events: int = 0  # writes and flushes completed before the cut (or in all, without one)
    writes: int = 0
    flushes: int = 0
    flush_events: list[int] = field(default_factory=list)  # event numbers of the flushes
    cut: bool = False
    cut_on: str = ""  # "write" or "flush"
    pending: int = 0  # journal writes (block-sized) at the cut
    kept: int = 0  # of those, persisted
    torn_block: int | None = None
    torn_sectors: list[int] = field(default_factory=list)  # new sectors of the torn block


def _default_on_cut(record: CutRecord) -> None:
    # The machine is off: no unmount, no final commit, no status file.
    os._exit(EXIT_POWERCUT)


class PowerOff(OSError):
    """The machine is off: every device call fails with EIO."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "simulated power cut: the device is off")


@final
class PowerCut:
    """The simulator for one open image (see the module docstring).

    Thread-safe: the device's calls come from worker threads; one lock keeps the
    overlay, the journal and the counters consistent (a simulated device has
    no need to be fast).
    """

    def __init__(
        self,
        fd: int,
        block_size: int,
        plan: CutPlan,
        *,
        record_path: str | None = None,
        on_cut: Callable[[CutRecord], None] | None = None,
    ) -> None:
        self._fd = fd
        self.block_size = block_size
        self.plan = plan
        self.record_path = plan.record or record_path
        self._on_cut = on_cut or _default_on_cut
        self._lock = threading.Lock()
        self._overlay: dict[int, bytes] = {}  # block -> newest contents, not yet durable
        self._journal: list[tuple[int, bytes]] = []  # (block, contents) since the last flush
        # Each cut point draws differently: a campaign's cuts share one seed.
        self._rng = random.Random(f"cut:{plan.seed}:{plan.at}")
        self.record = CutRecord(plan.spec())
        self.off = False

    def __repr__(self) -> str:
        state = "off" if self.off else f"events={self.record.events}"
        return f"<PowerCut {self.plan.spec()} {state} pending={len(self._journal)}>"

    # the system calls BlockDevice makes:

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        with self._lock:
            self._check_on()
            data = os.pread(fd, length, offset)
            if not self._overlay:
                return data
            bs = self.block_size
            first, end = offset // bs, -(-(offset + len(data)) // bs)
            patched = bytearray(data)
            for blk in range(first, end):
                new = self._overlay.get(blk)
                if new is not None:
                    # Device IO is whole blocks; only the tail of a short image may be cut.
                    pos = blk * bs - offset
                    patched[pos : pos + bs] = new[: max(0, len(data) - pos)]
            return bytes(patched)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        with self._lock:
            self._event("write")
            self.record.writes += 1
            bs = self.block_size
            view = memoryview(data)
            first = offset // bs
            for i in range(len(view) // bs):
                block = bytes(view[i * bs : (i + 1) * bs])
                self._overlay[first + i] = block
                self._journal.append((first + i, block))
            return len(view)

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            self._event("flush")
            self._apply(sorted(self._overlay.items()))
            self._overlay.clear()
            self._journal.clear()
            self.record.flushes += 1
            self.record.flush_events.append(self.record.events)

    def close(self) -> None:
        """The device is closed: what is left reaches the image (the host's page
        cache would write it out), and the record says how many writes there were."""
        with self._lock:
            if self.off:
                return
            self._apply(sorted(self._overlay.items()))
            self._overlay.clear()
            self._journal.clear()
            self._write_record()

    # the cut:

    def _check_on(self) -> None:
        if self.off:
            raise PowerOff()

    # Caller must hold the lock.
    def _event(self, kind: str) -> None:
        """Count a write or flush; at the cut point, cut instead (and raise)."""
        self._check_on()
        if self.plan.at is not None and self.record.events + 1 >= self.plan.at:
            self.record.cut_on = kind
            self._cut()
            raise PowerOff()
        self.record.events += 1

    def _apply(self, blocks: list[tuple[int, bytes]]) -> None:
        bs = self.block_size
        for blk, data in blocks:
            os.pwrite(self._fd, data, blk * bs)
        if blocks:
            os.fdatasync(self._fd)

    # Caller must hold the lock.
    def _cut(self) -> None:
        record = self.record
        record.cut = True
        record.pending = len(self._journal)
        if self.plan.mode == "torn":
            kept = [entry for entry in self._journal if self._rng.random() < 0.5]
            record.kept = len(kept)
            self._apply(kept)
            if self._journal and self._rng.random() < 0.5:
                blk, new = self._journal[self._rng.randrange(len(self._journal))]
                self._tear(blk, new)
        self.off = True
        self._overlay.clear()
        self._journal.clear()
        self._write_record()
        log.warning(
            "power cut at event %d (a %s, %s): %d pending write(s), %d kept%s",
            record.events + 1,
            record.cut_on,
            self.plan.mode,
            record.pending,
            record.kept,
            f", block {record.torn_block} torn" if record.torn_block is not None else "",
        )
        self._on_cut(record)

    def _tear(self, blk: int, new: bytes) -> None:
        bs = self.block_size
        sectors = bs // SECTOR
        old = os.pread(self._fd, bs, blk * bs).ljust(bs, b"\0")
        # Some, not all, sectors new; at least one of each when the block has two.
        count = self._rng.randint(1, max(1, sectors - 1))
        chosen = sorted(self._rng.sample(range(sectors), count))
        torn = bytearray(old)
        for s in chosen:
            torn[s * SECTOR : (s + 1) * SECTOR] = new[s * SECTOR : (s + 1) * SECTOR]
        os.pwrite(self._fd, bytes(torn), blk * bs)
        os.fdatasync(self._fd)
        self.record.torn_block = blk
        self.record.torn_sectors = chosen

    def _write_record(self) -> None:
        if self.record_path is None:
            return
        tmp = f"{self.record_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(asdict(self.record), f)
                f.write("\n")
            os.replace(tmp, self.record_path)
        except OSError as e:
            log.warning("power cut record %s: %s", self.record_path, e.strerror)


def record_path_for(image: str) -> str:
    return image + ".powercut"


def read_record(path: str) -> CutRecord | None:
    """The record a simulator left at ``path``, or None if there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return CutRecord(**data)


__all__ = [
    "ENV_VAR",
    "EXIT_POWERCUT",
    "CutPlan",
    "CutRecord",
    "PowerCut",
    "PowerOff",
    "read_record",
    "record_path_for",
]
