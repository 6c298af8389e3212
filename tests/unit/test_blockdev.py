"""BlockDevice.read_into (the fill path's preadv straight into page buffers), read_runs
(direct reads gathered into one buffer) and the prefetch hint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fusefs.blockdev
from fusefs.blockdev import BlockDevice
from fusefs.errors import InvalidArgument, IOFailure
from fusefs.faults import REGISTRY
from fusefs.format import mkfs
from fusefs.powercut import ENV_VAR

BS = 4096


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BlockDevice:
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "img"
    mkfs(path, 1 << 20)
    return BlockDevice(path, BS)


def test_read_into_fills_each_buffer_with_its_block(dev: BlockDevice) -> None:
    data = os.urandom(8 * BS)
    dev.write_sync(100, data)
    bufs = [bytearray(BS) for _ in range(8)]
    before = dev.statistics()
    dev.read_into_sync(100, bufs)
    assert b"".join(bufs) == data == dev.read_sync(100, 8)
    after = dev.statistics()
    assert (after.reads - before.reads, after.bytes_read - before.bytes_read) == (2, 16 * BS)
    dev.close()


def test_read_into_splits_at_iov_max(dev: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fusefs.blockdev, "IOV_MAX", 3)
    data = os.urandom(10 * BS)
    dev.write_sync(50, data)
    bufs = [bytearray(BS) for _ in range(10)]
    dev.read_into_sync(50, bufs)
    assert b"".join(bufs) == data
    dev.close()


def test_read_into_sees_unflushed_writes_under_the_power_cut_simulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "img"
    mkfs(path, 1 << 20)
    monkeypatch.setenv(ENV_VAR, "mode=drop,seed=1")
    dev = BlockDevice(path, BS)
    try:
        assert dev.powercut is not None
        dev.write_sync(20, b"a" * BS + b"b" * BS)  # in the overlay, not in the image
        bufs = [bytearray(BS), bytearray(BS)]
        dev.read_into_sync(20, bufs)
        assert bufs == [bytearray(b"a" * BS), bytearray(b"b" * BS)]
        run = bytearray(2 * BS)
        dev.read_runs_sync([(20, memoryview(run))])
        assert run == b"a" * BS + b"b" * BS
    finally:
        dev.close()


def test_read_runs_reads_each_run_into_its_view(dev: BlockDevice) -> None:
    buf = bytearray(3 * BS)
    view = memoryview(buf)
    with pytest.raises(InvalidArgument, match="partial block"):
        dev.read_runs_sync([(10, view[: BS + 1])])
    with pytest.raises(InvalidArgument, match="outside the device"):
        dev.read_runs_sync([(dev.blocks - 1, view[: 2 * BS])])
    data = os.urandom(3 * BS)
    dev.write_sync(10, data[:BS])
    dev.write_sync(20, data[BS:])
    before = dev.statistics()
    dev.read_runs_sync([(10, view[:BS]), (20, view[BS:])])
    assert buf == data
    after = dev.statistics()
    assert (after.reads - before.reads, after.bytes_read - before.bytes_read) == (2, 3 * BS)
    dev.close()


def test_prefetch_is_a_hint_that_skips_runs_outside_the_device(dev: BlockDevice) -> None:
    dev.prefetch_sync([(dev.blocks - 1, 2), (-1, 1), (5, 0), (0, 4)])
    assert dev.statistics().reads == 0  # counts no read: nothing comes back
    dev.close()


def test_read_into_errors(dev: BlockDevice) -> None:
    with pytest.raises(InvalidArgument, match="outside the device"):
        dev.read_into_sync(dev.blocks - 1, [bytearray(BS), bytearray(BS)])
    REGISTRY.control("name blockdev_read oneshot")
    try:
        with pytest.raises(IOFailure, match="injected read error at block 7"):
            dev.read_into_sync(7, [bytearray(BS)])
        assert REGISTRY.site("blockdev_read").fired == 1
    finally:
        REGISTRY.reset()
    dev.close()


def test_read_into_reports_a_short_read(dev: BlockDevice) -> None:
    os.truncate(dev.path, (dev.blocks - 1) * BS + 100)  # the image shrank underneath
    with pytest.raises(IOFailure, match="short read at block"):
        dev.read_into_sync(dev.blocks - 1, [bytearray(BS)])
    dev.close()


def test_write_many_goes_on_past_a_failed_write(dev: BlockDevice) -> None:
    a, b, c = (bytes([n]) * BS for n in (1, 2, 3))
    REGISTRY.control("name blockdev_write frequency 2 times 1")  # the second write fails
    try:
        errors = dev.write_many_sync([(30, a), (31, b), (32, c), (dev.blocks, a)])
    finally:
        REGISTRY.reset()
    assert errors[0] is None
    assert errors[2] is None
    assert isinstance(errors[1], IOFailure)
    assert "injected write error" in str(errors[1])
    assert isinstance(errors[3], InvalidArgument)  # past the end: refused, nothing written
    assert dev.read_sync(30, 3) == a + bytes(BS) + c
    dev.close()
