"""One run of a fault campaign: a fault site in one mode, or one power cut.

A fault run, on a fresh image:

1. mount -- with ``--fault`` when the site is on the mount or recovery path
   (class ``error:mount``), else the fault is armed through
   ``.fusefs/dynamic_fault`` once the mount is up;
2. the workloads (data or fsx, then metadata), under a watchdog;
3. the site's fire count is read, the fault switched off, the image unmounted
   (``fusefs umount`` says whether the final commit succeeded) and fsck'd;
4. the mount/umount cycle workload: a few mounts each with ``--fault`` (so
   the mount, recovery and unmount paths are hit too), each writing and
   fsyncing one file; fsck again;
5. a plain remount, and every workload checks what it recorded.

A power-cut run mounts with ``FUSEFS_POWERCUT`` in the daemon's environment and
runs the workloads until the daemon dies at the cut; then it detaches the
dead mount, runs fsck, remounts (recovery) and verifies what was durable.

The outcome, first match wins: **hang** (a step overran its timeout: the
daemon was killed), **crash** (the daemon died: ENOTCONN; for a power cut, died
without the simulator's record of a cut), **corruption** (acknowledged data
wrong or missing, or an error outside EIO/ENOMEM/ENOSPC/EROFS), **fsck error**
(fsck failed, or the image would not mount again), **clean** (the site fired,
or the cut happened, and nothing above), **not reached** (it never fired).
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from fusefs.powercut import ENV_VAR as POWERCUT_ENV
from fusefs.powercut import read_record, record_path_for
from tools.campaign.fsx import FsxWorkload, fsx_available
from tools.campaign.meta import MetaWorkload
from tools.campaign.metaheavy import MetaHeavyWorkload
from tools.campaign.mount import Image, SiteInfo, StepTimeout
from tools.campaign.workloads import (
    DaemonGone,
    DataWorkload,
    Observations,
    SpaceWorkload,
    classify,
    read_whole,
)
from tools.poison import poison_free_blocks, poisoned_files
from tools.pressure import Pressure, PressureSpec


class Outcome(enum.StrEnum):
    CLEAN = "clean"
    NOT_REACHED = "not reached"
    CRASH = "crash"
    HANG = "hang"
    CORRUPTION = "corruption"
    FSCK_ERROR = "fsck error"


OUTCOMES: Final = tuple(Outcome)
FAILURES: Final = frozenset({Outcome.CRASH, Outcome.HANG, Outcome.CORRUPTION, Outcome.FSCK_ERROR})
WORKLOADS: Final = ("fsx", "data", "meta", "metaheavy", "cycle", "space")


@dataclass(frozen=True)
class RunConfig:
    """What every run of a campaign shares."""

    out: Path
    seed: int = 1
    size: str = "64M"
    timeout: float = 60.0
    workloads: tuple[str, ...] = ("fsx", "meta", "cycle")
    ops: int = 120
    cycles: int = 3
    faults: tuple[str, ...] = ()  # extra --fault specs for every mount under test
    keep: bool = False  # keep the images of clean runs too
    minimize: bool = True  # minimize a failing fsx run's op list
    pressure: PressureSpec | None = None  # other processes on the cache during the workloads
    chaos: tuple[str, ...] = ()  # the --chaos schedule's fault specs
    flags: str = ""  # the campaign flags a reproducer repeats (--pressure, --chaos)

    @property
    def mount_faults(self) -> list[str]:
        """The fault specs every mount under test gets: --fault, then --chaos."""
        return [*self.faults, *self.chaos]

    @property
    def step_timeout(self) -> float:
        """For mount and umount: the workload's timeout, but never so short that a
        slow start on a loaded machine passes for a hang."""
        return max(self.timeout, 60.0)


@dataclass
class RunResult:
    kind: str  # "fault" or "powercut"
    site: str  # the site, or "cut@N"
    mode: str
    outcome: str
    fired: int
    errors: dict[str, int]
    detail: str
    notes: list[str]
    seconds: float
    reproducer: dict[str, str]
    workdir: str
    ops: int = 0
    events: int | None = None  # power cuts: the event the cut fell on / events counted
    flush_events: list[int] = field(default_factory=list)  # the counting run's flushes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Workload(Protocol):
    name: str

    def run(self, root: Path, obs: Observations, deadline: Any) -> None: ...

    def verify(self, root: Path, clean: bool) -> list[str]: ...


# the watchdog:


class Watchdog:
    """Kill the daemon if the guarded block overruns ``timeout``: a blocked
    syscall on the mount then returns ENOTCONN, and the run reports a hang."""

    def __init__(self, image: Image, timeout: float) -> None:
        self.image = image
        self.timeout = timeout
        self.fired = False
        self._timer: threading.Timer | None = None

    def _expire(self) -> None:
        self.fired = True
        self.image.kill()

    def check(self) -> None:
        """Between operations: stop as soon as the watchdog has fired."""
        if self.fired:
            raise DaemonGone("watchdog: out of time")

    def __enter__(self) -> Watchdog:
        self._timer = threading.Timer(self.timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()


# the mount/umount cycle workload:


class CycleWorkload:
    """Mount (with the fault spec), write and fsync one file, unmount: a few times."""

    name = "cycle"

    def __init__(self, seed: int, count: int) -> None:
        self.rng = random.Random(f"{seed}:cycle")
        self.count = count
        self.acked: dict[str, bytes] = {}
        self.fired = 0
        self.notes: list[str] = []
        self.crashed = False

    def run(self, image: Image, faults: Sequence[str], site: str | None, obs: Observations) -> None:
        for i in range(self.count):
            mounted = image.mount(faults=faults)
            if not mounted.ok:
                # A mount refused with a clean error is what a mount fault should cause.
                if "injected" in mounted.message:
                    self.fired += 1
                    obs.errors["mount refused"] = obs.errors.get("mount refused", 0) + 1
                else:
                    obs.problem(f"cycle {i}: mount failed: {mounted.message}")
                continue
            name = f"cycle/c{i}"
            data = self.rng.randbytes(self.rng.choice([1, 4096, 10000]))
            try:
                os.makedirs(image.path("cycle"), exist_ok=True)
                fd = os.open(image.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                    self.acked[name] = data
                finally:
                    os.close(fd)
            except DaemonGone:
                raise
            except OSError as e:
                try:
                    classify(e, obs, f"cycle {i}: {name}")
                except DaemonGone:
                    self.crashed = True
                    image.kill()
                    return
            if site is not None:
                self.fired += image.fired(site) or 0
            done = image.umount()
            if not done.ok:
                self.notes.append(f"cycle {i}: umount: {done.message}")
                if "daemon had died" in done.message:
                    self.crashed = True
                    return

    def verify(self, root: Path, clean: bool) -> list[str]:
        problems = []
        for name, data in self.acked.items():
            try:
                got = read_whole(root / name)
            except OSError as e:
                problems.append(f"{name}: fsynced, now {e.strerror}")
                continue
            if got != data:
                problems.append(f"{name}: fsynced contents differ")
        return problems


# runs:


def slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts)).strip("_")


def _data_workloads(cfg: RunConfig, seed: int, workdir: Path) -> list[Workload]:
    out: list[Workload] = []
    for name in cfg.workloads:
        if name == "fsx" and fsx_available():
            out.append(FsxWorkload(seed, workdir / "fsx", ops=cfg.ops, minimize=cfg.minimize))
        elif name in ("fsx", "data"):
            out.append(DataWorkload(seed, ops=cfg.ops))
        elif name == "meta":
            out.append(MetaWorkload(seed, ops=cfg.ops))
        elif name == "space":
            out.append(SpaceWorkload(seed, ops=cfg.ops))
        elif name == "metaheavy":
            out.append(MetaHeavyWorkload(seed, ops=cfg.ops))
    return out


@dataclass
class _Verdict:
    hang: bool = False
    crash: bool = False
    fired: int = 0
    problems: list[str] = field(default_factory=list)
    fsck: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def outcome(self, obs: Observations, reached: bool) -> tuple[Outcome, str]:
        problems = obs.problems + self.problems
        if self.hang:
            return Outcome.HANG, "no progress within the timeout; daemon killed"
        if self.crash:
            return Outcome.CRASH, "the daemon died (ENOTCONN)" + _also(problems + self.fsck)
        if problems:
            return Outcome.CORRUPTION, "; ".join(problems[:4])
        if self.fsck:
            return Outcome.FSCK_ERROR, "; ".join(self.fsck[:2])
        return (Outcome.CLEAN, "") if reached else (Outcome.NOT_REACHED, "")


def _also(more: list[str]) -> str:
    return f"; then: {'; '.join(more[:2])}" if more else ""


def _run_workloads(
    image: Image,
    workloads: Sequence[Workload],
    obs: Observations,
    cfg: RunConfig,
    notes: list[str],
) -> bool:
    """Run the workloads in turn under a watchdog, and under ``cfg.pressure``
    (tools/pressure.py) when set; True if the watchdog fired.  What the
    pressure did goes to ``notes``: a pressure process that failed is a note,
    not the outcome (the fault under test may fail its IO too)."""
    with contextlib.ExitStack() as stack:
        pressure = None
        if cfg.pressure is not None:
            root = os.fspath(image.mountpoint)
            pressure = stack.enter_context(Pressure(cfg.pressure, root, root, stop_timeout=10))
        with Watchdog(image, cfg.timeout) as dog:
            for w in workloads:
                try:
                    w.run(image.mountpoint, obs, dog.check)
                except DaemonGone:
                    break
        stack.close()
        if pressure is not None:
            notes.append(f"pressure: {pressure.summary()}")
            notes.extend(pressure.problems)
    return dog.fired


def _check_image(image: Image, verdict: _Verdict, what: str) -> None:
    done = image.fsck()
    if not done.ok:
        verdict.fsck.append(f"{what}: {done.message}")


def _verify(
    image: Image,
    verdict: _Verdict,
    checks: Sequence[tuple[Workload | CycleWorkload, bool]],
    *,
    poison: bool = False,
) -> None:
    """Remount and check each workload's files; with ``poison`` (a power cut on
    an image whose free blocks were poisoned), also that no file shows a block
    whose data never reached the disk."""
    mounted = image.mount()
    if not mounted.ok:
        verdict.fsck.append(f"remount failed: {mounted.message}")
        return
    try:
        for workload, clean in checks:
            verdict.problems += workload.verify(image.mountpoint, clean)
        if poison:
            verdict.problems += [
                f"{path}: shows a block whose data never reached the disk"
                for path in poisoned_files(image.mountpoint)
            ]
    finally:
        done = image.umount()
        if not done.ok:
            verdict.notes.append(f"umount after verification: {done.message}")


def _log_notes(image: Image) -> list[str]:
    text = image.log_text()
    notes = []
    if "Traceback" in text:
        notes.append("daemon log has a traceback")
    return notes


def run_fault(site: SiteInfo, mode: str, cfg: RunConfig) -> RunResult:
    """Run the workloads with ``site`` armed in ``mode``; classify the outcome."""
    start = time.monotonic()
    workdir = cfg.out / "runs" / slug(site.name, mode)
    if workdir.exists():
        shutil.rmtree(workdir)
    image = Image(workdir, cfg.size, timeout=cfg.step_timeout)
    image.mkfs()
    spec = f"seed {cfg.seed}; name {site.name} {mode}"
    obs = Observations()
    verdict = _Verdict()
    workloads = _data_workloads(cfg, cfg.seed, workdir)
    cycle = CycleWorkload(cfg.seed, cfg.cycles) if "cycle" in cfg.workloads else None
    checks: list[tuple[Workload | CycleWorkload, bool]] = []
    try:
        mounted = image.mount(
            faults=[spec, *cfg.mount_faults] if site.is_mount_site else cfg.mount_faults
        )
        if mounted.ok and not site.is_mount_site:
            image.control_write("dynamic_fault", spec)
        if not mounted.ok:
            if "injected" in mounted.message:
                verdict.fired += 1
                obs.errors["mount refused"] = 1
            else:
                verdict.problems.append(f"mount failed: {mounted.message}")
        else:
            verdict.hang = _run_workloads(image, workloads, obs, cfg, verdict.notes)
            clean = False
            if not (obs.daemon_gone or verdict.hang):
                fired = image.fired(site.name)
                verdict.fired += fired or 0
                with contextlib.suppress(OSError):
                    image.control_write("dynamic_fault", f"name {site.name} disable")
                done = image.umount()
                clean = done.ok
                if not done.ok:
                    verdict.notes.append(f"umount: {done.message}")
                    verdict.crash |= "daemon had died" in done.message
            else:
                verdict.crash |= not verdict.hang
                image.kill()
            checks += [(w, clean) for w in workloads]
        _check_image(image, verdict, "fsck after the workloads")
        if cycle is not None and not (verdict.hang or verdict.crash):
            with Watchdog(image, cfg.timeout * 2) as dog:
                try:
                    cycle.run(image, [spec, *cfg.mount_faults], site.name, obs)
                except DaemonGone:
                    cycle.crashed = True
            verdict.hang |= dog.fired
            verdict.crash |= cycle.crashed and not dog.fired
            verdict.fired += cycle.fired
            verdict.notes += cycle.notes
            checks.append((cycle, False))
            _check_image(image, verdict, "fsck after the mount cycles")
        if not verdict.hang:
            _verify(image, verdict, checks)
    except StepTimeout as e:
        verdict.hang = True
        verdict.notes.append(str(e))
    finally:
        image.cleanup()
    verdict.notes += _log_notes(image)
    outcome, detail = verdict.outcome(obs, verdict.fired > 0)
    repro = {
        "command": (
            f"fusefs-campaign --name {site.name} --mode '{mode}' --seed {cfg.seed} "
            f"--workload {','.join(cfg.workloads)} --ops {cfg.ops} --cycles {cfg.cycles}"
            f"{_size_flag(cfg)}{cfg.flags}"
        ),
        "fault": spec,
    }
    for w in workloads:
        if isinstance(w, FsxWorkload):
            repro.update(w.reproducer(outcome in FAILURES, f"name {site.name} {mode}"))
    result = RunResult(
        kind="fault",
        site=site.name,
        mode=mode,
        outcome=outcome.value,
        fired=verdict.fired,
        errors=dict(obs.errors),
        detail=detail,
        notes=verdict.notes,
        seconds=round(time.monotonic() - start, 2),
        reproducer=repro if outcome is not Outcome.CLEAN else {},
        workdir=str(workdir),
        ops=obs.ops,
    )
    _tidy(workdir, outcome, cfg)
    return result


def _size_flag(cfg: RunConfig) -> str:
    """``--size`` for a reproducer, when the campaign's image was not the default."""
    return "" if cfg.size == RunConfig.size else f" --size {cfg.size}"


def _tidy(workdir: Path, outcome: Outcome, cfg: RunConfig) -> None:
    """Images are large: keep them only for failures (and logs always)."""
    if outcome in FAILURES or cfg.keep:
        return
    image = workdir / "fs.img"
    with contextlib.suppress(OSError):
        image.unlink()


# power cuts:


def powercut_workloads(cfg: RunConfig) -> list[Workload]:
    """A workload that fsyncs as it goes: data (every fourth op) then metadata;
    or, when the campaign names it, the metadata-heavy one alone."""
    if "metaheavy" in cfg.workloads:
        return [MetaHeavyWorkload(cfg.seed, ops=cfg.ops)]
    return [
        DataWorkload(cfg.seed, ops=cfg.ops, fsync_every=4, files=3),
        MetaWorkload(cfg.seed, ops=cfg.ops // 2, fsync_every=5),
    ]


def powercut_spec(at: int | None, mode: str, seed: int) -> str:
    return (f"at={at}," if at is not None else "") + f"mode={mode},seed={seed}"


def run_powercut(at: int | None, mode: str, cfg: RunConfig) -> RunResult:
    """One power cut at device event ``at`` (None: only count the events)."""
    start = time.monotonic()
    label = f"cut@{at}" if at is not None else "count"
    workdir = cfg.out / "powercuts" / slug(label, mode)
    if workdir.exists():
        shutil.rmtree(workdir)
    image = Image(workdir, cfg.size, timeout=cfg.step_timeout)
    image.mkfs()
    poison_free_blocks(image.image)
    record_file = record_path_for(os.fspath(image.image))
    spec = powercut_spec(at, mode, cfg.seed)
    obs = Observations()
    verdict = _Verdict()
    workloads = powercut_workloads(cfg)
    events: int | None = None
    flush_events: list[int] = []
    cut = False
    clean = False
    try:
        mounted = image.mount(faults=cfg.mount_faults, env={POWERCUT_ENV: spec})
        if not mounted.ok:
            verdict.problems.append(f"mount failed: {mounted.message}")
        else:
            verdict.hang = _run_workloads(image, workloads, obs, cfg, verdict.notes)
            record = read_record(record_file)
            if obs.daemon_gone or verdict.hang or not image.daemon_alive():
                cut = record is not None and record.cut
                verdict.crash = not cut and not verdict.hang
                image.kill()
            else:
                done = image.umount()
                clean = done.ok
                if not done.ok:
                    verdict.notes.append(f"umount: {done.message}")
            record = read_record(record_file)
            if record is not None:
                events = record.events + (1 if record.cut else 0)
                flush_events = record.flush_events if at is None else []
                if record.cut:
                    cut = True
                    verdict.notes.append(
                        f"cut at a {record.cut_on}: {record.pending} pending write(s), "
                        f"{record.kept} kept"
                        + (f", block {record.torn_block} torn" if record.torn_block else "")
                    )
        if not verdict.hang:
            _check_image(image, verdict, "fsck after the cut")
            _verify(image, verdict, [(w, clean and not cut) for w in workloads], poison=True)
    except StepTimeout as e:
        verdict.hang = True
        verdict.notes.append(str(e))
    finally:
        image.cleanup()
    verdict.notes += _log_notes(image)
    verdict.fired = int(cut)
    outcome, detail = verdict.outcome(obs, cut)
    faults = "".join(f" --fault '{f}'" for f in cfg.faults)
    if "metaheavy" in cfg.workloads:
        faults = f" --workload metaheavy{faults}"
    repro = {
        "command": (
            f"fusefs-campaign --power-cut-at {at} --power-cut-mode {mode} --seed {cfg.seed} "
            f"--ops {cfg.ops}{_size_flag(cfg)}{faults}{cfg.flags}"
        ),
        "environment": f"{POWERCUT_ENV}={spec}",
    }
    result = RunResult(
        kind="powercut",
        site=label,
        mode=mode,
        outcome=outcome.value,
        fired=int(cut),
        errors=dict(obs.errors),
        detail=detail,
        notes=verdict.notes,
        seconds=round(time.monotonic() - start, 2),
        reproducer=repro if outcome in FAILURES else {},
        workdir=str(workdir),
        ops=obs.ops,
        events=events,
        flush_events=flush_events,
    )
    _tidy(workdir, outcome, cfg)
    return result


def cut_points(candidates: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` distinct cut points among ``candidates`` (all of them if fewer),
    spread evenly with a seeded jitter so every part of the workload is cut."""
    pool = sorted(set(candidates))
    if len(pool) <= count:
        return pool
    rng = random.Random(f"cuts:{seed}")
    step = len(pool) / count
    # One point in each of ``count`` disjoint strata: distinct however close
    # ``count`` comes to the number of candidates.
    points = []
    for i in range(count):
        lo, hi = int(i * step), int((i + 1) * step)
        points.append(pool[lo + rng.randrange(hi - lo)])
    return points


def iter_modes(mode: str, count: int) -> Iterator[str]:
    """``both`` alternates drop and torn."""
    for i in range(count):
        yield ("drop", "torn")[i % 2] if mode == "both" else mode


__all__ = [
    "FAILURES",
    "OUTCOMES",
    "WORKLOADS",
    "CycleWorkload",
    "Outcome",
    "RunConfig",
    "RunResult",
    "cut_points",
    "iter_modes",
    "powercut_spec",
    "run_fault",
    "run_powercut",
]
