"""The campaign report: Markdown from the JSON matrix, and a short summary.

Both read only the JSON document (`tools.campaign.cli.Campaign.to_json`), so a
report can be rendered again from ``matrix.json`` alone.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

_OUTCOMES: Final = ("clean", "not reached", "crash", "hang", "corruption", "fsck error")
_FAILURES: Final = ("crash", "hang", "corruption", "fsck error")

OUTCOME_FIELDS: Final = ("kind", "site", "mode", "outcome")
"""The fields of a run that the outcome table holds, and that a merged report
must share with the unsharded run's, run by run: a run's timing, fire and error
counts, notes and directory may differ between two runs of one campaign."""


def outcome_counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    counter = Counter(r["outcome"] for r in runs)
    return {o: counter.get(o, 0) for o in _OUTCOMES}


def outcome_matrix(
    sites: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> dict[str, dict[str, str]]:
    """Site -> mode -> outcome."""
    return {
        s["name"]: {r["mode"]: r["outcome"] for r in runs if r["site"] == s["name"]} for s in sites
    }


def outcome_table(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every run of a report in order -- fault runs, then power cuts -- as its
    `OUTCOME_FIELDS`."""
    return [
        tuple(str(r[f]) for f in OUTCOME_FIELDS) for r in [*doc["runs"], *doc["powercut"]["runs"]]
    ]


def _cell(run: dict[str, Any]) -> str:
    text = run["outcome"]
    if run["outcome"] in _FAILURES:
        text = f"**{text}**"
    extra = []
    if run["fired"]:
        extra.append(f"fired {run['fired']}")
    if run["errors"]:
        extra.append(", ".join(f"{v} {k}" for k, v in sorted(run["errors"].items())))
    return f"{text} ({'; '.join(extra)})" if extra else text


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _counts_table(counts: dict[str, int]) -> list[str]:
    lines = ["| outcome | runs |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines.append(f"| **total** | {sum(counts.values())} |")
    return lines


def _reproducers(runs: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for r in runs:
        if not r["reproducer"]:
            continue
        lines += ["", f"### {r['site']} x {r['mode']}: {r['outcome']}", ""]
        if r["detail"]:
            lines += [_esc(r["detail"]), ""]
        lines.append("```sh")
        repro = r["reproducer"]
        lines.append(repro["command"])
        for key, value in repro.items():
            if key != "command":
                lines.append(f"# {key}: {value}")
        lines += ["```", f"Run directory: `{r['workdir']}`"]
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    per_class = ", ".join(f"{k} {v}" for k, v in doc["sites_per_class"].items())
    lines = [
        "# fusefs fault campaign",
        "",
        f"Started {doc['started']}, {doc['seconds']:.0f} s; seed {doc['seed']}; "
        f"workloads {', '.join(doc['workloads'])}.",
        f"Command: `fusefs-campaign {' '.join(doc['argv'])}`",
    ]
    if doc["sites_total"]:
        lines.append(f"Sites in the code: {doc['sites_total']} ({per_class}).")
    shard = doc.get("shard")
    if shard:
        lines.append(
            f"Shard {shard['index']}/{shard['count']} of plan {shard['plan_id']}: "
            f"{len(shard['assigned'])} of {len(shard['plan_runs'])} runs "
            f"(`fusefs-campaign merge` folds the shards)."
        )
    merged = doc.get("merged")
    if merged:
        each = ", ".join(
            f"{s['index']}: {s['runs']} runs, {s['seconds']:.0f} s" for s in merged["shards"]
        )
        lines.append(f"Merged from {merged['count']} shards of plan {merged['plan_id']} ({each}).")
    if doc["budget_exhausted"]:
        lines.append(f"**Time budget exhausted**: not run: {', '.join(doc['skipped'])}.")
    runs = doc["runs"]
    if runs or doc["sites"]:
        modes = doc["modes"]
        lines += ["", "## Fault sites", "", *_counts_table(doc["counts"]), ""]
        lines.append("| site | class | " + " | ".join(modes) + " |")
        lines.append("| --- | --- |" + " --- |" * len(modes))
        by_key = {(r["site"], r["mode"]): r for r in runs}
        for site in doc["sites"]:
            cells = []
            for mode in modes:
                run = by_key.get((site["name"], mode))
                cells.append(_cell(run) if run else "not run")
            lines.append(f"| `{site['name']}` | {site['class']} | " + " | ".join(cells) + " |")
    pc = doc["powercut"]
    if pc["runs"]:
        events = pc["workload_events"]
        over = f" over {events} device writes and flushes" if events else ""
        lines += ["", "## Power cuts", "", f"{len(pc['runs'])} cut point(s){over}.", ""]
        lines += _counts_table(pc["counts"])
        lines += ["", "| cut | mode | outcome | notes |", "| --- | --- | --- | --- |"]
        for r in pc["runs"]:
            note = r["detail"] or "; ".join(r["notes"][:1])
            lines.append(f"| {r['site']} | {r['mode']} | {_cell(r)} | {_esc(note)} |")
    failing = [r for r in [*runs, *pc["runs"]] if r["reproducer"]]
    if failing:
        lines += ["", "## Reproducers", *_reproducers(failing)]
    return "\n".join(lines) + "\n"


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A few lines for a terminal: counts per outcome, failures, coverage gaps."""
    out = []
    if doc["runs"]:
        counts = ", ".join(f"{k} {v}" for k, v in doc["counts"].items() if v)
        out.append(f"fault campaign: {len(doc['runs'])} run(s): {counts or 'none'}")
        gaps = sorted({r["site"] for r in doc["runs"] if r["outcome"] == "not reached"})
        if gaps:
            out.append(f"  not reached: {', '.join(gaps)}")
    pc = doc["powercut"]
    if pc["runs"]:
        counts = ", ".join(f"{k} {v}" for k, v in pc["counts"].items() if v)
        out.append(f"power cuts: {len(pc['runs'])} cut point(s): {counts}")
    for r in [*doc["runs"], *pc["runs"]]:
        if r["outcome"] in _FAILURES:
            out.append(f"  {r['outcome']}: {r['site']} x {r['mode']}: {r['detail']}")
            if r["reproducer"]:
                out.append(f"    replay: {r['reproducer']['command']}")
    if doc["budget_exhausted"]:
        out.append(f"time budget exhausted; not run: {len(doc['skipped'])}")
    return out


__all__ = [
    "OUTCOME_FIELDS",
    "outcome_counts",
    "outcome_matrix",
    "outcome_table",
    "render_markdown",
    "summary_lines",
]
