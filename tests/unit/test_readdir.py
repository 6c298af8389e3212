"""readdir of the in-process core: resumable scans while the directory changes, and
the cost of one call in a large directory."""

from __future__ import annotations

import bisect
import os
import stat
import tempfile
import tracemalloc
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs import dirents
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.namespace import RENAME_EXCHANGE, ROOT_INO

from .conftest import assert_fsck_clean

UID, GID = os.getuid(), os.getgid()
FILE = stat.S_IFREG | 0o644


async def mknod(fs: Filesystem, parent: int, name: bytes) -> int:
    return (await fs.mknod(parent, name, FILE, 0, UID, GID)).ino


def scan_page(fs: Filesystem, fh: int, cookie: int, room: int) -> list[tuple[bytes, int, int]]:
    """One readdir reply of at most ``room`` entries, as `fuse_ops.readdir` takes them:
    ``(name, ino, cookie)``."""
    return [(n, a.ino, c) for n, a, c in islice(fs.readdir_entries(fh, cookie), room)]


async def scan_all(fs: Filesystem, ino: int, room: int = 7) -> list[tuple[bytes, int, int]]:
    fh = await fs.opendir(ino)
    out: list[tuple[bytes, int, int]] = []
    cookie = 0
    while page := scan_page(fs, fh, cookie, room):
        out += page
        cookie = page[-1][2]
    await fs.releasedir(fh)
    return out


# a scan interleaved with changes:

Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 12)),
        st.tuples(
            st.sampled_from(
                ["create", "unlink", "rename", "replace", "exchange", "move_out", "move_in"]
            ),
            st.integers(0, 1 << 20),
        ),
    ),
    max_size=80,
)


async def interleaved_scan(image: Path, initial: int, script: list[Op]) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    try:
        d = (await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)).ino
        other = (await fs.mkdir(ROOT_INO, b"other", 0o755, UID, GID)).ino
        model: dict[bytes, int] = {}  # d's entries
        outside: dict[bytes, int] = {}  # other's
        fresh = iter(b"n%d" % i for i in range(1 << 30))
        for _ in range(initial):
            name = next(fresh)
            model[name] = await mknod(fs, d, name)
        stable = set(model)  # present for the whole scan: shrinks as names are touched
        fh = await fs.opendir(d)
        cookie = 0
        returned: list[bytes] = []

        def pick(n: int, names: dict[bytes, int]) -> bytes:
            return sorted(names)[n % len(names)]

        for op, n in script:
            if op == "read":
                for name, ino, c in scan_page(fs, fh, cookie, n):
                    assert c > cookie, "cookies of one scan must increase"
                    assert model.get(name) == ino, f"{name!r} returned but not there"
                    returned.append(name)
                    cookie = c
            elif op == "create":
                name = next(fresh)
                model[name] = await mknod(fs, d, name)
            elif op == "move_in" and outside:
                src, name = pick(n, outside), next(fresh)
                await fs.rename(other, src, d, name, 0)
                model[name] = outside.pop(src)
            elif not model:
                continue
            elif op == "unlink":
                name = pick(n, model)
                await fs.unlink(d, name)
                del model[name]
                stable.discard(name)
            elif op == "rename":
                src, name = pick(n, model), next(fresh)
                await fs.rename(d, src, d, name, 0)
                model[name] = model.pop(src)
                stable.discard(src)
            elif op == "replace":
                src, dst = pick(n, model), pick(n // 7, model)
                await fs.rename(d, src, d, dst, 0)
                model[dst] = model.pop(src)
                stable -= {src, dst}  # dst was removed and inserted again
            elif op == "exchange":
                a, b = pick(n, model), pick(n // 7, model)
                await fs.rename(d, a, d, b, RENAME_EXCHANGE)
                model[a], model[b] = model[b], model[a]  # both names stay: still stable
            elif op == "move_out":
                src, name = pick(n, model), next(fresh)
                await fs.rename(d, src, other, name, 0)
                outside[name] = model.pop(src)
                stable.discard(src)
        while page := scan_page(fs, fh, cookie, 5):  # the rest of the scan
            for name, ino, c in page:
                assert c > cookie
                assert model.get(name) == ino
                returned.append(name)
                cookie = c
        await fs.releasedir(fh)
        for name in stable:
            assert returned.count(name) == 1, f"{name!r}: {returned.count(name)} times"
        # Every name but a replaced one is used once: none may come out twice.
        assert len(set(returned)) >= len(returned) - sum(op == "replace" for op, _ in script)
        assert sorted(n for n, _, _ in await scan_all(fs, d)) == sorted(model)
    finally:
        await fs.unmount()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.integers(0, 150), script=ops)
def test_scan_interleaved_with_changes_returns_stable_entries_once(
    initial: int, script: list[Op]
) -> None:
    """An entry neither added nor removed during a scan comes out exactly once; no
    entry comes out twice; every entry returned was there when it was."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "fs.img"
        mkfs(image, 64 << 20)
        trio.run(interleaved_scan, image, initial, script)
        assert_fsck_clean(image)


# cookies:


async def test_cookie_stays_valid_after_the_directory_changed(fs: Filesystem) -> None:
    d = (await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)).ino
    for i in range(300):
        await mknod(fs, d, b"f%03d" % i)
    fh = await fs.opendir(d)
    first = scan_page(fs, fh, 0, 100)
    cookie = first[-1][2]
    # Everything around the position changes, the entry at it too.
    for i in range(50, 250):
        await fs.unlink(d, b"f%03d" % i)
    for i in range(20):
        await mknod(fs, d, b"new%02d" % i)
    await fs.rename(d, b"f280", d, b"renamed", 0)
    rest: list[bytes] = []
    while page := scan_page(fs, fh, cookie, 9):
        rest += [n for n, _, _ in page]
        cookie = page[-1][2]
    await fs.releasedir(fh)
    want = [b"f%03d" % i for i in range(250, 300) if i != 280]
    assert rest == want + [b"new%02d" % i for i in range(20)] + [b"renamed"]
    # The same cookie works on another handle of the directory: cookies are the directory's.
    fh2 = await fs.opendir(d)
    assert [n for n, _, _ in scan_page(fs, fh2, first[-1][2], 3)] == want[:3]
    await fs.releasedir(fh2)


async def test_cookies_positive_and_from_one(fs: Filesystem) -> None:
    """0 is FUSE's "from the start", so no entry may have it; and off_t is signed."""
    for name in (b"a", b"b", b"c"):
        await mknod(fs, ROOT_INO, name)
    entries = await fs.readdir(await fs.opendir(ROOT_INO), 0)
    assert [(n, c) for n, _, c in entries] == [(b"a", 1), (b"b", 2), (b"c", 3)]
    assert all(0 < c < 2**63 for _, _, c in entries)


async def test_dot_and_dotdot_are_not_listed(fs: Filesystem) -> None:
    """As before: pyfuse3 does not require them; the kernel answers lookups of both."""
    d = (await fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID)).ino
    assert await scan_all(fs, d) == []
    assert (await fs.lookup(d, b"..")).ino == ROOT_INO


async def test_exchange_keeps_places_rename_takes_a_new_one(fs: Filesystem) -> None:
    a, b, c = [await mknod(fs, ROOT_INO, n) for n in (b"a", b"b", b"c")]
    await fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", RENAME_EXCHANGE)
    assert await scan_all(fs, ROOT_INO) == [(b"a", c, 1), (b"b", b, 2), (b"c", a, 3)]
    await fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)  # replaces b: a new entry b
    assert await scan_all(fs, ROOT_INO) == [(b"c", a, 3), (b"b", c, 4)]


async def test_order_survives_remount(fs: Filesystem, image: Path) -> None:
    for name in (b"z", b"a", b"m", b"b"):
        await mknod(fs, ROOT_INO, name)
    await fs.unlink(ROOT_INO, b"a")
    await fs.rename(ROOT_INO, b"z", ROOT_INO, b"y", 0)
    await fs.unmount()
    fs2 = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    try:
        # Renumbered from 1 at mount, in the same order.
        assert [(n, c) for n, _, c in await scan_all(fs2, ROOT_INO)] == [
            (b"m", 1),
            (b"b", 2),
            (b"y", 3),
        ]
    finally:
        await fs2.unmount()


# cost:


async def test_readdir_call_touches_log_n_plus_returned_at_100000(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """opendir copies nothing; a resumed readdir call compares O(log n) cookies and
    builds attributes only for the entries it returns -- also after the front half
    of the directory was unlinked (no tombstones to step over)."""
    n = 100_000
    d = (await fs.mkdir(ROOT_INO, b"big", 0o755, UID, GID)).ino
    for i in range(n):
        await mknod(fs, d, b"f%06d" % i)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fh = await fs.opendir(d)
        opened = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert opened < 1024, f"opendir of {n} entries allocated {opened} bytes"

    touched = {"probes": 0, "attrs": 0}

    def probe(x: int) -> int:
        touched["probes"] += 1
        return x

    def right(a: Any, x: int) -> int:
        return bisect.bisect_right(a, x, key=probe)

    attr = fs.attr

    def counting_attr(inode: Any) -> Any:
        touched["attrs"] += 1
        return attr(inode)

    monkeypatch.setattr(dirents, "bisect_right", right)
    monkeypatch.setattr(fs, "attr", counting_attr)
    log_n = n.bit_length()

    def one_call(cookie: int) -> list[tuple[bytes, int, int]]:
        touched.update(probes=0, attrs=0)
        return scan_page(fs, fh, cookie, 30)

    middle = one_call(n // 2)
    assert [name for name, _, _ in middle] == [b"f%06d" % i for i in range(n // 2, n // 2 + 30)]
    assert touched["probes"] <= 2 * (log_n + 1)
    assert touched["attrs"] == 30
    for i in range(n // 2):
        await fs.unlink(d, b"f%06d" % i)
    front = one_call(0)
    assert front[0][0] == b"f%06d" % (n // 2)
    assert touched["probes"] <= 2 * (log_n + 1)
    assert touched["attrs"] == 30
    await fs.releasedir(fh)
