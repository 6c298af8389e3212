"""The fsx workload of a fault campaign: ``fusefs-fsx`` (tools/fsx/cli.py) in a subprocess.

Two short runs on one file each: buffered IO with every fallocate mode, then
O_DIRECT (``-Z``).  fsx keeps its own model and reads back as it goes, so a
wrong byte makes it exit non-zero with a miscompare; an error it was given
(EIO under a fault) ends it too, with the errno in its output.  Its op list is
recorded (``--record-ops``), so a failing run comes with a reproducer; with
``minimize`` the list is first cut down with ``fusefs-fsx --minimize``.

Where tools/fsx/cli.py is not installed, campaigns use the built-in data workload
(`tools.campaign.workloads.DataWorkload`) instead.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tools.campaign.mount import GONE_ERRNOS
from tools.campaign.workloads import CLEAN_ERRNOS, DaemonGone, Observations

FSX: Final = (sys.executable, "-m", "tools.fsx")
_ERRNO_RE: Final = re.compile(r"failed: (E[A-Z0-9]+):")
_CLEAN: Final = frozenset(errno.errorcode[code] for code in CLEAN_ERRNOS)
_GONE: Final = frozenset(errno.errorcode[code] for code in GONE_ERRNOS)
# Setup errors carry only the strerror text ("fusefs-fsx: FILE: Input/output error").
_ERRNO_TEXTS: Final = {os.strerror(c): errno.errorcode[c] for c in (*CLEAN_ERRNOS, *GONE_ERRNOS)}


def fsx_available() -> bool:
    return importlib.util.find_spec("tools.fsx") is not None


class FsxWorkload:
    name = "fsx"

    def __init__(self, seed: int, logdir: Path, *, ops: int, minimize: bool) -> None:
        self.seed = seed
        self.logdir = logdir
        self.ops = ops
        self.minimize = minimize
        self.failed: list[tuple[list[str], Path]] = []  # (argv, recorded ops) of failing runs
        self.root: Path | None = None

    def _argv(self, target: Path, direct: bool, record: Path) -> list[str]:
        argv = ["-N", str(self.ops), "-S", str(self.seed), "-l", "256K", "-o", "64K"]
        if direct:
            argv.append("-Z")
        if self.minimize:
            # A failure is minimized at once, while the mount is still there.
            argv += ["--minimize", "--minimize-budget", "20"]
        return [*argv, "-P", os.fspath(self.logdir), "--record-ops", os.fspath(record), str(target)]

    def run(self, root: Path, obs: Observations, deadline: Callable[[], None]) -> None:
        self.root = root
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(root / "fsx")
        except OSError as e:
            from tools.campaign.workloads import classify

            classify(e, obs, "mkdir fsx")
            return
        for direct in (False, True):
            deadline()
            label = "direct" if direct else "buffered"
            record = self.logdir / f"{label}.ops"
            argv = self._argv(root / "fsx" / label, direct, record)
            proc = subprocess.Popen(
                [*FSX, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
            try:
                output, _ = proc.communicate()
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            (self.logdir / f"{label}.out").write_text(output)
            obs.ops += self.ops
            if proc.returncode == 0:
                continue
            self._judge(output, argv, record, obs, label)

    def _judge(
        self, output: str, argv: list[str], record: Path, obs: Observations, label: str
    ) -> None:
        """A non-zero exit: an error fsx was given (``op N (...) failed: EIO: ...``),
        the daemon gone, or a miscompare (``FAILED: read op N: bad data ...``)."""
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        failed = next((ln for ln in lines if "FAILED:" in ln), lines[-1] if lines else "")
        m = _ERRNO_RE.search(failed)
        name = m[1] if m else next((n for t, n in _ERRNO_TEXTS.items() if t in failed), None)
        if name in _GONE:
            obs.daemon_gone = True
            raise DaemonGone(f"fsx {label}: {failed}")
        if name in _CLEAN:
            obs.errors[name] = obs.errors.get(name, 0) + 1
            return
        obs.problem(f"fsx {label}: {failed.removeprefix('fsx: ')}")
        self.failed.append((argv, record))

    def verify(self, root: Path, clean: bool) -> list[str]:
        # fsx compared every read with its model while it ran; it fsyncs nothing
        # it is told to keep, so there is nothing owed after a remount.
        return []

    def reproducer(self, failed: bool, fault: str) -> dict[str, str]:
        """The op list of the first failing fsx run (minimized where fsx managed
        to), and the command that replays it with the fault armed."""
        if not self.failed:
            return {}
        argv, record = self.failed[0]
        target = Path(argv[-1])
        ops = self.logdir / f"{target.name}.fsxops"
        minimized = self.logdir / f"{target.name}.min.fsxops"
        chosen = next((p for p in (minimized, ops, record) if p.exists()), record)
        out = {"fsx_ops": os.fspath(chosen)}
        if chosen == minimized:
            out["fsx_minimized"] = "yes"
        replay = ["fusefs-fsx", "--replay-ops", os.fspath(chosen), "--fault", fault, "MNT/fsx/file"]
        if "-Z" in argv:
            replay.insert(1, "-Z")
        out["fsx_replay"] = " ".join(shlex.quote(a) for a in replay)
        return out


__all__ = ["FsxWorkload", "fsx_available"]
