"""`fusefs mount` refuses a pyfuse3 without the fallocate/lseek patch, before it
forks a daemon or touches the image."""

from __future__ import annotations

from pathlib import Path

import pyfuse3
import pytest

from fusefs import cli, daemon


def test_installed_build_is_the_patched_one() -> None:
    assert pyfuse3.FUSEFS_PATCH == daemon.PYFUSE3_PATCH
    assert daemon.pyfuse3_problem() is None
    assert callable(pyfuse3.Operations.fallocate)
    assert callable(pyfuse3.Operations.lseek)


def test_unpatched_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pyfuse3, "FUSEFS_PATCH")
    problem = daemon.pyfuse3_problem()
    assert problem is not None
    assert "\n" not in problem
    assert f"pyfuse3 {pyfuse3.__version__} is unpatched" in problem
    assert "scripts/setup" in problem


def test_other_patch_level_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "FUSEFS_PATCH", "fallocate+lseek 0")
    problem = daemon.pyfuse3_problem()
    assert problem is not None
    assert "patched as 'fallocate+lseek 0'" in problem


def test_mount_refuses_unpatched_pyfuse3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delattr(pyfuse3, "FUSEFS_PATCH")

    def no_fork(*args: object) -> int:
        raise AssertionError("the daemon was started")

    monkeypatch.setattr(cli, "_spawn_daemon", no_fork)
    # The image does not even exist: the pyfuse3 check comes first.
    code = cli.main(["mount", str(tmp_path / "missing.img"), str(tmp_path)])
    assert code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("fusefs mount: pyfuse3 ")
    assert "is unpatched" in err
    assert "Traceback" not in err
