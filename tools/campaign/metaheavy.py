"""The metadata-heavy workload: many directories, every namespace operation, and
syncs in between -- the power-cut workload for the metadata journal.

Operations, chosen by a seeded ``random.Random``: create (and a small write),
small writes into existing files (append or overwrite), mkdir, symlink, renames
(within a directory, across directories, onto another file, of directories to a
new name or onto an empty directory, and ``RENAME_EXCHANGE``), unlink, rmdir,
hard links, setxattr and removexattr on files and directories, ``fsync`` of a
file and ``fsync`` of a directory -- over twenty directories, some nested, made
first.

What fusefs promises (DESIGN §6): a commit makes *all* metadata so far durable,
atomically, and an ``fsync`` (of a file or a directory) is a commit; a file's
``fsync`` also makes its data durable.  One process runs the operations one
after the other, so the namespace passes through a sequence of states, and a
commit -- the periodic one too -- records one of them.  After a power cut the
recovered tree must therefore be *exactly* the state after some prefix of the
operations that includes every operation before the last returned sync: the
state at that sync, or a later one, or the state of the operation in flight.

The model keeps the states cheaply: a state is a sum (mod 2**64) of one hash per
path -- its kind, inode number, size, link count, xattrs and symlink target -- so
an operation updates the sum with the paths it touched (a directory rename: its
subtree), and each prefix costs one integer.  The inode number is what ties a
path to its inode (hard links share it; fusefs never reuses a number).  File
sizes are metadata and are compared in every state; file contents are compared
where they are owed: a file written to since its last returned ``fsync`` may
hold anything of its writes (writeback may have put some blocks down, in place),
one not written since must hold exactly what that ``fsync`` saw.  The full state
is kept at each returned sync only, to say what differs when nothing matches.

After a clean unmount everything acknowledged must be there.  A clean error
(EIO, ENOMEM, ENOSPC, EROFS: fault runs) makes the workload walk the tree and
adopt the old or the new state; for a write, read the file back and adopt the
old contents, the new, or a byte-wise mix inside the write's range.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from tools.campaign.mount import GONE_ERRNOS
from tools.campaign.workloads import Observations, _first_difference, _mix_ok, classify

# One path of a state: (path, kind, inode number, size, link count, xattrs, symlink
# target).  Directories carry size and link count 0 (not compared), symlinks size 0.
Entry = tuple[str, str, int, int, int, tuple[tuple[str, bytes], ...], str]

MASK: Final = (1 << 64) - 1
MISSING: Final = -1  # the state before the workload's top directory exists
DIRS: Final = 20
NESTED: Final = 5  # of the DIRS, how many sit inside another one
SIZES: Final = (0, 1, 100, 3000, 4096, 5000, 12000)
XATTR_KEYS: Final = 4
BS: Final = 4096
# Gone read-only after an error, the filesystem refuses every change: after this
# many refusals in a row there is nothing left to learn (each one walks the tree).
READ_ONLY_STOP: Final = 10
MAX_DEPTH: Final = 4  # where mkdir and directory renames put directories
# Operation weights: syncs are about one operation in nine.
OPS: Final = {
    "create": 12,
    "write": 8,
    "mkdir": 4,
    "symlink": 2,
    "rename_local": 5,
    "rename_cross": 5,
    "rename_replace": 4,
    "rename_dir": 3,
    "exchange": 2,
    "unlink": 7,
    "rmdir": 3,
    "link": 4,
    "setxattr": 6,
    "removexattr": 4,
    "fsync": 5,
    "fsyncdir": 3,
}

_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def exchange(a: Path, b: Path) -> None:
    """``renameat2(a, b, RENAME_EXCHANGE)``: swap two names atomically."""
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(a))


@dataclass(frozen=True, slots=True)
class Node:
    """An inode of the model (replaced, never changed, so a state copy is a dict copy)."""

    kind: str  # "d", "f", "l"
    ino: int = 0  # 0 until the call that made it returned
    data: bytes = b""  # files: the contents acknowledged
    synced: bool = False  # files: a returned fsync of this file since its last write
    xattrs: tuple[tuple[str, bytes], ...] = ()
    target: str = ""


@dataclass(frozen=True, slots=True)
class Pending:
    """The states of the operation in flight: the power may have cut after its
    commit.  A create's inode number is not known until it returns: its entry is
    hashed with number 0 and fixed up with the number found on disk."""

    totals: tuple[int, ...]
    new_path: str | None = None
    new_entry: Entry | None = None


def entry_hash(entry: Entry) -> int:
    return hash(entry) & MASK


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class MetaHeavyWorkload:
    """See the module docstring."""

    name = "metaheavy"

    def __init__(self, seed: int, *, ops: int = 400, dirs: int = DIRS) -> None:
        self.rng = random.Random(f"{seed}:metaheavy")
        self.nops = ops
        self.ndirs = dirs
        self.dir = "mh"
        self.tree: dict[str, int] = {}  # path -> node id
        self.nodes: dict[int, Node] = {}  # every node ever made (verify maps inodes back)
        self.nlink: dict[int, int] = {}
        self.ehash: dict[str, int] = {}  # path -> its entry's hash
        self.total = 0
        self.hashes: list[int] = []  # the state after each prefix of the operations
        self.durable = 0  # index in hashes of the state at the last returned sync
        self.durable_state: dict[str, Entry] = {}
        self.pending: Pending | None = None
        self.lost = False
        self.check_hash = False  # tests: recompute the sum after every operation
        self.syncs = 0
        self._next = 0
        self._name = 0

    # the model:

    def _entry(self, path: str, ino: int | None = None) -> Entry:
        nid = self.tree[path]
        n = self.nodes[nid]
        if n.kind == "d":
            return (path, "d", n.ino if ino is None else ino, 0, 0, n.xattrs, "")
        size = len(n.data) if n.kind == "f" else 0
        return (
            path,
            n.kind,
            n.ino if ino is None else ino,
            size,
            self.nlink[nid],
            n.xattrs,
            n.target,
        )

    def _refresh(self, paths: set[str]) -> None:
        """Bring the sum up to date for ``paths`` (each old and new path an
        operation touched)."""
        total = self.total
        for p in paths:
            total -= self.ehash.pop(p, 0)
            if p in self.tree:
                h = entry_hash(self._entry(p))
                self.ehash[p] = h
                total += h
        self.total = total & MASK

    def _full_total(self) -> int:
        return sum(entry_hash(self._entry(p)) for p in self.tree) & MASK

    def state(self) -> dict[str, Entry]:
        return {p: self._entry(p) for p in self.tree}

    def _save(self) -> tuple[dict[str, int], dict[int, Node], dict[int, int], dict[str, int], int]:
        return dict(self.tree), dict(self.nodes), dict(self.nlink), dict(self.ehash), self.total

    def _restore(
        self, saved: tuple[dict[str, int], dict[int, Node], dict[int, int], dict[str, int], int]
    ) -> None:
        self.tree, self.nodes, self.nlink, self.ehash, self.total = saved

    def _record(self) -> None:
        if self.check_hash:
            assert self.total == self._full_total(), "incremental state hash drifted"
        self.hashes.append(self.total)

    def _synced(self) -> None:
        """A sync returned: every state so far is durable."""
        self.durable = len(self.hashes) - 1
        self.durable_state = self.state()
        self.syncs += 1

    def _links(self, nid: int, known: str) -> set[str]:
        if self.nlink.get(nid, 1) <= 1:
            return {known}
        return {p for p, n in self.tree.items() if n == nid}

    def _subtree(self, top: str) -> dict[str, int]:
        return {p: nid for p, nid in self.tree.items() if _within(p, top)}

    def _new_node(self, kind: str, target: str = "") -> int:
        self._next += 1
        self.nodes[self._next] = Node(kind, target=target)
        self.nlink[self._next] = 1
        return self._next

    def _new_name(self, prefix: str) -> str:
        self._name += 1
        return f"{prefix}{self._name}"

    def _of_kind(self, *kinds: str) -> list[str]:
        return sorted(p for p, nid in self.tree.items() if self.nodes[nid].kind in kinds)

    def _dirs(self) -> list[str]:
        return ["", *self._of_kind("d")]

    def _shallow(self, outside: str | None = None) -> list[str]:
        """Directories a directory may go into, so that the tree stays a few levels deep."""
        return [
            d
            for d in self._dirs()
            if d.count("/") < MAX_DEPTH - 1 and (outside is None or not _within(d, outside))
        ]

    # running:

    def run(self, root: Path, obs: Observations, deadline: Callable[[], None]) -> None:
        self.root = root / self.dir
        self.hashes.append(MISSING)
        self.pending = Pending((0,))
        try:
            os.mkdir(self.root)
        except OSError as e:
            if e.errno not in GONE_ERRNOS:
                self.pending = None
            classify(e, obs, f"mkdir {self.dir}")
            self.lost = True
            return
        self.pending = None
        self.hashes.append(0)
        for i in range(self.ndirs):
            deadline()
            parent = f"d{i - (self.ndirs - NESTED):02}" if i >= self.ndirs - NESTED else ""
            self._mkdir(obs, _join(parent, f"d{i:02}"))
            obs.ops += 1
        names = list(OPS)
        weights = list(OPS.values())
        refused = 0  # operations in a row the filesystem refused as read-only
        for _ in range(self.nops):
            deadline()
            if self.lost or refused >= READ_ONLY_STOP:
                return
            op = self.rng.choices(names, weights)[0]
            before = obs.errors.get("EROFS", 0)
            getattr(self, f"_op_{op}")(obs)
            refused = refused + 1 if obs.errors.get("EROFS", 0) > before else 0
            obs.ops += 1
        self._op_fsyncdir(obs)

    def _step(
        self,
        obs: Observations,
        what: str,
        change: Callable[[], set[str]],
        syscall: Callable[[], int | None],
        new_path: str | None = None,
    ) -> bool:
        """Apply ``change`` to the model (it returns the paths it touched), run
        ``syscall``; a call that makes ``new_path`` returns its inode number.  On a
        clean error, walk the tree and adopt the old or the new state."""
        saved = self._save()
        affected = change()
        self._refresh(affected)
        new_entry = self._entry(new_path) if new_path is not None else None
        self.pending = Pending((self.total,), new_path, new_entry)
        try:
            ino = syscall()
        except OSError as e:
            after = self._save()
            self._restore(saved)
            if e.errno not in GONE_ERRNOS:
                self.pending = None
            classify(e, obs, what)  # DaemonGone leaves the new state pending
            return self._adopt(obs, what, after, new_path)
        self.pending = None
        if new_path is not None and ino is not None:
            self._set_ino(new_path, ino)
        self._record()
        return True

    def _set_ino(self, path: str, ino: int) -> None:
        nid = self.tree[path]
        self.nodes[nid] = replace(self.nodes[nid], ino=ino)
        self._refresh({path})

    def _adopt(
        self,
        obs: Observations,
        what: str,
        after: tuple[dict[str, int], dict[int, Node], dict[int, int], dict[str, int], int],
        new_path: str | None,
    ) -> bool:
        """After a failed call: the tree must be in the old state or the new one."""
        found = self._walk(obs, what)
        if found is None:
            return False
        total = state_total(found)
        if total == self.total:
            return False
        self._restore(after)
        if new_path is not None and new_path in found:
            self._set_ino(new_path, found[new_path][2])
        if total == self.total:
            self._record()
            return True
        obs.problem(f"after failed {what}: the tree is in neither the old nor the new state")
        self.lost = True
        return False

    def _walk(self, obs: Observations, what: str) -> dict[str, Entry] | None:
        try:
            return walk(self.root, data=False)[0]
        except OSError as e:
            classify(e, obs, f"walk after {what}")
            self.lost = True
            return None

    # operations:

    def _mkdir(self, obs: Observations, path: str) -> None:
        def change() -> set[str]:
            self.tree[path] = self._new_node("d")
            return {path}

        def call() -> int:
            os.mkdir(self.root / path)
            return os.lstat(self.root / path).st_ino

        self._step(obs, f"mkdir {path}", change, call, new_path=path)

    def _op_mkdir(self, obs: Observations) -> None:
        self._mkdir(obs, _join(self.rng.choice(self._shallow()), self._new_name("d")))

    def _op_symlink(self, obs: Observations) -> None:
        path = _join(self.rng.choice(self._dirs()), self._new_name("l"))
        target = f"t{self.rng.randrange(10**6)}"

        def change() -> set[str]:
            self.tree[path] = self._new_node("l", target)
            return {path}

        def call() -> int:
            os.symlink(target, self.root / path)
            return os.lstat(self.root / path).st_ino

        self._step(obs, f"symlink {path}", change, call, new_path=path)

    def _op_create(self, obs: Observations) -> None:
        path = _join(self.rng.choice(self._dirs()), self._new_name("f"))
        data = self.rng.randbytes(self.rng.choice(SIZES))
        sync = self.rng.random() < 0.2
        fd = -1

        def change() -> set[str]:
            self.tree[path] = self._new_node("f")
            return {path}

        def call() -> int:
            nonlocal fd
            fd = os.open(self.root / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            return os.fstat(fd).st_ino

        try:
            if not self._step(obs, f"create {path}", change, call, new_path=path) or fd < 0:
                return
            if data:
                self._write(obs, fd, path, 0, data)
            if sync:
                self._fsync_fd(obs, fd, path)
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _op_write(self, obs: Observations) -> None:
        files = self._of_kind("f")
        if not files:
            return
        path = self.rng.choice(files)
        size = len(self.nodes[self.tree[path]].data)
        off = self.rng.randint(0, size) if self.rng.random() < 0.5 else size
        data = self.rng.randbytes(self.rng.randint(1, 5000))
        fd = self._open(obs, path, os.O_WRONLY)
        if fd < 0:
            return
        try:
            self._write(obs, fd, path, off, data)
            if self.rng.random() < 0.3:
                self._fsync_fd(obs, fd, path)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write(self, obs: Observations, fd: int, path: str, off: int, data: bytes) -> None:
        nid = self.tree[path]
        old = self.nodes[nid].data
        new = old[:off] + data + old[off + len(data) :]
        what = f"write {path} {off}+{len(data)}"
        # Written to, whatever happens: its contents are owed again after an fsync only.
        self.nodes[nid] = replace(self.nodes[nid], synced=False)
        saved = self._save()
        # A write that extends the file moves its size up page by page, with awaits
        # in between (fusefs/io/buffered.py): a commit meanwhile records a size at a
        # page boundary.  Those are states of the history too.
        partial = []
        for size in range((off // BS + 1) * BS, len(new), BS):
            if size > len(old):
                self._contents(nid, path, new[:size])
                partial.append(self.total)
        self._contents(nid, path, new)
        self.pending = Pending((*partial, self.total))
        try:
            done = os.pwrite(fd, data, off)
        except OSError as e:
            self._restore(saved)
            if e.errno not in GONE_ERRNOS:
                self.pending = None
            classify(e, obs, what)
            self._read_back(obs, what, nid, path, old, new, (off, off + len(data)))
            return
        self.pending = None
        if done != len(data):  # a short write: the rest was not acknowledged
            self._contents(nid, path, old[:off] + data[:done] + old[off + done :])
        self.hashes += partial
        self._record()

    def _contents(self, nid: int, path: str, data: bytes) -> None:
        self.nodes[nid] = replace(self.nodes[nid], data=data, synced=False)
        self._refresh(self._links(nid, path))

    def _read_back(
        self,
        obs: Observations,
        what: str,
        nid: int,
        path: str,
        old: bytes,
        new: bytes,
        span: tuple[int, int],
    ) -> None:
        try:
            with open(self.root / path, "rb", buffering=0) as f:
                got = f.read()
        except OSError as e:
            classify(e, obs, f"read-back after {what}")
            self.lost = True
            return
        if got not in (old, new) and not _mix_ok(got, old, new, span):
            obs.problem(
                f"after failed {what}: {path} holds neither the old nor the new contents "
                f"(size {len(got)}; old {len(old)}, new {len(new)})"
            )
            self.lost = True
            return
        self.nodes[nid] = replace(self.nodes[nid], synced=False)
        if got != old:
            self._contents(nid, path, got)
            self._record()

    def _fsync_fd(self, obs: Observations, fd: int, path: str) -> None:
        nid = self.tree[path]
        try:
            os.fsync(fd)
        except OSError as e:
            classify(e, obs, f"fsync {path}")
            return
        self.nodes[nid] = replace(self.nodes[nid], synced=True)
        self._synced()

    def _open(self, obs: Observations, path: str, flags: int) -> int:
        """Open a file of the tree: its descriptor, or -1 after an error."""
        try:
            return os.open(self.root / path, flags)
        except OSError as e:
            classify(e, obs, f"open {path}")
            return -1

    def _op_fsync(self, obs: Observations) -> None:
        files = self._of_kind("f")
        if not files:
            return
        unsynced = [p for p in files if not self.nodes[self.tree[p]].synced]
        path = self.rng.choice(unsynced if unsynced and self.rng.random() < 0.8 else files)
        fd = self._open(obs, path, os.O_RDONLY)
        if fd < 0:
            return
        try:
            self._fsync_fd(obs, fd, path)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _op_fsyncdir(self, obs: Observations) -> None:
        path = self.rng.choice(self._dirs())
        what = f"fsync directory {path or '.'}"
        try:
            fd = os.open(self.root / path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            classify(e, obs, what)
            return
        self._synced()

    def _rename(self, obs: Observations, src: str, dst: str, *, swap: bool = False) -> None:
        def change() -> set[str]:
            moved = self._subtree(src)
            affected = set(moved)
            if swap:
                back = self._subtree(dst)
                affected |= set(back)
                for p in [*moved, *back]:
                    del self.tree[p]
                for p, nid in back.items():
                    self.tree[src + p[len(dst) :]] = nid
            else:
                replaced = self.tree.get(dst)
                if replaced is not None:
                    affected |= self._links(replaced, dst)
                    del self.tree[dst]
                    self.nlink[replaced] -= 1
                for p in moved:
                    del self.tree[p]
            for p, nid in moved.items():
                self.tree[dst + p[len(src) :]] = nid
            return affected | set(self._subtree(dst)) | set(self._subtree(src))

        def call() -> None:
            if swap:
                exchange(self.root / src, self.root / dst)
            else:
                os.rename(self.root / src, self.root / dst)

        self._step(obs, f"{'exchange' if swap else 'rename'} {src} {dst}", change, call)

    def _op_rename_local(self, obs: Observations) -> None:
        movable = self._of_kind("f", "l")
        if movable:
            src = self.rng.choice(movable)
            parent = src.rpartition("/")[0]
            self._rename(obs, src, _join(parent, self._new_name("r")))

    def _op_rename_cross(self, obs: Observations) -> None:
        movable = self._of_kind("f", "l")
        if movable:
            src = self.rng.choice(movable)
            parents = [d for d in self._dirs() if d != src.rpartition("/")[0]]
            self._rename(obs, src, _join(self.rng.choice(parents), self._new_name("r")))

    def _op_rename_replace(self, obs: Observations) -> None:
        movable = self._of_kind("f", "l")
        if len(movable) < 2:
            return
        src = self.rng.choice(movable)
        # Onto another link of the same inode rename(2) does nothing: not a case worth having.
        targets = [p for p in movable if self.tree[p] != self.tree[src]]
        if targets:
            self._rename(obs, src, self.rng.choice(targets))

    def _op_rename_dir(self, obs: Observations) -> None:
        dirs = self._of_kind("d")
        if not dirs:
            return
        src = self.rng.choice(dirs)
        empty = [
            d
            for d in dirs
            if not _within(d, src) and not any(p.startswith(d + "/") for p in self.tree)
        ]
        if empty and self.rng.random() < 0.3:
            self._rename(obs, src, self.rng.choice(empty))
            return
        self._rename(obs, src, _join(self.rng.choice(self._shallow(src)), self._new_name("r")))

    def _op_exchange(self, obs: Observations) -> None:
        paths = sorted(self.tree)
        if len(paths) < 2:
            return
        a, b = self.rng.sample(paths, 2)
        if _within(a, b) or _within(b, a) or self.tree[a] == self.tree[b]:
            return
        self._rename(obs, a, b, swap=True)

    def _op_unlink(self, obs: Observations) -> None:
        victims = self._of_kind("f", "l")
        if not victims:
            return
        path = self.rng.choice(victims)
        nid = self.tree[path]

        def change() -> set[str]:
            affected = self._links(nid, path)
            del self.tree[path]
            self.nlink[nid] -= 1
            return affected

        self._step(obs, f"unlink {path}", change, lambda: os.unlink(self.root / path))

    def _op_rmdir(self, obs: Observations) -> None:
        empty = [d for d in self._of_kind("d") if not any(p.startswith(d + "/") for p in self.tree)]
        if not empty:
            return
        path = self.rng.choice(empty)

        def change() -> set[str]:
            del self.tree[path]
            return {path}

        self._step(obs, f"rmdir {path}", change, lambda: os.rmdir(self.root / path))

    def _op_link(self, obs: Observations) -> None:
        files = self._of_kind("f")
        if not files:
            return
        src = self.rng.choice(files)
        dst = _join(self.rng.choice(self._dirs()), self._new_name("h"))
        nid = self.tree[src]

        def change() -> set[str]:
            affected = self._links(nid, src) | {dst}
            self.tree[dst] = nid
            self.nlink[nid] += 1
            return affected

        self._step(
            obs, f"link {src} {dst}", change, lambda: os.link(self.root / src, self.root / dst)
        )

    def _op_setxattr(self, obs: Observations) -> None:
        self._xattr(obs, set_it=True)

    def _op_removexattr(self, obs: Observations) -> None:
        self._xattr(obs, set_it=False)

    def _xattr(self, obs: Observations, *, set_it: bool) -> None:
        targets = self._of_kind("f", "d")
        if not set_it:
            targets = [p for p in targets if self.nodes[self.tree[p]].xattrs]
        if not targets:
            return
        path = self.rng.choice(targets)
        nid = self.tree[path]
        xattrs = dict(self.nodes[nid].xattrs)
        if set_it:
            key = f"user.k{self.rng.randrange(XATTR_KEYS)}"
            value = self.rng.randbytes(self.rng.randint(0, 64))
            xattrs[key] = value
            what = f"setxattr {path} {key}"
        else:
            key = self.rng.choice(sorted(xattrs))
            del xattrs[key]
            what = f"removexattr {path} {key}"

        def call() -> None:
            if set_it:
                os.setxattr(self.root / path, key, xattrs[key])
            else:
                os.removexattr(self.root / path, key)

        def change() -> set[str]:
            self.nodes[nid] = replace(self.nodes[nid], xattrs=tuple(sorted(xattrs.items())))
            return self._links(nid, path)

        self._step(obs, what, change, call)

    # verification:

    def candidates(self, found: dict[str, Entry]) -> list[int]:
        """The states the recovered tree may be in after an unclean end."""
        out = self.hashes[self.durable :]
        p = self.pending
        if p is None:
            return out
        if p.new_path is None or p.new_entry is None:
            return [*out, *p.totals]
        if p.new_path not in found:
            return out
        path, kind, _, size, links, xattrs, target = p.new_entry
        fixed: Entry = (path, kind, found[path][2], size, links, xattrs, target)
        return [*out, *((t - entry_hash(p.new_entry) + entry_hash(fixed)) & MASK for t in p.totals)]

    def verify(self, root: Path, clean: bool) -> list[str]:
        if self.lost or not self.hashes:
            return []
        top = root / self.dir
        try:
            found, contents = walk(top, data=True)
        except FileNotFoundError:
            found, contents = None, {}
        except OSError as e:
            return [f"{self.dir}: unreadable: {e.strerror}"]
        total = MISSING if found is None else state_total(found)
        if clean:
            if total != self.total:
                return [f"{self.dir}: not the final state: {_diff(found or {}, self.state())}"]
        elif total not in self.candidates(found or {}):
            n = len(self.hashes) - self.durable + (self.pending is not None)
            return [
                f"{self.dir}: the tree is none of the {n} states since the last sync "
                f"(sync {self.syncs}); against it: {_diff(found or {}, self.durable_state)}"
            ]
        return self._check_contents(found or {}, contents, clean)

    def _check_contents(
        self, found: dict[str, Entry], contents: dict[str, bytes], clean: bool
    ) -> list[str]:
        """Every file whose contents are owed holds exactly them."""
        owed: dict[str, Node] = {}
        if clean:  # the final state: the model's names are the tree's
            owed = {p: self.nodes[nid] for p, nid in self.tree.items()}
        else:  # some state since the last sync: inode numbers tell which file is which
            by_ino: dict[int, list[Node]] = {}
            for n in self.nodes.values():
                if n.ino:
                    by_ino.setdefault(n.ino, []).append(n)
            for path, entry in found.items():
                # fusefs never reuses an inode number; a plain directory (the tests) may.
                nodes = by_ino.get(entry[2], [])
                if len(nodes) == 1 and nodes[0].synced and entry[1] == "f":
                    owed[path] = nodes[0]
        problems = []
        for path, node in sorted(owed.items()):
            if node.kind != "f":
                continue
            got = contents.get(path)
            if got != node.data:
                at = _first_difference(got or b"", node.data)
                problems.append(
                    f"{self.dir}/{path}: {'final' if clean else 'fsynced'} contents differ "
                    f"(size {len(got or b'')}, want {len(node.data)}; first difference at {at})"
                )
        return problems[:10]


def walk(top: Path, *, data: bool) -> tuple[dict[str, Entry], dict[str, bytes]]:
    """The tree under ``top`` as entries (and, with ``data``, each file's contents)."""
    out: dict[str, Entry] = {}
    contents: dict[str, bytes] = {}

    def visit(d: Path | str, prefix: str) -> None:
        with os.scandir(d) as it:
            entries = list(it)
        for de in entries:
            rel = prefix + de.name
            st = de.stat(follow_symlinks=False)
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                names = os.listxattr(de.path, follow_symlinks=False)
                xattrs = tuple(sorted((k, os.getxattr(de.path, k)) for k in names))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = (rel, "d", st.st_ino, 0, 0, xattrs, "")
                visit(de.path, rel + "/")
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (rel, "l", st.st_ino, 0, st.st_nlink, (), os.readlink(de.path))
            else:
                out[rel] = (rel, "f", st.st_ino, st.st_size, st.st_nlink, xattrs, "")
                if data:
                    with open(de.path, "rb", buffering=0) as f:
                        contents[rel] = f.read()

    visit(top, "")
    return out, contents


def state_total(state: dict[str, Entry]) -> int:
    return sum(entry_hash(e) for e in state.values()) & MASK


def _diff(found: dict[str, Entry], want: dict[str, Entry]) -> str:
    missing = sorted(want.keys() - found.keys())
    extra = sorted(found.keys() - want.keys())
    changed = [p for p in sorted(want.keys() & found.keys()) if found[p] != want[p]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if items:
            shown = ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")
            parts.append(f"{label}: {shown}")
    if changed:
        p = changed[0]
        parts.append(f"{p}: found {found[p][1:]}, want {want[p][1:]}")
    return "; ".join(parts) or "same paths and entries (a later state?)"


__all__ = ["MetaHeavyWorkload", "exchange", "state_total", "walk"]
