"""``fusefs demo races``: every race of DESIGN §3, with the lock off and on, as a table."""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import IO

import trio
from rich.console import Console
from rich.table import Table

from fusefs.races import RACES, RaceOutcome, run_race


def demo_console(file: IO[str] | None = None, *, highlight: bool = True) -> Console:
    """The console the demonstrations print on.  Soft-wrapped: a long record (a
    fault site, a result) stays one line, which a terminal wraps on its own.  When
    the output is not a terminal, rich would assume 80 columns and squeeze tables
    and rules into them: give them room instead."""
    stream = sys.stdout if file is None else file
    wide = None if stream.isatty() else 120
    return Console(file=file, soft_wrap=True, width=wide, highlight=highlight)


async def _run_all(
    workdir: Path, numbers: set[int] | None
) -> list[tuple[RaceOutcome, RaceOutcome]]:
    rows = []
    for race in RACES:
        if numbers and race.number not in numbers:
            continue
        off = await run_race(race, lock=False, workdir=workdir)
        on = await run_race(race, lock=True, workdir=workdir)
        rows.append((off, on))
    return rows


def race_table(numbers: set[int] | None = None, console: Console | None = None) -> bool:
    """Run the races and print the table; True when every race behaved as expected
    (wrong without the lock, right with it)."""
    console = console or demo_console()
    # The lock-off runs log the damage they do; the table is the report here.
    logging.getLogger("fusefs").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fusefs-races-") as tmp:
        rows = trio.run(_run_all, Path(tmp), numbers)
    table = Table(title="pagecache add lock: each race forced, lock off vs on")
    table.add_column("#", justify="right")
    table.add_column("race")
    table.add_column("lock off")
    table.add_column("lock on")
    ok = True
    for off, on in rows:
        race = next(r for r in RACES if r.number == off.race)
        off_text = (
            "[red]WRONG[/red] " if off.wrong else "[yellow]not shown[/yellow] "
        ) + off.observed
        on_text = ("[red]WRONG[/red] " if on.wrong else "[green]right[/green] ") + on.observed
        table.add_row(str(race.number), race.title, off_text, on_text)
        ok &= off.wrong and not on.wrong
    console.print(table)
    return ok
