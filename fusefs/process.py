"""Processes that are not our children: is one alive, and waiting for it to exit.

Used by ``fusefs umount`` (the daemon was started by an earlier ``fusefs mount``),
the fault campaign and the mount tests.  A zombie counts as gone: its work is over,
and in a container nothing may be reaping it.
"""

from __future__ import annotations

import os
import select


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` exits (its pidfd becomes readable); True if it did
    within ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or not pid_alive(pid)
    finally:
        os.close(fd)
