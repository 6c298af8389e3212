"""The ``fusefs`` command line: exit codes and one-line errors, without a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import trio

from fusefs.filesystem import Filesystem, MountOptions
from fusefs.namespace import ROOT_INO

from .conftest import FUSEFS, FuseMount, control_read, control_write, fusefs, mkfs, stats


def assert_one_line_error(done: subprocess.CompletedProcess[str], command: str) -> None:
    assert done.returncode != 0, done.stdout
    assert done.stderr.startswith(f"fusefs {command}: "), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_python_m_fusefs_and_help() -> None:
    for argv in (["-m", "fusefs", "--help"], ["-m", "fusefs.cli", "mount", "--help"]):
        done = subprocess.run(
            [FUSEFS[0], *argv], capture_output=True, text=True, check=False, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "usage: fusefs" in done.stdout


def test_mkfs_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image)
    before = image.read_bytes()[:8192]
    done = fusefs("mkfs", image, "--size", "64M")
    assert_one_line_error(done, "mkfs")
    assert "--force" in done.stderr
    assert image.read_bytes()[:8192] == before
    done = fusefs("mkfs", image, "--size", "32M", "--force")
    assert done.returncode == 0, done.stderr
    assert image.stat().st_size == 32 << 20


@pytest.mark.mount
def test_mkfs_refuses_a_mounted_image(mnt: FuseMount) -> None:
    (Path(mnt.mountpoint) / "kept").write_bytes(b"still here")
    before = mnt.image.read_bytes()[:8192]
    for path in (mnt.image, Path(os.path.relpath(mnt.image))):
        done = fusefs("mkfs", path, "--size", "32M", "--force")
        assert_one_line_error(done, "mkfs")
        assert "mounted on" in done.stderr
    assert mnt.image.read_bytes()[:8192] == before
    assert (Path(mnt.mountpoint) / "kept").read_bytes() == b"still here"


@pytest.mark.mount
def test_mkfs_takes_the_image_lock_the_daemon_holds(mnt: FuseMount, tmp_path: Path) -> None:
    """A path mountinfo does not know (a symlink) still meets the daemon's lock."""
    link = tmp_path / "link.img"
    link.symlink_to(mnt.image)
    size = mnt.image.stat().st_size
    done = fusefs("mkfs", link, "--size", "32M", "--force")
    assert_one_line_error(done, "mkfs")
    assert "in use by a fusefs process" in done.stderr
    assert mnt.image.stat().st_size == size
    mnt.remount()  # the image is intact


def test_mkfs_refuses_a_file_that_holds_other_data(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"a" * 1234)
    done = fusefs("mkfs", notes, "--size", "1M")
    assert_one_line_error(done, "mkfs")
    assert "holds 1234 bytes of data that is not a fusefs image" in done.stderr
    assert "--force" in done.stderr
    assert notes.read_bytes() == b"a" * 1234
    # Empty files, and files of zeros (sparse or not), hold nothing to lose.
    for name, content in (("empty", b""), ("zeros", bytes(1 << 20))):
        path = tmp_path / name
        path.write_bytes(content)
        done = fusefs("mkfs", path, "--size", "1M")
        assert done.returncode == 0, done.stderr
    sparse = tmp_path / "sparse"
    sparse.touch()
    os.truncate(sparse, 1 << 30)
    done = fusefs("mkfs", sparse, "--size", "1M")
    assert done.returncode == 0, done.stderr
    done = fusefs("mkfs", notes, "--size", "1M", "--force")
    assert done.returncode == 0, done.stderr
    assert fusefs("fsck", notes).returncode == 0


def test_mkfs_size_help_and_errors_suggest_sizes_that_work(tmp_path: Path) -> None:
    help_text = " ".join(fusefs("mkfs", "--help").stdout.split())
    m = re.search(
        r"--size SIZE image size, at least 64 blocks \((\w+) with [^)]*\): ([\w, ]+)", help_text
    )
    assert m, help_text
    suggested = [m[1], *m[2].split(", ")]
    done = fusefs("mkfs", tmp_path / "x.img", "--size", "lots")
    assert_one_line_error(done, "mkfs")
    m = re.search(r"unit: ([\w, ]+)\)", done.stderr)
    assert m, done.stderr
    suggested += m[1].split(", ")
    for bad in ("4096", "4K", "255K"):
        done = fusefs("mkfs", tmp_path / "x.img", "--size", bad)
        assert_one_line_error(done, "mkfs")
        m = re.search(r"too small: at least (\w+) ", done.stderr)
        assert m, done.stderr
        suggested.append(m[1])
    assert "256K" in suggested
    assert "4096" not in suggested
    for i, size in enumerate(sorted(set(suggested))):
        done = fusefs("mkfs", tmp_path / f"s{i}.img", "--size", size)
        assert done.returncode == 0, f"--size {size}: {done.stderr}"


def test_fsck_errors_go_to_stderr_once(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    done = fusefs("fsck", missing)
    assert done.returncode == 8
    assert done.stdout == ""
    assert done.stderr == f"fusefs fsck: {missing}: no such image file\n"


def test_fsck_reports_and_repairs_a_damaged_superblock_copy(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image)
    for copy, block in (("B", 1), ("A", 0)):
        with open(image, "r+b") as f:
            f.seek(block * 4096 + 16)
            f.write(b"\xde\xad")  # inside the checksummed fields
        done = fusefs("fsck", image)
        assert done.returncode == 4, done.stdout + done.stderr
        assert done.stderr == (
            f"fusefs fsck: superblock copy {copy} (block {block}) is damaged: superblock "
            "checksum mismatch; the image still mounts from the other copy\n"
        )
        assert done.stdout == "1 inodes, 1 errors\n"
        done = fusefs("fsck", image, "--repair")
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.endswith("(fixed)\n")
        done = fusefs("fsck", image)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stderr == ""


@pytest.mark.mount
def test_fault_command_errors_say_why_and_where_the_log_is(mnt: FuseMount) -> None:
    cases = [
        (("name", "blockdev_write", "explode"), "unknown keyword 'explode'", "EINVAL"),
        (("name", "nosuch_site", "enable"), "no site matches 'name nosuch_site'", "ENOENT"),
        (("file", "fuse_ops.py", "enable"), "self-test sites match only by", "ENOENT"),
    ]
    for words, reason, name in cases:
        done = fusefs("fault", mnt.mountpoint, *words)
        assert_one_line_error(done, "fault")
        assert reason in done.stderr
        assert f"({name}; daemon log: {mnt.log})" in done.stderr
    mnt.allow_log_errors = True
    done = fusefs("fault", mnt.mountpoint, "name", "blockdev_write", "oneshot")
    assert done.returncode == 0, done.stderr
    assert "name:blockdev_write oneshot " in control_read(mnt.mountpoint, "dynamic_fault")
    control_write(mnt.mountpoint, "dynamic_fault", "reset")


@pytest.mark.mount
def test_broad_fault_queries_do_not_arm_selftest_sites(mnt: FuseMount) -> None:
    for query in ("", "class io", "class error", "file blockdev.py", "name *"):
        control_write(mnt.mountpoint, "dynamic_fault", f"{query} probability 0")
        text = control_read(mnt.mountpoint, "dynamic_fault")
        listing = [ln for ln in text.splitlines() if not ln.startswith("#")]
        armed = {ln.split(" name:")[1].split()[0] for ln in listing if "probability=0" in ln}
        assert armed, query
        selftest = {ln.split(" name:")[1].split()[0] for ln in listing if ":selftest " in ln}
        assert {"daemon_crash", "blockdev_corrupt_write"} <= selftest
        assert not armed & selftest, query
        control_write(mnt.mountpoint, "dynamic_fault", "reset")
    control_write(mnt.mountpoint, "dynamic_fault", "class error:selftest probability 0")
    text = control_read(mnt.mountpoint, "dynamic_fault")
    assert "name:daemon_crash probability=0 " in text
    control_write(mnt.mountpoint, "dynamic_fault", "reset")


@pytest.mark.parametrize(
    ("size", "block_size", "words"),
    [
        ("4K", "4096", "too small"),
        ("1E", "4096", "too large"),
        ("lots", "4096", "bad size"),
        ("64M", "3000", "block size"),
    ],
)
def test_mkfs_bad_sizes_are_clean_errors(
    tmp_path: Path, size: str, block_size: str, words: str
) -> None:
    image = tmp_path / "fs.img"
    done = fusefs("mkfs", image, "--size", size, "--block-size", block_size)
    assert_one_line_error(done, "mkfs")
    assert words in done.stderr
    assert not image.exists()


def test_umount_of_a_non_mount_is_a_clean_error(tmp_path: Path) -> None:
    done = fusefs("umount", tmp_path)
    assert_one_line_error(done, "umount")
    assert "not mounted" in done.stderr
    done = fusefs("umount", "/proc")
    assert_one_line_error(done, "umount")
    assert "not a fusefs mount" in done.stderr


@pytest.mark.parametrize("command", ["fault", "stats", "drop-caches", "lock"])
def test_control_commands_on_a_non_mount(tmp_path: Path, command: str) -> None:
    done = fusefs(command, tmp_path)
    assert_one_line_error(done, command)
    assert "not a fusefs mount" in done.stderr


def test_fallocate_outside_a_fusefs_mount(tmp_path: Path) -> None:
    done = fusefs("fallocate", "-l", "4K", tmp_path / "f")
    assert_one_line_error(done, "fallocate")
    assert "not on a fusefs mount" in done.stderr
    done = fusefs("fallocate", "-l", "4K", tmp_path / "missing" / "f")
    assert_one_line_error(done, "fallocate")
    assert "No such file or directory" in done.stderr


@pytest.mark.mount
def test_mount_options_reach_the_core(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image)
    (tmp_path / "mnt").mkdir()
    m = FuseMount(image, tmp_path / "mnt")
    try:
        m.mount("-o", "pagecache_lock=off,cache_size=32M,readahead=off,commit=1")
        st = stats(m.mountpoint)
        assert st["pagecache_lock"] == "off"
        assert st["cache_limit_bytes"] == str(32 << 20)
        assert control_read(m.mountpoint, "pagecache_lock") == "off\n"
        # Sequential reads start no readahead.
        data = os.urandom(64 * 4096)
        (tmp_path / "mnt" / "f").write_bytes(data)
        control_write(m.mountpoint, "drop_caches", "1")
        with open(tmp_path / "mnt" / "f", "rb") as f:
            while f.read(4096):
                pass
        assert stats(m.mountpoint)["readahead_issued"] == "0"
        # commit=1: a change is committed within about a second, without fsync.
        commits = int(stats(m.mountpoint)["commits"])
        (tmp_path / "mnt" / "g").write_bytes(b"x")
        deadline = time.monotonic() + 10
        while int(stats(m.mountpoint)["commits"]) == commits:
            assert time.monotonic() < deadline, "no periodic commit"
            time.sleep(0.05)
        m.umount_clean()
    finally:
        m.teardown()


def test_mount_argument_errors(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image)
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "mnt").mkdir()
    cases: list[tuple[tuple[str | Path, ...], str]] = [
        ((tmp_path / "missing.img", tmp_path / "mnt"), "no such image"),
        ((image, tmp_path / "nowhere"), "No such file or directory"),
        ((image, tmp_path / "file"), "not a directory"),
        ((image, "/proc"), "already a mount point"),
        ((image, tmp_path / "mnt", "-o", "bogus"), "unknown mount option"),
    ]
    for args, words in cases:
        done = fusefs("mount", *args)
        assert_one_line_error(done, "mount")
        assert words in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    assert not (tmp_path / "fs.img.status").exists()


@pytest.mark.mount
def test_mount_of_a_mounted_image_or_mountpoint(mnt: FuseMount, tmp_path: Path) -> None:
    done = fusefs("mount", mnt.image, mnt.mountpoint)
    assert_one_line_error(done, "mount")
    assert "already a mount point" in done.stderr
    (tmp_path / "other").mkdir()
    done = fusefs("mount", mnt.image, tmp_path / "other")
    assert_one_line_error(done, "mount")
    assert f"already mounted on {mnt.mountpoint}" in done.stderr


@pytest.mark.mount
def test_fsck_refuses_a_mounted_image(mnt: FuseMount) -> None:
    done = fusefs("fsck", mnt.image)
    assert done.returncode == 8
    assert_one_line_error(done, "fsck")
    assert "is mounted on" in done.stderr


def test_fsck_exit_codes_clean(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image)
    done = fusefs("fsck", image)
    assert done.returncode == 0, done.stdout + done.stderr
    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(os.urandom(1 << 20))
    assert fusefs("fsck", foreign).returncode == 8
    assert fusefs("fsck", tmp_path / "missing.img").returncode == 8


async def _damage_link_count(image: Path) -> None:
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, os.getuid(), os.getgid())
    await fs.write(fh, 0, b"data")
    await fs.release(fh)
    fs.ns.get(attr.ino).nlink = 7  # a wrong link count, which fsck can repair
    await fs.unmount()


def test_fsck_exit_codes_damaged(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image)
    trio.run(_damage_link_count, image)
    done = fusefs("fsck", image)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "link count" in done.stderr
    done = fusefs("fsck", image, "--repair")
    assert done.returncode == 1, done.stdout + done.stderr
    assert fusefs("fsck", image).returncode == 0


@pytest.mark.mount
def test_awkward_image_path_round_trips_through_mountinfo(tmp_path: Path) -> None:
    """The image path travels as the mount's source (fsname=fusefs:IMAGE, escaped for
    libfuse, octal-escaped in mountinfo) and umount needs it back for the status."""
    image = tmp_path / "an image, with\\odd chars.img"
    mkfs(image)
    (tmp_path / "mnt").mkdir()
    m = FuseMount(image, tmp_path / "mnt")
    try:
        m.mount()
        (tmp_path / "mnt" / "f").write_bytes(b"x")
        m.umount_clean()
    finally:
        m.teardown()
    assert Path(f"{image}.status").read_text().startswith("clean ")


def test_demo_races_prints_the_table() -> None:
    done = fusefs("demo", "races", "--race", "3")
    assert done.returncode == 0, done.stderr
    assert "buffered read vs" in done.stdout
    assert "WRONG" in done.stdout
    assert "right" in done.stdout
    assert "Traceback" not in done.stderr
