"""Each race the pagecache add lock closes (DESIGN §3): wrong with the lock off,
right with it on — the same forced interleaving both times."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusefs.races import RACES, Race, run_race


@pytest.mark.parametrize("race", RACES, ids=lambda r: f"race{r.number}")
async def test_race_is_wrong_without_the_lock(race: Race, tmp_path: Path) -> None:
    outcome = await run_race(race, lock=False, workdir=tmp_path)
    assert outcome.wrong, f"race {race.number} did not show without the lock: {outcome.observed}"


@pytest.mark.parametrize("race", RACES, ids=lambda r: f"race{r.number}")
async def test_race_is_closed_by_the_lock(race: Race, tmp_path: Path) -> None:
    outcome = await run_race(race, lock=True, workdir=tmp_path)
    assert not outcome.wrong, f"race {race.number} with the lock: {outcome.observed}"
