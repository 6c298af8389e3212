"""Fixtures for in-process tests of the core: a real image file, no FUSE."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fusefs.faults import REGISTRY
from fusefs.filesystem import Filesystem, MountOptions
from fusefs.format import mkfs
from fusefs.fsck import fsck


@pytest.fixture(autouse=True)
def _clean_faults() -> Iterator[None]:
    """Every test starts and ends with every fault site disabled."""
    REGISTRY.reset()
    yield
    REGISTRY.reset()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "fs.img"
    mkfs(path, 64 << 20)
    return path


def assert_fsck_clean(path: Path) -> None:
    result = fsck(path)
    assert result.exit_code == 0, "\n".join(result.messages)


@pytest.fixture
async def fs(image: Path) -> AsyncIterator[Filesystem]:
    """A mounted core; unmounted and checked with fsck after the test."""
    fs = await Filesystem.mount(image, MountOptions(commit_interval=3600))
    yield fs
    if not fs.dev.closed:
        await fs.unmount()
    assert_fsck_clean(image)


@pytest.fixture
async def tiny_fs(tmp_path: Path) -> AsyncIterator[Filesystem]:
    """A core on a 1 MiB image: 256 blocks, for ENOSPC."""
    path = tmp_path / "tiny.img"
    mkfs(path, 1 << 20)
    fs = await Filesystem.mount(path, MountOptions(commit_interval=3600))
    yield fs
    if not fs.dev.closed:
        await fs.unmount()
    assert_fsck_clean(path)
