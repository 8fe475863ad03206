"""TableConfig parsing/validation/serialisation and Table details not covered by the contract suite."""

from __future__ import annotations

import numpy as np
import pytest

from replay.errors import FailedPrecondition, InvalidArgument
from replay.schema import Schema
from replay.table import Table, TableConfig

SPEC = (
    "name=replay,capacity=100000,sampler=prioritized,storage=ring,min_size=100,spi=8,"
    "schema=obs:float32:4;action:int64;reward:float32"
)


def test_parse_full_spec():
    c = TableConfig.parse(SPEC)
    assert c == TableConfig(
        name="replay",
        schema=Schema.parse("obs:float32:4,action:int64,reward:float32"),
        capacity=100000,
        storage="ring",
        sampler="prioritized",
        min_size_to_sample=100,
        samples_per_insert=8.0,
    )
    assert TableConfig.from_json(c.to_json()) == c
    # Long names, spi=none, and schema fields separated by ',' when schema= comes last.
    c2 = TableConfig.parse(
        "name=q,capacity=10,samples_per_insert=none,priority_exponent=0.5,error_buffer=3,seed=4,schema=x:int64,y:uint8:2"
    )
    assert (c2.samples_per_insert, c2.priority_exponent, c2.error_buffer, c2.seed) == (None, 0.5, 3.0, 4)
    assert c2.schema.spec() == "x:int64,y:uint8:2"


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("capacity=10,schema=x:int64", "missing name="),
        ("name=a,capacity=10,schema=x:int64,colour=red", "table spec key 'colour'"),
        ("name=a,capacity=ten,schema=x:int64", "invalid literal for int"),
        ("name=a,capacity=0,schema=x:int64", "capacity 0; expected an int >= 1"),
        ("name=a,capacity=10,sampler=lifo,schema=x:int64", "sampler 'lifo'"),
        ("name=a,capacity=10,storage=disk,schema=x:int64", "storage 'disk'"),
        ("name=a,capacity=10,min_size=11,schema=x:int64", "min_size_to_sample 11 > capacity 10"),
        ("name=a,capacity=10,spi=4,error_buffer=2,schema=x:int64", "error_buffer 2.0 is smaller than"),
        ("name=a,capacity=10,alpha=-1,schema=x:int64", "priority_exponent -1.0"),
        ("name=a b,capacity=10,schema=x:int64", "table name 'a b'"),
        ("name=a,name=b,capacity=10,schema=x:int64", "'name' given twice"),
        ("name=a,capacity=10,storage=atari,schema=x:int64", "has no field 'obs'"),
        ("name=a,capacity=10,sampler=fifo,spi=2,error_buffer=4,schema=x:int64", "with sampler 'fifo' would deadlock"),
    ],
)
def test_parse_refuses(spec, msg):
    with pytest.raises(ValueError, match=msg):
        TableConfig.parse(spec)


def test_from_json_refuses_unknown_and_missing():
    d = TableConfig.parse(SPEC).to_json()
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        TableConfig.from_json({**d, "bogus": 1})
    d.pop("capacity")
    with pytest.raises(ValueError, match="missing 'capacity'"):
        TableConfig.from_json(d)


def test_nbytes_exact():
    schema = Schema.parse("obs:float32:4,action:int64")  # 24 bytes per row
    assert Table(TableConfig(name="a", schema=schema, capacity=100)).info().nbytes == 2400
    # prioritized adds the sum tree: 2 * 128 leaves * 8 bytes
    assert Table(TableConfig(name="a", schema=schema, capacity=100, sampler="prioritized")).info().nbytes == 4448
    atari = Schema.parse("obs:uint8:4x2x3,action:int64,next_obs:uint8:4x2x3")
    t = Table(TableConfig(name="a", schema=atari, capacity=1000, storage="atari"))
    st = t._storage
    assert (st.dedup_window, st.frame_capacity) == (512, 1512)
    # frames 6 B + hash 8 + max key 8 per pool frame; 8 int32 indices + 8 B action per transition
    assert t.info().nbytes == 1512 * (6 + 8 + 8) + 1000 * (32 + 8)


def test_insert_accepts_non_contiguous_and_copies():
    schema = Schema.parse("obs:float32:2")
    t = Table(TableConfig(name="a", schema=schema, capacity=8))
    src = np.arange(16, dtype=np.float32).reshape(4, 4)[:, ::2]  # non-contiguous view
    t.insert({"obs": src})
    src[:] = -1  # the table holds its own copy
    r = t.sample(8)
    np.testing.assert_array_equal(r.columns["obs"], np.array([[0, 2], [4, 6], [8, 10], [12, 14]])[r.keys])


def test_load_refuses_garbage_metadata():
    t = Table(TableConfig(name="a", schema=Schema.parse("x:int64"), capacity=4))
    with pytest.raises(FailedPrecondition, match="no 'config'"):
        t.load_state_dict({}, {})
    meta, arrays = t.state_dict()
    with pytest.raises(FailedPrecondition, match="version 7"):
        t.load_state_dict({**meta, "version": 7}, arrays)
    with pytest.raises(FailedPrecondition, match="saved keys oldest=3, next=1"):
        t.load_state_dict({**meta, "oldest_key": 3, "next_key": 1}, arrays)


def test_priorities_ignored_but_validated_for_uniform():
    t = Table(TableConfig(name="a", schema=Schema.parse("x:int64"), capacity=4))
    t.insert({"x": np.arange(2)}, priorities=np.array([1.0, 2.0]))
    with pytest.raises(InvalidArgument, match=r"priority\[0\] = -1.0"):
        t.insert({"x": np.arange(2)}, priorities=np.array([-1.0, 2.0]))
    assert t.info().size == 2


def _stamp_frames(ids: np.ndarray) -> np.ndarray:
    """4x8 uint8 frames whose first 8 bytes are the id (distinct ids -> distinct frames)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((*ids.shape, 32), np.uint8)
    out[..., :8] = ids[..., None].astype("<u8").view(np.uint8).reshape(*ids.shape, 8)
    out[..., 8:] = (ids[..., None] % 200).astype(np.uint8)
    return out.reshape(*ids.shape, 4, 8)


@pytest.mark.parametrize("storage", ["ring", "atari"])
def test_concurrent_writers_and_samplers_stay_consistent(storage):
    import threading

    if storage == "ring":
        schema = Schema.parse("wid:int64,seq:int64,obs:float32:2")
    else:
        schema = Schema.parse("wid:int64,seq:int64,obs:uint8:2x4x8,next_obs:uint8:2x4x8")
    t = Table(TableConfig(name="c", schema=schema, capacity=64, storage=storage, sampler="prioritized"))
    owner: dict[int, tuple[int, int]] = {}
    samples = []
    errors = []

    def rows(wid, seq):
        g = (wid * 1000 + seq) * 10 + np.arange(3)
        cols = {"wid": np.full(3, wid, np.int64), "seq": np.full(3, seq, np.int64)}
        if storage == "ring":
            cols["obs"] = np.stack([g, g + 0.5], axis=1).astype(np.float32)
        else:
            cols["obs"] = _stamp_frames(np.stack([g, g + 1], axis=1))
            cols["next_obs"] = _stamp_frames(np.stack([g + 1, g + 2], axis=1))
        return cols

    def writer(wid):
        try:
            for seq in range(40):
                keys = t.insert(rows(wid, seq), timeout=30)
                for j, k in enumerate(keys.tolist()):
                    owner[k] = (wid, seq * 10 + j)
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    def sampler():
        try:
            for _ in range(40):
                r = t.sample(8, timeout=30)
                samples.append(r)
                t.update_priorities(r.keys, np.full(8, 2.0))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=sampler) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == [] and not any(th.is_alive() for th in threads)
    assert sorted(owner) == list(range(480))
    info = t.info()
    assert (info.inserts, info.samples, info.size) == (480, 640, 64)
    for r in samples:
        for row, key in enumerate(r.keys.tolist()):
            wid, code = owner[key]
            g = (wid * 1000 + code // 10) * 10 + code % 10
            assert (r.columns["wid"][row], r.columns["seq"][row]) == (wid, code // 10)
            if storage == "ring":
                np.testing.assert_array_equal(r.columns["obs"][row], [g, g + 0.5])
            else:
                np.testing.assert_array_equal(r.columns["obs"][row], _stamp_frames(np.array([g, g + 1])))
                np.testing.assert_array_equal(r.columns["next_obs"][row], _stamp_frames(np.array([g + 1, g + 2])))


def test_writer_totals_are_counted_checkpointed_and_unknown_in_old_checkpoints():
    config = TableConfig(name="t", schema=Schema.parse("x:int64"), capacity=8)
    table = Table(config)
    rows = {"x": np.arange(3, dtype=np.int64)}
    assert table.write(rows, writer="w", sequence=1).writer_rows == 3
    assert table.write(rows, writer="w", sequence=2).writer_rows == 6
    again = table.write(rows, writer="w", sequence=2)
    assert again.duplicate and again.writer_rows == 6          # a repeat adds nothing
    assert table.write(rows).writer_rows == -1                 # no writer: nothing to count
    assert table.write(rows, writer="w", sequence=3).writer_rows == 9   # evictions do not change the total
    meta, arrays = table.state_dict()
    restored = Table(config)
    restored.load_state_dict(meta, arrays)
    assert restored.write(rows, writer="w", sequence=4).writer_rows == 12
    meta["writers"] = [entry[:5] for entry in meta["writers"]]   # a checkpoint from before the totals
    old = Table(config)
    old.load_state_dict(meta, arrays)
    assert old.write(rows, writer="w", sequence=4).writer_rows == -1
