"""``fusefs-campaign``: fault-injection campaigns and simulated power cuts.

Fault campaign: the sites come from a freshly mounted filesystem's
``.fusefs/dynamic_fault`` (so the list always matches the code), filtered by
class, module and name; every selected site runs in every selected mode
(``oneshot``, ``frequency N``, ``probability P`` seeded by ``--seed``), each run on
a fresh image (tools/campaign/run.py says what a run does and how its outcome
is decided: clean, not reached, crash, hang, corruption, fsck error).

Power cuts (``--power-cut N``): one counting run learns how many device writes
the workload makes, then N runs each cut the power at one of them (drop or torn
mode), recover, fsck and verify every write acknowledged by a returned fsync.

Output, in ``--out DIR``: ``matrix.json`` and ``matrix.md`` (the outcome matrix,
counts per outcome, a reproducer for every run that was not clean), and each
run's directory (daemon log; the image too when the run failed).  ``-j N`` runs
N images at once; ``--budget SECONDS`` starts no run after that time and
reports what ran.  Exit status: 0 when no run failed, 1 otherwise, 2 for bad
arguments.

``--power-cut all`` cuts at every device write and flush of the workload;
``--full`` is every site in the three modes and ``--power-cut all``.
``--shard K/N`` runs slice K of N of the run list (tools/sharding.py),
``merge DIR...`` folds the shards' reports into the campaign's, ``compare A B``
checks two reports' outcome tables, ``plan ARGS`` writes the run list once for
shards to take with ``--plan FILE``.

Self-test sites (class ``...:selftest``: silent corruption, a daemon crash, a
commit that skips its flush) are left out unless ``--selftest`` is given or
they are named with ``--name``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from fusefs.demo import demo_console
from tools.campaign import fuzz
from tools.campaign.merge import compare_main, merge_main
from tools.campaign.mount import Image, SiteInfo, kill_all, parse_listing
from tools.campaign.plan import (
    FULL_MODES,
    PlannedRun,
    fault_cost,
    fault_run_id,
    plan_argv,
    plan_config,
    powercut_cost,
    powercut_run_id,
    write_plan,
)
from tools.campaign.report import (
    outcome_counts,
    outcome_matrix,
    render_markdown,
    summary_lines,
)
from tools.campaign.run import (
    FAILURES,
    WORKLOADS,
    RunConfig,
    RunResult,
    cut_points,
    iter_modes,
    run_fault,
    run_powercut,
)
from tools.pressure import PressureSpec, parse_kinds
from tools.pressure import add_arguments as add_pressure_arguments
from tools.sharding import Shard, partition, plan_id, shard_section, without_options

_MODE_RE: Final = re.compile(
    r"^(oneshot|frequency [1-9][0-9]*|probability (0|1|0?\.[0-9]+|1\.0+))$"
)

DEMO_ARGV: Final = ("--class", "io", "--power-cut", "20", "--ops", "60", "-j", "2")
"""The main job's short campaign: every ``io`` site x oneshot, then 20 power cuts."""


@dataclass
class Campaign:
    """Everything a report shows."""

    started: str
    seed: int
    modes: list[str]
    workloads: list[str]
    argv: list[str]
    sites: list[SiteInfo] = field(default_factory=list)
    all_sites: list[SiteInfo] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    powercut_requested: int | str = 0  # N, or "all"
    powercut_events: int | None = None
    powercuts: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0
    budget_exhausted: bool = False
    interrupted: bool = False
    plan_id: str = ""
    shard: dict[str, Any] | None = None  # tools.sharding.shard_section, when sharded

    def failures(self) -> list[RunResult]:
        return [r for r in [*self.runs, *self.powercuts] if r.outcome in FAILURES]

    def to_json(self) -> dict[str, Any]:
        per_class = Counter(s.root_class for s in self.all_sites)
        runs = [r.to_json() for r in self.runs]
        powercuts = [r.to_json() for r in self.powercuts]
        sites = [
            {"name": s.name, "class": s.cls, "module": s.module, "location": f"{s.file}:{s.line}"}
            for s in self.sites
        ]
        return {
            "kind": "campaign",
            "plan_id": self.plan_id,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "argv": self.argv,
            "seed": self.seed,
            "modes": self.modes,
            "workloads": self.workloads,
            "sites_total": len(self.all_sites),
            "sites_per_class": dict(sorted(per_class.items())),
            "sites": sites,
            "counts": outcome_counts(runs),
            "matrix": outcome_matrix(sites, runs),
            "runs": runs,
            "skipped": self.skipped,
            "budget_exhausted": self.budget_exhausted,
            "interrupted": self.interrupted,
            "powercut": {
                "requested": self.powercut_requested,
                "workload_events": self.powercut_events,
                "counts": outcome_counts(powercuts),
                "runs": powercuts,
            },
            "shard": self.shard,
        }


# sites:


def list_sites(cfg: RunConfig, where: Path | None) -> list[SiteInfo]:
    """The sites as a freshly mounted filesystem lists them (its image and mount
    point in a temporary directory under ``where``, or the system's)."""
    with tempfile.TemporaryDirectory(prefix="fusefs-sites-", dir=where) as tmp:
        image = Image(Path(tmp), "16M", timeout=cfg.timeout)
        image.mkfs()
        mounted = image.mount()
        if not mounted.ok:
            raise SystemExit(f"fusefs-campaign: cannot mount a fresh image: {mounted.message}")
        try:
            listing = image.control_read("dynamic_fault")
        finally:
            done = image.umount()
            image.cleanup()
        if not done.ok:
            raise SystemExit(f"fusefs-campaign: unmounting the listing image: {done.message}")
    return parse_listing(listing)


def select_sites(sites: Sequence[SiteInfo], args: argparse.Namespace) -> list[SiteInfo]:
    def class_ok(s: SiteInfo) -> bool:
        return not args.cls or any(s.cls == c or s.cls.startswith(c + ":") for c in args.cls)

    def module_ok(s: SiteInfo) -> bool:
        return not args.module or any(
            fnmatch.fnmatchcase(s.module, m) or s.module.endswith("." + m) for m in args.module
        )

    def name_ok(s: SiteInfo) -> bool:
        return not args.name or any(fnmatch.fnmatchcase(s.name, n) for n in args.name)

    named = {n for n in args.name if not any(ch in n for ch in "*?[")}
    return [
        s
        for s in sites
        if class_ok(s)
        and module_ok(s)
        and name_ok(s)
        and not any(fnmatch.fnmatchcase(s.name, x) for x in args.exclude)
        and (not s.is_selftest or args.selftest or s.name in named)
    ]


# running:


class Scheduler:
    """Runs jobs on ``jobs`` threads (each drives its own image); no job starts
    after the budget ran out.  Reports each result as it comes in."""

    def __init__(self, jobs: int, budget: float | None, report: Callable[[RunResult], None]):
        self.jobs = jobs
        self.deadline = None if budget is None else time.monotonic() + budget
        self.report = report
        self.exhausted = False
        self.interrupted = False
        self._lock = threading.Lock()

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.exhausted = True
        return self.exhausted

    def run(
        self, jobs: Sequence[tuple[str, Callable[[], RunResult]]]
    ) -> tuple[list[RunResult], list[str]]:
        results: dict[int, RunResult] = {}
        skipped: list[str] = []

        def one(index: int, label: str, job: Callable[[], RunResult]) -> None:
            if self.out_of_time():
                with self._lock:
                    skipped.append(label)
                return
            result = job()
            with self._lock:
                if self.interrupted:
                    skipped.append(f"{label} (interrupted)")
                    return
                results[index] = result
                self.report(result)

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(one, i, label, job) for i, (label, job) in enumerate(jobs)]
            try:
                for future in futures:
                    future.result()
            except KeyboardInterrupt:
                # Stop: no new run starts, the running ones lose their daemons.
                with self._lock:
                    self.interrupted = self.exhausted = True
                kill_all()
                concurrent.futures.wait(futures)
        return [results[i] for i in sorted(results)], skipped


class Progress:
    def __init__(self, console: Console, total: int, quiet: bool) -> None:
        self.console = console
        self.total = total
        self.done = 0
        self.quiet = quiet

    def __call__(self, r: RunResult) -> None:
        self.done += 1
        if self.quiet:
            return
        colour = {"clean": "green", "not reached": "yellow"}.get(r.outcome, "red")
        extra = f" — {r.detail}" if r.detail else ""
        self.console.print(
            f"[{self.done}/{self.total}] {r.site} x {r.mode}: [{colour}]{r.outcome}[/{colour}] "
            f"(fired {r.fired}, {r.seconds:.1f}s){extra}",
            highlight=False,
            soft_wrap=True,
        )


def chaos_faults(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--chaos`` schedule as a fault spec for every mount under test: every
    race site armed with a probability and a drawn window (the run's ``seed``
    command, sent first, seeds the draws)."""
    if args.chaos is None:
        return ()
    return (f"seed {args.seed}; class race probability {args.chaos} delay {args.chaos_delay}",)


def stress_flags(args: argparse.Namespace) -> str:
    """The ``--pressure`` and ``--chaos`` flags, for the reproducers."""
    out = ""
    if args.pressure is not None:
        out += f" --pressure {args.pressure}"
        if args.pressure_interval:
            out += f" --pressure-interval {args.pressure_interval:g}"
    if args.chaos is not None:
        out += f" --chaos {args.chaos:g} --chaos-delay {args.chaos_delay}"
    return out


def run_campaign(args: argparse.Namespace, console: Console) -> Campaign:
    out = Path(args.out).resolve()
    if not args.list:  # --list writes nothing: no report directory
        out.mkdir(parents=True, exist_ok=True)
    workloads = tuple(w for item in args.workload for w in item.split(",") if w)
    cfg = RunConfig(
        out=out,
        seed=args.seed,
        size=args.size,
        timeout=args.timeout,
        workloads=workloads,
        ops=args.ops,
        cycles=args.cycles,
        faults=tuple(args.fault),
        chaos=chaos_faults(args),
        keep=args.keep,
        pressure=args.pressure_spec,
        flags=stress_flags(args),
        minimize=not args.no_minimize,
    )
    campaign = Campaign(
        started=datetime.now().isoformat(timespec="seconds"),
        seed=args.seed,
        modes=list(args.mode),
        workloads=list(workloads),
        argv=list(args.argv),
    )
    start = time.monotonic()
    scheduler = Scheduler(args.jobs, args.budget, lambda r: None)
    planned: list[PlannedRun] = []
    want_sites = (
        args.full
        or (not args.power_cut and not args.power_cut_at)
        or bool(args.cls or args.module or args.name)
    )
    if want_sites or args.list:
        campaign.all_sites = list_sites(cfg, None if args.list else out)
        campaign.sites = select_sites(campaign.all_sites, args)
        if args.list:
            return campaign
        cost = fault_cost(cfg)
        planned += [
            PlannedRun(
                fault_run_id(s.name, m),
                "fault",
                cost,
                lambda s=s, m=m: run_fault(s, m, cfg),  # type: ignore[misc]
            )
            for s in campaign.sites
            for m in args.mode
        ]
    if args.power_cut or args.power_cut_at:
        planned += plan_powercuts(args, cfg, campaign, scheduler)
    ids = [r.id for r in planned]
    costs = [r.cost_ms for r in planned]
    campaign.plan_id = plan_id(plan_config(args, campaign.sites), ids)
    if args.plan is not None and campaign.plan_id != args.plan["plan_id"]:
        raise SystemExit(
            f"fusefs-campaign: this checkout's sites are not the plan's "
            f"(plan {campaign.plan_id}, not {args.plan['plan_id']}): a plan is for one version"
        )
    if args.write_plan:
        write_plan(
            out / "plan.json",
            without_options(args.argv, ("--out",)),
            campaign.plan_id,
            planned,
            campaign.powercut_requested,
            campaign.powercut_events,
            [r.to_json() for r in campaign.powercuts],
        )
        return campaign
    mine = list(range(len(planned)))
    if args.shard is not None:
        mine = partition(costs, args.shard.count)[args.shard.index - 1]
        campaign.shard = shard_section(args.shard, campaign.plan_id, ids, costs, mine)
    jobs = [(planned[i].id, planned[i].job) for i in mine]
    if not args.quiet:
        faults = sum(1 for i in mine if planned[i].kind == "fault")
        cuts = len(mine) - faults
        what = f"shard {args.shard}: " if args.shard is not None else ""
        console.print(
            f"{what}{faults} fault run(s) of {len(campaign.sites)} site(s) x "
            f"{len(args.mode)} mode(s), {cuts} power cut(s); expected "
            f"{sum(costs[i] for i in mine) / 1000:.0f} s of {sum(costs) / 1000:.0f} s, "
            f"-j {args.jobs}, workloads {','.join(workloads)}; out {out}",
            highlight=False,
        )
    scheduler.report = Progress(console, len(jobs), args.quiet)
    results, skipped = scheduler.run(jobs)
    campaign.runs += [r for r in results if r.kind == "fault"]
    campaign.powercuts += [r for r in results if r.kind == "powercut"]
    campaign.skipped += skipped
    campaign.budget_exhausted = scheduler.exhausted and not scheduler.interrupted
    campaign.interrupted = scheduler.interrupted
    campaign.seconds = time.monotonic() - start
    return campaign


def plan_powercuts(
    args: argparse.Namespace,
    cfg: RunConfig,
    campaign: Campaign,
    scheduler: Scheduler,
) -> list[PlannedRun]:
    """The cut points: ``--power-cut-at``'s, or drawn from a counting run of the
    workload (``--power-cut all``: every event it counted)."""
    if args.plan is not None:
        pc = args.plan["powercut"]
        campaign.powercut_requested = pc["requested"]
        campaign.powercut_events = pc["workload_events"]
        points = [p for p, _ in pc["points"]]
        modes = [m for _, m in pc["points"]]
    elif args.power_cut_at:
        points = sorted(set(args.power_cut_at))
    else:
        campaign.powercut_requested = args.power_cut
        if scheduler.out_of_time():
            campaign.skipped.append(f"{args.power_cut} power cut(s)")
            return []
        count = run_powercut(None, "drop", cfg)
        campaign.powercut_events = count.events
        if count.outcome != "not reached" or not count.events:
            count.detail = count.detail or "the counting run did not finish cleanly"
            campaign.powercuts.append(count)
            return []
        if args.power_cut_on == "flush":
            candidates = count.flush_events
        else:
            candidates = list(range(1, count.events + 1))
        wanted = len(candidates) if args.power_cut == "all" else args.power_cut
        points = cut_points(candidates, wanted, args.seed)
    if args.plan is None:
        modes = list(iter_modes(args.power_cut_mode, len(points)))
    events = campaign.powercut_events
    return [
        PlannedRun(
            powercut_run_id(p, m),
            "powercut",
            powercut_cost(cfg, p, events),
            lambda p=p, m=m: run_powercut(p, m, cfg),  # type: ignore[misc]
        )
        for p, m in zip(points, modes, strict=True)
    ]


def write_reports(campaign: Campaign, out: Path) -> tuple[Path, Path]:
    json_path = out / "matrix.json"
    md_path = out / "matrix.md"
    json_path.write_text(json.dumps(campaign.to_json(), indent=2) + "\n")
    md_path.write_text(render_markdown(campaign.to_json()))
    return json_path, md_path


# command line:


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusefs-campaign",
        description="Run fault-injection campaigns and simulated power cuts against fusefs.",
    )
    sel = p.add_argument_group("sites (default: every site but the self-tests)")
    sel.add_argument(
        "--class",
        dest="cls",
        action="append",
        default=[],
        metavar="CLASS",
        help="a class or sub-class (io, io:write, error:mount); repeatable",
    )
    sel.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module or its dotted suffix, wildcards allowed; repeatable",
    )
    sel.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="a site name, wildcards allowed; repeatable",
    )
    sel.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="leave out sites matching NAME; repeatable",
    )
    sel.add_argument(
        "--selftest", action="store_true", help="include the self-test sites (class ...:selftest)"
    )
    sel.add_argument("--list", action="store_true", help="list the selected sites and exit")
    sel.add_argument(
        "--full",
        action="store_true",
        help=f"the whole campaign: every site x {', '.join(FULL_MODES)} (unless --mode), "
        "and a power cut at every device write and flush (unless --power-cut)",
    )
    run = p.add_argument_group("runs")
    run.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="MODE",
        help="oneshot | 'frequency N' | 'probability P'; repeatable (default oneshot)",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seeds the workloads, probability draws and power cuts (default 1)",
    )
    run.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="LIST",
        help=f"comma-separated, from {', '.join(WORKLOADS)} (default fsx,meta,cycle;"
        " fsx falls back to data where fusefs-fsx is missing)",
    )
    run.add_argument("--ops", type=int, default=120, help="operations per workload (default 120)")
    run.add_argument("--cycles", type=int, default=3, help="mounts in the cycle workload")
    run.add_argument("--size", default="64M", help="image size (default 64M)")
    run.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a step may take before the run counts as a hang (default 60)",
    )
    run.add_argument("-j", "--jobs", type=int, default=1, help="images run in parallel (default 1)")
    run.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="start no run after this many seconds; report what ran",
    )
    run.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra fault spec for every mount under test (fault runs and power cuts); "
        "repeatable",
    )
    add_pressure_arguments(run)
    fuzz.add_arguments(p)
    pc = p.add_argument_group("power cuts")
    pc.add_argument(
        "--power-cut",
        type=_power_cut_count,
        default=None,
        metavar="N|all",
        help="N cut points over a workload that fsyncs as it goes; all: every device write "
        "and flush it makes",
    )
    pc.add_argument(
        "--power-cut-mode",
        choices=["drop", "torn", "both"],
        default="both",
        help="drop every unflushed write, keep a torn random subset, or alternate (default both)",
    )
    pc.add_argument(
        "--power-cut-at",
        type=int,
        action="append",
        default=[],
        metavar="EVENT",
        help="cut at this device event (replays one cut point); repeatable",
    )
    pc.add_argument(
        "--power-cut-on",
        choices=["any", "flush"],
        default="any",
        help="draw cut points from every device write and flush, or from the flushes only "
        "(default any)",
    )
    outp = p.add_argument_group("output")
    outp.add_argument("--out", help="report directory (default ./campaign-DATE-TIME)")
    outp.add_argument("--keep", action="store_true", help="keep the images of clean runs too")
    outp.add_argument(
        "--no-minimize", action="store_true", help="do not minimize failing fsx op lists"
    )
    outp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    outp.add_argument(
        "--plan",
        metavar="FILE",
        help="run the campaign of FILE (written by 'fusefs-campaign plan ARGS'): its flags, "
        "sites and cut points, without a counting run",
    )
    outp.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="run shard K of N (from 1) of the run list, balanced by expected cost; "
        "fold the shards' reports with 'fusefs-campaign merge DIR...'",
    )
    return p


def _power_cut_count(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"N or all, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("needs N >= 0")
    return value


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Sequence[str] | None, write_plan: bool = False) -> argparse.Namespace:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    plan = None
    if any(a == "--plan" or a.startswith("--plan=") for a in raw):
        if write_plan:
            parser.error("plan and --plan exclude each other")
        try:
            raw, plan = plan_argv(raw)
        except ValueError as e:
            parser.error(str(e))
    args = parser.parse_args(raw)
    args.argv = raw
    args.plan = plan
    args.write_plan = write_plan
    if write_plan and (args.shard is not None or args.list):
        parser.error("plan writes the whole run list: no --shard, no --list")
    args.mode = args.mode or list(FULL_MODES if args.full else ["oneshot"])
    if args.power_cut is None:
        args.power_cut = "all" if args.full else 0
    for mode in args.mode:
        if not _MODE_RE.match(mode):
            parser.error(f"bad --mode {mode!r}: oneshot, 'frequency N' or 'probability P'")
    args.workload = args.workload or ["fsx,meta,cycle"]
    for item in args.workload:
        for w in filter(None, item.split(",")):
            if w not in WORKLOADS:
                parser.error(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    if args.jobs < 1:
        parser.error("-j needs at least 1")
    if args.shard is not None and args.list:
        parser.error("--list and --shard exclude each other")
    args.pressure_spec = None
    if args.pressure is not None:
        try:
            kinds = parse_kinds(args.pressure)
        except ValueError as e:
            parser.error(f"--pressure: {e}")
        args.pressure_spec = PressureSpec(kinds, interval=args.pressure_interval / 1000)
    if args.chaos is not None and not 0 < args.chaos <= 1:
        parser.error(f"--chaos needs a probability in (0, 1], got {args.chaos}")
    if args.out is None:
        args.out = datetime.now().strftime("campaign-%Y%m%d-%H%M%S")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["merge"]:
        return merge_main(raw[1:])
    if raw[:1] == ["compare"]:
        return compare_main(raw[1:])
    args = parse_args(raw[1:], write_plan=True) if raw[:1] == ["plan"] else parse_args(raw)
    if args.fuzz_image or args.fuzz_replay:
        return fuzz.main(args)
    console = demo_console(sys.stderr)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    campaign = run_campaign(args, console)
    if campaign.interrupted:
        console.print("interrupted: reporting what ran", highlight=False)
    out = Path(args.out).resolve()
    if args.list:
        for s in campaign.sites:
            print(f"{s.name:32} {s.cls:16} {s.module} ({s.file}:{s.line})")
        return 0
    if args.write_plan:
        if campaign.powercuts:  # the counting run failed: no cut points to plan
            (count,) = campaign.powercuts
            print(f"fusefs-campaign plan: the counting run: {count.outcome}: {count.detail}")
            return 1
        print(f"plan {campaign.plan_id}: {out / 'plan.json'}")
        return 0
    json_path, md_path = write_reports(campaign, out)
    stdout = demo_console(highlight=False)
    for line in summary_lines(campaign.to_json()):
        stdout.print(line)
    stdout.print(f"reports: {md_path} {json_path}")
    return 1 if campaign.failures() else 0


def run_demo(out: str | os.PathLike[str]) -> int:
    """The main job's campaign (``DEMO_ARGV`` into ``out``); prints the summary."""
    return main([*DEMO_ARGV, "--out", os.fspath(out)])


if __name__ == "__main__":
    sys.exit(main())
