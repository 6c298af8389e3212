"""Dynamic fault injection: the registry of fault sites and its control language.

A fault site is one call in the code, named by a string literal that is unique
across the package::

    if dynamic_fault("blockdev_write", cls="io:write"):
        raise IOFailure("blockdev_write: injected")
    await race_fault("readahead_after_read")        # hold a race window open
    page = alloc_page("pagecache_page", PAGE_SIZE)   # may raise OutOfMemory

This is the kernel's ``dynamic_fault`` (Kent Overstreet's tree) in Python.  The
kernel learns every site before it runs because the compiler drops a descriptor
per call into an ELF section.  Python has no link step, so the registry reads
the source instead: on first use it parses every ``.py`` file of the package
(and of ``tools/`` next to it) with `ast` and records each call to
`dynamic_fault`, `race_fault`, `memory_fault`, `alloc_page` or `alloc_buffer`
with its file, line, module, enclosing function, name and class.  So the listing
of a freshly started filesystem shows every site, hit count 0, including those in
modules that were never imported.  The scan costs tens of milliseconds once and
imports nothing.  Its rules are enforced where they can be checked, at scan time:
a site's name must be a string literal (otherwise it could not be known before
it runs) and must be used by exactly one call; breaking either raises
`FaultSiteError` naming the offending lines.  A call whose name the scan did not
see -- code outside the scanned roots, such as a test module -- is registered on
its first hit from the caller's frame (the only place ``sys._getframe`` is used);
tests can also call `FaultRegistry.register_site`.

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

Classes are ``io`` (backing device errors), ``memory`` (allocation failures,
raising `OutOfMemory`), ``race`` (`race_fault`: yield or sleep in a race window)
and ``error`` (rare error paths), each with optional sub-classes after a colon
(``io:write``).  `dynamic_fault` takes its class from ``cls=`` (default
``error``); `race_fault` is ``race``; `memory_fault` is ``memory``,
`alloc_page` ``memory:page`` and `alloc_buffer` ``memory:buffer``.

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

Control language
----------------

Text is split into commands at ``;`` and newlines; ``#`` starts a comment.  A
command is a query followed by actions, or a standalone command::

    command    := query* action+  |  "reset"  |  "seed" INT
    query      := "name" NAME | "class" CLASS | "module" MODULE | "file" PATH
                | "func" FUNC | "line" RANGE | "index" RANGE
    action     := "enable" | "disable" | "oneshot" | "frequency" INT
                | "probability" FLOAT | "times" INT | "delay" MS
    RANGE      := INT | INT "-" INT        (inclusive)

Query terms AND together; a command without any applies to every site.

- ``name``: the site's name.  ``module``: the dotted module name or a dotted
  suffix of it (``fusefs.io.buffered``, ``io.buffered``, ``buffered``).
  ``file``: the path relative to the package's parent directory
  (``fusefs/io/buffered.py``) or a path suffix (``buffered.py``).  ``func``: the
  enclosing function's qualified name (``BlockDevice.write``, module level is
  ``<module>``) or a dotted suffix (``write``).  These four accept shell
  wildcards (``name blockdev_*``).
- ``class``: prefix match up to a colon: ``class io`` matches ``io`` and
  ``io:write``; ``class io:write`` matches only ``io:write`` (and its own
  sub-classes).
- ``line N`` / ``line N-M``: the site's line.
- ``index N-M``: picks among the sites the other terms matched, counted from
  **0** in listing order (file, then line) -- as in the kernel.

Actions set the whole firing policy of every matched site, replacing the old
one; they do not accumulate across commands:

- ``enable``: fire on every hit.  ``disable``: never fire.
- ``oneshot``: fire on the next hit, then disable.
- ``frequency N`` (N >= 1): fire on the N-th, 2N-th, ... hit counted from this
  command.  ``probability P`` (0 <= P <= 1): fire on each hit with chance P.
- ``times N`` (N >= 1): fire at most N more times, then disable; combines with
  ``enable``, ``frequency`` and ``probability``.
- ``delay MS`` (MS >= 0, may be fractional): race sites only (other matched
  sites ignore it; a query with no race site is an error): sleep this long when
  fired instead of one checkpoint.

At most one of enable/disable/oneshot/frequency/probability may be given; if
only ``times`` or ``delay`` is, the mode is ``enable``.  ``disable`` takes no
modifier, ``oneshot`` no ``times``.  ``reset`` disables every site and clears
all counters and the fire log; ``seed N`` re-seeds the probability draws.

A malformed command raises `InvalidArgument` (EINVAL), a query that matches
nothing `NotFound` (ENOENT), each with a one-line message.  Every command of a
text is parsed and resolved before any is applied, so a bad text changes
nothing.

Listing (`FaultRegistry.listing`): a header ``# sites:S armed:A fired:F seed:N``
then one line per site in file/line order::

    fusefs/blockdev.py:88 class:io:write module:fusefs.blockdev func:BlockDevice.write \
name:blockdev_write frequency=3 times=2 hits:7 fired:2

The state is ``disabled``, ``enabled``, ``oneshot``, ``frequency=N`` or
``probability=P``, followed by `` times=N`` (fires left) and `` delay=MSms``
where set.

Start-up specs: `FaultRegistry.apply_startup` takes the ``--fault`` options and
`FaultRegistry.apply_environment` reads ``FUSEFS_FAULTS``; both use this same
language, so mount and recovery paths can be hit before anything else runs.
"""

from __future__ import annotations

import ast
import enum
import fnmatch
import itertools
import math
import operator
import os
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Final, final

import trio

from fusefs.errors import InvalidArgument, NotFound, OutOfMemory

__all__ = [
    "CLASSES",
    "ENV_VAR",
    "FIRE_LOG_SIZE",
    "REGISTRY",
    "FaultRegistry",
    "FaultSite",
    "FaultSiteError",
    "FaultStatistics",
    "alloc_buffer",
    "alloc_page",
    "dynamic_fault",
    "memory_fault",
    "race_fault",
]

CLASSES: Final = ("io", "memory", "race", "error")
"""The root fault classes; a site's class is one of these or ``root:sub...``."""

ENV_VAR: Final = "FUSEFS_FAULTS"
"""Environment variable holding start-up commands (see `FaultRegistry.apply_environment`)."""

FIRE_LOG_SIZE: Final = 256
"""How many fires `FaultRegistry.fire_log` remembers by default."""

# The call-site functions the scanner looks for, with the class each defaults to
# and the root classes it accepts.
_DEFAULT_CLASS: Final[Mapping[str, str]] = {
    "dynamic_fault": "error",
    "race_fault": "race",
    "memory_fault": "memory",
    "alloc_page": "memory:page",
    "alloc_buffer": "memory:buffer",
}
_ALLOWED_ROOTS: Final[Mapping[str, frozenset[str]]] = {
    "dynamic_fault": frozenset({"io", "memory", "error"}),
    "race_fault": frozenset({"race"}),
    "memory_fault": frozenset({"memory"}),
    "alloc_page": frozenset({"memory"}),
    "alloc_buffer": frozenset({"memory"}),
    "register_site": frozenset(CLASSES),
}
_FUNCTION_NAMES: Final = tuple(fn.encode() for fn in _DEFAULT_CLASS)
_THIS_FILE: Final = Path(__file__).resolve()
# Position of a positional ``cls`` argument (alloc_* take it by keyword only).
_CLS_POSITION: Final[Mapping[str, int]] = {"dynamic_fault": 1, "race_fault": 1, "memory_fault": 1}

_NAME_RE: Final = re.compile(r"[^\s;#]+")
_CLASS_RE: Final = re.compile(r"[A-Za-z0-9_]+(?::[A-Za-z0-9_]+)*")


class FaultSiteError(RuntimeError):
    """A programming error in the fault sites themselves: a duplicate name, a name
    that is not a string literal, an unknown class.  Raised by the scan (so the
    test suite catches it) and by `FaultRegistry.register_site`."""


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


class _Mode(enum.StrEnum):
    DISABLED = "disabled"
    ENABLED = "enabled"
    ONESHOT = "oneshot"
    FREQUENCY = "frequency"
    PROBABILITY = "probability"


@dataclass(frozen=True, slots=True)
class _Policy:
    mode: _Mode
    frequency: int = 0
    probability: float = 0.0
    times: int | None = None
    delay_ms: float | None = None


_DISABLED_POLICY: Final = _Policy(_Mode.DISABLED)


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
    """The live state of one site.  The hot path touches only the site's ticker,
    through the registry's name -> ticker dict; everything else belongs to the
    slow path and the registry, under the registry's lock."""

    __slots__ = (
        "_count",
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
        "cls",
        "delay_ms",
        "file",
        "fired",
        "func",
        "line",
        "module",
        "name",
    )

    def __init__(
        self,
        *,
        name: str,
        cls: str,
        file: str,
        line: int,
        module: str,
        func: str,
        lock: threading.RLock,
        log: deque[_FireRecord],
        ticks: dict[str, itertools.repeat[bool]],
    ) -> None:
        self.name = name
        self.cls = cls
        self.file = file
        self.line = line
        self.module = module
        self.func = func
        self.fired = 0
        self.armed = False
        self.delay_ms: float | None = None
        self._lock = lock
        self._log = log
        self._ticks = ticks
        self._hits_base = 0  # hits not counted by the current ticker
        self._install(_counting_ticker())
        self._mode = _Mode.DISABLED
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
        return _class_root(self.cls) == "race"

    def _install(self, ticker: itertools.repeat[bool]) -> None:
        self._ticker = ticker
        self._ticks[self.name] = ticker

    def _arm(self) -> None:
        if not self.armed:
            self._hits_base = self.hits
            self.armed = True
            self._install(_ARMED_TICKER)

    def _disarm(self) -> None:
        # delay_ms stays: the race site that fired this last time still reads it.
        self._mode = _Mode.DISABLED
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
            if mode is _Mode.FREQUENCY:
                self._count += 1
                if self._count < self._frequency:
                    return False
                self._count = 0
            elif mode is _Mode.PROBABILITY:
                assert self._rng is not None
                if self._rng.random() >= self._probability:
                    return False
            elif mode is _Mode.ONESHOT:
                self._disarm()
            if self._times_left is not None:
                self._times_left -= 1
                if self._times_left <= 0:
                    self._disarm()
            self.fired += 1
            self._log.append(
                _FireRecord(
                    time.time(), self.name, f"{self.file}:{self.line}", self.hits, _task_name()
                )
            )
            return True

    # Caller must hold the registry's lock.
    def set_policy(self, policy: _Policy, seed: int) -> None:
        if policy.mode is _Mode.DISABLED:
            self._disarm()
        else:
            self._arm()
        self._mode = policy.mode
        self._frequency = policy.frequency
        self._count = 0
        self._probability = policy.probability
        self._rng = _site_rng(seed, self.name) if policy.mode is _Mode.PROBABILITY else None
        self._times_left = policy.times
        self.delay_ms = policy.delay_ms if self.is_race else None

    # Caller must hold the registry's lock.
    def reset(self, seed: int) -> None:
        self.set_policy(_DISABLED_POLICY, seed)
        self._install(_counting_ticker())
        self._hits_base = 0
        self.fired = 0

    # Caller must hold the registry's lock.
    def reseed(self, seed: int) -> None:
        if self._rng is not None:
            self._rng = _site_rng(seed, self.name)

    def state(self) -> str:
        mode = self._mode
        if mode is _Mode.FREQUENCY:
            text = f"frequency={self._frequency}"
        elif mode is _Mode.PROBABILITY:
            text = f"probability={self._probability:g}"
        elif mode is _Mode.DISABLED:
            return str(mode)
        else:
            text = str(mode)
        if self._times_left is not None:
            text += f" times={self._times_left}"
        if self.delay_ms is not None:
            text += f" delay={self.delay_ms:g}ms"
        return text

    def snapshot(self) -> FaultSite:
        return FaultSite(
            file=self.file,
            line=self.line,
            module=self.module,
            func=self.func,
            name=self.name,
            cls=self.cls,
            state=self.state(),
            hits=self.hits,
            fired=self.fired,
        )

    def sort_key(self) -> tuple[str, int, str]:
        return (self.file, self.line, self.name)


def _qualname(frame: FrameType) -> str:
    # Like the scan's: nested functions without the ``<locals>`` parts.
    return frame.f_code.co_qualname.replace("<locals>.", "")


def _site_rng(seed: int, name: str) -> random.Random:
    # String seeds hash with SHA-512: stable across runs and Python processes.
    return random.Random(f"{seed}:{name}")


def _class_root(cls: str) -> str:
    return cls.partition(":")[0]


def _check_class(cls: str, kind: str) -> str | None:
    """Why ``cls`` is not a valid class for a ``kind`` call site, or None."""
    if not _CLASS_RE.fullmatch(cls):
        return f"malformed fault class {cls!r}"
    root = _class_root(cls)
    if root not in CLASSES:
        return f"unknown fault class {cls!r} (classes: {', '.join(CLASSES)})"
    if root not in _ALLOWED_ROOTS[kind]:
        allowed = ", ".join(sorted(_ALLOWED_ROOTS[kind]))
        return f"{kind}() cannot have class {cls!r} (allowed: {allowed})"
    return None


def _check_name(name: str) -> str | None:
    if not _NAME_RE.fullmatch(name):
        return f"fault site name {name!r} must be non-empty without blanks, ';' or '#'"
    return None


# discovery:


@dataclass(frozen=True, slots=True)
class _SiteInfo:
    name: str
    cls: str
    file: str
    line: int
    module: str
    func: str


def _default_roots() -> list[Path]:
    package = Path(__file__).resolve().parent
    roots = [package]
    tools = package.parent / "tools"
    if (tools / "__init__.py").is_file():
        roots.append(tools)
    return roots


def _module_name(rel: str) -> str:
    module = rel.removesuffix(".py").replace("/", ".")
    return module.removesuffix(".__init__")


_SCOPES: Final = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _collect(
    node: ast.AST,
    scope: str,
    calls: list[tuple[ast.Call, str]],
    imports: list[ast.Import | ast.ImportFrom],
) -> None:
    """One pass over the tree: the calls that may be sites, each with the
    qualified name of its enclosing function, and every import statement."""
    # ast.iter_child_nodes, inlined: this walk is most of the scan's time.
    for field in node._fields:
        value = getattr(node, field, None)
        children = value if isinstance(value, list) else (value,)
        for child in children:
            if not isinstance(child, ast.AST):
                continue
            if isinstance(child, _SCOPES):
                inner = f"{scope}.{child.name}" if scope else child.name
                _collect(child, inner, calls, imports)
                continue
            if isinstance(child, ast.Call):
                # ``f(...)`` may be an alias (``import ... as df``); ``x.f(...)``
                # can only be a site under the function's own name.
                func = child.func
                if isinstance(func, ast.Name) or getattr(func, "attr", None) in _DEFAULT_CLASS:
                    calls.append((child, scope))
            elif isinstance(child, ast.Import | ast.ImportFrom):
                imports.append(child)
                continue
            _collect(child, scope, calls, imports)


def _import_aliases(
    imports: Iterable[ast.Import | ast.ImportFrom], module: str, is_package: bool
) -> dict[str, str]:
    """Map each name bound by an import anywhere in the file to the dotted name it
    stands for.  Function-level imports are included: shadowing is rare enough
    that a file-wide table is the right trade for simplicity."""
    package = module if is_package else module.rpartition(".")[0]
    aliases: dict[str, str] = {}
    for node in imports:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    head = alias.name.partition(".")[0]
                    aliases[head] = head
            continue
        if node.level:
            parts = package.split(".") if package else []
            up = node.level - 1
            if up > len(parts):
                continue
            base = ".".join(parts[: len(parts) - up])
            if node.module:
                base = f"{base}.{node.module}" if base else node.module
        else:
            base = node.module or ""
        for alias in node.names:
            if alias.name != "*":
                aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif base == __name__:
                aliases.update({fn: f"{__name__}.{fn}" for fn in _DEFAULT_CLASS})
    return aliases


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return None if head is None else f"{head}.{expr.attr}"
    return None


def _fault_function(func: ast.expr, aliases: Mapping[str, str]) -> str | None:
    """Which of this module's call-site functions ``func`` refers to, if any."""
    dotted = _dotted(func)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    target = aliases.get(head)
    if target is None:
        return None
    owner, _, fn = (f"{target}.{rest}" if rest else target).rpartition(".")
    return fn if owner == __name__ and fn in _DEFAULT_CLASS else None


def _argument(node: ast.Call, position: int | None, keyword: str) -> ast.expr | None:
    if position is not None and len(node.args) > position:
        return node.args[position]
    for kw in node.keywords:
        if kw.arg == keyword:
            return kw.value
    return None


def _scan_tree(
    tree: ast.Module, file: str, module: str, is_package: bool
) -> tuple[list[_SiteInfo], list[str]]:
    """The sites in one parsed file, and the problems found with them."""
    calls: list[tuple[ast.Call, str]] = []
    imports: list[ast.Import | ast.ImportFrom] = []
    _collect(tree, "", calls, imports)
    aliases = _import_aliases(imports, module, is_package)
    sites: list[_SiteInfo] = []
    errors: list[str] = []
    for node, scope in calls:
        kind = _fault_function(node.func, aliases)
        if kind is None:
            continue
        where = f"{file}:{node.lineno}"
        name_expr = _argument(node, 0, "name")
        if not (isinstance(name_expr, ast.Constant) and isinstance(name_expr.value, str)):
            errors.append(
                f"{where}: {kind}() needs a string literal name, so that the site "
                "is known before it runs"
            )
            continue
        cls_expr = _argument(node, _CLS_POSITION.get(kind), "cls")
        if cls_expr is None:
            cls = _DEFAULT_CLASS[kind]
        elif isinstance(cls_expr, ast.Constant) and isinstance(cls_expr.value, str):
            cls = cls_expr.value
        else:
            errors.append(f"{where}: {kind}() needs a string literal cls")
            continue
        problem = _check_name(name_expr.value) or _check_class(cls, kind)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        sites.append(
            _SiteInfo(
                name=name_expr.value,
                cls=cls,
                file=file,
                line=node.lineno,
                module=module,
                func=scope or "<module>",
            )
        )
    return sites, errors


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if not any(part.startswith(".") or part == "__pycache__" for part in rel):
            yield path


def _scan(roots: Iterable[Path]) -> list[_SiteInfo]:
    """Every fault site under ``roots``; raises `FaultSiteError` listing every
    malformed or duplicate site found."""
    found: dict[str, _SiteInfo] = {}
    errors: list[str] = []
    for root in roots:
        base = root.parent
        for path in _python_files(root):
            rel = path.relative_to(base).as_posix()
            if path == _THIS_FILE:  # defines the call-site functions, places no site
                continue
            source = path.read_bytes()
            # A site names its function in the text, even when called through an
            # alias: most files can be skipped without parsing them.
            if not any(fn in source for fn in _FUNCTION_NAMES):
                continue
            try:
                tree = ast.parse(source, filename=str(path))
            except SyntaxError as exc:
                errors.append(f"{rel}:{exc.lineno}: cannot scan for fault sites: {exc.msg}")
                continue
            module = _module_name(rel)
            sites, problems = _scan_tree(tree, rel, module, path.stem == "__init__")
            errors.extend(problems)
            for info in sites:
                other = found.get(info.name)
                if other is not None:
                    errors.append(
                        f"fault site name {info.name!r} is used twice: "
                        f"{other.file}:{other.line} and {info.file}:{info.line} "
                        "(one name = one call site)"
                    )
                else:
                    found[info.name] = info
    if errors:
        raise FaultSiteError("\n".join(errors))
    return list(found.values())


# control language:


@dataclass(frozen=True, slots=True)
class _Query:
    text: str
    name: str | None = None
    cls: str | None = None
    module: str | None = None
    file: str | None = None
    func: str | None = None
    lines: tuple[int, int] | None = None
    index: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class _SetPolicy:
    text: str
    query: _Query
    policy: _Policy


@dataclass(frozen=True, slots=True)
class _Reset:
    pass


@dataclass(frozen=True, slots=True)
class _Seed:
    seed: int


_Command = _SetPolicy | _Reset | _Seed

_QUERY_KEYWORDS: Final = frozenset({"name", "class", "module", "file", "func", "line", "index"})
_MODE_WORDS: Final = frozenset({"enable", "disable", "oneshot", "frequency", "probability"})
_VALUE_ACTIONS: Final = frozenset({"frequency", "probability", "times", "delay"})
_UINT_RE: Final = re.compile(r"[0-9]+")
_RANGE_RE: Final = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def _split_commands(text: str) -> Iterator[str]:
    for line in text.splitlines():
        for part in line.partition("#")[0].split(";"):
            if part.strip():
                yield part.strip()


def _bad(command: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"dynamic_fault: {problem} in {command!r}")


def _parse_uint(command: str, keyword: str, word: str, *, minimum: int) -> int:
    if not _UINT_RE.fullmatch(word) or int(word) < minimum:
        kind = "a positive integer" if minimum > 0 else "a non-negative integer"
        raise _bad(command, f"{keyword!r} needs {kind}, got {word!r}")
    return int(word)


def _parse_float(command: str, keyword: str, word: str, low: float, high: float) -> float:
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise _bad(command, f"{keyword!r} needs a number {bounds}, got {word!r}")
    return value


def _parse_range(command: str, keyword: str, word: str) -> tuple[int, int]:
    match = _RANGE_RE.fullmatch(word)
    if match is None:
        problem = "unterminated range" if word.endswith("-") else "malformed range"
        raise _bad(command, f"{problem} {word!r} after {keyword!r} (expected N or N-M)")
    first = int(match[1])
    last = int(match[2]) if match[2] is not None else first
    if last < first:
        raise _bad(command, f"empty range {word!r} after {keyword!r}")
    return first, last


def _parse_command(command: str) -> _Command:
    words = command.split()
    if words[0] in ("reset", "seed"):
        if words[0] == "reset":
            if len(words) != 1:
                raise _bad(command, "'reset' takes no query or argument")
            return _Reset()
        if len(words) != 2:
            raise _bad(command, "'seed' takes exactly one number")
        return _Seed(_parse_uint(command, "seed", words[1], minimum=0))

    terms: dict[str, str] = {}
    query_words: list[str] = []
    actions: dict[str, str | None] = {}
    i = 0
    while i < len(words):
        word = words[i]
        takes_value = word in _QUERY_KEYWORDS or word in _VALUE_ACTIONS
        if word in ("reset", "seed"):
            raise _bad(command, f"{word!r} is a command of its own, not an action")
        if not takes_value and word not in _MODE_WORDS:
            raise _bad(command, f"unknown keyword {word!r}")
        if takes_value and i + 1 >= len(words):
            what = "a value" if word in _QUERY_KEYWORDS else "a number"
            raise _bad(command, f"{word!r} needs {what}")
        value = words[i + 1] if takes_value else None
        if word in _QUERY_KEYWORDS:
            if actions:
                raise _bad(command, f"query keyword {word!r} after an action")
            if word in terms:
                raise _bad(command, f"duplicate query keyword {word!r}")
            assert value is not None
            terms[word] = value
            query_words += (word, value)
        else:
            if word in actions:
                raise _bad(command, f"duplicate action {word!r}")
            actions[word] = value
        i += 2 if takes_value else 1

    if not actions:
        raise _bad(command, "no action (enable, disable, oneshot, frequency, probability, ...)")
    query = _parse_query(command, " ".join(query_words), terms)
    return _SetPolicy(command, query, _parse_policy(command, actions))


def _parse_query(command: str, text: str, terms: Mapping[str, str]) -> _Query:
    cls = terms.get("class")
    if cls is not None:
        if not _CLASS_RE.fullmatch(cls):
            raise _bad(command, f"malformed class {cls!r}")
        if _class_root(cls) not in CLASSES:
            raise _bad(command, f"unknown class {cls!r} (classes: {', '.join(CLASSES)})")
    line = terms.get("line")
    index = terms.get("index")
    return _Query(
        text=text,
        name=terms.get("name"),
        cls=cls,
        module=terms.get("module"),
        file=terms.get("file"),
        func=terms.get("func"),
        lines=None if line is None else _parse_range(command, "line", line),
        index=None if index is None else _parse_range(command, "index", index),
    )


def _parse_policy(command: str, actions: Mapping[str, str | None]) -> _Policy:
    modes = [word for word in actions if word in _MODE_WORDS]
    if len(modes) > 1:
        raise _bad(command, f"conflicting actions {' and '.join(repr(m) for m in modes)}")
    mode = modes[0] if modes else "enable"
    times_word = actions.get("times")
    delay_word = actions.get("delay")
    if mode == "disable" and (times_word is not None or delay_word is not None):
        raise _bad(command, "'disable' takes no 'times' or 'delay'")
    if mode == "oneshot" and times_word is not None:
        raise _bad(command, "'oneshot' fires once; it takes no 'times'")
    times = None if times_word is None else _parse_uint(command, "times", times_word, minimum=1)
    delay_ms = None
    if delay_word is not None:
        delay_ms = _parse_float(command, "delay", delay_word, 0.0, math.inf)
    value = actions.get(mode)
    if mode == "frequency":
        assert value is not None
        frequency = _parse_uint(command, "frequency", value, minimum=1)
        return _Policy(_Mode.FREQUENCY, frequency=frequency, times=times, delay_ms=delay_ms)
    if mode == "probability":
        assert value is not None
        probability = _parse_float(command, "probability", value, 0.0, 1.0)
        return _Policy(_Mode.PROBABILITY, probability=probability, times=times, delay_ms=delay_ms)
    if mode == "disable":
        return _DISABLED_POLICY
    if mode == "oneshot":
        return _Policy(_Mode.ONESHOT, delay_ms=delay_ms)
    return _Policy(_Mode.ENABLED, times=times, delay_ms=delay_ms)


def _parse(text: str) -> list[_Command]:
    return [_parse_command(command) for command in _split_commands(text)]


def _suffixes(value: str, sep: str) -> list[str]:
    parts = value.split(sep)
    return [sep.join(parts[i:]) for i in range(len(parts))]


def _matches_any(pattern: str, candidates: Iterable[str]) -> bool:
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
    return pattern in candidates


def _site_matches(query: _Query, site: _Site) -> bool:
    if query.name is not None and not _matches_any(query.name, (site.name,)):
        return False
    if query.cls is not None and not (
        site.cls == query.cls or site.cls.startswith(query.cls + ":")
    ):
        return False
    if query.module is not None and not _matches_any(query.module, _suffixes(site.module, ".")):
        return False
    if query.file is not None and not _matches_any(query.file, _suffixes(site.file, "/")):
        return False
    if query.func is not None and not _matches_any(query.func, _suffixes(site.func, ".")):
        return False
    return query.lines is None or query.lines[0] <= site.line <= query.lines[1]


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
        self._roots = _default_roots() if roots is None else [Path(r).resolve() for r in roots]
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
                infos = _scan(self._roots)
            except FaultSiteError as exc:
                self._scan_error = str(exc)
                raise
            # Nothing is registered before the scan: every registration scans first.
            for info in infos:
                self._add(info)
            self._scanned = True

    # Caller must hold the lock.
    def _add(self, info: _SiteInfo) -> _Site:
        site = _Site(
            name=info.name,
            cls=info.cls,
            file=info.file,
            line=info.line,
            module=info.module,
            func=info.func,
            lock=self._lock,
            log=self._log,
            ticks=self._ticks,
        )
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
            problem = _check_name(name) or _check_class(cls, kind)
            if problem:
                raise FaultSiteError(f"{frame.f_code.co_filename}:{frame.f_lineno}: {problem}")
            return self._add(
                _SiteInfo(
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
        problem = _check_name(name) or _check_class(cls, "register_site")
        if problem:
            raise FaultSiteError(problem)
        with self._lock:
            self._ensure_scanned()
            other = self._by_name.get(name)
            if other is not None:
                raise FaultSiteError(
                    f"fault site name {name!r} is already registered at {other.file}:{other.line}"
                )
            site = self._add(
                _SiteInfo(
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
            lines = [f"# sites:{len(sites)} armed:{armed} fired:{fired} seed:{self._seed}"]
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
        """Execute the commands in ``text`` (see the module docstring), all or none.

        Raises `InvalidArgument` for a malformed command and `NotFound` for a
        query that matches no site, before anything is changed.
        """
        commands = _parse(text)
        with self._lock:
            self._ensure_scanned()
            plan: list[tuple[_Command, list[_Site]]] = []
            for command in commands:
                matched: list[_Site] = []
                if isinstance(command, _SetPolicy):
                    matched = self._select(command.query)
                    if command.policy.delay_ms is not None and not any(
                        site.is_race for site in matched
                    ):
                        raise _bad(command.text, "'delay' applies to race sites only")
                plan.append((command, matched))
            for command, matched in plan:
                if isinstance(command, _Reset):
                    self._reset_locked()
                elif isinstance(command, _Seed):
                    self._seed_locked(command.seed)
                else:
                    for site in matched:
                        site.set_policy(command.policy, self._seed)

    # Caller must hold the lock.
    def _select(self, query: _Query) -> list[_Site]:
        matched = [site for site in self._sorted_sites() if _site_matches(query, site)]
        if query.index is not None:
            first, last = query.index
            matched = matched[first : last + 1]
        if not matched:
            what = f"{query.text!r}" if query.text else "(no sites registered)"
            raise NotFound(f"dynamic_fault: no site matches {what}")
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


async def _hold_window(site: _Site) -> None:
    delay_ms = site.delay_ms
    if delay_ms is None:
        await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(delay_ms / 1000)


def _injected_oom(site: _Site) -> OutOfMemory:
    return OutOfMemory(f"{site.name}: injected allocation failure ({site.file}:{site.line})")


def _allocate(name: str, size: int) -> bytearray:
    try:
        return bytearray(size)
    except MemoryError:
        raise OutOfMemory(f"{name}: cannot allocate {size} bytes") from None


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


def alloc_buffer(name: str, size: int, *, cls: str = "memory:buffer") -> bytearray:
    """A zeroed IO buffer of ``size`` bytes, or `OutOfMemory` if the site fires."""
    try:
        if next(_TICKS[name], True) and REGISTRY._hit(name):
            raise _injected_oom(REGISTRY._by_name[name])
    except KeyError:
        if REGISTRY._first_hit(name, cls, "alloc_buffer", sys._getframe(1)):
            raise _injected_oom(REGISTRY._by_name[name]) from None
    return _allocate(name, size)
