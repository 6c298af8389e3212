"""Splitting a run list over machines, and folding the shards' reports back.

A fault campaign and an fsx seed sweep are both an ordered list of independent
runs, each with an id and an expected cost.  ``--shard K/N`` runs one slice of
that list; any scheduler that can start N copies of a command with a different
K (a CI matrix, a Kubernetes Indexed Job, a Slurm job array) then runs the
whole list, and ``merge`` folds the N reports into the one the unsharded run
would have written.

No shard talks to another, so each must compute the same partition from the
same inputs.  `partition` is greedy longest-processing-time: runs by expected
cost, dearest first (ties: earlier in the list first), each to the shard with
the least cost so far (ties: the lower shard number).  Costs are integers
(milliseconds) so no floating-point rounding can make two machines disagree.
LPT is within 4/3 of the best makespan; with costs that are only estimates,
better is not worth having.

Each shard's report carries a ``shard`` section: its number, the shard count,
the *plan id* (a hash of the configuration that decides the runs and their
outcomes, and of the ordered run ids) and the *fingerprint* (the plan id and N).
``merge`` refuses shards whose fingerprints differ, and reports a missing or
duplicated shard, each in one line with exit status 2 (`MergeError`).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

EXIT_MERGE_REFUSED: Final = 2

_SHARD_RE: Final = re.compile(r"^([0-9]+)/([0-9]+)$")


class MergeError(Exception):
    """Shards that cannot be merged; the message is one line."""


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``, numbered from 1 (``--shard 1/4`` .. ``4/4``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = _SHARD_RE.match(text.strip())
        if not m:
            raise ValueError(f"--shard wants K/N (shard K of N, from 1), got {text!r}")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or not 1 <= index <= count:
            raise ValueError(f"--shard {text}: K must be between 1 and N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def partition(costs: Sequence[int], count: int) -> list[list[int]]:
    """The positions of ``costs`` each of ``count`` shards runs, each list in
    run-list order: every position in exactly one shard, balanced by cost (LPT)."""
    if count < 1:
        raise ValueError("at least one shard")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0, s) for s in range(count)]  # a heap of (cost so far, shard)
    shards: list[list[int]] = [[] for _ in range(count)]
    for i in order:
        load, s = heapq.heappop(loads)
        shards[s].append(i)
        heapq.heappush(loads, (load + costs[i], s))
    return [sorted(positions) for positions in shards]


def parse_merge_args(
    prog: str, description: str, report: str, argv: Sequence[str]
) -> argparse.Namespace:
    """The arguments every ``merge`` command takes: the shards' directories (or
    their ``report`` files), ``--out`` (default ``./PROG-merged-TIME``), ``-q``."""
    p = argparse.ArgumentParser(prog=f"{prog} merge", description=description)
    p.add_argument("dirs", nargs="+", metavar="DIR", help=f"a shard's directory, or its {report}")
    p.add_argument("--out", help="the merged report's directory (default ./NAME-merged-TIME)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    args = p.parse_args(list(argv))
    name = prog.removeprefix("fusefs-")
    args.out = Path(args.out or datetime.now().strftime(f"{name}-merged-%Y%m%d-%H%M%S")).resolve()
    return args


def without_options(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """``argv`` less each of ``options`` (each taking a value) in any spelling:
    ``--opt V``, ``--opt=V``, and for a short option ``-oV``.  For the command
    line a shard's report shows the campaign by, and the one a sweep gives each
    seed."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(
            arg.startswith(o + "=") or (len(o) == 2 and arg.startswith(o) and len(arg) > 2)
            for o in options
        ):
            out.append(arg)
    return out


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_id(config: Mapping[str, Any], run_ids: Sequence[str]) -> str:
    """What makes two runs of a campaign the same campaign: the configuration
    that decides the runs and their outcomes, and the run list in order."""
    return _digest({"config": config, "runs": list(run_ids)})


def fingerprint(plan: str, count: int) -> str:
    """The plan and the number of shards it was split into."""
    return _digest({"plan": plan, "shards": count})


def shard_section(
    shard: Shard, plan: str, run_ids: Sequence[str], costs: Sequence[int], mine: Sequence[int]
) -> dict[str, Any]:
    """The ``shard`` section of a shard's report."""
    return {
        "index": shard.index,
        "count": shard.count,
        "plan_id": plan,
        "fingerprint": fingerprint(plan, shard.count),
        "plan_runs": list(run_ids),
        "assigned": [run_ids[i] for i in mine],
        "expected_ms": sum(costs[i] for i in mine),
        "plan_expected_ms": sum(costs),
    }


def load_shards(paths: Sequence[str | Path], filename: str, kind: str) -> list[dict[str, Any]]:
    """The shard reports under ``paths`` (directories holding ``filename``, or
    the files), checked to be every shard of one plan exactly once; sorted by
    shard number.  Raises `MergeError` with a one-line reason."""
    if not paths:
        raise MergeError("merge: no shard directories given")
    docs: list[tuple[Path, dict[str, Any]]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            path = path / filename
        try:
            doc = json.loads(path.read_text())
        except OSError as e:
            raise MergeError(f"merge: {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise MergeError(f"merge: {path}: not JSON ({e.msg})") from None
        if doc.get("kind", kind) != kind:
            raise MergeError(f"merge: {path}: a {doc.get('kind')} report, not a {kind} report")
        if not isinstance(doc.get("shard"), dict):
            raise MergeError(f"merge: {path}: not a shard's report (run with --shard K/N)")
        docs.append((path, doc))
    first_path, first = docs[0]
    want = first["shard"]["fingerprint"]
    count = first["shard"]["count"]
    for path, doc in docs[1:]:
        if doc["shard"]["fingerprint"] != want:
            raise MergeError(
                f"merge: {path} is a shard of another {kind} than {first_path} "
                f"(fingerprint {doc['shard']['fingerprint']} of {doc['shard']['count']} shards, "
                f"not {want} of {count})"
            )
    seen: dict[int, Path] = {}
    for path, doc in docs:
        index = doc["shard"]["index"]
        if index in seen:
            raise MergeError(f"merge: duplicate shard {index}/{count}: {seen[index]} and {path}")
        seen[index] = path
    missing = [str(k) for k in range(1, count + 1) if k not in seen]
    if missing:
        raise MergeError(
            f"merge: missing shard(s) {', '.join(missing)} of {count} "
            f"(have {', '.join(str(k) for k in sorted(seen))})"
        )
    return [doc for _, doc in sorted(docs, key=lambda pd: int(pd[1]["shard"]["index"]))]


def merge_runs(
    shards: Sequence[dict[str, Any]],
    runs_of: Callable[[dict[str, Any]], Sequence[dict[str, Any]]],
    run_id: Callable[[dict[str, Any]], str],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every shard's runs in the plan's order, and the plan's ids no shard ran
    (left out by a budget or an interrupt).  A run reported by two shards, or
    one that is not in the plan, raises `MergeError`."""
    order = shards[0]["shard"]["plan_runs"]
    position = {rid: i for i, rid in enumerate(order)}
    found: dict[str, dict[str, Any]] = {}
    for doc in shards:
        for run in runs_of(doc):
            rid = run_id(run)
            if rid not in position:
                raise MergeError(f"merge: shard {doc['shard']['index']} ran {rid!r}, not planned")
            if rid in found:
                raise MergeError(f"merge: {rid!r} was run by two shards")
            found[rid] = run
    runs = [found[rid] for rid in order if rid in found]
    return runs, [rid for rid in order if rid not in found]


def merged_section(shards: Sequence[dict[str, Any]], paths: Sequence[str]) -> dict[str, Any]:
    """What a merged report says of the shards it came from."""
    first = shards[0]["shard"]
    return {
        "plan_id": first["plan_id"],
        "fingerprint": first["fingerprint"],
        "count": first["count"],
        "shards": [
            {
                "index": doc["shard"]["index"],
                "seconds": doc.get("seconds"),
                "runs": len(doc["shard"]["assigned"]),
                "expected_ms": doc["shard"]["expected_ms"],
            }
            for doc in shards
        ],
        "from": list(paths),
    }


__all__ = [
    "EXIT_MERGE_REFUSED",
    "MergeError",
    "Shard",
    "fingerprint",
    "load_shards",
    "merge_runs",
    "merged_section",
    "parse_merge_args",
    "partition",
    "plan_id",
    "shard_section",
    "without_options",
]
