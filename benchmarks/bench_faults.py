"""Cost of a disabled fault site versus an empty function call, in the same run.

A fault site sits in hot paths (every block read and write, every page
allocation), so a disabled one must cost about what a function call costs:
target <= 2x an empty call with the same signature.  Two call shapes are timed:

- ``site``: ``dynamic_fault("name", cls="io:write")``, the shape every site in the
  code base has (the class is a keyword) -- this is the headline ratio;
- ``positional``: ``dynamic_fault("name")``, the cheapest possible call, where the
  fixed cost of the call is smallest and the check's own work shows most;
- ``memory``: ``memory_fault("name")``, the check in front of every page and
  buffer allocation.

Times are the best of ``--repeat`` short rounds of ``--number`` calls, the rounds of
the statements interleaved in a shuffled order, so that load from other processes
and drift in machine speed hit them alike and the minimum filters them out.
Ratios are net of the timing loop itself (an empty ``pass`` statement).

Run: ``python -m benchmarks.bench_faults``.  Ends with ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import timeit
from collections.abc import Sequence

from fusefs.faults import REGISTRY, dynamic_fault, memory_fault

TARGET_RATIO = 2.0
SITE = "bench_faults_disabled"
MEMORY_SITE = "bench_faults_memory"


def empty_check(name: str, cls: str = "error") -> bool:
    """What a site would cost if the check did nothing."""
    return False


def empty_memory(name: str, cls: str = "memory") -> None:
    return None


STATEMENTS = {
    "loop": "pass",
    "empty_site": "empty_check(SITE, cls='io:write')",
    "fault_site": "dynamic_fault(SITE, cls='io:write')",
    "empty_positional": "empty_check(SITE)",
    "fault_positional": "dynamic_fault(SITE)",
    "empty_memory": "empty_memory(MEMORY_SITE)",
    "fault_memory": "memory_fault(MEMORY_SITE)",
}


def measure(number: int, repeat: int) -> dict[str, float]:
    """Best time per execution of each statement, in nanoseconds."""
    namespace = {
        "SITE": SITE,
        "MEMORY_SITE": MEMORY_SITE,
        "empty_check": empty_check,
        "empty_memory": empty_memory,
        "dynamic_fault": dynamic_fault,
        "memory_fault": memory_fault,
    }
    timers = {key: timeit.Timer(stmt, globals=namespace) for key, stmt in STATEMENTS.items()}
    best = dict.fromkeys(STATEMENTS, float("inf"))
    order = list(timers)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)  # no statement always runs right after another
        for key in order:
            best[key] = min(best[key], timers[key].timeit(number) / number * 1e9)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--number", type=int, default=50_000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=100, help="rounds per statement")
    args = parser.parse_args(argv)

    # Register the sites (and run the package scan) outside the timed loops.
    dynamic_fault(SITE, cls="io:write")
    memory_fault(MEMORY_SITE)
    REGISTRY.control(f"name {SITE} disable; name {MEMORY_SITE} disable")

    ns = measure(args.number, args.repeat)
    loop = ns["loop"]

    def ratio(fault: str, empty: str) -> float:
        return (ns[fault] - loop) / (ns[empty] - loop)

    ratios = {
        "site": ratio("fault_site", "empty_site"),
        "positional": ratio("fault_positional", "empty_positional"),
        "memory": ratio("fault_memory", "empty_memory"),
    }
    hits = REGISTRY.site(SITE).hits
    expected_hits = 1 + 2 * args.number * args.repeat
    print(f"python {platform.python_version()} ({platform.python_implementation()})")
    print(f"{'statement':<18} {'ns/call':>8}  {'net ns':>7}")
    for key, stmt in STATEMENTS.items():
        print(f"{key:<18} {ns[key]:8.1f}  {ns[key] - loop:7.1f}   {stmt}")
    for shape, value in ratios.items():
        print(f"disabled {shape:<10} check / empty call: {value:.2f}x (target <= {TARGET_RATIO}x)")
    print(f"hits counted: {hits} of {expected_hits}")

    result = {
        "benchmark": "faults",
        "python": platform.python_version(),
        "number": args.number,
        "repeat": args.repeat,
        "ns_per_call": {key: round(value, 2) for key, value in ns.items()},
        "ratio": round(ratios["site"], 3),
        "ratio_positional": round(ratios["positional"], 3),
        "ratio_memory": round(ratios["memory"], 3),
        "target": TARGET_RATIO,
        "ok": ratios["site"] <= TARGET_RATIO,
        "hits_exact": hits == expected_hits,
    }
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
