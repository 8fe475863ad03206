"""Units of the replay hardening: key layout, field bounds, priority bounds, idempotent writes, generations,
token files, message clipping, bounded decoding, checkpoint housekeeping."""

from __future__ import annotations

import json
import os
import stat
import threading

import numpy as np
import pytest

from replay import checkpoint as ckpt
from replay.auth import ensure_token_file, generate_token, metadata, read_token_file, write_token_file
from replay.client import ReplayClient, global_keys, split_keys
from replay.codec import InsertRequestParts, InsertRequestView, decode_array
from replay.errors import Aborted, InvalidArgument
from replay.keys import key_generation, key_index, table_key
from replay.limits import MAX_ITEM_MASS, MIN_ITEM_MASS, clip, clip_detail
from replay.proto import replay_pb2
from replay.samplers import PrioritizedSampler, validate_priorities
from replay.schema import Bounds, Field, Schema
from replay.table import MAX_WRITERS, Table, TableConfig

SCHEMA = Schema((Field("x", "int64"), Field("action", "int64", bounds=Bounds.index(3)),
                 Field("reward", "float32", bounds=Bounds()), Field("discount", "float64", bounds=Bounds(0, 1))))


def _rows(n=2, first=0, **override):
    k = np.arange(first, first + n)
    cols = {"x": k.astype(np.int64), "action": (k % 3).astype(np.int64), "reward": np.zeros(n, np.float32),
            "discount": np.ones(n)}
    cols.update(override)
    return cols


def _table(**kw) -> Table:
    kw.setdefault("capacity", 16)
    return Table(TableConfig(name="t", schema=SCHEMA, **kw))


# ----------------------------------------------------------------------------------------------- keys
def test_key_layout_shard_generation_index():
    k = table_key(index=np.array([0, 5, (1 << 40) - 1], np.uint64), generation=3)
    assert k.tolist() == [3 << 40, (3 << 40) + 5, (4 << 40) - 1]
    assert key_generation(k).tolist() == [3, 3, 3] and key_index(k).tolist() == [0, 5, (1 << 40) - 1]
    assert table_key(index=1, generation=256 + 2) == (2 << 40) + 1          # generation mod 256
    g = global_keys(k, 7)
    shard, local = split_keys(g)
    assert shard.tolist() == [7, 7, 7] and local.tolist() == k.tolist()
    assert key_generation(local).tolist() == [3, 3, 3]


def test_table_keys_carry_the_generation_and_stale_updates_are_counted():
    t = _table(sampler="prioritized", priority_exponent=1.0)
    old = t.insert(_rows(2), priorities=np.array([1.0, 2.0]))
    assert old.tolist() == [0, 1]
    t.start_generation(1)
    new = t.insert(_rows(2, 2), priorities=np.array([4.0, 8.0]))
    assert new.tolist() == [(1 << 40) + 2, (1 << 40) + 3]
    r = t.update_priorities(np.concatenate([old, new, [np.uint64(1 << 50)]]), np.array([9.0, 9.0, 1.0, 1.0, 9.0]))
    assert (r.updated, r.stale_generation, r.unknown) == (2, 2, 1)
    assert t.info().priority_mass == 1.0 + 2.0 + 1.0 + 1.0
    assert (t.info().stale_generation_updates, t.info().unknown_key_updates) == (2, 1)
    assert set(key_generation(t.sample(8).keys).tolist()) == {1}
    with pytest.raises(ValueError, match="generation 0: expected an int >= the current 1"):
        t.start_generation(0)
    meta, arrays = t.state_dict()
    u = _table(sampler="prioritized", priority_exponent=1.0)
    u.load_state_dict(meta, arrays)
    assert u.generation == 1


# --------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize(("text", "bounds", "spec"), [
    ("finite", Bounds(), "finite"),
    ("any", Bounds(finite=False), "any"),
    ("0..1", Bounds(0, 1), "0..1"),
    ("-2.5..", Bounds(low=-2.5), "-2.5.."),
    ("..1e3", Bounds(high=1000.0), "..1000.0"),
    ("nonfinite:0..", Bounds(low=0, finite=False), "nonfinite:0.."),
])
def test_bounds_parse_and_spec(text, bounds, spec):
    assert Bounds.parse(text) == bounds and bounds.spec() == spec and Bounds.parse(spec) == bounds
    assert Bounds.from_json(json.loads(json.dumps(bounds.to_json()))) == bounds


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Bounds(2, 1), "low 2 > high 1"),
    (lambda: Bounds(low=float("nan")), "expected a finite number"),
    (lambda: Bounds(low=True), "expected a number or None"),
    (lambda: Bounds.index(0), r"Bounds.index\(0\): expected an int >= 1"),
    (lambda: Bounds.parse("0-1"), "expected 'finite', 'LOW..HIGH'"),
    (lambda: Bounds.parse("a..1"), "'a' is not a number"),
    (lambda: Field("a", "int64", bounds=Bounds(0, 1.5)), "bounds high 1.5 on a int64 field: expected an integer"),
    (lambda: Field("a", "bool", bounds=Bounds()), "bounds on a bool field"),
    (lambda: Schema.parse("a:int64::0..x"), r"schema field spec 'a:int64::0..x'"),
])
def test_bad_bounds_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_schema_spec_and_json_carry_bounds_and_old_json_still_loads():
    assert Schema.parse(SCHEMA.spec()) == SCHEMA
    assert SCHEMA.spec() == "x:int64,action:int64::0..2,reward:float32::finite,discount:float64::0..1"
    assert Schema.from_json(SCHEMA.to_json()) == SCHEMA
    assert SCHEMA.to_json()[0] == {"name": "x", "dtype": "int64", "shape": []}           # no "bounds" key
    assert Schema.from_json([{"name": "x", "dtype": "int64", "shape": []}]) == Schema.parse("x:int64")
    assert SCHEMA.layout()[1] == {"name": "action", "dtype": "int64", "shape": []}


@pytest.mark.parametrize(("override", "message"), [
    ({"action": np.array([0, 3])}, "field 'action' row 1 value 3: expected an integer in [0, 2]"),
    ({"action": np.array([-1, 0])}, "field 'action' row 0 value -1: expected an integer in [0, 2]"),
    ({"reward": np.array([0, np.inf], np.float32)}, "field 'reward' row 1 value inf: expected a finite number"),
    ({"discount": np.array([np.nan, 1.0])}, "field 'discount' row 0 value nan: expected a finite number in [0, 1]"),
    ({"discount": np.array([1.0, 1.0000001])},
     "field 'discount' row 1 value 1.0000001: expected a finite number in [0, 1]"),
])
def test_out_of_bounds_inserts_are_refused_and_store_nothing(override, message):
    t = _table()
    with pytest.raises(InvalidArgument) as err:
        t.insert(_rows(2, **override))
    assert str(err.value) == message
    info = t.info()
    assert (info.size, info.inserts, info.refused_inserts) == (0, 0, 1)
    assert t.insert(_rows(2)).tolist() == [0, 1]    # the boundaries themselves are accepted


def test_bounds_name_the_element_of_a_vector_field():
    schema = Schema((Field("v", "float32", (3,), bounds=Bounds(-1, 1)),))
    bad = np.zeros((2, 3), np.float32)
    bad[1, 2] = 2.0
    with pytest.raises(InvalidArgument, match=r"^field 'v' row 1 element 2 value 2.0: expected a finite number in "
                                              r"\[-1, 1\]$"):
        schema.validate_batch({"v": bad})
    assert Bounds(-1, 1).invalid_rows(bad).tolist() == [False, True]


def test_restore_compares_layout_not_bounds():
    loose = Table(TableConfig(name="t", schema=Schema.parse("x:int64,action:int64,reward:float32,discount:float64"),
                              capacity=16))
    loose.insert(_rows(3))
    t = _table()
    t.load_state_dict(*loose.state_dict())
    assert t.info().size == 3


# ---------------------------------------------------------------------------------------- priorities
def test_priority_mass_bound_depends_on_the_exponent():
    assert validate_priorities(np.array([1e100, 0.0]), n=2, exponent=1.0).tolist() == [1e100, 0.0]
    assert validate_priorities(np.array([1e166]), n=1, exponent=0.6).tolist() == [1e166]   # 1e99.6
    with pytest.raises(InvalidArgument, match=r"priority\[1\] = 1e\+308: priority \*\* priority_exponent = inf "
                                              r"exceeds 1e\+100 \(priority_exponent 1.5\)"):
        validate_priorities(np.array([1.0, 1e308]), n=2, exponent=1.5)
    with pytest.raises(InvalidArgument, match=r"priority\[0\] = 1e\+101"):
        validate_priorities(np.array([1e101]), n=1, exponent=1.0)


def test_two_huge_priorities_keep_the_mass_finite_and_tiny_ones_stay_sampleable():
    t = _table(sampler="prioritized", priority_exponent=1.0)
    t.insert(_rows(3), priorities=np.array([MAX_ITEM_MASS, MAX_ITEM_MASS, 1e-300]))
    mass = t.info().priority_mass
    assert mass == 2 * MAX_ITEM_MASS and np.isfinite(mass)
    s = PrioritizedSampler(capacity=4, priority_exponent=1.0)
    s.on_insert(first_key=0, n=2, priorities=np.array([1e-300, 0.0]))
    assert s.tree.leaves()[:2].tolist() == [MIN_ITEM_MASS, 0.0]
    # The smallest draw probability stays a positive normal float: importance weights stay finite.
    assert np.finfo(np.float64).tiny < MIN_ITEM_MASS / (2 * MAX_ITEM_MASS * 2**40)


# ----------------------------------------------------------------------------------- idempotent writes
def test_writes_are_stored_once_per_writer_and_sequence():
    t = _table()
    first = t.write(_rows(2), writer="a", sequence=1)
    assert (first.keys.tolist(), first.duplicate) == ([0, 1], False)
    again = t.write(_rows(2, 50), writer="a", sequence=1)
    assert (again.keys.tolist(), again.duplicate) == ([0, 1], True)
    assert t.write(_rows(1, 2), writer="b", sequence=1).keys.tolist() == [2]
    assert t.write(_rows(1, 3), writer="a", sequence=2).keys.tolist() == [3]
    older = t.write(_rows(1, 60), writer="a", sequence=1)
    assert (older.keys.tolist(), older.duplicate) == ([], True)
    info = t.info()
    assert (info.size, info.inserts, info.duplicate_inserts) == (4, 4, 2)
    # The writers' last sequences are checkpointed with the rows.
    u = _table()
    u.load_state_dict(*t.state_dict())
    assert u.write(_rows(1, 70), writer="a", sequence=2).duplicate
    assert not u.write(_rows(1, 4), writer="a", sequence=3).duplicate
    with pytest.raises(InvalidArgument, match="sequence 0: expected an int >= 1 with a writer id"):
        u.write(_rows(1), writer="a", sequence=0)


def test_a_second_insert_of_a_writer_waiting_in_the_limiter_is_aborted():
    t = _table(min_size_to_sample=1, samples_per_insert=1.0, error_buffer=1.0)
    t.write(_rows(2), writer="a", sequence=1)          # diff 2 = max_diff: the next insert waits
    done = threading.Event()
    threading.Thread(target=lambda: (t.write(_rows(1, 2), writer="a", sequence=2, timeout=30), done.set()),
                     daemon=True).start()
    for _ in range(3000):
        if t._cond._waiters:
            break
        threading.Event().wait(0.01)
    with pytest.raises(Aborted, match="an insert of writer 'a' is already waiting"):
        t.write(_rows(1, 2), writer="a", sequence=2, timeout=0)
    t.sample(1)
    assert done.wait(30)
    assert t.write(_rows(1, 2), writer="a", sequence=2).duplicate      # the retry after it: acknowledged
    assert t.info().inserts == 3


def test_the_writer_table_forgets_the_least_recently_used():
    t = _table(capacity=8)
    for w in range(MAX_WRITERS + 1):
        t.write(_rows(1), writer=f"w{w}", sequence=1)
    assert len(t._writers) == MAX_WRITERS and "w0" not in t._writers
    assert not t.write(_rows(1), writer="w0", sequence=1).duplicate    # forgotten: stored again ...
    assert "w1" not in t._writers                                       # ... and now w1 is the one forgotten
    assert t.write(_rows(1), writer="w2", sequence=1).duplicate


def test_the_client_numbers_writers_per_session():
    a, b = ReplayClient(["127.0.0.1:1"]), ReplayClient(["127.0.0.1:1"])
    wa, wb = a._writer("actor-0")[0], b._writer("actor-0")[0]
    assert wa != wb and wa.endswith(".0") and a._writer("actor-1")[0].endswith(".1")
    parts = InsertRequestParts(table="t", writer_key="actor-0", columns={"x": np.arange(2)}, writer_id=wa, sequence=7)
    view = InsertRequestView(parts.to_bytes(1.5))
    assert (view.writer_id, view.sequence, view.timeout_s) == (wa, 7, 1.5)
    parsed = replay_pb2.InsertRequest.FromString(parts.to_bytes(None))
    assert (parsed.writer_id, parsed.sequence) == (wa, 7)


# ---------------------------------------------------------------------------------------------- auth
def test_token_files_are_private_and_never_loosely_readable(tmp_path):
    path = tmp_path / "run" / "replay.token"
    token = ensure_token_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    assert ensure_token_file(path) == token and read_token_file(path) == token
    assert [p.name for p in path.parent.iterdir()] == ["replay.token"]      # no temporary left
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match=r"has mode 0644; others may read it. Expected 0600") as err:
        read_token_file(path)
    assert token not in str(err.value)
    write_token_file(path, "abc")
    assert read_token_file(path) == "abc" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="printable ASCII"):
        write_token_file(path, "a b")
    assert metadata("abc") == (("authorization", "Bearer abc"),) and metadata(None) is None
    assert generate_token() != generate_token()


def test_the_client_never_shows_its_token():
    token = generate_token()
    client = ReplayClient(["127.0.0.1:1"], token=token)
    assert token not in repr(client) and "authenticated=True" in repr(client)


# -------------------------------------------------------------------------------------------- limits
def test_clip_cuts_long_values_to_a_prefix():
    assert clip("abc") == "'abc'"
    assert clip("x" * 1000) == repr("x" * 48) + "... (1000 chars)"
    assert clip(b"\xff" * 100, 4) == repr(b"\xff" * 4) + "... (100 bytes)"
    assert len(clip_detail("y" * 5000)) <= 1024 and clip_detail("short") == "short"


@pytest.mark.parametrize(("dtype", "shape", "data", "message"), [
    ("float32" * 3, [1], b"\0" * 4, "dtype 'float32float32float32' is not a numeric"),
    ("longdouble", [1], b"\0" * 16, "is not a numeric numpy dtype name"),
    ("float32", [1] * 9, b"\0" * 4, "9 dimensions; expected at most 8"),
    ("float32", [2**41], b"", "has a dimension above"),
    ("uint8", [2**40, 2**40], b"\0", "do not match shape"),
])
def test_decoding_is_bounded(dtype, shape, data, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_array(replay_pb2.Array(data=data, dtype=dtype, shape=shape), name="a")


# -------------------------------------------------------------------------------------- housekeeping
def test_generations_and_stale_temporaries(tmp_path):
    assert ckpt.next_generation(tmp_path) == 0
    assert ckpt.next_generation(tmp_path) == 1
    assert ckpt.next_generation(tmp_path, at_least=7) == 7
    assert (tmp_path / "GENERATION").read_text() == "7\n"
    (tmp_path / "GENERATION").write_text("garbage")
    assert ckpt.next_generation(tmp_path, at_least=3) == 3
    (tmp_path / ".tmp-ckpt-1-ab").mkdir()
    (tmp_path / ".tmp-ckpt-LATEST-1-cd").write_text("x")
    (tmp_path / "keep-me").write_text("x")
    assert ckpt.remove_stale_temporaries(tmp_path) == [".tmp-ckpt-1-ab", ".tmp-ckpt-LATEST-1-cd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GENERATION", "keep-me"]


def test_the_checkpoint_writer_writes_npy_files_numpy_reads(tmp_path):
    big = np.arange(3 * (1 << 20), dtype=np.int64).reshape(-1, 3)       # 24 MiB: written in pieces
    with ckpt.CheckpointWriter(tmp_path) as writer:
        writer.add_array("t", "big", big)
        writer.add_array("t", "empty", np.zeros((0, 4), np.float32))
        writer.add_table("t", {"n": 1})
        path = writer.commit()
    meta, arrays = ckpt.read_checkpoint(path)["t"]
    assert meta == {"n": 1}
    np.testing.assert_array_equal(arrays["big"], big)
    assert arrays["empty"].shape == (0, 4) and arrays["empty"].dtype == np.float32
    with pytest.raises(RuntimeError), ckpt.CheckpointWriter(tmp_path) as writer:
        writer.add_array("t", "x", np.ones(3))
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-000001"]
