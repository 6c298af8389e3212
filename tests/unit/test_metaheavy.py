"""The metadata-heavy campaign workload's model and checker, on a plain directory.

The workload runs its syscalls against ``tmp_path`` (no mount): what it recorded
must match the tree it left, and every planted difference -- a lost name, a
renamed directory, a dropped xattr, changed fsynced bytes, a name nobody made --
must make the power-cut check fail.  The in-flight operation's state is allowed,
a create's included (its inode number is learnt from the tree).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.campaign.metaheavy import MetaHeavyWorkload, exchange, state_total, walk
from tools.campaign.workloads import DaemonGone, Observations


@pytest.fixture(autouse=True)
def no_inode_reuse(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep every inode the workload unlinks, renames over or removes open
    (an ``O_PATH`` descriptor), so the plain directory never hands its number
    to a new file: fusefs never reuses one, and the checker tells files apart
    by number.  Without it a reused number made a swapped pair, or a new file,
    look like an older one in about one run in ten."""
    held: list[int] = []

    def pinning(real: Callable[..., None], victim_arg: int) -> Callable[..., None]:
        def call(*args: Any) -> None:
            with contextlib.suppress(OSError):
                held.append(os.open(args[victim_arg], os.O_PATH | os.O_NOFOLLOW))
            real(*args)

        return call

    monkeypatch.setattr(os, "unlink", pinning(os.unlink, 0))
    monkeypatch.setattr(os, "rmdir", pinning(os.rmdir, 0))
    monkeypatch.setattr(os, "rename", pinning(os.rename, 1))
    yield
    for fd in held:
        os.close(fd)


def _run(root: Path, seed: int = 1, ops: int = 400) -> MetaHeavyWorkload:
    w = MetaHeavyWorkload(seed, ops=ops)
    w.check_hash = True  # the incremental sum must equal a full recompute after every step
    obs = Observations()
    w.run(root, obs, lambda: None)
    assert not obs.problems, obs.problems
    assert not w.lost
    return w


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_model_matches_the_tree_it_made(tmp_path: Path, seed: int) -> None:
    w = _run(tmp_path, seed)
    found, _ = walk(tmp_path / "mh", data=False)
    assert state_total(found) == w.total == w.hashes[-1]
    assert w.verify(tmp_path, clean=True) == []
    assert w.verify(tmp_path, clean=False) == []
    kinds = {e[1] for e in found.values()}
    assert kinds == {"d", "f", "l"}
    assert any(e[4] > 1 for e in found.values()), "no hard links made"
    assert any(e[5] for e in found.values()), "no xattrs set"
    assert w.syncs > 20
    assert sum(1 for e in found.values() if e[1] == "d") >= 20


def test_the_workload_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _run(tmp_path / "a", ops=200)
    b = _run(tmp_path / "b", ops=200)
    assert sorted(a.tree) == sorted(b.tree)
    assert len(a.hashes) == len(b.hashes)


def _durable_file(w: MetaHeavyWorkload) -> str:
    """A file whose name the last sync made durable and that is still there."""
    return next(
        p
        for p, e in sorted(w.durable_state.items())
        if e[1] == "f" and p in w.tree and w.state()[p] == e
    )


def test_a_lost_name_is_caught(tmp_path: Path) -> None:
    w = _run(tmp_path)
    os.unlink(tmp_path / "mh" / _durable_file(w))
    (problem,) = w.verify(tmp_path, clean=False)
    assert "none of the" in problem
    assert "missing" in problem


def test_a_moved_directory_is_caught(tmp_path: Path) -> None:
    w = _run(tmp_path)
    top = next(p for p, e in sorted(w.durable_state.items()) if e[1] == "d" and p in w.tree)
    os.rename(tmp_path / "mh" / top, tmp_path / "mh" / "elsewhere")
    assert any("none of the" in p for p in w.verify(tmp_path, clean=False))


def test_a_lost_xattr_is_caught(tmp_path: Path) -> None:
    w = _run(tmp_path)
    path, entry = next((p, e) for p, e in sorted(w.state().items()) if e[5])
    os.removexattr(tmp_path / "mh" / path, entry[5][0][0])
    assert w.verify(tmp_path, clean=False) != []


def test_swapped_names_are_caught(tmp_path: Path) -> None:
    """Same names, same sizes: only the inode numbers tell.  Both files as the
    last sync left them: a pair the workload exchanged after its last sync may
    be swapped back legitimately (an earlier prefix state), and which pairs
    those are depends on the run."""
    w = _run(tmp_path)
    by_size: dict[int, list[str]] = {}
    for p, e in sorted(w.state().items()):
        if e[1] == "f" and e[4] == 1 and not e[5] and w.durable_state.get(p) == e:
            by_size.setdefault(e[3], []).append(p)
    a, b = next(paths[:2] for paths in by_size.values() if len(paths) >= 2)
    exchange(tmp_path / "mh" / a, tmp_path / "mh" / b)
    assert w.verify(tmp_path, clean=False) != []


def test_changed_fsynced_bytes_are_caught(tmp_path: Path) -> None:
    w = _run(tmp_path)
    inos = [n.ino for n in w.nodes.values()]  # a plain directory reuses inode numbers
    path = next(
        p
        for p, nid in sorted(w.tree.items())
        if w.nodes[nid].kind == "f"
        and w.nodes[nid].synced
        and w.nodes[nid].data
        and inos.count(w.nodes[nid].ino) == 1
    )
    with open(tmp_path / "mh" / path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    (problem,) = w.verify(tmp_path, clean=False)
    assert f"{path}: fsynced contents differ" in problem


def test_unsynced_bytes_are_not_owed_but_sizes_are(tmp_path: Path) -> None:
    w = _run(tmp_path)
    path = next(
        p
        for p, nid in sorted(w.tree.items())
        if w.nodes[nid].kind == "f" and not w.nodes[nid].synced and w.nodes[nid].data
    )
    size = len(w.nodes[w.tree[path]].data)
    with open(tmp_path / "mh" / path, "r+b") as f:
        f.write(bytes(size))  # zeros: what a cut before writeback leaves
    assert w.verify(tmp_path, clean=False) == []
    assert w.verify(tmp_path, clean=True) != []  # a clean unmount owes them
    os.truncate(tmp_path / "mh" / path, size + 1)
    assert w.verify(tmp_path, clean=False) != []


def test_a_name_nobody_made_is_caught(tmp_path: Path) -> None:
    w = _run(tmp_path)
    top = next(p for p, e in sorted(w.state().items()) if e[1] == "d")
    (tmp_path / "mh" / top / "stray").write_bytes(b"")
    assert any(f"unexpected: {top}/stray" in p for p in w.verify(tmp_path, clean=False))


def test_an_earlier_state_than_the_last_sync_is_caught(tmp_path: Path) -> None:
    """Undo the last operation before the last sync: the tree is a state of the
    history, but one the sync had made obsolete."""
    w = MetaHeavyWorkload(1, ops=0)
    obs = Observations()
    w.run(tmp_path, obs, lambda: None)  # the twenty directories and a directory sync
    assert w.durable == len(w.hashes) - 1
    os.rmdir(tmp_path / "mh" / "d04" / "d19")  # the last mkdir
    assert state_total(walk(tmp_path / "mh", data=False)[0]) == w.hashes[-2]
    assert w.verify(tmp_path, clean=False) != []
    w.durable -= 1  # had the sync not returned, the state would be allowed
    assert w.verify(tmp_path, clean=False) == []


def test_the_state_of_a_create_in_flight_is_allowed(tmp_path: Path) -> None:
    """The daemon dies during a create that did happen: its inode number is
    unknown to the model, yet the state is one of the candidates; so is the
    state before it."""
    w = _run(tmp_path, ops=100)
    made: list[Path] = []

    def create_then_die() -> int:
        path = tmp_path / "mh" / "d03" / "inflight"
        path.write_bytes(b"")
        made.append(path)
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def change() -> set[str]:
        w.tree["d03/inflight"] = w._new_node("f")
        return {"d03/inflight"}

    before = w.hashes[-1]
    w.durable = len(w.hashes) - 1
    with pytest.raises(DaemonGone):
        w._step(Observations(), "create d03/inflight", change, create_then_die, "d03/inflight")
    assert w.pending is not None
    assert w.hashes[-1] == before
    assert w.verify(tmp_path, clean=False) == []
    made[0].unlink()
    assert w.verify(tmp_path, clean=False) == []
    made[0].mkdir()  # the wrong kind
    assert w.verify(tmp_path, clean=False) != []


def test_a_write_may_be_recovered_at_a_page_boundary(tmp_path: Path) -> None:
    """A commit during a write that extends a file may record a size at a page
    boundary: a state of the history, when the cut comes before the next commit."""
    w = _run(tmp_path, ops=60)
    path = "d05/grow"
    fd = os.open(tmp_path / "mh" / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w.tree[path] = w._new_node("f")
        w._set_ino(path, os.fstat(fd).st_ino)
        w._record()
        w._write(Observations(), fd, path, 0, b"x" * 10000)
    finally:
        os.close(fd)
    w.durable = len(w.hashes) - 1
    assert w.verify(tmp_path, clean=False) == []
    os.truncate(tmp_path / "mh" / path, 8192)
    w.durable -= 3  # before the write: sizes 0, 4096, 8192 and 10000 follow
    assert w.verify(tmp_path, clean=False) == []
    os.truncate(tmp_path / "mh" / path, 5000)  # not a page boundary
    assert w.verify(tmp_path, clean=False) != []
