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
from tools.campaign.mount import Image, SiteInfo, kill_all, parse_listing
from tools.campaign.report import render_markdown, summary_lines
from tools.campaign.run import (
    FAILURES,
    OUTCOMES,
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
    powercut_requested: int = 0
    powercut_events: int | None = None
    powercuts: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0
    budget_exhausted: bool = False
    interrupted: bool = False

    def counts(self, runs: Sequence[RunResult]) -> dict[str, int]:
        counter = Counter(r.outcome for r in runs)
        return {o.value: counter.get(o.value, 0) for o in OUTCOMES}

    def failures(self) -> list[RunResult]:
        return [r for r in [*self.runs, *self.powercuts] if r.outcome in FAILURES]

    def to_json(self) -> dict[str, Any]:
        per_class = Counter(s.root_class for s in self.all_sites)
        return {
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "argv": self.argv,
            "seed": self.seed,
            "modes": self.modes,
            "workloads": self.workloads,
            "sites_total": len(self.all_sites),
            "sites_per_class": dict(sorted(per_class.items())),
            "sites": [
                {
                    "name": s.name,
                    "class": s.cls,
                    "module": s.module,
                    "location": f"{s.file}:{s.line}",
                }
                for s in self.sites
            ],
            "counts": self.counts(self.runs),
            "matrix": {
                s.name: {r.mode: r.outcome for r in self.runs if r.site == s.name}
                for s in self.sites
            },
            "runs": [r.to_json() for r in self.runs],
            "skipped": self.skipped,
            "budget_exhausted": self.budget_exhausted,
            "interrupted": self.interrupted,
            "powercut": {
                "requested": self.powercut_requested,
                "workload_events": self.powercut_events,
                "counts": self.counts(self.powercuts),
                "runs": [r.to_json() for r in self.powercuts],
            },
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
    want_sites = (not args.power_cut and not args.power_cut_at) or bool(
        args.cls or args.module or args.name
    )
    if want_sites or args.list:
        campaign.all_sites = list_sites(cfg, None if args.list else out)
        campaign.sites = select_sites(campaign.all_sites, args)
        if args.list:
            return campaign
        jobs: list[tuple[str, Callable[[], RunResult]]] = [
            (f"{s.name} x {m}", lambda s=s, m=m: run_fault(s, m, cfg))  # type: ignore[misc]
            for s in campaign.sites
            for m in args.mode
        ]
        if not args.quiet:
            console.print(
                f"fault campaign: {len(campaign.sites)} site(s) x {len(args.mode)} mode(s) = "
                f"{len(jobs)} run(s), -j {args.jobs}, workloads {','.join(workloads)}; out {out}",
                highlight=False,
            )
        scheduler.report = Progress(console, len(jobs), args.quiet)
        campaign.runs, campaign.skipped = scheduler.run(jobs)
    if args.power_cut or args.power_cut_at:
        run_powercuts(args, cfg, campaign, scheduler, console)
    campaign.budget_exhausted = scheduler.exhausted and not scheduler.interrupted
    campaign.interrupted = scheduler.interrupted
    campaign.seconds = time.monotonic() - start
    return campaign


def run_powercuts(
    args: argparse.Namespace,
    cfg: RunConfig,
    campaign: Campaign,
    scheduler: Scheduler,
    console: Console,
) -> None:
    if args.power_cut_at:
        points = sorted(set(args.power_cut_at))
    else:
        campaign.powercut_requested = args.power_cut
        if scheduler.out_of_time():
            campaign.skipped.append(f"{args.power_cut} power cut(s)")
            return
        count = run_powercut(None, "drop", cfg)
        campaign.powercut_events = count.events
        if count.outcome != "not reached" or not count.events:
            count.detail = count.detail or "the counting run did not finish cleanly"
            campaign.powercuts.append(count)
            return
        if args.power_cut_on == "flush":
            candidates = count.flush_events
        else:
            candidates = list(range(1, count.events + 1))
        points = cut_points(candidates, args.power_cut, args.seed)
    modes = list(iter_modes(args.power_cut_mode, len(points)))
    jobs: list[tuple[str, Callable[[], RunResult]]] = [
        (f"cut@{p} {m}", lambda p=p, m=m: run_powercut(p, m, cfg))  # type: ignore[misc]
        for p, m in zip(points, modes, strict=True)
    ]
    if not args.quiet:
        events = campaign.powercut_events
        of = f" of {events} device writes and flushes" if events else ""
        console.print(f"power cuts: {len(jobs)} cut point(s){of}", highlight=False)
    scheduler.report = Progress(console, len(jobs), args.quiet)
    results, skipped = scheduler.run(jobs)
    campaign.powercuts += results
    campaign.skipped += skipped


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
        type=int,
        default=0,
        metavar="N",
        help="N cut points over a workload that fsyncs as it goes",
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
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.argv = raw
    args.mode = args.mode or ["oneshot"]
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
    if args.power_cut < 0:
        parser.error("--power-cut needs N >= 0")
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
    args = parse_args(argv)
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
