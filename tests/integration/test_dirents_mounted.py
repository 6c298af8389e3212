"""Directory listings through the kernel while the directory changes: every entry
present for a whole listing is seen exactly once, and a position taken with
telldir(3) stays good after entries around it come and go."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections import Counter, deque

import pytest

pytestmark = pytest.mark.mount

STABLE = 3000  # ~120 readdir replies of the kernel's 4 KiB buffer per listing


def touch(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


class Churn(threading.Thread):
    """Creates, renames and unlinks files named ``c<n>``/``r<n>`` (never a name twice)
    until stopped; keeps at most `live` of them."""

    def __init__(self, directory: str, live: int = 64) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.live = live
        self.ops = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        names: deque[str] = deque()
        try:
            while not self.stop.is_set():
                n = self.ops
                name = f"c{n}"
                touch(os.path.join(self.directory, name))
                if n % 3 == 0:
                    os.rename(
                        os.path.join(self.directory, name), os.path.join(self.directory, f"r{n}")
                    )
                    name = f"r{n}"
                names.append(name)
                if len(names) > self.live:
                    os.unlink(os.path.join(self.directory, names.popleft()))
                self.ops += 1
        except BaseException as e:
            self.error = e


def test_listing_while_another_thread_creates_renames_and_unlinks(work: str) -> None:
    stable = [f"s{i:05d}" for i in range(STABLE)]
    for name in stable:
        touch(os.path.join(work, name))
    churn = Churn(work)
    churn.start()
    overlapped = 0
    try:
        for round_ in range(12):
            ops_before = churn.ops
            if round_ % 2:
                names = os.listdir(work)
            else:
                with os.scandir(work) as it:
                    names = [entry.name for entry in it]
            overlapped += churn.ops > ops_before
            counts = Counter(names)
            missing = [n for n in stable if counts[n] != 1]
            assert not missing, f"listing {round_}: {len(missing)} stable names not seen once"
            twice = [n for n, c in counts.items() if c > 1]
            assert not twice, f"listing {round_}: seen twice: {twice[:5]}"
            assert all(n in stable or n[0] in "cr" for n in counts)
    finally:
        churn.stop.set()
        churn.join()
    assert churn.error is None, churn.error
    assert overlapped >= 6, "the churn did not run during the listings"


# telldir/seekdir through libc, the way a program resumes a listing:


class Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def libc_dir() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.restype = None
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    return libc


def read_names(libc: ctypes.CDLL, dirp: int, limit: int | None = None) -> list[str]:
    out: list[str] = []
    while limit is None or len(out) < limit:
        entry = libc.readdir(dirp)
        if not entry:
            break
        name = entry.contents.d_name.decode()
        if name not in (".", ".."):
            out.append(name)
    return out


def test_seekdir_to_a_telldir_position_after_entries_came_and_went(work: str) -> None:
    libc = libc_dir()
    names = [f"f{i:04d}" for i in range(1000)]
    for name in names:
        touch(os.path.join(work, name))
    dirp = libc.opendir(work.encode())
    assert dirp, os.strerror(ctypes.get_errno())
    try:
        first = read_names(libc, dirp, 300)
        pos = libc.telldir(dirp)
        seen = set(first)
        # Remove entries before, at and after the position; add new ones.
        gone = set(first[100:] + names[300:700:2])
        for name in gone:
            os.unlink(os.path.join(work, name))
        for i in range(50):
            touch(os.path.join(work, f"new{i:02d}"))
        rest = read_names(libc, dirp)
        libc.seekdir(dirp, pos)
        again = read_names(libc, dirp)
    finally:
        libc.closedir(dirp)
    stable_after = [n for n in names if n not in seen and n not in gone]
    for listing in (rest, again):
        assert Counter(listing)[stable_after[0]] == 1
        assert [n for n in listing if n in stable_after] == sorted(stable_after)
        assert not seen & set(listing), "entries before the position came back"
        assert len(set(listing)) == len(listing)
    # The position is the directory's, not one stream's.
    dirp2 = libc.opendir(work.encode())
    try:
        libc.seekdir(dirp2, pos)
        assert read_names(libc, dirp2) == again
    finally:
        libc.closedir(dirp2)
