"""The control language of the fault registry: parsing commands into queries
and firing policies, and matching queries against sites.

`parse` turns text into commands, `Query.matches` tells whether a site matches
a query, and `fusefs.faults.FaultRegistry.control` resolves and applies the
commands.  The same language serves the control file, the ``--fault`` options
and ``$FUSEFS_FAULTS``.

Text is split into commands at ``;`` and newlines; ``#`` starts a comment.  A
command is a query followed by actions, or a standalone command::

    command    := query* action+  |  "reset"  |  "seed" INT
    query      := "name" NAME | "class" CLASS | "module" MODULE | "file" PATH
                | "func" FUNC | "line" RANGE | "index" RANGE
    action     := "enable" | "disable" | "oneshot" | "frequency" INT
                | "probability" FLOAT | "times" INT | "delay" MS ["-" MS]
    RANGE      := INT | INT "-" INT        (inclusive)

Query terms AND together; a command without any applies to every site but the
self-test ones, which only a query naming them reaches (`fusefs.faults.names_selftest`).

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
  fired instead of one checkpoint.  ``delay MIN-MAX``: a delay drawn uniformly
  from that range on each fire, from a per-site RNG seeded like
  ``probability``'s (a chaos schedule: ``class race probability 0.1 delay 0-5``).

At most one of enable/disable/oneshot/frequency/probability may be given; if
only ``times`` or ``delay`` is, the mode is ``enable``.  ``disable`` takes no
modifier, ``oneshot`` no ``times``.  ``reset`` disables every site and clears
all counters and the fire log; ``seed N`` re-seeds the probability draws.

A malformed command raises `InvalidArgument` (EINVAL), a query that matches
nothing `NotFound` (ENOENT), each with a one-line message.  Every command of a
text is parsed and resolved before any is applied, so a bad text changes
nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from fusefs.errors import InvalidArgument
from fusefs.faultscan import CLASS_RE, CLASSES, SiteInfo, class_root

__all__ = [
    "DISABLED_POLICY",
    "Command",
    "Mode",
    "Policy",
    "Query",
    "Reset",
    "Seed",
    "SetPolicy",
    "command_error",
    "parse",
]


class Mode(enum.StrEnum):
    """When a site fires; the value names the mode in the listing."""

    DISABLED = "disabled"
    ENABLED = "enabled"
    ONESHOT = "oneshot"
    FREQUENCY = "frequency"
    PROBABILITY = "probability"


@dataclass(frozen=True, slots=True)
class Policy:
    """A site's whole firing policy, as one command's actions set it."""

    mode: Mode
    frequency: int = 0
    probability: float = 0.0
    times: int | None = None
    delay_ms: float | None = None
    delay_max_ms: float | None = None  # with delay_ms, a range drawn from on each fire


DISABLED_POLICY: Final = Policy(Mode.DISABLED)


# commands:


@dataclass(frozen=True, slots=True)
class Query:
    """The sites a command applies to; terms left None match any site."""

    text: str
    name: str | None = None
    cls: str | None = None
    module: str | None = None
    file: str | None = None
    func: str | None = None
    lines: tuple[int, int] | None = None
    index: tuple[int, int] | None = None

    def matches(self, site: SiteInfo) -> bool:
        """Whether ``site`` matches every term but ``index``, which picks among
        the sites that match (`fusefs.faults.FaultRegistry` applies it)."""
        if self.name is not None and not _matches_any(self.name, (site.name,)):
            return False
        if self.cls is not None and not (
            site.cls == self.cls or site.cls.startswith(self.cls + ":")
        ):
            return False
        if self.module is not None and not _matches_any(self.module, _suffixes(site.module, ".")):
            return False
        if self.file is not None and not _matches_any(self.file, _suffixes(site.file, "/")):
            return False
        if self.func is not None and not _matches_any(self.func, _suffixes(site.func, ".")):
            return False
        return self.lines is None or self.lines[0] <= site.line <= self.lines[1]


@dataclass(frozen=True, slots=True)
class SetPolicy:
    """``query action+``: give every site the query matches this policy."""

    text: str
    query: Query
    policy: Policy


@dataclass(frozen=True, slots=True)
class Reset:
    """``reset``: disable every site, zero its counters, clear the fire log."""


@dataclass(frozen=True, slots=True)
class Seed:
    """``seed N``: re-seed the probability draws."""

    seed: int


Command = SetPolicy | Reset | Seed


# parsing:


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


def command_error(command: str, problem: str) -> InvalidArgument:
    """The error for ``command``, as every malformed command reports it."""
    return InvalidArgument(f"dynamic_fault: {problem} in {command!r}")


def _parse_uint(command: str, keyword: str, word: str, *, minimum: int) -> int:
    if not _UINT_RE.fullmatch(word) or int(word) < minimum:
        kind = "a positive integer" if minimum > 0 else "a non-negative integer"
        raise command_error(command, f"{keyword!r} needs {kind}, got {word!r}")
    return int(word)


def _parse_float(command: str, keyword: str, word: str, low: float, high: float) -> float:
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise command_error(command, f"{keyword!r} needs a number {bounds}, got {word!r}")
    return value


def _parse_range(command: str, keyword: str, word: str) -> tuple[int, int]:
    match = _RANGE_RE.fullmatch(word)
    if match is None:
        problem = "unterminated range" if word.endswith("-") else "malformed range"
        raise command_error(command, f"{problem} {word!r} after {keyword!r} (expected N or N-M)")
    first = int(match[1])
    last = int(match[2]) if match[2] is not None else first
    if last < first:
        raise command_error(command, f"empty range {word!r} after {keyword!r}")
    return first, last


def _parse_command(command: str) -> Command:
    words = command.split()
    if words[0] in ("reset", "seed"):
        if words[0] == "reset":
            if len(words) != 1:
                raise command_error(command, "'reset' takes no query or argument")
            return Reset()
        if len(words) != 2:
            raise command_error(command, "'seed' takes exactly one number")
        return Seed(_parse_uint(command, "seed", words[1], minimum=0))

    terms: dict[str, str] = {}
    query_words: list[str] = []
    actions: dict[str, str | None] = {}
    i = 0
    while i < len(words):
        word = words[i]
        takes_value = word in _QUERY_KEYWORDS or word in _VALUE_ACTIONS
        if word in ("reset", "seed"):
            raise command_error(command, f"{word!r} is a command of its own, not an action")
        if not takes_value and word not in _MODE_WORDS:
            raise command_error(command, f"unknown keyword {word!r}")
        if takes_value and i + 1 >= len(words):
            what = "a value" if word in _QUERY_KEYWORDS else "a number"
            raise command_error(command, f"{word!r} needs {what}")
        value = words[i + 1] if takes_value else None
        if word in _QUERY_KEYWORDS:
            if actions:
                raise command_error(command, f"query keyword {word!r} after an action")
            if word in terms:
                raise command_error(command, f"duplicate query keyword {word!r}")
            assert value is not None
            terms[word] = value
            query_words += (word, value)
        else:
            if word in actions:
                raise command_error(command, f"duplicate action {word!r}")
            actions[word] = value
        i += 2 if takes_value else 1

    if not actions:
        raise command_error(
            command, "no action (enable, disable, oneshot, frequency, probability, ...)"
        )
    query = _parse_query(command, " ".join(query_words), terms)
    return SetPolicy(command, query, _parse_policy(command, actions))


def _parse_query(command: str, text: str, terms: Mapping[str, str]) -> Query:
    cls = terms.get("class")
    if cls is not None:
        if not CLASS_RE.fullmatch(cls):
            raise command_error(command, f"malformed class {cls!r}")
        if class_root(cls) not in CLASSES:
            raise command_error(command, f"unknown class {cls!r} (classes: {', '.join(CLASSES)})")
    line = terms.get("line")
    index = terms.get("index")
    return Query(
        text=text,
        name=terms.get("name"),
        cls=cls,
        module=terms.get("module"),
        file=terms.get("file"),
        func=terms.get("func"),
        lines=None if line is None else _parse_range(command, "line", line),
        index=None if index is None else _parse_range(command, "index", index),
    )


def _parse_policy(command: str, actions: Mapping[str, str | None]) -> Policy:
    modes = [word for word in actions if word in _MODE_WORDS]
    if len(modes) > 1:
        raise command_error(command, f"conflicting actions {' and '.join(repr(m) for m in modes)}")
    mode = modes[0] if modes else "enable"
    times_word = actions.get("times")
    delay_word = actions.get("delay")
    if mode == "disable" and (times_word is not None or delay_word is not None):
        raise command_error(command, "'disable' takes no 'times' or 'delay'")
    if mode == "oneshot" and times_word is not None:
        raise command_error(command, "'oneshot' fires once; it takes no 'times'")
    times = None if times_word is None else _parse_uint(command, "times", times_word, minimum=1)
    delay_ms = delay_max_ms = None
    if delay_word is not None:
        low, dash, high = delay_word.partition("-")
        delay_ms = _parse_float(command, "delay", low, 0.0, math.inf)
        if dash:
            delay_max_ms = _parse_float(command, "delay", high, delay_ms, math.inf)
    value = actions.get(mode)
    if mode == "disable":
        return DISABLED_POLICY
    policy = Policy(Mode.ENABLED, times=times, delay_ms=delay_ms, delay_max_ms=delay_max_ms)
    if mode == "frequency":
        assert value is not None
        frequency = _parse_uint(command, "frequency", value, minimum=1)
        return dataclasses.replace(policy, mode=Mode.FREQUENCY, frequency=frequency)
    if mode == "probability":
        assert value is not None
        probability = _parse_float(command, "probability", value, 0.0, 1.0)
        return dataclasses.replace(policy, mode=Mode.PROBABILITY, probability=probability)
    if mode == "oneshot":
        return dataclasses.replace(policy, mode=Mode.ONESHOT)
    return policy


def parse(text: str) -> list[Command]:
    """Every command in ``text``; raises `InvalidArgument` at the first bad one."""
    return [_parse_command(command) for command in _split_commands(text)]


# matching:


def _suffixes(value: str, sep: str) -> list[str]:
    parts = value.split(sep)
    return [sep.join(parts[i:]) for i in range(len(parts))]


def _matches_any(pattern: str, candidates: Iterable[str]) -> bool:
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
    return pattern in candidates
