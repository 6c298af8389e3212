"""Dynamic fault injection: the registry of fault sites and the call-site functions.

A fault site is one call in the code, named by a string literal that is unique
across the package::

    if dynamic_fault("blockdev_write", cls="io:write"):
        raise IOFailure("blockdev_write: injected")
    await race_fault("readahead_after_read")        # hold a race window open
    page = alloc_page("pagecache_page", PAGE_SIZE)   # may raise OutOfMemory

This is the kernel's ``dynamic_fault`` (Kent Overstreet's tree) in Python, in
three modules: this one, the public face (the call-site functions, `FaultRegistry`
with its counters and firing policies, `REGISTRY`); `fusefs.faultscan`, which
finds every site in the package source with `ast` before any runs and holds the
rules a site follows (a unique literal name, a class its function accepts); and
`fusefs.faultlang`, the control language.  Everything other modules use is
imported from here.

The registry learns its sites from the scan, on first use.  A call whose name
the scan did not see -- code outside the scanned roots, such as a test module --
is registered on its first hit from the caller's frame (the only place
``sys._getframe`` is used); tests can also call `FaultRegistry.register_site`.
Either way a bad name or class raises `FaultSiteError`.

Sites sit in hot paths, so a disabled check must cost about a function call
while still counting its hit exactly.  A ``site.hits += 1`` in Python allocates
an int and alone costs as much as the call, so the count is kept in C instead:
each disabled site has an ``itertools.repeat(False, n)`` "ticker", and the whole
check is ``next(ticks[name], True)`` -- one dict lookup and one C call that
returns False and counts down, without allocating; hits are ``n`` minus what the
ticker has left.  Arming a site swaps in a shared ``repeat(True)``, whose True
sends each hit to the slow path, which counts it and applies the firing policy,
the seeded random draw, the fire log and the lock.  (A ticker that ran out after
``sys.maxsize`` hits also answers True, and the slow path replaces it.)
``benchmarks/bench_faults.py`` times the check against an empty function of the
same signature: about 1.7x for a site as the code base writes them (with
``cls=``), 1.9-2x for a bare ``dynamic_fault("name")`` -- some 30 ns.  Because
``next()`` on the ticker is atomic under the GIL, hit counts stay exact for sites
hit from worker threads (the block device's); only a hit racing a command that
arms or disarms the same site may go uncounted.

Classes are ``io``, ``memory`` (raising `OutOfMemory`), ``race`` and ``error``,
with sub-classes after a colon (``io:write``); `fusefs.faultscan` says which
function takes which.

A fired race site holds its window open: it sleeps ``delay`` milliseconds, or
without a delay executes one trio checkpoint.  A checkpoint lets the tasks that
are runnable at that moment run, but trio may run them before or after the
yielding task (it reverses each scheduling batch at random), so a demonstration
that must be deterministic sets a delay.  A race site that does not fire does not
checkpoint at all, so placing one changes no schedule until it is switched on.

Probability draws come from one `random.Random` per site, seeded from the
registry's seed and the site's name when the policy is set.  A site's decisions
therefore depend only on its own hits, not on how tasks interleave, and a run is
reproducible from the seed shown in the listing header.

Listing (`FaultRegistry.listing`): a header ``# sites:S armed:A fired:F seed:N``,
a comment line on self-test sites, then one line per site in file/line order::

    fusefs/blockdev.py:88 class:io:write module:fusefs.blockdev func:BlockDevice.write \
name:blockdev_write frequency=3 times=2 hits:7 fired:2

The state is ``disabled``, ``enabled``, ``oneshot``, ``frequency=N`` or
``probability=P``, followed by `` times=N`` (fires left) and `` delay=MSms``
where set.

Self-test sites (class ``...:selftest``) break the filesystem on purpose, to show
that the tools testing it notice: a query reaches them only by naming them (their
exact name, or a class that says ``selftest``); broader queries leave them out
(`names_selftest`), and the listing says so in its second header line.

Commands (`FaultRegistry.control`) are in the language of `fusefs.faultlang`:
a query, then the firing policy to set on the sites it matches
(``name blockdev_* frequency 3 times 2``), or ``reset`` / ``seed N``.  Start-up
specs use it too: `FaultRegistry.apply_startup` takes the ``--fault`` options
and `FaultRegistry.apply_environment` reads ``FUSEFS_FAULTS``, so mount and
recovery paths can be hit before anything else runs.
"""

from __future__ import annotations

import itertools
import operator
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Final, final

import trio

from fusefs.errors import InvalidArgument, NotFound, OutOfMemory
from fusefs.faultlang import (
    DISABLED_POLICY,
    Command,
    Mode,
    Policy,
    Query,
    Reset,
    Seed,
    SetPolicy,
    command_error,
    parse,
)
from fusefs.faultscan import (
    CLASSES,
    FaultSiteError,
    SiteInfo,
    check_class,
    check_name,
    class_root,
    default_roots,
    scan,
)

__all__ = [
    "CLASSES",
    "ENV_VAR",
    "FIRE_LOG_SIZE",
    "REGISTRY",
    "SELFTEST_RULE",
    "FaultRegistry",
    "FaultSite",
    "FaultSiteError",
    "FaultStatistics",
    "alloc_buffer",
    "alloc_page",
    "alloc_pages",
    "dynamic_fault",
    "is_selftest_class",
    "memory_fault",
    "names_selftest",
    "race_fault",
]

ENV_VAR: Final = "FUSEFS_FAULTS"
"""Environment variable holding start-up commands (see `FaultRegistry.apply_environment`)."""

FIRE_LOG_SIZE: Final = 256
"""How many fires `FaultRegistry.fire_log` remembers by default."""


@final
@dataclass(frozen=True, slots=True)
class FaultSite:
    """A snapshot of one site, as `FaultRegistry.sites` reports it."""

    file: str
    line: int
    module: str
    func: str
    name: str
    cls: str
    state: str
    hits: int
    fired: int

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line} class:{self.cls} module:{self.module} func:{self.func} "
            f"name:{self.name} {self.state} hits:{self.hits} fired:{self.fired}"
        )


@final
@dataclass(frozen=True, slots=True)
class FaultStatistics:
    """Totals over every site of a registry (`FaultRegistry.statistics`)."""

    sites: int
    armed: int
    hits: int
    fired: int
    seed: int
    logged: int  # entries in the fire log


@dataclass(frozen=True, slots=True)
class _FireRecord:
    when: float
    name: str
    location: str
    hit: int
    task: str


def _task_name() -> str:
    try:
        return trio.lowlevel.current_task().name
    except RuntimeError:  # not in trio: a worker thread or plain code
        return "-"


# A disabled site's hit counter: ``next()`` on it returns False and counts down,
# in C and without allocating, so hits = budget - length_hint.  sys.maxsize hits
# take centuries; a counter that runs out is replaced by the slow path anyway
# (not Final: a test lowers it to exercise that).
_TICK_BUDGET = sys.maxsize
# An armed site's ticker: every ``next()`` returns True, sending the call to the
# slow path, which counts the hit itself.
_ARMED_TICKER: Final = itertools.repeat(True)


def _counting_ticker() -> itertools.repeat[bool]:
    return itertools.repeat(False, _TICK_BUDGET)


@final
class _Site:
    """The live state of one site (``info``, where it is and what it is called,
    never changes).  The hot path touches only the site's ticker, through the
    registry's name -> ticker dict; everything else belongs to the slow path and
    the registry, under the registry's lock."""

    __slots__ = (
        "_count",
        "_delay_rng",
        "_frequency",
        "_hits_base",
        "_lock",
        "_log",
        "_mode",
        "_probability",
        "_rng",
        "_ticker",
        "_ticks",
        "_times_left",
        "armed",
        "delay_max_ms",
        "delay_ms",
        "fired",
        "info",
    )

    def __init__(
        self,
        info: SiteInfo,
        *,
        lock: threading.RLock,
        log: deque[_FireRecord],
        ticks: dict[str, itertools.repeat[bool]],
    ) -> None:
        self.info = info
        self.fired = 0
        self.armed = False
        self.delay_ms: float | None = None
        self.delay_max_ms: float | None = None
        self._delay_rng: random.Random | None = None
        self._lock = lock
        self._log = log
        self._ticks = ticks
        self._hits_base = 0  # hits not counted by the current ticker
        self._install(_counting_ticker())
        self._mode = Mode.DISABLED
        self._frequency = 0
        self._count = 0
        self._probability = 0.0
        self._rng: random.Random | None = None
        self._times_left: int | None = None

    @property
    def hits(self) -> int:
        if self.armed:
            return self._hits_base
        return self._hits_base + _TICK_BUDGET - operator.length_hint(self._ticker)

    @property
    def is_race(self) -> bool:
        return class_root(self.info.cls) == "race"

    def _install(self, ticker: itertools.repeat[bool]) -> None:
        self._ticker = ticker
        self._ticks[self.info.name] = ticker

    def _arm(self) -> None:
        if not self.armed:
            self._hits_base = self.hits
            self.armed = True
            self._install(_ARMED_TICKER)

    def _disarm(self) -> None:
        # delay_ms stays: the race site that fired this last time still reads it.
        self._mode = Mode.DISABLED
        self._times_left = None
        if self.armed:
            self.armed = False
            self._install(_counting_ticker())

    def hit(self) -> bool:
        """Count a hit whose ticker said True, and decide whether it fires."""
        with self._lock:
            self._hits_base += 1
            if not self.armed:
                # Disarmed since the caller fetched the armed ticker, or the
                # counter ran out (its ``next()`` returned the default True).
                if operator.length_hint(self._ticker) == 0:
                    self._hits_base += _TICK_BUDGET
                    self._install(_counting_ticker())
                return False
            mode = self._mode
            if mode is Mode.FREQUENCY:
                self._count += 1
                if self._count < self._frequency:
                    return False
                self._count = 0
            elif mode is Mode.PROBABILITY:
                assert self._rng is not None
                if self._rng.random() >= self._probability:
                    return False
            elif mode is Mode.ONESHOT:
                self._disarm()
            if self._times_left is not None:
                self._times_left -= 1
                if self._times_left <= 0:
                    self._disarm()
            self.fired += 1
            self._log.append(
                _FireRecord(
                    time.time(), self.info.name, self.info.location, self.hits, _task_name()
                )
            )
            return True

    # Caller must hold the registry's lock.
    def set_policy(self, policy: Policy, seed: int) -> None:
        if policy.mode is Mode.DISABLED:
            self._disarm()
        else:
            self._arm()
        self._mode = policy.mode
        self._frequency = policy.frequency
        self._count = 0
        self._probability = policy.probability
        self._rng = _site_rng(seed, self.info.name) if policy.mode is Mode.PROBABILITY else None
        self._times_left = policy.times
        self.delay_ms = policy.delay_ms if self.is_race else None
        self.delay_max_ms = policy.delay_max_ms if self.is_race else None
        self._delay_rng = (
            _site_rng(seed, f"{self.info.name}:delay") if self.delay_max_ms is not None else None
        )

    # Caller must hold the registry's lock.
    def reset(self, seed: int) -> None:
        self.set_policy(DISABLED_POLICY, seed)
        self._install(_counting_ticker())
        self._hits_base = 0
        self.fired = 0

    # Caller must hold the registry's lock.
    def reseed(self, seed: int) -> None:
        if self._rng is not None:
            self._rng = _site_rng(seed, self.info.name)
        if self._delay_rng is not None:
            self._delay_rng = _site_rng(seed, f"{self.info.name}:delay")

    def window_ms(self) -> float | None:
        """How long a fire holds the window open: the delay, or a draw from its range."""
        low = self.delay_ms
        if low is None or self.delay_max_ms is None:
            return low
        with self._lock:
            assert self._delay_rng is not None
            return self._delay_rng.uniform(low, self.delay_max_ms)

    def state(self) -> str:
        mode = self._mode
        if mode is Mode.FREQUENCY:
            text = f"frequency={self._frequency}"
        elif mode is Mode.PROBABILITY:
            text = f"probability={self._probability:g}"
        elif mode is Mode.DISABLED:
            return str(mode)
        else:
            text = str(mode)
        if self._times_left is not None:
            text += f" times={self._times_left}"
        if self.delay_ms is not None:
            high = "" if self.delay_max_ms is None else f"-{self.delay_max_ms:g}"
            text += f" delay={self.delay_ms:g}{high}ms"
        return text

    def snapshot(self) -> FaultSite:
        info = self.info
        return FaultSite(
            file=info.file,
            line=info.line,
            module=info.module,
            func=info.func,
            name=info.name,
            cls=info.cls,
            state=self.state(),
            hits=self.hits,
            fired=self.fired,
        )

    def sort_key(self) -> tuple[str, int, str]:
        return (self.info.file, self.info.line, self.info.name)


def _qualname(frame: FrameType) -> str:
    # Like `fusefs.faultscan`'s qualified names: nested functions without ``<locals>``.
    return frame.f_code.co_qualname.replace("<locals>.", "")


def _site_rng(seed: int, name: str) -> random.Random:
    # String seeds hash with SHA-512: stable across runs and Python processes.
    return random.Random(f"{seed}:{name}")


# the registry:


@final
class FaultRegistry:
    """Every fault site of the code under ``roots``, with its counters and firing
    policy.  ``roots`` are package directories, scanned lazily on first use;
    ``None`` means the fusefs package and ``tools/`` beside it, and ``[]`` a
    registry that knows only sites registered at run time.

    The module functions (`dynamic_fault`, ...) use `REGISTRY`; the methods of
    the same names check a site of this registry, which is how tests exercise a
    fresh one.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]] | None = None,
        *,
        seed: int = 0,
        log_size: int = FIRE_LOG_SIZE,
    ) -> None:
        self._roots = default_roots() if roots is None else [Path(r).resolve() for r in roots]
        self._by_name: dict[str, _Site] = {}
        # name -> the site's ticker, all the hot path reads (without the lock).
        # The module functions hold REGISTRY's: mutated, never rebound.
        self._ticks: dict[str, itertools.repeat[bool]] = {}
        self._ordered: list[_Site] | None = None  # listing order, rebuilt on registration
        # Protects everything but the hot path's reads.  Reentrant because the
        # first hit's slow path scans under it.
        self._lock = threading.RLock()
        self._scanned = False
        self._scan_error: str | None = None
        self._seed = seed
        self._log: deque[_FireRecord] = deque(maxlen=log_size)

    def __repr__(self) -> str:
        # No scan here: repr must never fail or do IO.
        with self._lock:
            sites = len(self._by_name) if self._scanned else "?"
            armed = sum(site.armed for site in self._by_name.values())
            fired = sum(site.fired for site in self._by_name.values())
            return (
                f"<{type(self).__name__} sites={sites} armed={armed} fired={fired} "
                f"seed={self._seed}>"
            )

    # discovery:

    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self._scan_once()

    def _scan_once(self) -> None:
        with self._lock:
            if self._scanned:
                return
            if self._scan_error is not None:
                raise FaultSiteError(self._scan_error)
            try:
                infos = scan(self._roots)
            except FaultSiteError as exc:
                self._scan_error = str(exc)
                raise
            # Nothing is registered before the scan: every registration scans first.
            for info in infos:
                self._add(info)
            self._scanned = True

    # Caller must hold the lock.
    def _add(self, info: SiteInfo) -> _Site:
        site = _Site(info, lock=self._lock, log=self._log, ticks=self._ticks)
        self._by_name[info.name] = site
        self._ordered = None
        return site

    def _relative_file(self, filename: str) -> str:
        path = Path(filename).resolve()
        project = Path(__file__).resolve().parent.parent  # where tests/ lives
        for base in [*(root.parent for root in self._roots), project, Path.cwd()]:
            if path.is_relative_to(base):
                return path.relative_to(base).as_posix()
        return path.as_posix()

    def _site_for_call(self, name: str, cls: str, kind: str, frame: FrameType) -> _Site:
        """The hot path's slow path: scan if not done yet, then find the site or
        register it from the calling frame."""
        with self._lock:
            self._ensure_scanned()
            site = self._by_name.get(name)
            if site is not None:
                return site
            problem = check_name(name) or check_class(cls, kind)
            if problem:
                raise FaultSiteError(f"{frame.f_code.co_filename}:{frame.f_lineno}: {problem}")
            return self._add(
                SiteInfo(
                    name=name,
                    cls=cls,
                    file=self._relative_file(frame.f_code.co_filename),
                    line=frame.f_lineno,
                    module=str(frame.f_globals.get("__name__", "?")),
                    func=_qualname(frame),
                )
            )

    def register_site(
        self,
        name: str,
        cls: str = "error",
        *,
        file: str | None = None,
        line: int | None = None,
        module: str | None = None,
        func: str | None = None,
    ) -> FaultSite:
        """Register a site explicitly (for tests); location fields left out are
        taken from the caller.  A name already known is a `FaultSiteError`."""
        caller = sys._getframe(1)
        problem = check_name(name) or check_class(cls, "register_site")
        if problem:
            raise FaultSiteError(problem)
        with self._lock:
            self._ensure_scanned()
            other = self._by_name.get(name)
            if other is not None:
                raise FaultSiteError(
                    f"fault site name {name!r} is already registered at {other.info.location}"
                )
            site = self._add(
                SiteInfo(
                    name=name,
                    cls=cls,
                    file=self._relative_file(caller.f_code.co_filename) if file is None else file,
                    line=caller.f_lineno if line is None else line,
                    module=str(caller.f_globals.get("__name__")) if module is None else module,
                    func=_qualname(caller) if func is None else func,
                )
            )
            return site.snapshot()

    # Caller must hold the lock.
    def _sorted_sites(self) -> list[_Site]:
        if self._ordered is None:
            self._ordered = sorted(self._by_name.values(), key=_Site.sort_key)
        return self._ordered

    # The hot path's two slow paths.  Neither may raise KeyError: the call-site
    # functions read a KeyError as "name not registered yet".

    def _hit(self, name: str) -> bool:
        """A hit whose ticker said True: count it and decide."""
        return self._by_name[name].hit()

    def _first_hit(self, name: str, cls: str, kind: str, frame: FrameType) -> bool:
        """A hit on a name without a ticker: scan if not done yet, find the site
        or register it from the calling frame, then count the hit and decide."""
        try:
            ticker = self._ticks[name]
        except KeyError:
            ticker = self._site_for_call(name, cls, kind, frame)._ticker
        return next(ticker, True) and self._hit(name)

    # call sites (the module functions do the same on REGISTRY):

    def dynamic_fault(self, name: str, cls: str = "error") -> bool:
        try:
            return next(self._ticks[name], True) and self._hit(name)
        except KeyError:
            return self._first_hit(name, cls, "dynamic_fault", sys._getframe(1))

    async def race_fault(self, name: str, cls: str = "race") -> None:
        try:
            fired = next(self._ticks[name], True) and self._hit(name)
        except KeyError:
            fired = self._first_hit(name, cls, "race_fault", sys._getframe(1))
        if fired:
            await _hold_window(self._by_name[name])

    def memory_fault(self, name: str, cls: str = "memory") -> None:
        try:
            if next(self._ticks[name], True) and self._hit(name):
                raise _injected_oom(self._by_name[name])
        except KeyError:
            if self._first_hit(name, cls, "memory_fault", sys._getframe(1)):
                raise _injected_oom(self._by_name[name]) from None

    def alloc_page(self, name: str, size: int, *, cls: str = "memory:page") -> bytearray:
        try:
            if next(self._ticks[name], True) and self._hit(name):
                raise _injected_oom(self._by_name[name])
        except KeyError:
            if self._first_hit(name, cls, "alloc_page", sys._getframe(1)):
                raise _injected_oom(self._by_name[name]) from None
        return _allocate(name, size)

    def alloc_buffer(self, name: str, size: int, *, cls: str = "memory:buffer") -> bytearray:
        try:
            if next(self._ticks[name], True) and self._hit(name):
                raise _injected_oom(self._by_name[name])
        except KeyError:
            if self._first_hit(name, cls, "alloc_buffer", sys._getframe(1)):
                raise _injected_oom(self._by_name[name]) from None
        return _allocate(name, size)

    def alloc_pages(
        self,
        name: str,
        size: int,
        count: int,
        *,
        cls: str = "memory:page",
        init: bytes | bytearray | memoryview | None = None,
    ) -> list[bytearray]:
        if count <= 0:
            return []
        try:
            fired = next(self._ticks[name], True) and self._hit(name)
        except KeyError:
            fired = self._first_hit(name, cls, "alloc_pages", sys._getframe(1))
        return _allocate_pages(self, name, size, count, fired, init)

    # inspection:

    def sites(self) -> list[FaultSite]:
        """Every site, in listing order (file, then line)."""
        with self._lock:
            self._ensure_scanned()
            return [site.snapshot() for site in self._sorted_sites()]

    def site(self, name: str) -> FaultSite:
        with self._lock:
            self._ensure_scanned()
            site = self._by_name.get(name)
            if site is None:
                raise NotFound(f"dynamic_fault: no site named {name!r}")
            return site.snapshot()

    def listing(self) -> str:
        """The control file's contents: a header, then one line per site."""
        with self._lock:
            self._ensure_scanned()
            sites = self._sorted_sites()
            armed = sum(site.armed for site in sites)
            fired = sum(site.fired for site in sites)
            lines = [
                f"# sites:{len(sites)} armed:{armed} fired:{fired} seed:{self._seed}",
                f"# {SELFTEST_RULE}: a broader query leaves them out",
            ]
            lines += [str(site.snapshot()) for site in sites]
            return "\n".join(lines) + "\n"

    def fire_log(self) -> str:
        """The last fires, oldest first: ``time name file:line hit:H task:T``."""
        with self._lock:
            records = list(self._log)
        return "".join(
            f"{datetime.fromtimestamp(r.when).isoformat(timespec='microseconds')} "
            f"{r.name} {r.location} hit:{r.hit} task:{r.task}\n"
            for r in records
        )

    def statistics(self) -> FaultStatistics:
        with self._lock:
            self._ensure_scanned()
            sites = list(self._by_name.values())
            return FaultStatistics(
                sites=len(sites),
                armed=sum(site.armed for site in sites),
                hits=sum(site.hits for site in sites),
                fired=sum(site.fired for site in sites),
                seed=self._seed,
                logged=len(self._log),
            )

    # control:

    def control(self, text: str) -> None:
        """Execute the commands in ``text`` (see `fusefs.faultlang`), all or none.

        Raises `InvalidArgument` for a malformed command and `NotFound` for a
        query that matches no site, before anything is changed.
        """
        commands = parse(text)
        with self._lock:
            self._ensure_scanned()
            plan: list[tuple[Command, list[_Site]]] = []
            for command in commands:
                matched: list[_Site] = []
                if isinstance(command, SetPolicy):
                    matched = self._select(command.query)
                    if command.policy.delay_ms is not None and not any(
                        site.is_race for site in matched
                    ):
                        raise command_error(command.text, "'delay' applies to race sites only")
                plan.append((command, matched))
            for command, matched in plan:
                if isinstance(command, Reset):
                    self._reset_locked()
                elif isinstance(command, Seed):
                    self._seed_locked(command.seed)
                else:
                    for site in matched:
                        site.set_policy(command.policy, self._seed)

    # Caller must hold the lock.
    def _select(self, query: Query) -> list[_Site]:
        matched = []
        skipped = 0
        for site in self._sorted_sites():
            if not query.matches(site.info):
                continue
            if is_selftest_class(site.info.cls) and not names_selftest(query, site.info):
                skipped += 1
                continue
            matched.append(site)
        if query.index is not None:
            first, last = query.index
            matched = matched[first : last + 1]
        if not matched:
            what = f"{query.text!r}" if query.text else "(no sites registered)"
            hint = f" ({SELFTEST_RULE})" if skipped else ""
            raise NotFound(f"dynamic_fault: no site matches {what}{hint}")
        return matched

    def reset(self) -> None:
        """Disable every site, zero every counter and clear the fire log."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        for site in self._by_name.values():
            site.reset(self._seed)
        self._log.clear()

    def seed(self, seed: int) -> None:
        """Seed the probability draws (every site's draws restart from it)."""
        if seed < 0:
            raise InvalidArgument(f"dynamic_fault: seed must be non-negative, got {seed}")
        with self._lock:
            self._seed_locked(seed)

    def _seed_locked(self, seed: int) -> None:
        self._seed = seed
        for site in self._by_name.values():
            site.reseed(seed)

    def apply_startup(self, specs: Sequence[str]) -> None:
        """Apply the ``--fault`` specs given before the filesystem starts, all or
        none (each spec may itself hold several commands)."""
        if specs:
            self.control("\n".join(specs))

    def apply_environment(self, environ: Mapping[str, str] | None = None) -> None:
        """Apply the commands in ``$FUSEFS_FAULTS``, if set."""
        value = (os.environ if environ is None else environ).get(ENV_VAR, "")
        if value.strip():
            self.control(value)


SELFTEST_RULE: Final = "self-test sites match only by their name or a ...:selftest class"


def is_selftest_class(cls: str) -> bool:
    """The class of a self-test site (``...:selftest``): one that breaks the
    filesystem on purpose, to show that the tools testing it notice."""
    return "selftest" in cls.split(":")


def names_selftest(query: Query, site: SiteInfo) -> bool:
    """Whether ``query`` asks for the self-test site ``site`` itself: by its exact
    name (no wildcard) or by a class that says ``selftest`` (``class io:selftest``).
    A broader query -- no term, ``class io``, ``file blockdev.py``, ``name *`` --
    leaves self-test sites alone, so that it can never crash the daemon or corrupt
    data silently by accident."""
    if query.name is not None and query.name == site.name:
        return True
    return query.cls is not None and is_selftest_class(query.cls)


async def _hold_window(site: _Site) -> None:
    delay_ms = site.window_ms()
    if delay_ms is None:
        await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(delay_ms / 1000)


def _injected_oom(site: _Site) -> OutOfMemory:
    return OutOfMemory(f"{site.info.name}: injected allocation failure ({site.info.location})")


def _allocate(
    name: str, size: int, init: bytes | bytearray | memoryview | None = None
) -> bytearray:
    try:
        return bytearray(size) if init is None else bytearray(init)
    except MemoryError:
        raise OutOfMemory(f"{name}: cannot allocate {size} bytes") from None


def _allocate_pages(
    registry: FaultRegistry,
    name: str,
    size: int,
    count: int,
    fired: bool,
    init: bytes | bytearray | memoryview | None,
) -> list[bytearray]:
    """`alloc_pages` after its first hit (``fired``): the other ``count - 1``
    hits, one per page, then the pages (zeroed, or ``init`` cut in ``size``)."""
    ticks = registry._ticks
    for _ in range(count - 1):
        if fired:
            break
        fired = next(ticks[name], True) and registry._hit(name)
    if fired:
        raise _injected_oom(registry._by_name[name])
    try:
        if init is None:
            return [bytearray(size) for _ in range(count)]
        return [bytearray(init[i * size : (i + 1) * size]) for i in range(count)]
    except MemoryError:
        raise OutOfMemory(f"{name}: cannot allocate {count} x {size} bytes") from None


# the module functions, on the default registry:

REGISTRY: Final = FaultRegistry()
_TICKS: Final = REGISTRY._ticks  # the hot path's one global lookup

# The functions below are REGISTRY's methods of the same names, written out:
# a bound-method call and ``self._ticks`` would cost the hot path a little more.


def dynamic_fault(name: str, cls: str = "error") -> bool:
    """Whether the site ``name`` fires on this hit: ``if dynamic_fault(...): raise``."""
    try:
        return next(_TICKS[name], True) and REGISTRY._hit(name)
    except KeyError:
        return REGISTRY._first_hit(name, cls, "dynamic_fault", sys._getframe(1))


async def race_fault(name: str, cls: str = "race") -> None:
    """A race window: when fired, sleep the site's delay or checkpoint once; when
    not fired, return without a checkpoint."""
    try:
        fired = next(_TICKS[name], True) and REGISTRY._hit(name)
    except KeyError:
        fired = REGISTRY._first_hit(name, cls, "race_fault", sys._getframe(1))
    if fired:
        await _hold_window(REGISTRY._by_name[name])


def memory_fault(name: str, cls: str = "memory") -> None:
    """Raise `OutOfMemory` if the site ``name`` fires."""
    try:
        if next(_TICKS[name], True) and REGISTRY._hit(name):
            raise _injected_oom(REGISTRY._by_name[name])
    except KeyError:
        if REGISTRY._first_hit(name, cls, "memory_fault", sys._getframe(1)):
            raise _injected_oom(REGISTRY._by_name[name]) from None


def alloc_page(name: str, size: int, *, cls: str = "memory:page") -> bytearray:
    """A zeroed page of ``size`` bytes, or `OutOfMemory` if the site fires."""
    try:
        if next(_TICKS[name], True) and REGISTRY._hit(name):
            raise _injected_oom(REGISTRY._by_name[name])
    except KeyError:
        if REGISTRY._first_hit(name, cls, "alloc_page", sys._getframe(1)):
            raise _injected_oom(REGISTRY._by_name[name]) from None
    return _allocate(name, size)


def alloc_pages(
    name: str,
    size: int,
    count: int,
    *,
    cls: str = "memory:page",
    init: bytes | bytearray | memoryview | None = None,
) -> list[bytearray]:
    """``count`` pages of ``size`` bytes, zeroed or copied from consecutive
    pieces of ``init``: one hit of the site per page, so the site fires on the
    same page it would if each were an `alloc_page`; `OutOfMemory` then, and
    no page is returned."""
    if count <= 0:
        return []
    try:
        fired = next(_TICKS[name], True) and REGISTRY._hit(name)
    except KeyError:
        fired = REGISTRY._first_hit(name, cls, "alloc_pages", sys._getframe(1))
    return _allocate_pages(REGISTRY, name, size, count, fired, init)


def alloc_buffer(name: str, size: int, *, cls: str = "memory:buffer") -> bytearray:
    """A zeroed IO buffer of ``size`` bytes, or `OutOfMemory` if the site fires."""
    try:
        if next(_TICKS[name], True) and REGISTRY._hit(name):
            raise _injected_oom(REGISTRY._by_name[name])
    except KeyError:
        if REGISTRY._first_hit(name, cls, "alloc_buffer", sys._getframe(1)):
            raise _injected_oom(REGISTRY._by_name[name]) from None
    return _allocate(name, size)
