"""``fusefs-campaign merge``: fold shards' reports into the campaign's, and
``fusefs-campaign compare``: do two reports have the same outcome table.

The merged ``matrix.json`` has the unsharded run's shape and its runs in the
unsharded run's order (the plan's, which every shard records), with counts and
the site matrix computed again from them; ``seconds`` is the slowest shard's
(the wall time when the shards ran side by side) and a ``merged`` section lists
each shard's time and run count.  What two reports of one campaign must share
is the outcome table (`tools.campaign.report.outcome_table`): run ids, order
and outcomes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.campaign.plan import run_id
from tools.campaign.report import (
    OUTCOME_FIELDS,
    outcome_counts,
    outcome_matrix,
    outcome_table,
    render_markdown,
    summary_lines,
)
from tools.campaign.run import FAILURES
from tools.sharding import (
    EXIT_MERGE_REFUSED,
    MergeError,
    load_shards,
    merge_runs,
    merged_section,
    parse_merge_args,
    without_options,
)


def merge_reports(shards: Sequence[dict[str, Any]], paths: Sequence[str]) -> dict[str, Any]:
    """The campaign's report from every shard's (as `load_shards` returns them)."""

    def planned(doc: dict[str, Any]) -> list[dict[str, Any]]:
        # A failed counting run is reported as a power cut "count": no planned run.
        return [r for r in [*doc["runs"], *doc["powercut"]["runs"]] if r["site"] != "count"]

    runs, not_run = merge_runs(shards, planned, run_id)
    doc = copy.deepcopy(shards[0])
    faults = [r for r in runs if r["kind"] == "fault"]
    cuts = [r for r in runs if r["kind"] == "powercut"]
    counting = [r for s in shards[:1] for r in s["powercut"]["runs"] if r["site"] == "count"]
    doc["started"] = min(s["started"] for s in shards)
    doc["seconds"] = max(s["seconds"] for s in shards)
    doc["argv"] = without_options(doc["argv"], ("--shard", "--out"))
    doc["runs"] = faults
    doc["counts"] = outcome_counts(faults)
    doc["matrix"] = outcome_matrix(doc["sites"], faults)
    doc["powercut"]["runs"] = [*counting, *cuts]
    doc["powercut"]["counts"] = outcome_counts([*counting, *cuts])
    doc["skipped"] = not_run
    doc["budget_exhausted"] = any(s["budget_exhausted"] for s in shards)
    doc["interrupted"] = any(s["interrupted"] for s in shards)
    doc["shard"] = None
    doc["merged"] = merged_section(shards, paths)
    return doc


def write_merged(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "matrix.json"
    md_path = out / "matrix.md"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path.write_text(render_markdown(doc))
    return json_path, md_path


def table_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two reports' outcome tables differ, one line each (empty: equal)."""
    ta, tb = outcome_table(a), outcome_table(b)
    out = []
    if a.get("plan_id") != b.get("plan_id"):
        out.append(f"plan ids differ: {a.get('plan_id')} and {b.get('plan_id')}")
    for i in range(max(len(ta), len(tb))):
        ra = ta[i] if i < len(ta) else None
        rb = tb[i] if i < len(tb) else None
        if ra != rb:
            out.append(f"run {i + 1}: {ra} != {rb}")
    return out


def _load(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "matrix.json"
    try:
        doc: dict[str, Any] = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"compare: {p}: {e}") from None
    return doc


def merge_main(argv: Sequence[str]) -> int:
    args = parse_merge_args(
        "fusefs-campaign",
        "Fold the reports of --shard K/N runs (each shard's --out) into the campaign's.",
        "matrix.json",
        argv,
    )
    try:
        shards = load_shards(args.dirs, "matrix.json", "campaign")
        doc = merge_reports(shards, args.dirs)
    except MergeError as e:
        print(f"fusefs-campaign {e}", file=sys.stderr)
        return EXIT_MERGE_REFUSED
    json_path, md_path = write_merged(doc, args.out)
    if not args.quiet:
        print(f"merged {len(shards)} shards: {len(outcome_table(doc))} runs")
        for line in summary_lines(doc):
            print(line)
        print(f"reports: {md_path} {json_path}")
    failed = any(r["outcome"] in FAILURES for r in [*doc["runs"], *doc["powercut"]["runs"]])
    return 1 if failed else 0


def compare_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fusefs-campaign compare",
        description="Exit 0 when two reports have the same outcome table (run ids, order and "
        f"{', '.join(OUTCOME_FIELDS)}), else list the differences and exit 1.",
    )
    p.add_argument("a", metavar="A", help="a report directory or matrix.json")
    p.add_argument("b", metavar="B")
    args = p.parse_args(list(argv))
    try:
        a, b = _load(args.a), _load(args.b)
    except MergeError as e:
        print(f"fusefs-campaign {e}", file=sys.stderr)
        return EXIT_MERGE_REFUSED
    diffs = table_differences(a, b)
    for line in diffs:
        print(line)
    if not diffs:
        print(f"same outcome table: {len(outcome_table(a))} runs")
    return 1 if diffs else 0


__all__ = ["compare_main", "merge_main", "merge_reports", "table_differences", "write_merged"]
