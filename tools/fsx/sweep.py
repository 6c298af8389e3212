"""``fusefs-fsx --seeds A-B``: one fsx run per seed, and a report of them all.

Each seed is a whole ``fusefs-fsx`` run with ``-S SEED`` and its own log
directory (``-P DIR/seed-SEED``), one after the other on the same file; the
sweep's report is ``DIR/sweep.json`` and ``DIR/sweep.md``: per seed, passed
(exit 0) or failed (exit 1, the filesystem disagreed with the model), its time,
and the command that replays it.  ``--shard K/N`` runs every N-th share of the
seeds (tools/sharding.py; every seed is expected to cost the same) and
``fusefs-fsx merge DIR...`` folds the shards' ``sweep.json`` into the sweep's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from tools.sharding import (
    EXIT_MERGE_REFUSED,
    MergeError,
    Shard,
    load_shards,
    merge_runs,
    merged_section,
    parse_merge_args,
    partition,
    plan_id,
    shard_section,
    without_options,
)

KIND: Final = "fsx-sweep"
_SWEEP_OPTS: Final = ("--seeds", "--shard", "-S", "-P")
"""Options the sweep sets for each seed itself, or that only the sweep has."""
_OUTCOMES: Final = {0: "passed", 1: "failed"}


def parse_seeds(text: str) -> list[int]:
    """``A-B`` (inclusive), ``A``, or a comma-separated list of both."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise ValueError(f"--seeds wants A-B, A or a list of them, got {text!r}") from None
        if a < 1 or b < a:
            raise ValueError(f"--seeds {part}: seeds start at 1 and A-B needs A <= B")
        seeds += range(a, b + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text}: a seed given twice")
    return seeds


def run_sweep(
    args: argparse.Namespace, argv: Sequence[str], run: Callable[[list[str]], int]
) -> int:
    """Run the seeds of ``args.seeds`` (this shard's, with ``--shard``) through
    ``run`` (the single-seed command); write the report; the exit status."""
    try:
        seeds = parse_seeds(args.seeds)
        shard = Shard.parse(args.shard) if args.shard else None
    except ValueError as e:
        print(f"fusefs-fsx: {e}", file=sys.stderr)
        return 2
    base = without_options(argv, _SWEEP_OPTS)
    ids = [f"seed {s}" for s in seeds]
    costs = [1] * len(seeds)  # same flags, same op count: the same expected cost
    plan = plan_id({"argv": base}, ids)
    mine = list(range(len(seeds)))
    if shard is not None:
        mine = partition(costs, shard.count)[shard.index - 1]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now().isoformat(timespec="seconds")
    start = time.monotonic()
    runs: list[dict[str, Any]] = []
    for i in mine:
        seed = seeds[i]
        seed_dir = log_dir / f"seed-{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        one = [*base, "-S", str(seed), "-P", str(seed_dir)]
        if not args.quiet:
            print(f"fsx sweep: seed {seed} ({len(runs) + 1} of {len(mine)})", flush=True)
        t0 = time.monotonic()
        status = run(one)
        if status not in _OUTCOMES:  # bad usage is the same for every seed: stop
            return status
        runs.append(
            {
                "id": ids[i],
                "seed": seed,
                "outcome": _OUTCOMES[status],
                "exit": status,
                "seconds": round(time.monotonic() - t0, 2),
                "log_dir": str(seed_dir),
                "reproducer": "fusefs-fsx " + shlex.join(one),
            }
        )
        sys.stdout.flush()
    doc: dict[str, Any] = {
        "kind": KIND,
        "plan_id": plan,
        "started": started,
        "seconds": round(time.monotonic() - start, 1),
        "argv": base,
        "seeds": seeds,
        "runs": runs,
        "counts": _counts(runs),
        "shard": None if shard is None else shard_section(shard, plan, ids, costs, mine),
    }
    write_report(doc, log_dir)
    for line in summary_lines(doc):
        print(line)
    return 1 if doc["counts"]["failed"] else 0


def _counts(runs: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {o: sum(1 for r in runs if r["outcome"] == o) for o in _OUTCOMES.values()}


def summary_lines(doc: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in doc["counts"].items())
    out = [f"fsx sweep: {len(doc['runs'])} seed(s): {counts}"]
    out += [f"  failed: {r['id']}: {r['reproducer']}" for r in doc["runs"] if r["exit"]]
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# fusefs-fsx seed sweep",
        "",
        f"Started {doc['started']}, {doc['seconds']:.0f} s; "
        f"`fusefs-fsx {shlex.join(doc['argv'])}` for {len(doc['seeds'])} seeds.",
    ]
    if doc.get("shard"):
        s = doc["shard"]
        lines.append(f"Shard {s['index']}/{s['count']}: {len(s['assigned'])} seeds.")
    if doc.get("merged"):
        lines.append(f"Merged from {doc['merged']['count']} shards.")
    lines += ["", "| seed | outcome | seconds |", "| ---: | --- | ---: |"]
    lines += [f"| {r['seed']} | {r['outcome']} | {r['seconds']:.1f} |" for r in doc["runs"]]
    failing = [r for r in doc["runs"] if r["exit"]]
    if failing:
        lines += ["", "## Reproducers", ""]
        lines += [
            f"- seed {r['seed']}: `{r['reproducer']}` (logs `{r['log_dir']}`)" for r in failing
        ]
    return "\n".join(lines) + "\n"


def write_report(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "sweep.md").write_text(render_markdown(doc))


def outcome_table(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What a merged sweep shares with the unsharded one, seed by seed."""
    return [(r["id"], r["outcome"]) for r in doc["runs"]]


def merge_main(argv: Sequence[str]) -> int:
    args = parse_merge_args(
        "fusefs-fsx",
        "Fold the reports of --seeds A-B --shard K/N runs (each shard's -P) into the sweep's.",
        "sweep.json",
        argv,
    )
    try:
        shards = load_shards(args.dirs, "sweep.json", KIND)
        runs, not_run = merge_runs(shards, lambda d: d["runs"], lambda r: str(r["id"]))
    except MergeError as e:
        print(f"fusefs-fsx {e}", file=sys.stderr)
        return EXIT_MERGE_REFUSED
    doc = dict(shards[0])
    doc.update(
        started=min(s["started"] for s in shards),
        seconds=max(s["seconds"] for s in shards),
        runs=runs,
        counts=_counts(runs),
        not_run=not_run,
        shard=None,
        merged=merged_section(shards, args.dirs),
    )
    write_report(doc, args.out)
    if not args.quiet:
        for line in summary_lines(doc):
            print(line)
        print(f"reports: {args.out / 'sweep.md'} {args.out / 'sweep.json'}")
    return 1 if doc["counts"]["failed"] else 0


__all__ = [
    "KIND",
    "merge_main",
    "outcome_table",
    "parse_seeds",
    "render_markdown",
    "run_sweep",
]
