"""Directory against a dict model: the mapping, cookie order, resumable scans, blocks."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from itertools import islice, pairwise

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fusefs import dirents
from fusefs.dirents import BLOCK, COOKIE_MAX, Directory

names = st.binary(min_size=1, max_size=4)
inos = st.one_of(st.integers(0, 300), st.integers(2**63, 2**64 - 1))


class DirectoryMachine(RuleBasedStateMachine):
    """Random inserts, overwrites and deletes against a dict, which keeps the same
    order: an overwrite stays in place, a reinserted name goes to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Directory()
        self.model: dict[bytes, int] = {}
        self.cookies: dict[bytes, int] = {}
        self.last_cookie = 0
        # An open scan: where it stands, what it has returned, and the entries
        # present since it began.
        self.scan_at = 0
        self.scanned: list[bytes] = []
        self.stable: set[bytes] = set()

    @rule(name=names, ino=inos)
    def insert(self, name: bytes, ino: int) -> None:
        self.d[name] = ino
        if name not in self.model:
            self.last_cookie += 1
            self.cookies[name] = self.last_cookie
        self.model[name] = ino

    @rule(base=names, count=st.integers(1, 3 * BLOCK))
    def insert_many(self, base: bytes, count: int) -> None:
        for i in range(count):
            self.insert(base + b"-%d" % i, i)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(list(self.model)))
        del self.d[name]
        del self.model[name], self.cookies[name]
        self.stable.discard(name)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), keep=st.integers(0, 3))
    def delete_most(self, data: st.DataObject, keep: int) -> None:
        """Empty whole blocks, and leave others nearly empty."""
        for name in list(self.model)[keep::4] + list(self.model)[keep + 1 :: 4]:
            del self.d[name]
            del self.model[name], self.cookies[name]
            self.stable.discard(name)

    @rule(name=names)
    def delete_missing(self, name: bytes) -> None:
        if name not in self.model:
            with pytest.raises(KeyError):
                del self.d[name]

    @rule(name=names)
    def lookup(self, name: bytes) -> None:
        probe = bytes(bytearray(name))  # equal, not the stored object
        assert self.d.get(probe) == self.model.get(probe)
        assert self.d.get(probe, -1) == self.model.get(probe, -1)
        assert (probe in self.d) == (probe in self.model)
        if probe in self.model:
            assert self.d[probe] == self.model[probe]
            assert self.d.cookie(probe) == self.cookies[probe]
        else:
            with pytest.raises(KeyError):
                self.d[probe]

    @rule(start=st.integers(-1, 2**63))
    def after(self, start: int) -> None:
        want = [(n, self.model[n], c) for n, c in self.cookies.items() if c > start]
        assert list(self.d.after(start)) == want

    @rule(k=st.integers(1, 2 * BLOCK))
    def scan_step(self, k: int) -> None:
        """Part of one scan that spans the other rules' changes; at its end, every
        entry present all along came out exactly once."""
        got = list(islice(self.d.after(self.scan_at), k))
        for name, ino, cookie in got:
            assert self.model[name] == ino
            assert self.cookies[name] == cookie > self.scan_at
            self.scanned.append(name)
            self.scan_at = cookie
        if not got:
            for name in self.stable:
                assert self.scanned.count(name) == 1
            self.rewind()

    @rule()
    def rewind(self) -> None:
        self.scan_at = 0
        self.scanned = []
        self.stable = set(self.model)

    @invariant()
    def agrees(self) -> None:
        d = self.d
        assert len(d) == len(self.model)
        assert list(d) == list(self.model)
        assert list(d.items()) == list(self.model.items())
        assert list(d.values()) == list(self.model.values())
        assert d == self.model
        cookies = [c for _, _, c in d.after(0)]
        assert cookies == list(self.cookies.values())
        assert all(0 < c <= COOKIE_MAX for c in cookies)
        # No block is empty; no two neighbours both under a quarter full.
        sizes = [len(b.names) for b in d._blocks]
        assert all(0 < s <= BLOCK for s in sizes)
        assert not any(a < BLOCK // 4 and b < BLOCK // 4 for a, b in pairwise(sizes))
        assert d._lasts == [b.cookies[-1] for b in d._blocks]
        assert all(d._entries[n] is b for b in d._blocks for n in b.names)


TestDirectory = DirectoryMachine.TestCase
TestDirectory.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def test_cookies_start_at_one_and_follow_insertion() -> None:
    d = Directory([(b"a", 10), (b"b", 11)])
    assert [(n, c) for n, _, c in d.after(0)] == [(b"a", 1), (b"b", 2)]
    d[b"c"] = 12
    assert d.cookie(b"c") == 3
    assert repr(d) == "<Directory 3 entries in 1 blocks, next cookie 4>"


def test_new_inode_under_a_name_keeps_its_cookie() -> None:
    """RENAME_EXCHANGE stores a new inode under each name: both stay where they were."""
    d = Directory([(b"a", 10), (b"b", 11), (b"c", 12)])
    d[b"a"], d[b"c"] = 12, 10
    assert list(d.after(0)) == [(b"a", 12, 1), (b"b", 11, 2), (b"c", 10, 3)]


def test_reinserted_name_gets_a_new_cookie() -> None:
    """A name removed and inserted again is a new entry: after every cookie so far."""
    d = Directory([(b"a", 10), (b"b", 11)])
    del d[b"a"]
    d[b"a"] = 10
    assert list(d.after(0)) == [(b"b", 11, 2), (b"a", 10, 3)]
    assert list(d) == [b"b", b"a"]


def test_scan_resumes_after_its_own_entry_was_removed() -> None:
    d = Directory((b"n%d" % i, i) for i in range(3 * BLOCK))
    seen = [n for n, _, _ in islice(d.after(0), 10)]
    at = d.cookie(seen[-1])
    for name in seen[5:] + [b"n%d" % i for i in range(20, 2 * BLOCK)]:
        del d[name]
    rest = [*range(10, 20), *range(2 * BLOCK, 3 * BLOCK)]
    assert [n for n, _, _ in d.after(at)] == [b"n%d" % i for i in rest]


def test_walk_survives_changes_between_two_entries() -> None:
    """`after` may be resumed after the directory changed: it finds its place again."""
    d = Directory((b"n%d" % i, i) for i in range(3 * BLOCK))
    walk = d.after(0)
    got = [next(walk)[0]]
    for i in range(1, 2 * BLOCK):  # empties and merges blocks under the walk
        if i % 3:
            del d[b"n%d" % i]
    d[b"late"] = 7
    got += [n for n, _, _ in walk]
    assert got == list(d)


def test_cookies_renumbered_rather_than_overflow_off_t(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dirents, "COOKIE_MAX", 5)
    d = Directory((b"n%d" % i, i) for i in range(5))
    del d[b"n0"], d[b"n3"]
    d[b"x"] = 9
    assert list(d.after(0)) == [(b"n1", 1, 1), (b"n2", 2, 2), (b"n4", 4, 3), (b"x", 9, 4)]


def test_bad_inode_numbers_are_refused() -> None:
    d = Directory()
    for ino in (-1, 2**64):
        with pytest.raises(ValueError, match="out of range"):
            d[b"a"] = ino
    assert not d


def _counting_bisects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the elements the two bisections of `Directory` compare against."""
    probes = [0]

    def probe(x: int) -> int:
        probes[0] += 1
        return x

    def left(a: object, x: int) -> int:
        return bisect.bisect_left(a, x, key=probe)  # type: ignore[call-overload, no-any-return]

    def right(a: object, x: int) -> int:
        return bisect.bisect_right(a, x, key=probe)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(dirents, "bisect_left", left)
    monkeypatch.setattr(dirents, "bisect_right", right)
    return probes


def test_seek_and_delete_cost_log_n_at_100000(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 100_000
    d = Directory((b"f%06d" % i, i) for i in range(n))
    probes = _counting_bisects(monkeypatch)

    def pages(start: int) -> Iterator[tuple[bytes, int, int]]:
        return islice(d.after(start), 30)

    assert len(list(pages(n // 2))) == 30
    assert probes[0] <= 2 * (n.bit_length() + 1)
    for i in range(n // 2):  # the first half unlinked, as `rm` of a sorted list does
        del d[b"f%06d" % i]
    probes[0] = 0
    assert [c for _, _, c in pages(0)] == list(range(n // 2 + 1, n // 2 + 31))
    assert probes[0] <= 2 * (n.bit_length() + 1)
    probes[0] = 0
    del d[b"f%06d" % (3 * n // 4)]
    assert probes[0] <= n.bit_length() + 1
    assert len(d._blocks) <= n // 2 // (BLOCK // 4) + 1
