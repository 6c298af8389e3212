"""The dynamic fault registry: discovery, the control language, firing semantics,
race windows and the memory helpers.

Every test builds its own `FaultRegistry` (from explicit registrations or from a
fake package in ``tmp_path``), except the few that check the module-level
functions, which reset `REGISTRY` afterwards.
"""

from __future__ import annotations

import errno
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest
import trio
import trio.testing

from fusefs import faults
from fusefs.errors import InvalidArgument, NotFound, OutOfMemory
from fusefs.faults import (
    CLASSES,
    ENV_VAR,
    REGISTRY,
    FaultRegistry,
    FaultSiteError,
    alloc_buffer,
    alloc_page,
    alloc_pages,
    dynamic_fault,
    memory_fault,
    race_fault,
)

# name, class, file, line, module, func -- listed here in listing order.
SITES = [
    ("bd_read", "io:read", "fusefs/blockdev.py", 10, "fusefs.blockdev", "BlockDevice.read"),
    ("bd_write", "io:write", "fusefs/blockdev.py", 20, "fusefs.blockdev", "BlockDevice.write"),
    ("bd_flush", "io", "fusefs/blockdev.py", 30, "fusefs.blockdev", "BlockDevice.flush"),
    ("commit_cp", "error:commit", "fusefs/commit.py", 15, "fusefs.commit", "Committer.commit"),
    ("br_window", "race", "fusefs/io/buffered.py", 12, "fusefs.io.buffered", "read_folio"),
    ("br_page", "memory:page", "fusefs/io/buffered.py", 40, "fusefs.io.buffered", "fill"),
    ("pc_buffer", "memory:buffer", "fusefs/pagecache.py", 25, "fusefs.pagecache", "Cache.alloc"),
]
NAMES = [site[0] for site in SITES]


@pytest.fixture
def reg() -> FaultRegistry:
    registry = FaultRegistry(roots=[])
    for name, cls, file, line, module, func in reversed(SITES):
        registry.register_site(name, cls, file=file, line=line, module=module, func=func)
    return registry


def states(registry: FaultRegistry) -> dict[str, str]:
    return {site.name: site.state for site in registry.sites()}


def armed(registry: FaultRegistry) -> set[str]:
    return {site.name for site in registry.sites() if site.state != "disabled"}


def fire_pattern(registry: FaultRegistry, name: str, hits: int) -> list[int]:
    """The 1-based hits (counted from now) on which ``name`` fires."""
    return [i for i in range(1, hits + 1) if registry.dynamic_fault(name)]


# ---------------------------------------------------------------------------
# the parser:


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("name bd_write enable", {"bd_write": "enabled"}),
        ("class io:write enable", {"bd_write": "enabled"}),
        ("class io oneshot", {"bd_read": "oneshot", "bd_write": "oneshot", "bd_flush": "oneshot"}),
        ("module fusefs.commit frequency 3", {"commit_cp": "frequency=3"}),
        ("module commit frequency 3", {"commit_cp": "frequency=3"}),
        ("module io.buffered class memory enable", {"br_page": "enabled"}),
        ("file fusefs/pagecache.py probability 0.25", {"pc_buffer": "probability=0.25"}),
        ("file pagecache.py probability 1", {"pc_buffer": "probability=1"}),
        ("file io/buffered.py line 12 enable delay 5", {"br_window": "enabled delay=5ms"}),
        ("func read enable", {"bd_read": "enabled"}),
        ("func BlockDevice.flush times 2", {"bd_flush": "enabled times=2"}),
        ("func read_folio oneshot delay 0.5", {"br_window": "oneshot delay=0.5ms"}),
        ("name br_window delay 0", {"br_window": "enabled delay=0ms"}),
        ("name br_window probability 0.5 delay 1-4", {"br_window": "probability=0.5 delay=1-4ms"}),
        ("line 25-35 enable", {"bd_flush": "enabled", "pc_buffer": "enabled"}),
        ("index 2-3 enable", {"bd_flush": "enabled", "commit_cp": "enabled"}),
        ("name bd_write frequency 2 times 3", {"bd_write": "frequency=2 times=3"}),
        ("name bd_write probability 0.5 times 1", {"bd_write": "probability=0.5 times=1"}),
        ("name bd_* disable", {}),
        ("name bd_* enable", {"bd_read": "enabled", "bd_write": "enabled", "bd_flush": "enabled"}),
        ("func *.alloc enable", {"pc_buffer": "enabled"}),
        ("class memory disable", {}),
    ],
)
def test_parser_accepts_every_keyword_and_action(
    reg: FaultRegistry, command: str, expected: dict[str, str]
) -> None:
    reg.control(command)
    assert {name: state for name, state in states(reg).items() if state != "disabled"} == expected


def test_command_without_query_applies_to_every_site(reg: FaultRegistry) -> None:
    reg.control("frequency 4")
    assert set(states(reg).values()) == {"frequency=4"}
    reg.control("disable")
    assert armed(reg) == set()


def test_several_commands_separated_by_semicolons_and_newlines(reg: FaultRegistry) -> None:
    reg.control(
        "name bd_write enable; name bd_read oneshot\n"
        "# a comment line\n"
        "\n"
        "name bd_flush frequency 2   # trailing comment\n"
        "seed 9 ; name commit_cp probability 0.1;"
    )
    assert states(reg) == {
        "bd_read": "oneshot",
        "bd_write": "enabled",
        "bd_flush": "frequency=2",
        "commit_cp": "probability=0.1",
        "br_window": "disabled",
        "br_page": "disabled",
        "pc_buffer": "disabled",
    }
    assert reg.statistics().seed == 9


def test_a_later_command_replaces_the_policy(reg: FaultRegistry) -> None:
    reg.control("name br_window frequency 2 times 3 delay 7")
    reg.control("name br_window oneshot")
    assert reg.site("br_window").state == "oneshot"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("name bd_write foo", "unknown keyword 'foo'"),
        ("nmae bd_write enable", "unknown keyword 'nmae'"),
        ("name bd_write frequency", "'frequency' needs a number"),
        ("name bd_write times", "'times' needs a number"),
        ("name bd_write probability", "'probability' needs a number"),
        ("name br_window delay", "'delay' needs a number"),
        ("name", "'name' needs a value"),
        ("name bd_write line", "'line' needs a value"),
        ("name bd_write frequency -1", "'frequency' needs a positive integer, got '-1'"),
        ("name bd_write frequency 0", "'frequency' needs a positive integer, got '0'"),
        ("name bd_write frequency 2.5", "'frequency' needs a positive integer"),
        ("name bd_write times 0", "'times' needs a positive integer"),
        ("name bd_write probability 1.5", "'probability' needs a number between 0 and 1"),
        ("name bd_write probability -0.1", "'probability' needs a number between 0 and 1"),
        ("name bd_write probability nan", "'probability' needs a number between 0 and 1"),
        ("name bd_write probability half", "'probability' needs a number between 0 and 1"),
        ("name br_window delay -1", "'delay' needs a number >= 0"),
        ("name br_window delay inf", "'delay' needs a number >= 0"),
        ("name br_window delay 5-2", "'delay' needs a number >= 5, got '2'"),
        ("name br_window delay 1-", "'delay' needs a number >= 1, got ''"),
        ("name br_window delay 1-x", "'delay' needs a number >= 1, got 'x'"),
        ("line 10- enable", "unterminated range '10-'"),
        ("index 2- enable", "unterminated range '2-'"),
        ("line -5 enable", "malformed range '-5'"),
        ("line ten enable", "malformed range 'ten'"),
        ("line 20-10 enable", "empty range '20-10'"),
        ("name bd_write", "no action"),
        ("name bd_write enable disable", "conflicting actions 'enable' and 'disable'"),
        ("name bd_write frequency 2 probability 0.5", "conflicting actions"),
        ("name bd_write enable enable", "duplicate action 'enable'"),
        ("name bd_write name bd_read enable", "duplicate query keyword 'name'"),
        ("enable name bd_write", "query keyword 'name' after an action"),
        ("name bd_write disable times 2", "'disable' takes no 'times' or 'delay'"),
        ("name bd_write oneshot times 2", "'oneshot' fires once"),
        ("class disk enable", "unknown class 'disk'"),
        ("class io: enable", "malformed class 'io:'"),
        ("reset all", "'reset' takes no query or argument"),
        ("seed", "'seed' takes exactly one number"),
        ("seed -3", "'seed' needs a non-negative integer"),
        ("name bd_write seed 3", "'seed' is a command of its own"),
        ("name bd_write delay 5", "'delay' applies to race sites only"),
    ],
)
def test_malformed_command_is_einval_with_message(
    reg: FaultRegistry, command: str, message: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        reg.control(command)
    assert info.value.code == errno.EINVAL
    text = str(info.value)
    assert text.startswith("dynamic_fault: ")
    assert message in text
    assert "\n" not in text
    assert armed(reg) == set()


@pytest.mark.parametrize(
    ("command", "query"),
    [
        ("name nosuch enable", "name nosuch"),
        ("class race:read enable", "class race:read"),
        ("class io:wri enable", "class io:wri"),
        ("module blockdev func commit enable", "module blockdev func commit"),
        ("module fusefs.io enable", "module fusefs.io"),
        ("file blockdev enable", "file blockdev"),
        ("line 1000-2000 enable", "line 1000-2000"),
        ("class io index 3 enable", "class io index 3"),
        ("name bd_? enable", "name bd_?"),
    ],
)
def test_query_matching_nothing_is_enoent(reg: FaultRegistry, command: str, query: str) -> None:
    with pytest.raises(NotFound) as info:
        reg.control(command)
    assert info.value.code == errno.ENOENT
    assert str(info.value) == f"dynamic_fault: no site matches {query!r}"


def test_bad_text_changes_nothing(reg: FaultRegistry) -> None:
    with pytest.raises(NotFound):
        reg.control("name bd_write enable; name nosuch enable")
    with pytest.raises(InvalidArgument):
        reg.control("name bd_write enable\nreset\nname bd_read frob")
    assert armed(reg) == set()


def test_empty_text_is_a_no_op(reg: FaultRegistry) -> None:
    reg.control("")
    reg.control(" ;\n # nothing\n")
    assert armed(reg) == set()


def test_empty_registry_matches_nothing() -> None:
    with pytest.raises(NotFound, match="no sites registered"):
        FaultRegistry(roots=[]).control("enable")


# ---------------------------------------------------------------------------
# firing semantics:


def test_disabled_site_counts_hits_and_never_fires(reg: FaultRegistry) -> None:
    assert fire_pattern(reg, "bd_write", 50) == []
    site = reg.site("bd_write")
    assert (site.hits, site.fired) == (50, 0)


def test_enable_fires_on_every_hit_and_disable_stops(reg: FaultRegistry) -> None:
    reg.control("name bd_write enable")
    assert fire_pattern(reg, "bd_write", 5) == [1, 2, 3, 4, 5]
    reg.control("name bd_write disable")
    assert fire_pattern(reg, "bd_write", 5) == []
    site = reg.site("bd_write")
    assert (site.hits, site.fired, site.state) == (10, 5, "disabled")


def test_oneshot_fires_exactly_once(reg: FaultRegistry) -> None:
    reg.control("name bd_write oneshot")
    assert fire_pattern(reg, "bd_write", 10) == [1]
    site = reg.site("bd_write")
    assert (site.hits, site.fired, site.state) == (10, 1, "disabled")


def test_frequency_fires_every_nth_hit_counted_from_the_command(reg: FaultRegistry) -> None:
    fire_pattern(reg, "bd_write", 2)  # hits before the command do not count
    reg.control("name bd_write frequency 3")
    assert fire_pattern(reg, "bd_write", 10) == [3, 6, 9]
    reg.control("name bd_write frequency 3")  # restarts the count
    assert fire_pattern(reg, "bd_write", 4) == [3]
    assert reg.site("bd_write").fired == 4


def test_frequency_one_is_every_hit(reg: FaultRegistry) -> None:
    reg.control("name bd_read frequency 1")
    assert fire_pattern(reg, "bd_read", 3) == [1, 2, 3]


def test_times_stops_after_n_fires(reg: FaultRegistry) -> None:
    reg.control("name bd_write times 3")
    assert fire_pattern(reg, "bd_write", 1) == [1]
    assert reg.site("bd_write").state == "enabled times=2"
    assert fire_pattern(reg, "bd_write", 9) == [1, 2]
    site = reg.site("bd_write")
    assert (site.hits, site.fired, site.state) == (10, 3, "disabled")


def test_frequency_with_times(reg: FaultRegistry) -> None:
    reg.control("name bd_write frequency 2 times 3")
    assert fire_pattern(reg, "bd_write", 12) == [2, 4, 6]


def test_probability_is_reproducible_with_a_seed() -> None:
    def run(seed: int) -> list[int]:
        registry = FaultRegistry(roots=[], seed=seed)
        registry.register_site("p", "io")
        registry.control("name p probability 0.3")
        return fire_pattern(registry, "p", 200)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_probability_fires_about_p_of_the_hits(reg: FaultRegistry) -> None:
    reg.control("seed 1234; name bd_read probability 0.25")
    fires = len(fire_pattern(reg, "bd_read", 8000))
    assert 1800 < fires < 2200  # 2000 expected, sigma ~39


def test_probability_draws_do_not_depend_on_other_sites(reg: FaultRegistry) -> None:
    reg.control("name bd_read probability 0.5")
    alone = fire_pattern(reg, "bd_read", 100)
    reg.control("name bd_read probability 0.5; name bd_write probability 0.5")
    interleaved = []
    for i in range(1, 101):
        reg.dynamic_fault("bd_write")
        if reg.dynamic_fault("bd_read"):
            interleaved.append(i)
    assert interleaved == alone


def test_probability_bounds_and_times(reg: FaultRegistry) -> None:
    reg.control("name bd_read probability 0; name bd_write probability 1 times 4")
    assert fire_pattern(reg, "bd_read", 100) == []
    assert fire_pattern(reg, "bd_write", 10) == [1, 2, 3, 4]


def test_seed_restarts_the_draws(reg: FaultRegistry) -> None:
    reg.control("seed 5; name bd_read probability 0.5")
    first = fire_pattern(reg, "bd_read", 50)
    reg.seed(5)
    assert fire_pattern(reg, "bd_read", 50) == first
    reg.control("seed 5")
    assert fire_pattern(reg, "bd_read", 50) == first
    with pytest.raises(InvalidArgument, match="seed must be non-negative"):
        reg.seed(-1)


def test_class_prefix_matches_subclasses(reg: FaultRegistry) -> None:
    reg.control("class io enable")
    assert armed(reg) == {"bd_read", "bd_write", "bd_flush"}
    reg.control("reset; class io:write enable")
    assert armed(reg) == {"bd_write"}
    reg.control("reset; class memory enable")
    assert armed(reg) == {"br_page", "pc_buffer"}
    reg.control("reset; class error enable")
    assert armed(reg) == {"commit_cp"}


def test_line_ranges_select_the_right_sites(reg: FaultRegistry) -> None:
    reg.control("line 10-20 enable")
    assert armed(reg) == {"bd_read", "bd_write", "br_window", "commit_cp"}
    reg.control("reset; file blockdev.py line 10-20 enable")
    assert armed(reg) == {"bd_read", "bd_write"}
    reg.control("reset; line 30 enable")
    assert armed(reg) == {"bd_flush"}


def test_index_ranges_count_from_zero_over_the_matches(reg: FaultRegistry) -> None:
    reg.control("index 2-3 enable")
    assert armed(reg) == {NAMES[2], NAMES[3]}
    reg.control("reset; index 0 enable")
    assert armed(reg) == {NAMES[0]}
    reg.control("reset; class io index 1 enable")
    assert armed(reg) == {"bd_write"}
    reg.control("reset; class memory index 1-5 enable")
    assert armed(reg) == {"pc_buffer"}


def test_counters_are_exact(reg: FaultRegistry) -> None:
    reg.control("name bd_write frequency 7; name bd_read enable")
    for _ in range(1000):
        reg.dynamic_fault("bd_write")
        reg.dynamic_fault("bd_read")
        reg.dynamic_fault("bd_flush")
    hits = {site.name: (site.hits, site.fired) for site in reg.sites()}
    assert hits["bd_write"] == (1000, 142)
    assert hits["bd_read"] == (1000, 1000)
    assert hits["bd_flush"] == (1000, 0)
    stats = reg.statistics()
    assert (stats.hits, stats.fired, stats.armed, stats.sites) == (3000, 1142, 2, len(SITES))
    assert stats.logged == 256


def test_counters_are_exact_from_worker_threads(reg: FaultRegistry) -> None:
    def hammer() -> None:
        for _ in range(20_000):
            reg.dynamic_fault("bd_read")

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert reg.site("bd_read").hits == 80_000


def test_counters_survive_a_spent_tick_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_TICK_BUDGET", 3)
    registry = FaultRegistry(roots=[])
    registry.register_site("x", "io")
    assert fire_pattern(registry, "x", 10) == []
    assert registry.site("x").hits == 10
    registry.control("name x frequency 4")
    assert fire_pattern(registry, "x", 8) == [4, 8]
    registry.control("name x disable")
    fire_pattern(registry, "x", 7)
    site = registry.site("x")
    assert (site.hits, site.fired) == (25, 2)


def test_reset_clears_every_site(reg: FaultRegistry) -> None:
    reg.control("name bd_write enable; name br_window enable delay 3")
    reg.dynamic_fault("bd_write")
    reg.dynamic_fault("bd_read")
    reg.control("reset")
    assert armed(reg) == set()
    assert all((site.hits, site.fired) == (0, 0) for site in reg.sites())
    assert reg.fire_log() == ""
    reg.control("name bd_write enable")
    reg.reset()
    assert reg.statistics().armed == 0


# ---------------------------------------------------------------------------
# self-test sites:

SELFTEST_SITES = [
    ("bd_corrupt", "io:selftest", "fusefs/blockdev.py", 22, "fusefs.blockdev", "BlockDevice.write"),
    ("crash", "error:selftest", "fusefs/fuse_ops.py", 5, "fusefs.fuse_ops", "Ops.write"),
]


@pytest.fixture
def reg_selftest(reg: FaultRegistry) -> FaultRegistry:
    for name, cls, file, line, module, func in SELFTEST_SITES:
        reg.register_site(name, cls, file=file, line=line, module=module, func=func)
    return reg


@pytest.mark.parametrize(
    "command",
    [
        "enable",
        "oneshot",
        "class io enable",
        "class error probability 1",
        "file blockdev.py enable",
        "module blockdev frequency 2",
        "func write enable",
        "name * enable",
        "name bd_* enable",
        "index 0-100 enable",
    ],
)
def test_broad_queries_leave_selftest_sites_alone(
    reg_selftest: FaultRegistry, command: str
) -> None:
    reg_selftest.control(command)
    assert armed(reg_selftest)
    assert not armed(reg_selftest) & {"bd_corrupt", "crash"}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("name bd_corrupt oneshot", {"bd_corrupt"}),
        ("name crash enable", {"crash"}),
        ("class io:selftest enable", {"bd_corrupt"}),
        ("class error:selftest enable", {"crash"}),
        ("file blockdev.py name bd_corrupt enable", {"bd_corrupt"}),
    ],
)
def test_selftest_sites_armed_when_named(
    reg_selftest: FaultRegistry, command: str, expected: set[str]
) -> None:
    reg_selftest.control(command)
    assert armed(reg_selftest) == expected


def test_a_query_that_only_reaches_selftest_sites_says_why(reg_selftest: FaultRegistry) -> None:
    with pytest.raises(NotFound, match="self-test sites match only by their name"):
        reg_selftest.control("file fuse_ops.py enable")
    assert armed(reg_selftest) == set()


def test_index_counts_past_selftest_sites(reg_selftest: FaultRegistry) -> None:
    # bd_corrupt sits between bd_write (line 20) and bd_flush (30) in the listing.
    reg_selftest.control("file blockdev.py index 2 enable")
    assert armed(reg_selftest) == {"bd_flush"}
    reg_selftest.control("file blockdev.py index 2 disable")
    assert armed(reg_selftest) == set()


def test_the_real_selftest_sites_are_classed_selftest() -> None:
    selftest = {site.name for site in REGISTRY.sites() if faults.is_selftest_class(site.cls)}
    assert {"daemon_crash", "blockdev_corrupt_write", "commit_skip_checkpoint_flush"} <= selftest


# listing, fire log, statistics:

LISTING_LINE = re.compile(
    r"(?P<file>\S+):(?P<line>\d+) class:(?P<cls>\S+) module:(?P<module>\S+) func:(?P<func>\S+) "
    r"name:(?P<name>\S+) (?P<state>.+) hits:(?P<hits>\d+) fired:(?P<fired>\d+)"
)


def test_listing_format(reg: FaultRegistry) -> None:
    reg.control("seed 17; name bd_write frequency 3 times 2; name br_window oneshot delay 2.5")
    for _ in range(4):
        reg.dynamic_fault("bd_write")
    header, rule, *lines = reg.listing().splitlines()
    assert header == f"# sites:{len(SITES)} armed:2 fired:1 seed:17"
    assert rule.startswith("# self-test sites match only by their name")
    assert len(lines) == len(SITES)
    parsed = [LISTING_LINE.fullmatch(line) for line in lines]
    assert all(parsed)
    assert [m["name"] for m in parsed if m] == NAMES  # file, then line
    assert lines[1] == (
        "fusefs/blockdev.py:20 class:io:write module:fusefs.blockdev func:BlockDevice.write "
        "name:bd_write frequency=3 times=1 hits:4 fired:1"
    )
    assert lines[4] == (
        "fusefs/io/buffered.py:12 class:race module:fusefs.io.buffered func:read_folio "
        "name:br_window oneshot delay=2.5ms hits:0 fired:0"
    )
    assert [str(site) for site in reg.sites()] == lines
    assert reg.sites()[1].location == "fusefs/blockdev.py:20"
    assert reg.listing().endswith("\n")


async def test_fire_log_records_site_time_and_task(reg: FaultRegistry) -> None:
    reg.control("name bd_write enable")

    async def writer() -> None:
        reg.dynamic_fault("bd_write")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, name="writer-task")
    reg.dynamic_fault("bd_read")  # disabled: not logged
    lines = reg.fire_log().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6} bd_write fusefs/blockdev.py:20 hit:1 "
        r"task:writer-task",
        lines[0],
    )


def test_fire_log_is_bounded_and_outside_trio_has_no_task() -> None:
    registry = FaultRegistry(roots=[], log_size=4)
    registry.register_site("x", "io")
    registry.control("name x enable")
    for _ in range(10):
        registry.dynamic_fault("x")
    lines = registry.fire_log().splitlines()
    assert [line.split()[3] for line in lines] == ["hit:7", "hit:8", "hit:9", "hit:10"]
    assert all(line.endswith(" task:-") for line in lines)


def test_statistics_and_repr() -> None:
    registry = FaultRegistry(roots=[], seed=3)
    assert repr(registry) == "<FaultRegistry sites=? armed=0 fired=0 seed=3>"
    registry.register_site("x", "io")
    registry.control("name x enable")
    registry.dynamic_fault("x")
    assert repr(registry) == "<FaultRegistry sites=1 armed=1 fired=1 seed=3>"
    stats = registry.statistics()
    assert (stats.sites, stats.armed, stats.hits, stats.fired, stats.seed) == (1, 1, 1, 1, 3)
    with pytest.raises(AttributeError):
        stats.sites = 2  # type: ignore[misc]


# ---------------------------------------------------------------------------
# discovery:


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))


FAKE_PACKAGE = {
    "fakepkg/__init__.py": "",
    "fakepkg/dev.py": """\
        raise RuntimeError("the scan must not import this module")

        from fusefs.faults import dynamic_fault, race_fault
        from fusefs.faults import dynamic_fault as df


        class Device:
            def write(self) -> None:
                if dynamic_fault("fake_write", cls="io:write"):
                    raise OSError

            async def window(self) -> None:
                await race_fault("fake_window")

            class Inner:
                def method(self) -> None:
                    df("fake_positional_cls", "error:mount")


        def outer() -> None:
            def inner() -> None:
                dynamic_fault("fake_inner")
    """,
    "fakepkg/sub/__init__.py": """\
        from fusefs import faults

        faults.memory_fault("fake_module_level")
    """,
    "fakepkg/sub/mem.py": """\
        import fusefs.faults
        import fusefs.faults as ff
        from fusefs import faults


        def allocate(cache, ino, index, name):
            faults.alloc_page("fake_page", 4096)
            ff.alloc_buffer(name="fake_buffer", size=10)
            fusefs.faults.alloc_buffer("fake_dma", 10, cls="memory:dma")
            cache.alloc_page(ino, index)  # some other alloc_page: not a site
            dynamic_fault(name)  # not imported from fusefs.faults: not a site
    """,
    "fakepkg/.hidden/skipped.py": 'from fusefs.faults import dynamic_fault\ndynamic_fault("no")\n',
}


def test_listing_shows_sites_in_modules_never_imported(tmp_path: Path) -> None:
    write_package(tmp_path, FAKE_PACKAGE)
    registry = FaultRegistry(roots=[tmp_path / "fakepkg"])
    sites = {site.name: site for site in registry.sites()}
    assert "fakepkg.dev" not in sys.modules
    found = {
        name: (site.file, site.line, site.module, site.func, site.cls, site.hits, site.fired)
        for name, site in sites.items()
    }
    assert found == {
        "fake_write": ("fakepkg/dev.py", 9, "fakepkg.dev", "Device.write", "io:write", 0, 0),
        "fake_window": ("fakepkg/dev.py", 13, "fakepkg.dev", "Device.window", "race", 0, 0),
        "fake_positional_cls": (
            "fakepkg/dev.py",
            17,
            "fakepkg.dev",
            "Device.Inner.method",
            "error:mount",
            0,
            0,
        ),
        "fake_inner": ("fakepkg/dev.py", 22, "fakepkg.dev", "outer.inner", "error", 0, 0),
        "fake_module_level": (
            "fakepkg/sub/__init__.py",
            3,
            "fakepkg.sub",
            "<module>",
            "memory",
            0,
            0,
        ),
        "fake_page": ("fakepkg/sub/mem.py", 7, "fakepkg.sub.mem", "allocate", "memory:page", 0, 0),
        "fake_buffer": (
            "fakepkg/sub/mem.py",
            8,
            "fakepkg.sub.mem",
            "allocate",
            "memory:buffer",
            0,
            0,
        ),
        "fake_dma": ("fakepkg/sub/mem.py", 9, "fakepkg.sub.mem", "allocate", "memory:dma", 0, 0),
    }
    listing = registry.listing()
    assert listing.startswith("# sites:8 armed:0 fired:0 seed:0\n")
    assert (
        "fakepkg/dev.py:9 class:io:write module:fakepkg.dev func:Device.write "
        "name:fake_write disabled hits:0 fired:0\n"
    ) in listing
    # Queries work on scanned sites, including the module's last component.
    registry.control("module mem func allocate class memory enable")
    assert armed(registry) == {"fake_page", "fake_buffer", "fake_dma"}
    registry.control("reset; module sub oneshot")
    assert armed(registry) == {"fake_module_level"}
    registry.control("reset; file dev.py line 10-20 enable")
    assert armed(registry) == {"fake_window", "fake_positional_cls"}


def test_scan_resolves_relative_imports(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "fusefs/__init__.py": "",
            "fusefs/io/__init__.py": "from ..faults import race_fault\n",
            "fusefs/io/direct.py": """\
                from .. import faults
                from ..faults import dynamic_fault


                async def write():
                    if dynamic_fault("direct_write", cls="io:write"):
                        return
                    await faults.race_fault("direct_window")
            """,
            "fusefs/blockdev.py": """\
                from .faults import alloc_buffer

                def read():
                    return alloc_buffer("blockdev_buffer", 512)
            """,
        },
    )
    registry = FaultRegistry(roots=[tmp_path / "fusefs"])
    assert {(s.name, s.location, s.func) for s in registry.sites()} == {
        ("blockdev_buffer", "fusefs/blockdev.py:4", "read"),
        ("direct_write", "fusefs/io/direct.py:6", "write"),
        ("direct_window", "fusefs/io/direct.py:8", "write"),
    }


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {
                "pkg/a.py": 'from fusefs.faults import dynamic_fault\n\ndynamic_fault("same")\n',
                "pkg/b.py": 'from fusefs.faults import race_fault\n\nrace_fault("same")\n',
            },
            "fault site name 'same' is used twice: pkg/a.py:3 and pkg/b.py:3",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import dynamic_fault\nx = 'n'\ndynamic_fault(x)\n"},
            "pkg/a.py:3: dynamic_fault() needs a string literal name",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import alloc_page\nalloc_page(size=4)\n"},
            "pkg/a.py:2: alloc_page() needs a string literal name",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import dynamic_fault\ndynamic_fault('n', cls=C)\n"},
            "pkg/a.py:2: dynamic_fault() needs a string literal cls",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import dynamic_fault\ndynamic_fault('n', 'disk')\n"},
            "pkg/a.py:2: unknown fault class 'disk'",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import dynamic_fault\ndynamic_fault('n', 'race')\n"},
            "pkg/a.py:2: dynamic_fault() cannot have class 'race'",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import race_fault\nrace_fault('n', cls='io')\n"},
            "pkg/a.py:2: race_fault() cannot have class 'io'",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import dynamic_fault\ndynamic_fault('a b')\n"},
            "pkg/a.py:2: fault site name 'a b' must be non-empty without blanks",
        ),
        (
            {"pkg/a.py": "from fusefs.faults import dynamic_fault\ndef broken(:\n"},
            "pkg/a.py:2: cannot scan for fault sites",
        ),
    ],
)
def test_scan_rejects_malformed_sites(tmp_path: Path, files: dict[str, str], message: str) -> None:
    write_package(tmp_path, files)
    registry = FaultRegistry(roots=[tmp_path / "pkg"])
    with pytest.raises(FaultSiteError) as info:
        registry.sites()
    assert message in str(info.value)
    with pytest.raises(FaultSiteError):  # every later use fails the same way
        registry.dynamic_fault("anything")


def test_scan_reports_every_problem_at_once(tmp_path: Path) -> None:
    write_package(
        tmp_path,
        {
            "pkg/a.py": """\
                from fusefs.faults import dynamic_fault
                dynamic_fault("x")
                dynamic_fault("x")
                dynamic_fault(1)
            """
        },
    )
    with pytest.raises(FaultSiteError) as info:
        FaultRegistry(roots=[tmp_path / "pkg"]).sites()
    assert str(info.value).splitlines() == [
        "pkg/a.py:4: dynamic_fault() needs a string literal name, so that the site is known "
        "before it runs",
        "fault site name 'x' is used twice: pkg/a.py:2 and pkg/a.py:3 (one name = one call site)",
    ]


def test_the_real_package_scans_cleanly() -> None:
    """Every site in fusefs/ and tools/ has a unique literal name and a valid class."""
    sites = FaultRegistry().sites()
    for site in sites:
        assert site.cls.partition(":")[0] in CLASSES
        assert site.file.startswith(("fusefs/", "tools/"))
        assert site.module.startswith(("fusefs.", "tools."))
        assert (site.hits, site.fired, site.state) == (0, 0, "disabled")
    assert len({site.name for site in sites}) == len(sites)


def test_unscanned_name_is_registered_on_first_use_from_the_caller() -> None:
    registry = FaultRegistry(roots=[])
    registry.dynamic_fault("runtime_site", cls="io:read")
    line = sys._getframe().f_lineno - 1
    site = registry.site("runtime_site")
    assert (site.cls, site.line, site.module, site.hits) == ("io:read", line, __name__, 1)
    assert site.func == "test_unscanned_name_is_registered_on_first_use_from_the_caller"
    assert site.file.endswith("test_faults.py")
    assert not Path(site.file).is_absolute()
    # The registration is kept: later calls with another class do not change it.
    registry.dynamic_fault("runtime_site", cls="error")
    assert registry.site("runtime_site").cls == "io:read"


def test_runtime_registration_checks_the_class() -> None:
    registry = FaultRegistry(roots=[])
    with pytest.raises(FaultSiteError, match="cannot have class 'race'"):
        registry.dynamic_fault("bad", cls="race")
    with pytest.raises(FaultSiteError, match="unknown fault class 'disk'"):
        registry.memory_fault("bad", cls="disk")


def test_register_site_rejects_duplicates_and_bad_names(reg: FaultRegistry) -> None:
    with pytest.raises(FaultSiteError, match="'bd_write' is already registered at "):
        reg.register_site("bd_write", "io")
    with pytest.raises(FaultSiteError, match="must be non-empty"):
        reg.register_site("a;b", "io")
    with pytest.raises(FaultSiteError, match="unknown fault class"):
        reg.register_site("ok", "network")


def test_register_site_takes_the_location_from_the_caller() -> None:
    registry = FaultRegistry(roots=[])

    def helper() -> None:
        registry.register_site("helper_site", "error")

    helper()
    site = registry.site("helper_site")
    assert site.func.endswith("helper")
    assert "<locals>" not in site.func
    with pytest.raises(NotFound, match="no site named 'nosuch'"):
        registry.site("nosuch")


def test_register_site_conflicting_with_the_scan(tmp_path: Path) -> None:
    write_package(
        tmp_path, {"pkg/a.py": 'from fusefs.faults import dynamic_fault\ndynamic_fault("a")\n'}
    )
    registry = FaultRegistry(roots=[tmp_path / "pkg"])
    with pytest.raises(FaultSiteError, match=r"already registered at pkg/a\.py:2"):
        registry.register_site("a", "io")


# ---------------------------------------------------------------------------
# race windows:


async def test_race_fault_not_fired_does_not_checkpoint(reg: FaultRegistry) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        await reg.race_fault("br_window")  # a checkpoint here would raise Cancelled
    assert not scope.cancelled_caught
    assert reg.site("br_window").hits == 1

    reg.control("name br_window enable")
    with trio.CancelScope() as scope:
        scope.cancel()
        await reg.race_fault("br_window")
    assert scope.cancelled_caught


async def run_race(registry: FaultRegistry, intruder_delay: float) -> list[str]:
    """Task A passes the window ``br_window``; task B wakes when A reaches it,
    takes ``intruder_delay`` seconds, and records whether A had left."""
    log: list[str] = []
    at_window = trio.Event()

    async def task_a() -> None:
        log.append("A enters")
        at_window.set()
        await registry.race_fault("br_window")
        log.append("A leaves")

    async def task_b() -> None:
        await at_window.wait()
        if intruder_delay:
            await trio.sleep(intruder_delay)
        log.append("B runs")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task_a)
        nursery.start_soon(task_b)
    return log


async def test_race_window_closed_when_disabled(reg: FaultRegistry) -> None:
    for _ in range(10):
        assert await run_race(reg, 0) == ["A enters", "A leaves", "B runs"]


async def test_race_window_enabled_yields_one_checkpoint(
    reg: FaultRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    reg.control("name br_window enable")
    # Trio orders a scheduling batch at random, so after one checkpoint the
    # runnable task B goes first about half the time: over 30 runs, surely once.
    orders = {tuple(await run_race(reg, 0)) for _ in range(30)}
    assert ("A enters", "B runs", "A leaves") in orders
    # One checkpoint is never enough for a task that needs more time.
    assert await run_race(reg, 0.002) == ["A enters", "A leaves", "B runs"]


async def test_race_window_delay_lets_a_second_task_run_inside(
    reg: FaultRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    reg.control("name br_window oneshot delay 10")
    start = trio.current_time()
    assert await run_race(reg, 0.002) == ["A enters", "B runs", "A leaves"]
    assert trio.current_time() - start == pytest.approx(0.010)
    # oneshot: the window is closed again.
    assert await run_race(reg, 0.002) == ["A enters", "A leaves", "B runs"]
    site = reg.site("br_window")
    assert (site.hits, site.fired) == (2, 1)


async def test_delay_range_draws_each_window_from_a_seeded_rng(
    reg: FaultRegistry, autojump_clock: trio.testing.MockClock
) -> None:
    async def windows() -> list[float]:
        out = []
        for _ in range(20):
            start = trio.current_time()
            await reg.race_fault("br_window")
            out.append(trio.current_time() - start)
        return out

    reg.control("seed 3; name br_window enable delay 1-4")
    first = await windows()
    assert all(0.001 <= w <= 0.004 for w in first), first
    assert len({round(w, 9) for w in first}) > 10  # drawn, not one fixed delay
    reg.control("seed 3")  # the same seed replays the same windows
    assert await windows() == pytest.approx(first)
    reg.control("seed 4")
    assert await windows() != pytest.approx(first)


async def test_delay_applies_to_race_sites_only(reg: FaultRegistry) -> None:
    reg.control("line 10-12 enable delay 3")
    assert states(reg)["br_window"] == "enabled delay=3ms"
    assert states(reg)["bd_read"] == "enabled"


# ---------------------------------------------------------------------------
# memory:


def test_alloc_helpers_allocate_zeroed_buffers(reg: FaultRegistry) -> None:
    page = reg.alloc_page("br_page", 4096)
    buffer = reg.alloc_buffer("pc_buffer", 100)
    assert page == bytearray(4096)
    assert buffer == bytearray(100)
    assert isinstance(page, bytearray)
    reg.memory_fault("br_page")
    assert reg.site("br_page").hits == 2


def test_memory_sites_raise_enomem_when_fired(reg: FaultRegistry) -> None:
    reg.control("class memory oneshot")
    with pytest.raises(OutOfMemory) as info:
        reg.alloc_page("br_page", 4096)
    assert info.value.code == errno.ENOMEM
    assert str(info.value) == "br_page: injected allocation failure (fusefs/io/buffered.py:40)"
    with pytest.raises(OutOfMemory):
        reg.alloc_buffer("pc_buffer", 10)
    assert reg.alloc_page("br_page", 10) == bytearray(10)  # oneshot spent
    registry = FaultRegistry(roots=[])
    registry.register_site("mem", "memory")
    registry.control("name mem frequency 2")
    registry.memory_fault("mem")
    with pytest.raises(OutOfMemory, match="mem: injected"):
        registry.memory_fault("mem")


def test_real_allocation_failure_is_enomem() -> None:
    registry = FaultRegistry(roots=[])
    with pytest.raises(OutOfMemory, match="huge: cannot allocate"):
        registry.alloc_buffer("huge", sys.maxsize)


def test_runtime_memory_sites_get_their_function_class() -> None:
    registry = FaultRegistry(roots=[])
    registry.alloc_page("rt_page", 1)
    registry.alloc_buffer("rt_buffer", 1)
    registry.memory_fault("rt_memory")
    assert {s.name: s.cls for s in registry.sites()} == {
        "rt_page": "memory:page",
        "rt_buffer": "memory:buffer",
        "rt_memory": "memory",
    }


def test_alloc_pages_counts_one_hit_per_page() -> None:
    registry = FaultRegistry(roots=[])
    assert registry.alloc_pages("rt_pages", 8, 0) == []
    pages = registry.alloc_pages("rt_pages", 8, 3)
    assert pages == [bytearray(8)] * 3
    assert len({id(p) for p in pages}) == 3  # three buffers, not one shared
    assert registry.site("rt_pages").cls == "memory:page"
    assert registry.site("rt_pages").hits == 3
    data = memoryview(bytes(range(24)))
    assert registry.alloc_pages("rt_pages", 8, 3, init=data) == [
        bytearray(data[0:8]),
        bytearray(data[8:16]),
        bytearray(data[16:24]),
    ]
    # Fires on the same page a loop of alloc_page would (the third after
    # arming); nothing is returned and the hits stop there: 6 + 3.
    registry.control("name rt_pages frequency 3 times 1")
    with pytest.raises(OutOfMemory, match="rt_pages: injected"):
        registry.alloc_pages("rt_pages", 8, 10)
    site = registry.site("rt_pages")
    assert (site.hits, site.fired) == (9, 1)
    assert len(registry.alloc_pages("rt_pages", 8, 4)) == 4  # times 1: spent
    registry.control("name rt_pages oneshot")
    with pytest.raises(OutOfMemory):
        registry.alloc_pages("rt_pages", 8, 1)
    with pytest.raises(OutOfMemory, match="huge: cannot allocate"):
        registry.alloc_pages("huge", sys.maxsize, 1)


# ---------------------------------------------------------------------------
# start-up specs:


def test_apply_startup_specs(reg: FaultRegistry) -> None:
    reg.apply_startup(["name bd_write oneshot", "class memory probability 0.5; seed 3"])
    assert armed(reg) == {"bd_write", "br_page", "pc_buffer"}
    assert reg.statistics().seed == 3
    reg.apply_startup([])


def test_apply_startup_is_all_or_nothing(reg: FaultRegistry) -> None:
    with pytest.raises(InvalidArgument, match="unknown keyword 'bogus'"):
        reg.apply_startup(["name bd_write oneshot", "bogus"])
    with pytest.raises(NotFound):
        reg.apply_startup(["name bd_write oneshot", "name nosuch enable"])
    assert armed(reg) == set()


def test_apply_environment(reg: FaultRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    reg.apply_environment()
    assert armed(reg) == set()
    monkeypatch.setenv(ENV_VAR, "name bd_read enable;name commit_cp frequency 2")
    reg.apply_environment()
    assert armed(reg) == {"bd_read", "commit_cp"}
    reg.apply_environment({ENV_VAR: "reset"})
    assert armed(reg) == set()
    with pytest.raises(InvalidArgument):
        reg.apply_environment({ENV_VAR: "name bd_read sometimes"})


# ---------------------------------------------------------------------------
# the module-level functions on REGISTRY:


@pytest.fixture
def default_registry() -> Iterator[FaultRegistry]:
    REGISTRY.reset()
    yield REGISTRY
    REGISTRY.reset()


async def test_module_functions_use_the_default_registry(
    default_registry: FaultRegistry,
) -> None:
    assert not dynamic_fault("test_faults_io", cls="io:test")
    await race_fault("test_faults_window")
    memory_fault("test_faults_memory")
    assert alloc_page("test_faults_page", 8) == bytearray(8)
    assert alloc_pages("test_faults_pages", 8, 2) == [bytearray(8)] * 2
    assert alloc_buffer("test_faults_buffer", 8) == bytearray(8)
    default_registry.control("name test_faults_* oneshot")
    assert dynamic_fault("test_faults_io", cls="io:test")
    assert not dynamic_fault("test_faults_io", cls="io:test")
    with trio.CancelScope() as scope:
        scope.cancel()
        await race_fault("test_faults_window")
    assert scope.cancelled_caught
    with pytest.raises(OutOfMemory):
        memory_fault("test_faults_memory")
    with pytest.raises(OutOfMemory):
        alloc_page("test_faults_page", 8)
    with pytest.raises(OutOfMemory):
        alloc_pages("test_faults_pages", 8, 2)
    with pytest.raises(OutOfMemory):
        alloc_buffer("test_faults_buffer", 8)
    sites = {site.name: site for site in default_registry.sites()}
    assert sites["test_faults_io"].file.endswith("test_faults.py")
    assert sites["test_faults_page"].cls == "memory:page"
    assert (sites["test_faults_io"].hits, sites["test_faults_io"].fired) == (3, 1)
    assert faults._TICKS is default_registry._ticks
