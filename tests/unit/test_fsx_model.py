"""fsx's pure parts: stamped data, the op text format, the model (bytes, and
where its data and holes are for SEEK_DATA/SEEK_HOLE, checked against the core
itself), generation, lineage, the minimizer, and the ``--procs`` checker on
synthetic logs."""

from __future__ import annotations

import errno
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusefs.errors import FsError
from fusefs.filesystem import Filesystem
from fusefs.namespace import ROOT_INO
from tools.fsx.model import (
    ALL_KINDS,
    BS,
    CELL,
    FALLOC_KINDS,
    GenConfig,
    Generator,
    Model,
    Op,
    OpSyntaxError,
    Stamp,
    Step,
    bad_range,
    ddmin,
    decode_cell,
    describe_at,
    first_difference,
    format_ops,
    parse_op,
    parse_ops,
    seek_walk,
    size_after,
    stamp_bytes,
    touching,
    why_invalid,
)
from tools.fsx.procs import (
    Anomaly,
    History,
    Mutation,
    Read,
    allowed,
    block_value,
    check_read,
    explain,
)
from tools.fsx.target import FALLOC_FLAGS

# stamped data:


def test_stamp_cells_say_who_wrote_them_and_where() -> None:
    data = stamp_bytes(3, 1234, 8192, 64)
    assert len(data) == 64
    for i in range(0, 64, CELL):
        assert decode_cell(data[i : i + CELL]) == Stamp(3, 1234, 8192 + i)


@given(
    writer=st.integers(0, 255),
    stamp=st.integers(0, 2**48 - 1),
    offset=st.integers(0, 1 << 20),
    a=st.integers(0, 300),
    b=st.integers(0, 300),
)
def test_stamp_bytes_depend_only_on_the_file_offset(
    writer: int, stamp: int, offset: int, a: int, b: int
) -> None:
    """Two writes of one op's data side by side equal one write of both: each
    byte is a function of (writer, op, file offset) alone."""
    whole = stamp_bytes(writer, stamp, offset, a + b)
    assert len(whole) == a + b
    assert (
        stamp_bytes(writer, stamp, offset, a) + stamp_bytes(writer, stamp, offset + a, b) == whole
    )


def test_zero_and_foreign_cells_are_not_stamps() -> None:
    assert decode_cell(bytes(CELL)) is None
    assert decode_cell(b"\xf5" + bytes(7) + (7).to_bytes(8, "little")) is None  # misaligned offset
    assert decode_cell(b"x" * CELL) is None
    assert decode_cell(b"\xf5" * 3) is None


def test_describe_at_names_the_writer_and_spots_moved_data() -> None:
    data = stamp_bytes(0, 9, 4096, 32)
    assert describe_at(data, 5, 4096) == "op 9 (written at offset 4096)"
    assert "moved or stale" in describe_at(data, 5, 8192)
    assert describe_at(bytes(32), 3) == "zeros"
    assert describe_at(b"junk" * 8, 0) == "unrecognised bytes (not a stamp)"


# the op text format:

ALL_OPS = [
    Op("read", 5, 100),
    Op("dread", 4096, 8192),
    Op("write", 12288, 4096, stamp=17),
    Op("dwrite", 0, 4096, stamp=2),
    Op("readahead", 0, 65536, arg="4096"),
    Op("truncate", 777),
    *(Op("fallocate", 4096, 8192, arg=mode) for mode in FALLOC_KINDS.values()),
    Op("fsync"),
    Op("fdatasync"),
    Op("reopen"),
    Op("drop_caches"),
    Op("check"),
]


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_op_text_round_trips(op: Op) -> None:
    assert parse_op(str(op)) == op


def test_op_lists_keep_order_and_skip_comments() -> None:
    text = format_ops(ALL_OPS, ["seed 5", "argv: -N 3"])
    assert text.startswith("# fusefs-fsx ops v1\n# seed 5\n")
    assert parse_ops(text) == ALL_OPS
    assert parse_ops("\n  write 0 10 stamp=1   # a comment\n\n") == [Op("write", 0, 10, stamp=1)]


@pytest.mark.parametrize(
    "line",
    [
        "frobnicate 1 2",
        "write 0 10",
        "write 0 10 data=3",
        "read 1",
        "read -1 5",
        "read x 5",
        "fallocate sideways 0 4096",
        "fallocate punch 0 0",
        "readahead 0 4096 0",
        "fsync now",
        "write 0 1 stamp=281474976710656",
    ],
)
def test_bad_op_lines_are_refused(line: str) -> None:
    with pytest.raises(OpSyntaxError):
        parse_op(line)


def test_a_bad_line_is_reported_with_its_number() -> None:
    with pytest.raises(OpSyntaxError, match="line 3"):
        parse_ops("# header\nfsync\nread 1 2 3\n")


# the model:


def model_after(*ops: Op, start: bytes = b"") -> bytes:
    m = Model(bytearray(start))
    for op in ops:
        m.apply(op)
    return bytes(m.data)


def test_model_fallocate_modes() -> None:
    data = bytes(range(256)) * 64  # 16 KiB
    n = len(data)

    def fa(mode: str, off: int, length: int) -> Op:
        return Op("fallocate", off, length, arg=mode)

    assert model_after(fa("alloc", n - 10, 100), start=data) == data + bytes(90)
    assert model_after(fa("keep_size", n - 10, 100), start=data) == data
    assert model_after(fa("punch", 100, 50), start=data) == data[:100] + bytes(50) + data[150:]
    assert model_after(fa("punch", n - 10, 100), start=data) == data[:-10] + bytes(10)
    assert model_after(fa("zero", n - 10, 100), start=data) == data[:-10] + bytes(100)
    assert model_after(fa("zero,keep_size", n - 10, 100), start=data) == data[:-10] + bytes(10)
    assert model_after(fa("collapse", 4096, 8192), start=data) == data[:4096] + data[12288:]
    assert model_after(fa("insert", 4096, 4096), start=data) == (
        data[:4096] + bytes(4096) + data[4096:]
    )


def test_model_write_past_eof_and_truncate_both_ways() -> None:
    after = model_after(Op("write", 10, 4, stamp=1), Op("truncate", 12), Op("truncate", 20))
    assert after == bytes(10) + stamp_bytes(0, 1, 10, 2) + bytes(8)


# where the model says data and holes are:


def fa(mode: str, off: int, length: int) -> Op:
    return Op("fallocate", off, length, arg=mode)


def model_of(*ops: Op) -> Model:
    m = Model()
    for op in ops:
        m.apply(op)
    return m


def test_model_seek_writes_are_data_preallocation_and_holes_are_not() -> None:
    # Blocks: 0 written, 1 hole, 2 preallocated, 3 written at 1 byte, 4 hole, then
    # 100 bytes of block 5 written: size 5 blocks + 100.
    m = model_of(
        Op("write", 0, BS, stamp=1),
        fa("alloc", 2 * BS, BS),
        Op("write", 3 * BS + 7, 1, stamp=2),
        Op("write", 5 * BS, 100, stamp=3),
    )
    assert m.size == 5 * BS + 100
    assert m.data_segments() == [(0, BS), (3 * BS, 4 * BS), (5 * BS, 5 * BS + 100)]
    assert m.seek_data(10) == 10  # never before the offset
    assert m.seek_data(BS) == 3 * BS  # the hole and the preallocated block skipped
    assert m.seek_hole(10) == BS
    assert m.seek_hole(3 * BS + 5) == 4 * BS
    assert m.seek_hole(5 * BS) == m.size  # EOF is a hole
    assert m.seek_data(m.size) is None  # at EOF: ENXIO
    assert m.seek_hole(m.size + 1) is None
    assert model_of(fa("alloc", 0, 3 * BS)).seek_data(0) is None  # all preallocated: ENXIO


def test_model_seek_punch_and_zero_range_keep_their_partial_edges_as_data() -> None:
    full = Op("write", 0, 6 * BS, stamp=1)
    # Punch from the middle of block 1 to the middle of block 4: blocks 2, 3 go;
    # 1 and 4 are zeroed in part and stay data (a written block of zeros is data).
    m = model_of(full, fa("punch", BS + 100, 3 * BS))
    assert m.data_segments() == [(0, 2 * BS), (4 * BS, 6 * BS)]
    assert m.expect_read(2 * BS, BS) == bytes(BS)
    # Zero range: the whole blocks become unwritten (holes), the edges stay data.
    m = model_of(full, fa("zero,keep_size", BS + 100, 3 * BS))
    assert m.data_segments() == [(0, 2 * BS), (4 * BS, 6 * BS)]
    # Zero range over holes preallocates: still holes, and the size grows.
    m = model_of(Op("write", 0, 10, stamp=1), fa("zero", 3 * BS, 2 * BS + 1))
    assert (m.size, m.data_segments()) == (5 * BS + 1, [(0, BS)])
    # A write into preallocated or zeroed blocks makes them data again.
    m.apply(Op("write", 4 * BS + 1, 1, stamp=2))
    assert m.data_segments() == [(0, BS), (4 * BS, 5 * BS)]


def test_model_seek_collapse_insert_and_truncate_move_and_drop_blocks() -> None:
    m = model_of(
        Op("write", 0, BS, stamp=1),
        Op("write", 3 * BS, BS, stamp=2),
        Op("write", 6 * BS, BS, stamp=3),
    )
    assert m.data_segments() == [(0, BS), (3 * BS, 4 * BS), (6 * BS, 7 * BS)]
    m.apply(fa("collapse", BS, 2 * BS))  # blocks 3.. move down by 2
    assert m.data_segments() == [(0, 2 * BS), (4 * BS, 5 * BS)]
    m.apply(fa("insert", BS, 3 * BS))  # block 1.. move up by 3
    assert m.data_segments() == [(0, BS), (4 * BS, 5 * BS), (7 * BS, 8 * BS)]
    # Preallocated past EOF: kept by a truncate up, dropped by a truncate down.
    m.apply(fa("keep_size", 8 * BS, 4 * BS))
    m.apply(Op("truncate", 12 * BS))
    assert m.blocks[10] == "U"
    m.apply(Op("truncate", 4 * BS + 1))  # block 4 keeps its state: partial EOF block
    assert sorted(m.blocks) == [0, 4]
    assert m.data_segments() == [(0, BS), (4 * BS, 4 * BS + 1)]
    m.apply(Op("truncate", 12 * BS))
    assert m.data_segments() == [(0, BS), (4 * BS, 5 * BS)]


def test_seek_walk_refuses_an_answer_that_goes_nowhere() -> None:
    with pytest.raises(ValueError, match="SEEK_HOLE from data at 0"):
        seek_walk(lambda o: 0, lambda o: 0)


async def _core_seek(fs: Filesystem, fh: int, offset: int, whence: int) -> int | None:
    try:
        return await fs.lseek(fh, offset, whence)
    except FsError as e:
        if e.code != errno.ENXIO:
            raise
        return None


async def _core_apply(fs: Filesystem, fh: int, dfh: int, ino: int, op: Op) -> None:
    if op.kind in ("write", "dwrite"):
        data = stamp_bytes(0, op.stamp, op.offset, op.length)
        await fs.write(dfh if op.kind == "dwrite" else fh, op.offset, data)
    elif op.kind in ("read", "dread", "readahead"):
        await fs.read(dfh if op.kind == "dread" else fh, op.offset, op.length)
    elif op.kind == "truncate":
        await fs.truncate(fs.ns.get(ino), op.offset)
    elif op.kind == "fallocate":
        await fs.fallocate(ino, FALLOC_FLAGS[op.arg], op.offset, op.length)
    elif op.kind in ("fsync", "fdatasync"):
        await fs.fsync(fh, op.kind == "fdatasync")
    elif op.kind == "drop_caches":
        await fs.drop_caches()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_model_seek_answers_are_the_cores(fs: Filesystem, seed: int) -> None:
    """The model's SEEK_DATA/SEEK_HOLE answer is fusefs's, exactly, from every
    block boundary and a few offsets inside blocks, after every op of a generated
    run (buffered and O_DIRECT writes, every fallocate mode, truncates, fsync
    and drop_caches moving dirty pages to written blocks): what lets fsx check
    fusefs's answers exactly on a mount."""
    fh, attr = await fs.create(ROOT_INO, b"f", 0o644, os.O_RDWR, 0, 0)
    dfh = await fs.open(attr.ino, os.O_RDWR | os.O_DIRECT)
    config = GenConfig(maxlen=64 * BS, maxoplen=16 * BS, kinds=ALL_KINDS - {"reopen"})
    gen = Generator(seed, config)
    model = Model()
    rng = random.Random(seed)
    kinds_seen = set()
    for number in range(1, 301):
        op = gen.next(number, model.size)
        if why_invalid(op, model.size) is not None:
            continue
        await _core_apply(fs, fh, dfh, attr.ino, op)
        model.apply(op)
        kinds_seen.add(op.arg or op.kind)
        offsets = [
            *range(0, model.size + BS, BS),
            *(rng.randrange(model.size + 1) for _ in range(4)),
        ]
        for offset in offsets:
            for whence, want in (
                (os.SEEK_DATA, model.seek_data(offset)),
                (os.SEEK_HOLE, model.seek_hole(offset)),
            ):
                got = await _core_seek(fs, fh, offset, whence)
                assert got == want, (number, str(op), offset, whence, model.blocks)
    assert {"write", "dwrite", "punch", "zero", "collapse", "insert", "truncate"} <= kinds_seen
    await fs.release(dfh)
    await fs.release(fh)


@pytest.mark.parametrize(
    ("op", "size", "reason"),
    [
        (Op("fallocate", 0, 4096, arg="collapse"), 4096, "reaches EOF"),
        (Op("fallocate", 4096, 4096, arg="collapse"), 8192, "reaches EOF"),
        (Op("fallocate", 100, 4096, arg="collapse"), 100000, "aligned"),
        (Op("fallocate", 8192, 4096, arg="insert"), 8192, "past EOF"),
        (Op("dwrite", 100, 4096, stamp=1), 0, "aligned"),
        (Op("dread", 0, 100), 0, "aligned"),
    ],
)
def test_ops_the_filesystem_would_refuse_are_spotted(op: Op, size: int, reason: str) -> None:
    why = why_invalid(op, size)
    assert why is not None
    assert reason in why


def test_valid_collapse_and_insert_pass() -> None:
    assert why_invalid(Op("fallocate", 0, 4096, arg="collapse"), 4097) is None
    assert why_invalid(Op("fallocate", 4096, 4096, arg="insert"), 4097) is None


def test_first_difference_and_bad_range() -> None:
    want = stamp_bytes(0, 1, 0, 4096)
    got = want[:100] + stamp_bytes(0, 2, 100, 200) + want[300:]
    first = first_difference(want, got)
    assert first is not None
    assert want[first] != got[first]
    assert want[:first] == got[:first]
    end, differing = bad_range(want, got, first)
    assert 100 <= first < end
    assert end == 304  # the stale run ends with the cell holding byte 299
    assert 0 < differing <= 200
    assert first_difference(want, want) is None
    assert first_difference(want, want[:10]) == 10


# generation:

SMALL = GenConfig(maxlen=64 * 1024, maxoplen=16 * 1024, kinds=ALL_KINDS)


def run_generator(seed: int, config: GenConfig, n: int) -> list[tuple[Op, int]]:
    gen = Generator(seed, config)
    size = 0
    out = []
    for number in range(1, n + 1):
        op = gen.next(number, size)
        out.append((op, size))
        size = size_after(op, size)
    return out


def test_same_seed_same_ops_other_seed_other_ops() -> None:
    assert run_generator(7, SMALL, 300) == run_generator(7, SMALL, 300)
    assert run_generator(7, SMALL, 300) != run_generator(8, SMALL, 300)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_generated_ops_are_valid_and_stay_inside_the_limits(seed: int) -> None:
    model = Model()
    kinds_seen = set()
    for op, size in run_generator(seed, SMALL, 2000):
        assert size == model.size
        assert why_invalid(op, size) is None, op
        assert parse_op(str(op)) == op
        model.apply(op)
        assert model.size == size_after(op, size)
        assert model.size <= SMALL.maxlen
        if op.kind not in ("truncate", "readahead") and op.length:
            assert op.length <= SMALL.maxoplen
        kinds_seen.add(op.arg if op.kind == "fallocate" else op.kind)
    assert kinds_seen >= {*FALLOC_KINDS.values(), "read", "write", "dread", "dwrite"}


def test_alignment_flags_are_kept() -> None:
    config = GenConfig(
        maxlen=256 * 1024, maxoplen=64 * 1024, readbdy=512, writebdy=2048, truncbdy=4096,
        kinds=ALL_KINDS,
    )  # fmt: skip
    for op, _ in run_generator(5, config, 1500):
        if op.kind == "read":
            assert op.offset % 512 == 0
        elif op.kind == "write":
            assert op.offset % 2048 == 0
            assert op.length % 2048 == 0
        elif op.kind == "truncate":
            assert op.offset % 4096 == 0
        elif op.kind in ("dread", "dwrite") or op.arg in ("collapse", "insert"):
            assert op.offset % BS == 0
            assert op.length % BS == 0


def test_procs_generation_keeps_every_size_whole_blocks() -> None:
    config = GenConfig(256 * 1024, 64 * 1024, BS, BS, BS, BS, ALL_KINDS)
    for op, size in run_generator(9, config, 1500):
        assert size % BS == 0
        assert op.offset % BS == 0
        assert op.length % BS == 0


def test_only_enabled_kinds_are_generated() -> None:
    config = GenConfig(kinds=frozenset({"write", "collapse"}))
    kinds = {op.arg or op.kind for op, _ in run_generator(3, config, 500)}
    assert kinds == {"write", "collapse"}
    with pytest.raises(ValueError, match="no operation"):
        Generator(1, GenConfig(kinds=frozenset()))


# lineage:


def test_touching_follows_a_byte_through_collapse_and_insert() -> None:
    ops = [
        Op("write", 0, 40960, stamp=1),
        Op("write", 20480, 10, stamp=2),
        Op("fallocate", 4096, 8192, arg="collapse"),  # byte 20480 -> 12288
        Op("fallocate", 0, 4096, arg="insert"),  # 12288 -> 16384
        Op("read", 0, 100),
    ]
    history = []
    size = 0
    for n, op in enumerate(ops, 1):
        history.append(Step(n, op, size))
        size = size_after(op, size)
    found = touching(history, 16384)
    assert [(s.number, what.split(" ")[0]) for s, what in found] == [
        (4, "moved"),
        (3, "moved"),
        (2, "wrote"),
        (1, "wrote"),
    ]
    assert "from offset 12288" in found[0][1]
    # Inside the inserted range: created by the insert, nothing older counts.
    assert [s.number for s, _ in touching(history, 100)] == [4]


# the minimizer:


def test_ddmin_finds_the_two_ops_that_matter() -> None:
    ops = [Op("write", i * 10, 5, stamp=i) for i in range(1, 101)]
    culprits = {ops[17], ops[63]}

    def fails(candidate: list[Op]) -> bool:
        return culprits <= set(candidate)

    result = ddmin(ops, fails)
    assert result.ops == [ops[17], ops[63]]
    assert result.stopped is None
    assert result.tests < 200


def test_ddmin_keeps_order_dependent_failures() -> None:
    ops = [Op("write", i, 1, stamp=i) for i in range(40)]

    def fails(candidate: list[Op]) -> bool:
        stamps = [op.stamp for op in candidate]
        return 5 in stamps and 30 in stamps and stamps.index(5) < stamps.index(30)

    assert [op.stamp for op in ddmin(ops, fails).ops] == [5, 30]


def test_ddmin_stops_at_its_budget() -> None:
    ops = [Op("fsync")] * 64
    result = ddmin(ops, lambda c: len(c) > 3, max_tests=5)
    assert result.tests == 5
    assert result.stopped is not None
    assert "budget" in result.stopped
    assert len(result.ops) < 64


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 49), min_size=1, max_size=4), st.integers(0, 2**32))
def test_ddmin_result_is_one_minimal(needed: set[int], seed: int) -> None:
    ops = [Op("write", i, 1, stamp=i) for i in range(50)]
    random.Random(seed).shuffle(ops)

    def fails(candidate: list[Op]) -> bool:
        return needed <= {op.stamp for op in candidate}

    result = ddmin(ops, fails)
    assert {op.stamp for op in result.ops} == needed


# the --procs checker:


def mut(number: int, t0: int, t1: int, op: Op, writer: int = 1) -> Mutation:
    return Mutation(number, t0, t1, writer, op)


def val(writer: int, number: int, block: int) -> str:
    return f"{writer}:{number}:{block * BS}"


@pytest.fixture
def history() -> History:
    return History(
        [
            mut(1, 10, 20, Op("write", 0, 4 * BS, stamp=1)),  # blocks 0-3
            mut(2, 30, 40, Op("write", BS, BS, stamp=2)),  # block 1
            mut(3, 50, 60, Op("fallocate", BS, BS, arg="collapse")),  # 2,3 -> 1,2
            mut(4, 70, 80, Op("truncate", BS)),
            mut(5, 90, 100, Op("truncate", 3 * BS)),
        ]
    )


def read(rs: int, re: int, offset: int, values: list[str], length: int = 0) -> Read:
    got = len(values) * BS
    return Read("reader 0", "buffered", rs, re, offset, length or got, got, tuple(values))


def anomalies_of(history: History, r: Read) -> list[Anomaly]:
    out: list[Anomaly] = []
    check_read(history, r, out)
    return out


def test_history_states(history: History) -> None:
    assert history.sizes == [0, 4 * BS, 4 * BS, 3 * BS, BS, 3 * BS]
    assert history.final == [val(1, 1, 0), "0", "0"]
    assert history.values(1, 1, 1) == [val(1, 1, 1)]
    assert history.values(1, 1, 5) == [val(1, 1, 1), val(1, 2, 1), val(1, 1, 2), None, "0"]
    assert history.window(25, 45) == (1, 2)  # op 1 done before, op 2 ran during
    assert history.window(41, 49) == (2, 2)


def test_a_read_may_see_any_state_during_it(history: History) -> None:
    # Block 1 during op 2: old or new.
    assert not anomalies_of(history, read(25, 45, BS, [val(1, 1, 1)]))
    assert not anomalies_of(history, read(25, 45, BS, [val(1, 2, 1)]))
    # Torn between the two states: each part was there at some moment.
    torn = f"T{val(1, 1, 1)}|{val(1, 2, 1)}"
    assert not anomalies_of(history, read(25, 45, BS, [torn]))


def test_stale_data_is_an_anomaly(history: History) -> None:
    (a,) = anomalies_of(history, read(41, 49, BS, [val(1, 1, 1)]))
    assert a.block == 1
    assert a.seen == val(1, 1, 1)
    text = "\n".join(explain(history, a))
    assert "stale data" in text
    assert "replaced it in this block" in text
    assert "write 4096 4096 stamp=2" in text


def test_stale_zeros_name_the_op_that_filled_the_block(history: History) -> None:
    (a,) = anomalies_of(history, read(41, 49, 0, ["0"]))
    text = "\n".join(explain(history, a))
    assert "stale zeros" in text
    assert "write 0 16384 stamp=1  -- put data in this block" in text


def test_data_from_the_wrong_offset_is_an_anomaly(history: History) -> None:
    (a,) = anomalies_of(history, read(61, 69, BS, [val(1, 1, 3)]))  # block 1 after collapse
    text = "\n".join(explain(history, a))
    assert "never in 1" in text


def test_garbage_and_past_eof_data(history: History) -> None:
    assert anomalies_of(history, read(61, 69, 0, ["?0102"]))
    # After the truncate to one block, block 2 can't return data ...
    assert anomalies_of(history, read(81, 89, 2 * BS, ["0"]))
    # ... but zeros while a truncate up makes it zeros are fine.
    assert not anomalies_of(history, read(81, 95, 2 * BS, ["0"]))
    # A read up to EOF is short by design; one that stops before EOF is not.
    whole = [val(1, 1, 0), val(1, 2, 1), val(1, 1, 2), val(1, 1, 3)]
    assert not anomalies_of(history, read(41, 49, 0, whole, length=5 * BS))
    (a,) = anomalies_of(history, read(41, 49, 0, [val(1, 1, 0)], length=2 * BS))
    assert "short read" in a.what


def test_allowed_zero_rules() -> None:
    assert allowed("0", ["0"])
    assert allowed("0", [None, "1:1:0"])
    assert not allowed("0", [None])
    assert not allowed("1:1:0", ["1:2:0"])


def test_block_value_decodes_blocks() -> None:
    assert block_value(bytes(BS)) == "0"
    assert block_value(stamp_bytes(2, 7, 8192, BS)) == "2:7:8192"
    torn = stamp_bytes(2, 7, 8192, BS // 2) + stamp_bytes(1, 9, 8192 + BS // 2, BS // 2)
    assert block_value(torn) == "T1:9:8192|2:7:8192"
    assert block_value(b"\x01" * BS).startswith("?")
