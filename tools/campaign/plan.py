"""A campaign's run list: every fault run and every power cut, in order, each
with an id and an expected cost, and what identifies the campaign.

The order is the report's: the sites in listing order, each in every mode in
the order given, then the cut points in increasing order.  ``--shard K/N``
(tools/sharding.py) splits this list by the expected costs below, so every
shard must build the same list: the sites come from the code (each shard lists
them from a freshly mounted image), the cut points from a counting run of the
power-cut workload, which makes the same number of device writes and flushes
from run to run on an idle machine (325 for ``--ops 120`` here, three runs
out of three) but may not under ``--pressure`` or heavy load.  The plan id
covers the run ids, so shards whose counting runs disagreed are refused by
``merge`` rather than folded into a report that matches no single run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tools.campaign.mount import SiteInfo
from tools.campaign.run import RunConfig, RunResult

FULL_MODES: Final = ("oneshot", "frequency 3", "probability 0.05")
"""The three modes a fault site runs in under ``--full``."""

# Expected costs, in milliseconds, measured on this 2-core machine with the
# default flags (--ops 120 --cycles 3): a fault run with fsx,meta,cycle takes
# about 4 s, a power cut 1.2 s plus the share of the workload it ran before
# the cut (0.6 s for all of it).  Only the ratios matter to the partition.
_RUN_BASE_MS: Final = 1500  # mkfs, mount, umount, fsck, the verifying remount
_CYCLE_MS: Final = 500  # one mount, write, fsync, umount of the cycle workload
# metaheavy and space are taken as meta and data cost (not measured apart).
_OP_MS: Final = {"fsx": 6.0, "data": 3.0, "meta": 3.0, "metaheavy": 3.0, "space": 3.0}
_CUT_BASE_MS: Final = 1100  # mkfs, mount, detach, fsck, recovery mount, verify
_CUT_OP_MS: Final = 3.0  # per op of the power-cut workload (data ops + meta ops/2)


@dataclass(frozen=True)
class PlannedRun:
    id: str
    kind: str  # "fault" or "powercut"
    cost_ms: int
    job: Callable[[], RunResult]


def fault_run_id(site: str, mode: str) -> str:
    return f"{site} x {mode}"


def powercut_run_id(at: int, mode: str) -> str:
    return f"cut@{at} {mode}"


def run_id(run: dict[str, Any]) -> str:
    """A report's run (``RunResult.to_json``) as the plan names it."""
    if run["kind"] == "fault":
        return fault_run_id(run["site"], run["mode"])
    return f"{run['site']} {run['mode']}"


def fault_cost(cfg: RunConfig) -> int:
    cost = _RUN_BASE_MS + sum(_OP_MS.get(w, 0.0) * cfg.ops for w in cfg.workloads)
    if "cycle" in cfg.workloads:
        cost += _CYCLE_MS * cfg.cycles
    return int(cost)


def powercut_cost(cfg: RunConfig, at: int, events: int | None) -> int:
    """A cut ends the workload: a late cut runs more of it than an early one.
    Without a counting run (``--power-cut-at``) the cut is taken as halfway."""
    share = 0.5 if not events else min(1.0, at / events)
    workload = _CUT_OP_MS * (cfg.ops + cfg.ops // 2)
    return int(_CUT_BASE_MS + workload * share)


def plan_config(args: argparse.Namespace, sites: Sequence[SiteInfo]) -> dict[str, Any]:
    """The flags that decide which runs there are and what their outcomes can
    be, and the selected sites' locations (two checkouts whose sites moved are
    not the same campaign).  Not in it: where the report goes, how many runs
    go at once, the budget, what is kept, progress output."""
    return {
        "seed": args.seed,
        "modes": list(args.mode),
        "workloads": [w for item in args.workload for w in item.split(",") if w],
        "ops": args.ops,
        "cycles": args.cycles,
        "size": args.size,
        "timeout": args.timeout,
        "faults": list(args.fault),
        "pressure": args.pressure,
        "pressure_interval": args.pressure_interval,
        "chaos": args.chaos,
        "chaos_delay": args.chaos_delay,
        "power_cut": args.power_cut,
        "power_cut_at": sorted(set(args.power_cut_at)),
        "power_cut_mode": args.power_cut_mode,
        "power_cut_on": args.power_cut_on,
        "sites": [f"{s.name} {s.cls} {s.file}:{s.line}" for s in sites],
    }


# plan files:


def write_plan(
    path: Path,
    argv: Sequence[str],
    plan: str,
    planned: Sequence[PlannedRun],
    requested: int | str,
    events: int | None,
    counting_failed: list[dict[str, Any]],
) -> None:
    """``fusefs-campaign plan``: the run list, for shards that must not each run
    a counting run of their own."""
    cuts = [r.id.removeprefix("cut@").split(" ", 1) for r in planned if r.kind == "powercut"]
    doc = {
        "kind": "campaign-plan",
        "plan_id": plan,
        "argv": list(argv),
        "runs": [r.id for r in planned],
        "expected_ms": [r.cost_ms for r in planned],
        "powercut": {
            "requested": requested,
            "workload_events": events,
            "points": [[int(p), m] for p, m in cuts],
            "counting_failed": counting_failed,
        },
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def load_plan(path: str) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"fusefs-campaign: --plan {path}: {e}") from None
    if doc.get("kind") != "campaign-plan":
        raise SystemExit(f"fusefs-campaign: --plan {path}: not a plan (fusefs-campaign plan)")
    if doc["powercut"]["counting_failed"]:
        raise SystemExit(f"fusefs-campaign: --plan {path}: its counting run failed; plan again")
    return doc


_PLAN_LOCAL: Final = frozenset({"--shard", "--out", "-j", "--jobs", "--budget"})
_PLAN_LOCAL_FLAGS: Final = frozenset({"--keep", "--no-minimize", "-q", "--quiet"})


def plan_argv(raw: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``--plan FILE`` and the options of this machine beside it (ValueError
    for any other): the plan's command line with those options, and the plan."""
    local: list[str] = []
    path = None
    it = iter(raw)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name == "--plan":
            path = value if eq else next(it, "")
        elif name in _PLAN_LOCAL:
            local += [arg] if eq else [arg, next(it, "")]
        elif arg in _PLAN_LOCAL_FLAGS:
            local.append(arg)
        else:
            raise ValueError(
                f"{arg}: --plan takes the campaign from the plan; beside it only "
                "--shard, --out, -j, --budget, --keep, --no-minimize and -q"
            )
    assert path is not None
    plan = load_plan(path)
    return [*plan["argv"], *local], plan


__all__ = [
    "FULL_MODES",
    "PlannedRun",
    "fault_cost",
    "fault_run_id",
    "load_plan",
    "plan_argv",
    "plan_config",
    "powercut_cost",
    "powercut_run_id",
    "run_id",
    "write_plan",
]
