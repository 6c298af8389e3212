"""The metadata workload of a fault campaign (see tools/campaign/workloads.py for
what a workload records and how it is verified).

The namespace is modelled as a sequence of states, one per operation: a commit
snapshots the namespace atomically, so after an unclean end the tree on disk must
be one of the states since the last returned ``fsync`` (or the state of the
operation in flight), with file contents compared only where an ``fsync`` made
them durable.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.campaign.mount import GONE_ERRNOS
from tools.campaign.workloads import Observations, classify, read_whole

# A namespace state: path -> (kind, node, data, xattrs, symlink target).  ``node``
# identifies the inode (hard links share it); ``data`` is None where the contents
# are not owed (never fsynced, or unknown after a failure).
Entry = tuple[str, int, bytes | None, tuple[tuple[str, bytes], ...], str]
State = dict[str, Entry]


@dataclass
class _Node:
    kind: str  # "d", "f", "l"
    data: bytes | None = None  # what was written
    synced: bool = False  # data made durable by a returned fsync
    xattrs: dict[str, bytes] = field(default_factory=dict)
    target: str = ""


class MetaWorkload:
    """Create, rename (over files too), link, unlink, rmdir, symlink and xattrs in
    a small tree, with an ``fsync`` of a file or a directory every few operations."""

    name = "meta"

    def __init__(self, seed: int, *, ops: int = 120, fsync_every: int = 10) -> None:
        self.rng = random.Random(f"{seed}:meta")
        self.nops = ops
        self.fsync_every = fsync_every
        self.dir = "meta"
        self.nodes: dict[int, _Node] = {}
        self.tree: dict[str, int] = {}  # relative path -> node id
        self.history: list[State] = []
        self.durable = 0  # index in history of the last state a returned fsync made durable
        self.pending: State | None = None  # the state of the operation in flight
        self.lost = False
        self._next = 1
        self._name = 0

    # the model:

    def _state(self) -> State:
        out: State = {}
        for path, nid in self.tree.items():
            n = self.nodes[nid]
            xattrs = tuple(sorted(n.xattrs.items()))
            out[path] = (n.kind, nid, n.data if n.synced else None, xattrs, n.target)
        return out

    def _final_state(self) -> State:
        out: State = {}
        for path, nid in self.tree.items():
            n = self.nodes[nid]
            out[path] = (n.kind, nid, n.data, tuple(sorted(n.xattrs.items())), n.target)
        return out

    def _dirs(self) -> list[str]:
        return ["", *(p for p, nid in self.tree.items() if self.nodes[nid].kind == "d")]

    def _new_name(self, kind: str) -> str:
        self._name += 1
        return f"{kind}{self._name}"

    def _join(self, parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    # running:

    def run(self, root: Path, obs: Observations, deadline: Callable[[], None]) -> None:
        self.root = root / self.dir
        try:
            os.mkdir(self.root)
        except OSError as e:
            classify(e, obs, f"mkdir {self.dir}")
            return
        self.history.append(self._state())
        for i in range(self.nops):
            deadline()
            if self.lost:
                return
            if (i + 1) % self.fsync_every == 0:
                self._fsync(obs)
            else:
                self._random_op(obs)
            obs.ops += 1
        self._fsync(obs)

    def _random_op(self, obs: Observations) -> None:
        files = [p for p, nid in self.tree.items() if self.nodes[nid].kind == "f"]
        dirs = self._dirs()
        op = self.rng.choice(
            [
                *("mkdir", "create", "create", "create", "rename", "rename", "link", "unlink"),
                *("rmdir", "symlink", "setxattr", "removexattr"),
            ]
        )
        parent = self.rng.choice(dirs)
        if op == "mkdir":
            self._mkdir(obs, self._join(parent, self._new_name("d")))
        elif op == "create":
            self._create(obs, self._join(parent, self._new_name("f")))
        elif op == "symlink":
            self._symlink(obs, self._join(parent, self._new_name("l")))
        elif op == "rename" and self.tree:
            self._rename(obs, self.rng.choice(sorted(self.tree)), parent, files)
        elif op == "link" and files:
            self._link(obs, self.rng.choice(files), self._join(parent, self._new_name("h")))
        elif op == "unlink":
            victims = [p for p, nid in self.tree.items() if self.nodes[nid].kind != "d"]
            if victims:
                self._unlink(obs, self.rng.choice(victims))
        elif op == "rmdir":
            empty = [d for d in dirs if d and not any(p.startswith(d + "/") for p in self.tree)]
            if empty:
                self._rmdir(obs, self.rng.choice(empty))
        elif op in ("setxattr", "removexattr"):
            targets = [p for p, nid in self.tree.items() if self.nodes[nid].kind != "l"]
            if targets:
                self._xattr(obs, self.rng.choice(targets), op == "setxattr")

    def _apply(
        self, obs: Observations, what: str, change: Callable[[], None], syscall: Callable[[], None]
    ) -> bool:
        """Run ``syscall``; ``change`` updates the model the way success would.
        On a clean error, walk the tree and adopt the old or the new state."""
        saved_tree = dict(self.tree)
        saved_nodes = {k: _copy_node(v) for k, v in self.nodes.items()}
        saved_next = self._next
        change()
        self.pending = self._state()
        try:
            syscall()
        except OSError as e:
            new_tree, new_nodes = self.tree, self.nodes
            self.tree, self.nodes, self._next = saved_tree, saved_nodes, saved_next
            if e.errno not in GONE_ERRNOS:
                self.pending = None
            classify(e, obs, what)  # raises DaemonGone, the new state still pending
            on_disk = self._walk(obs, what)
            if on_disk is None:
                return False
            if _same_shape(on_disk, self._state()):
                return False
            self.tree, self.nodes = new_tree, new_nodes
            if _same_shape(on_disk, self._state()):
                self.history.append(self._state())
                return True
            obs.problem(f"after failed {what}: the tree is in neither the old nor the new state")
            self.lost = True
            return False
        self.pending = None
        self.history.append(self._state())
        return True

    def _mkdir(self, obs: Observations, path: str) -> None:
        nid = self._alloc()

        def change() -> None:
            self.nodes[nid] = _Node("d")
            self.tree[path] = nid

        self._apply(obs, f"mkdir {path}", change, lambda: os.mkdir(self.root / path))

    def _create(self, obs: Observations, path: str) -> None:
        nid = self._alloc()
        data = self.rng.randbytes(self.rng.choice([0, 1, 100, 4096, 5000, 9000]))

        def change() -> None:
            self.nodes[nid] = _Node("f")
            self.tree[path] = nid

        fd = -1

        def create() -> None:
            nonlocal fd
            fd = os.open(self.root / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

        if not self._apply(obs, f"create {path}", change, create) or fd < 0:
            return
        try:
            try:
                os.write(fd, data)
            except OSError as e:
                classify(e, obs, f"write {path}")
                return  # contents unknown: data stays None
            self.nodes[nid].data = data
            self.history.append(self._state())
            if self.rng.random() < 0.5:
                try:
                    os.fsync(fd)
                except OSError as e:
                    classify(e, obs, f"fsync {path}")
                    return
                self.nodes[nid].synced = True
                self.history.append(self._state())
                self.durable = len(self.history) - 1
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _symlink(self, obs: Observations, path: str) -> None:
        nid = self._alloc()
        target = f"target-{self.rng.randrange(1000)}"

        def change() -> None:
            self.nodes[nid] = _Node("l", target=target)
            self.tree[path] = nid

        self._apply(obs, f"symlink {path}", change, lambda: os.symlink(target, self.root / path))

    def _rename(self, obs: Observations, src: str, parent: str, files: list[str]) -> None:
        kind = self.nodes[self.tree[src]].kind
        if kind == "d" and (parent == src or parent.startswith(src + "/")):
            return
        # Renaming onto another link of the same inode does nothing (rename(2)): not worth a case.
        replace = [p for p in files if self.tree[p] != self.tree[src] and kind != "d"]
        if replace and self.rng.random() < 0.3:
            dst = self.rng.choice(replace)
        else:
            dst = self._join(parent, self._new_name("r"))

        def change() -> None:
            moved = {p: nid for p, nid in self.tree.items() if p == src or p.startswith(src + "/")}
            for p in moved:
                del self.tree[p]
            self.tree.pop(dst, None)
            for p, nid in moved.items():
                self.tree[dst + p[len(src) :]] = nid

        self._apply(
            obs, f"rename {src} {dst}", change, lambda: os.rename(self.root / src, self.root / dst)
        )

    def _link(self, obs: Observations, src: str, dst: str) -> None:
        def change() -> None:
            self.tree[dst] = self.tree[src]

        self._apply(
            obs, f"link {src} {dst}", change, lambda: os.link(self.root / src, self.root / dst)
        )

    def _unlink(self, obs: Observations, path: str) -> None:
        def change() -> None:
            del self.tree[path]

        self._apply(obs, f"unlink {path}", change, lambda: os.unlink(self.root / path))

    def _rmdir(self, obs: Observations, path: str) -> None:
        def change() -> None:
            del self.tree[path]

        self._apply(obs, f"rmdir {path}", change, lambda: os.rmdir(self.root / path))

    def _xattr(self, obs: Observations, path: str, set_it: bool) -> None:
        node = self.nodes[self.tree[path]]
        if set_it:
            key = f"user.k{self.rng.randrange(4)}"
            value = self.rng.randbytes(self.rng.randint(0, 64))

            def change() -> None:
                node.xattrs[key] = value

            self._apply(
                obs,
                f"setxattr {path} {key}",
                change,
                lambda: os.setxattr(self.root / path, key, value),
            )
        elif node.xattrs:
            key = self.rng.choice(sorted(node.xattrs))

            def remove() -> None:
                del node.xattrs[key]

            self._apply(
                obs,
                f"removexattr {path} {key}",
                remove,
                lambda: os.removexattr(self.root / path, key),
            )

    def _fsync(self, obs: Observations) -> None:
        """fsync a file with contents not yet durable, or a directory: either
        commits the whole namespace."""
        unsynced = sorted(
            p
            for p, nid in self.tree.items()
            if self.nodes[nid].kind == "f" and not self.nodes[nid].synced
        )
        target = self.rng.choice(unsynced) if unsynced and self.rng.random() < 0.7 else ""
        what = f"fsync {target or '(dir)'}"
        try:
            flags = os.O_RDONLY if target else os.O_RDONLY | os.O_DIRECTORY
            fd = os.open(self.root / target if target else self.root, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            classify(e, obs, what)
            return
        if target:
            node = self.nodes[self.tree[target]]
            if node.data is not None:
                node.synced = True
        self.history.append(self._state())
        self.durable = len(self.history) - 1

    def _alloc(self) -> int:
        self._next += 1
        return self._next

    # reading the tree back:

    def _walk(self, obs: Observations | None, what: str, *, data: bool = False) -> State | None:
        try:
            return walk_tree(self.root, data=data)
        except OSError as e:
            if obs is not None:
                classify(e, obs, f"walk after {what}")
            self.lost = True
            return None

    def verify(self, root: Path, clean: bool) -> list[str]:
        if not self.history or self.lost:
            return []
        try:
            on_disk = walk_tree(root / self.dir, data=True)
        except FileNotFoundError:
            if clean or self.durable > 0:
                return [f"{self.dir}: missing"]
            return []
        except OSError as e:
            return [f"{self.dir}: unreadable: {e.strerror}"]
        if clean:
            want = self._final_state()
            return [] if _matches(on_disk, want) else [f"{self.dir}: " + _diff(on_disk, want)]
        candidates = self.history[self.durable :]
        if self.pending is not None:
            candidates = [*candidates, self.pending]
        if any(_matches(on_disk, state) for state in candidates):
            return []
        return [
            f"{self.dir}: the tree matches none of the {len(candidates)} states since the last "
            f"fsync; against the last durable one: {_diff(on_disk, self.history[self.durable])}"
        ]


def _copy_node(n: _Node) -> _Node:
    return _Node(n.kind, n.data, n.synced, dict(n.xattrs), n.target)


def walk_tree(top: Path, *, data: bool) -> State:
    """The tree under ``top`` as a `State` (node ids are inode numbers)."""
    out: State = {}

    def visit(d: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            rel = f"{prefix}{entry.name}"
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                kind, target, content = "d", "", None
            elif stat.S_ISLNK(st.st_mode):
                kind, target, content = "l", os.readlink(entry.path), None
            else:
                kind, target = "f", ""
                content = read_whole(entry.path) if data else None
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if kind != "l":
                xattrs = tuple(
                    sorted((k, os.getxattr(entry.path, k)) for k in os.listxattr(entry.path))
                )
            out[rel] = (kind, st.st_ino, content, xattrs, target)
            if kind == "d":
                visit(Path(entry.path), rel + "/")

    visit(top, "")
    return out


def _same_shape(on_disk: State, want: State) -> bool:
    """Names, kinds, links, xattrs and targets agree (contents not compared)."""
    return _matches(on_disk, want, data=False)


def _matches(on_disk: State, want: State, *, data: bool = True) -> bool:
    if on_disk.keys() != want.keys():
        return False
    ino_of: dict[int, int] = {}
    node_of: dict[int, int] = {}
    for path, (kind, nid, content, xattrs, target) in want.items():
        dkind, ino, dcontent, dxattrs, dtarget = on_disk[path]
        if (kind, xattrs, target) != (dkind, dxattrs, dtarget):
            return False
        if data and content is not None and content != dcontent:
            return False
        # Hard links: the same model node must be the same inode, and back.
        if ino_of.setdefault(nid, ino) != ino or node_of.setdefault(ino, nid) != nid:
            return False
    return True


def _diff(on_disk: State, want: State) -> str:
    missing = sorted(want.keys() - on_disk.keys())
    extra = sorted(on_disk.keys() - want.keys())
    changed = [
        p
        for p in sorted(want.keys() & on_disk.keys())
        if not _matches({p: on_disk[p]}, {p: want[p]})
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if items:
            shown = ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts) or "hard links differ"


__all__ = ["MetaWorkload", "walk_tree"]
