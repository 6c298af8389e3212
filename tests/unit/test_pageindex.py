"""PageIndex against a dict model: every operation, ordered walks, chunk bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fusefs.pageindex import CHUNK, PageIndex

# Keys cluster in a few chunks (so chunks fill up and empty out) with outliers
# far away (so walks must skip empty stretches).
keys = st.one_of(
    st.integers(0, 3 * CHUNK),
    st.integers(1 << 40, (1 << 40) + 2 * CHUNK),
    st.integers(0, 1 << 48),
)


class PageIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index: PageIndex[str] = PageIndex()
        self.model: dict[int, str] = {}

    @rule(key=keys, value=st.text(min_size=1, max_size=3))
    def set(self, key: int, value: str) -> None:
        self.index[key] = value
        self.model[key] = value

    @rule(first=keys, values=st.lists(st.text(min_size=1, max_size=2), max_size=3 * CHUNK))
    def set_run(self, first: int, values: list[str]) -> None:
        self.index.set_run(first, values)
        for i, value in enumerate(values):
            self.model[first + i] = value

    @rule(first=keys, count=st.integers(1, 3 * CHUNK))
    def clear_run(self, first: int, count: int) -> None:
        keys = range(first, first + count)
        if all(k in self.model for k in keys):
            self.index.clear_run(first, count)
            for k in keys:
                del self.model[k]
        else:  # a key missing: KeyError there (the chunks before it are cleared)
            with pytest.raises(KeyError):
                self.index.clear_run(first, count)
            self.model = {k: v for k, v in self.model.items() if k in self.index}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), count=st.integers(1, 3 * CHUNK))
    def clear_present_run(self, data: st.DataObject, count: int) -> None:
        first = data.draw(st.sampled_from(sorted(self.model)))
        n = 0
        while n < count and first + n in self.model:
            n += 1
        self.clear_run(first, n)

    @rule(first=keys, count=st.integers(0, 3 * CHUNK))
    def get_run(self, first: int, count: int) -> None:
        want = [self.model.get(k) for k in range(first, first + count)]
        assert self.index.get_run(first, count) == want

    @rule(first=keys, span=st.integers(0, 3 * CHUNK))
    def first_present(self, first: int, span: int) -> None:
        stop = first + span
        want = min((k for k in self.model if first <= k < stop), default=stop)
        assert self.index.first_present(first, stop) == want

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        del self.index[key]
        del self.model[key]

    @rule(key=keys)
    def delete_missing(self, key: int) -> None:
        if key not in self.model:
            with pytest.raises(KeyError):
                del self.index[key]

    @rule(key=keys)
    def lookup(self, key: int) -> None:
        assert self.index.get(key) == self.model.get(key)
        assert (key in self.index) == (key in self.model)
        if key in self.model:
            assert self.index[key] == self.model[key]
        else:
            with pytest.raises(KeyError):
                self.index[key]

    @rule(first=keys, span=st.one_of(st.none(), st.integers(-2, 5 * CHUNK)))
    def walk(self, first: int, span: int | None) -> None:
        last = None if span is None else first + span
        want = sorted(k for k in self.model if k >= first and (last is None or k <= last))
        assert list(self.index.irange(first, last)) == want
        assert list(self.index.values_in(first, last)) == runs_once(self.model, want)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), nudge=st.sampled_from([-1, 0, 1]))
    def walk_between_keys(self, data: st.DataObject, nudge: int) -> None:
        # Bounds on and next to stored keys: the edges of each chunk's slice.
        a, b = sorted(data.draw(st.sampled_from(sorted(self.model))) for _ in range(2))
        self.walk(max(a + nudge, 0), b - a)
        self.walk(a, b - a + nudge)
        self.first_present(max(a + nudge, 0), b - a + 1)

    @invariant()
    def agrees(self) -> None:
        assert len(self.index) == len(self.model)
        assert list(self.index) == sorted(self.model)
        assert list(self.index.items()) == sorted(self.model.items())
        assert list(self.index.values()) == runs_once(self.model, sorted(self.model))
        # A chunk is kept exactly while it holds a key.
        assert len(self.index._chunks) == len({k // CHUNK for k in self.model})


def runs_once(model: dict[int, str], keys: list[int]) -> list[str]:
    """The values at ``keys`` (ascending), one object stored at consecutive
    keys once -- as a page of several blocks is walked."""
    out: list[str] = []
    prev = -2
    for key in keys:
        value = model[key]
        if not (out and value is out[-1] and prev == key - 1):
            out.append(value)
        prev = key
    return out


TestPageIndex = PageIndexMachine.TestCase
TestPageIndex.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@given(st.integers(-(1 << 20), -1))
def test_negative_keys_are_refused(key: int) -> None:
    index: PageIndex[int] = PageIndex()
    with pytest.raises(KeyError):
        index[key] = 1
    assert key not in index
    assert index.get(0) is None


def test_a_walk_past_a_huge_gap_costs_the_chunks_not_the_range() -> None:
    index: PageIndex[int] = PageIndex()
    index[5] = 1
    index[1 << 47] = 2
    # Two chunks: the walk looks at two chunks' slots, not 2**47 keys.
    assert list(index.irange(0)) == [5, 1 << 47]
    assert list(index.values_in(6, (1 << 47) - 1)) == []
    assert repr(index) == "<PageIndex 2 entries in 2 chunks>"
