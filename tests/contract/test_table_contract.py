"""Contract suite: every registered storage x sampler combination behaves the same at the Table interface.

The combinations come from the registries (``replay.storage.STORAGES``, ``replay.samplers.SAMPLERS``), so
a newly registered class runs through the whole suite; it only needs a test schema and row generator in
``SCHEMAS``/``ROWS`` below (a storage without them fails :func:`test_every_storage_has_test_data`, and
every combination test with it fails with a KeyError rather than being skipped).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import threading

import numpy as np
import pytest

from replay.errors import Cancelled, FailedPrecondition, InvalidArgument
from replay.interfaces import Sampler, Storage
from replay.samplers import SAMPLERS, make_sampler
from replay.schema import Bounds, Schema
from replay.storage import STORAGES, make_storage
from replay.table import SampleResult, Table, TableConfig, TableInfo

COMBOS = [(st, sa) for st in STORAGES for sa in SAMPLERS]
CAP = 16
SCHEMAS = {
    "ring": Schema.parse("obs:float32:3,action:int64,reward:float32,done:bool"),
    "atari": Schema.parse("obs:uint8:2x4x8,action:int64,next_obs:uint8:2x4x8,reward:float32"),
}


def consumes(sampler: str) -> bool:
    """Whether sampled items leave the table (FIFO): several expectations below differ for such samplers."""
    return SAMPLERS[sampler].consumes


def _frame(ids):
    """4x8 uint8 frame whose bytes encode the frame id (so a wrong frame is always detected)."""
    ids = np.asarray(ids, dtype=np.int64)
    base = (ids[..., None] * 7 + np.arange(32)) % 251
    return base.astype(np.uint8).reshape(*ids.shape, 4, 8)


def _ring_rows(k: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "obs": np.stack([k, k + 0.5, -k], axis=1).astype(np.float32),
        "action": k.astype(np.int64),
        "reward": (k * 0.25).astype(np.float32),
        "done": k % 3 == 0,
    }


def _atari_rows(k: np.ndarray) -> dict[str, np.ndarray]:
    """One stream: consecutive stacks share frames, and next_obs frames are later obs frames."""
    return {
        "obs": _frame(np.stack([k, k + 1], axis=1)),
        "action": k.astype(np.int64),
        "next_obs": _frame(np.stack([k + 1, k + 2], axis=1)),
        "reward": (k * 0.25).astype(np.float32),
    }


ROWS = {"ring": _ring_rows, "atari": _atari_rows}


def rows(storage: str, start: int, n: int) -> dict[str, np.ndarray]:
    """Deterministic rows of ``SCHEMAS[storage]`` for keys start..start+n-1."""
    return ROWS[storage](np.arange(start, start + n))


def make(storage, sampler, **kw) -> Table:
    kw.setdefault("capacity", CAP)
    return Table(TableConfig(name="t", schema=SCHEMAS[storage], storage=storage, sampler=sampler, **kw))


def check_rows(storage: str, result: SampleResult) -> None:
    """Every sampled row equals what was inserted under its key."""
    keys = result.keys.astype(np.int64)
    expected = rows(storage, 0, int(keys.max()) + 1)
    for name, col in result.columns.items():
        np.testing.assert_array_equal(col, expected[name][keys], err_msg=name)


def snapshot(table: Table, *, without_config: bool = False):
    meta, arrays = table.state_dict()
    if without_config:  # e.g. a different seed: the restored RNG state, not the seed, must matter
        meta = {k: v for k, v in meta.items() if k != "config"}
    return json.dumps(meta, sort_keys=True), {k: v.copy() for k, v in arrays.items()}


def assert_same_state(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)


@pytest.fixture(params=COMBOS, ids=[f"{a}-{b}" for a, b in COMBOS])
def combo(request):
    return request.param


def test_every_storage_has_test_data():
    assert sorted(SCHEMAS) == sorted(STORAGES), "add a test schema to SCHEMAS for every registered storage"
    assert sorted(ROWS) == sorted(STORAGES), "add a row generator to ROWS for every registered storage"
    for storage in STORAGES:
        assert SCHEMAS[storage].validate_batch(rows(storage, 0, 3)) == 3


def _public_members(protocol: type) -> dict[str, object]:
    return {name: v for name, v in vars(protocol).items() if not name.startswith("_")}


def _parameters(fn) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def assert_satisfies(obj: object, protocol: type) -> None:
    """``obj`` has every member of ``protocol``, its methods take the same parameters, properties are
    properties, and the annotated attributes exist (``isinstance`` alone only checks presence)."""
    assert isinstance(obj, protocol), f"{type(obj).__name__} lacks members of {protocol.__name__}"
    cls = type(obj)
    for name, member in _public_members(protocol).items():
        if isinstance(member, property):
            assert isinstance(inspect.getattr_static(cls, name), property), f"{cls.__name__}.{name}"
            assert isinstance(getattr(obj, name), int), f"{cls.__name__}.{name} = {getattr(obj, name)!r}"
        elif inspect.isfunction(member):
            assert _parameters(getattr(cls, name)) == _parameters(member), f"{cls.__name__}.{name}"
    for name in protocol.__annotations__:
        assert hasattr(obj, name), f"{cls.__name__} has no attribute {name!r}"


@pytest.mark.parametrize("kind", list(STORAGES))
def test_registered_storage_satisfies_protocol(kind):
    storage = make_storage(kind, schema=SCHEMAS[kind], capacity=CAP)
    assert type(storage) is STORAGES[kind] and storage.kind == kind
    assert_satisfies(storage, Storage)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_registered_sampler_satisfies_protocol(name):
    sampler = make_sampler(name, capacity=CAP, priority_exponent=0.6)
    assert type(sampler) is SAMPLERS[name] and sampler.name == name
    assert isinstance(sampler.consumes, bool)
    assert_satisfies(sampler, Sampler)


def test_protocol_check_catches_a_wrong_signature():
    class RenamedKeyword(SAMPLERS["uniform"]):
        def on_remove(self, *, first: int, end: int) -> None:  # the table calls first_key=, end_key=
            """Wrong keywords."""

    with pytest.raises(AssertionError, match="RenamedKeyword.on_remove"):
        assert_satisfies(RenamedKeyword(capacity=CAP), Sampler)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"storage 'disk': expected one of \['ring', 'atari'\]"):
        make_storage("disk", schema=SCHEMAS["ring"], capacity=CAP)
    with pytest.raises(ValueError, match=r"sampler 'lifo': expected one of \['uniform', 'prioritized', 'fifo'\]"):
        make_sampler("lifo", capacity=CAP, priority_exponent=0.6)


def test_insert_sample_shapes_dtypes_values(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    keys = t.insert(rows(storage, 0, 10))
    assert keys.dtype == np.uint64 and keys.tolist() == list(range(10))
    r = t.sample(6)
    assert isinstance(r, SampleResult)
    assert r.keys.dtype == np.uint64 and r.keys.shape == (6,)
    assert r.probabilities.dtype == np.float64 and r.probabilities.shape == (6,)
    # fifo hands out the queue head for sure; uniform and prioritized (10 equal default priorities): 1/10
    np.testing.assert_allclose(r.probabilities, np.full(6, 1.0 if sampler == "fifo" else 0.1), rtol=1e-12)
    assert r.table_size == 10
    for f in SCHEMAS[storage].fields:
        col = r.columns[f.name]
        assert col.dtype == f.np_dtype and col.shape == (6, *f.shape) and col.flags.c_contiguous
    assert list(r.columns) == list(SCHEMAS[storage].names)
    check_rows(storage, r)
    assert set(r.keys.tolist()) <= set(range(10))
    if sampler == "fifo":
        assert r.keys.tolist() == [0, 1, 2, 3, 4, 5]
    if sampler == "prioritized":
        assert r.priority_mass == pytest.approx(10.0)  # new items get max priority 1 -> 1**alpha
    else:
        assert r.priority_mass == 10.0


def test_keys_monotonic_and_wraparound(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    seen = []
    for start in range(0, 5 * CAP, 5):
        if consumes(sampler) and t.info().size + 5 > CAP:
            check_rows(storage, t.sample(5))
        seen.extend(t.insert(rows(storage, start, 5)).tolist())
    assert seen == list(range(5 * CAP))
    info = t.info()
    assert info.inserts == 5 * CAP
    if not consumes(sampler):
        assert info.size == CAP and info.extra["oldest_key"] == 4 * CAP
        r = t.sample(CAP)
        assert set(r.keys.tolist()) <= set(range(4 * CAP, 5 * CAP))
    else:
        r = t.sample(info.size)
        assert r.keys.tolist() == list(range(5 * CAP - info.size, 5 * CAP))
    check_rows(storage, r)


BAD_INSERTS = {
    "missing field": lambda s, c: c.pop("action"),
    "extra field": lambda s, c: c.update(bogus=np.zeros(4)),
    "wrong dtype": lambda s, c: c.update(action=c["action"].astype(np.int32)),
    "wrong shape": lambda s, c: c.update(obs=c["obs"][:, :1]),
    "row mismatch": lambda s, c: c.update(reward=c["reward"][:3]),
    "empty": lambda s, c: [c.update({k: v[:0]}) for k, v in list(c.items())],
}


@pytest.mark.parametrize("bad", list(BAD_INSERTS) + ["nan priority", "negative priority", "too many rows"])
def test_refused_inserts_are_all_or_nothing(combo, bad):
    storage, sampler = combo
    t = make(storage, sampler)
    t.insert(rows(storage, 0, 6))
    before = snapshot(t)
    priorities = None
    if bad in BAD_INSERTS:
        cols = rows(storage, 6, 4)
        BAD_INSERTS[bad](storage, cols)
    elif bad == "too many rows":
        cols = rows(storage, 6, CAP + 1)
    else:
        cols = rows(storage, 6, 4)
        priorities = np.array([1.0, 2.0, np.nan if bad == "nan priority" else -1.0, 1.0])
    with pytest.raises(InvalidArgument) as err:
        t.insert(cols, priorities=priorities)
    assert err.value.code == "INVALID_ARGUMENT" and str(err.value)
    assert_same_state(before, snapshot(t))
    assert t.insert(rows(storage, 6, 2)).tolist() == [6, 7]  # the key sequence is unaffected


def test_state_round_trip_samples_identically(combo):
    storage, sampler = combo
    t = make(storage, sampler, seed=5, priority_exponent=0.7)
    t.insert(rows(storage, 0, 12), priorities=np.linspace(0.5, 3.0, 12))
    t.sample(6)  # FIFO: consumes 6, leaving room for the next 8
    t.insert(rows(storage, 12, 8), timeout=10)  # wraps; max priority 3 for the new ones
    t.update_priorities(np.arange(8, 14, dtype=np.uint64), np.arange(1.0, 7.0))
    meta, arrays = t.state_dict()
    meta = json.loads(json.dumps(meta))  # must survive a JSON round trip
    u = make(storage, sampler, seed=999, priority_exponent=0.7)
    u.insert(rows(storage, 0, 3))  # state is replaced, not merged
    u.load_state_dict(meta, {k: v.copy() for k, v in arrays.items()})
    assert_same_state(snapshot(t, without_config=True), snapshot(u, without_config=True))
    ti, ui = t.info(), u.info()
    assert (ti.size, ti.inserts, ti.samples, ti.priority_mass, ti.nbytes) == (
        ui.size,
        ui.inserts,
        ui.samples,
        ui.priority_mass,
        ui.nbytes,
    )
    for step in range(4):
        a, b = t.sample(3), u.sample(3)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        for name in a.columns:
            np.testing.assert_array_equal(a.columns[name], b.columns[name])
        # Inserts after the restore continue identically too (Atari: the dedup map was rebuilt).
        assert (t.insert(rows(storage, 20 + step, 1)) == u.insert(rows(storage, 20 + step, 1))).all()
    assert_same_state(snapshot(t, without_config=True), snapshot(u, without_config=True))


def _accepts(storage: str, schema: Schema) -> bool:
    try:
        TableConfig(name="t", schema=schema, storage=storage, capacity=CAP).validate()
    except ValueError:
        return False
    return True


def other_storage_sharing_a_schema(storage: str) -> tuple[str, str]:
    """(another registered storage, the storage whose test schema both accept)."""
    for schema_of, schema in SCHEMAS.items():
        for other in STORAGES:
            if other != storage and _accepts(storage, schema) and _accepts(other, schema):
                return other, schema_of
    pytest.fail(f"no other registered storage shares a test schema with {storage!r}")


@pytest.mark.parametrize("what", ["schema", "storage", "sampler", "capacity"])
def test_load_refuses_different_table(combo, what):
    storage, sampler = combo
    if what == "storage":  # same schema, different storage
        other_storage, schema_of = other_storage_sharing_a_schema(storage)
        t = Table(TableConfig(name="t", schema=SCHEMAS[schema_of], storage=storage, sampler=sampler, capacity=CAP))
        t.insert(rows(schema_of, 0, 4))
    else:
        t = make(storage, sampler)
        t.insert(rows(storage, 0, 4))
    meta, arrays = t.state_dict()
    if what == "schema":
        other = Table(
            TableConfig(
                name="t",
                schema=Schema.parse(SCHEMAS[storage].spec() + ",extra:int8"),
                storage=storage,
                sampler=sampler,
                capacity=CAP,
            )
        )
    elif what == "storage":
        other = Table(
            TableConfig(name="t", schema=SCHEMAS[schema_of], storage=other_storage, sampler=sampler, capacity=CAP)
        )
    elif what == "sampler":
        other = make(storage, next(s for s in SAMPLERS if s != sampler))
    else:
        other = make(storage, sampler, capacity=CAP * 2)
    before = snapshot(other)
    with pytest.raises(FailedPrecondition, match=f"saved state has {what}=.* but this table has {what}="):
        other.load_state_dict(meta, arrays)
    assert_same_state(before, snapshot(other))


def test_load_refuses_corrupt_arrays(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    t.insert(rows(storage, 0, 4))
    meta, arrays = t.state_dict()
    name = "storage/field/action"
    arrays[name] = arrays[name][:3]
    u = make(storage, sampler)
    u.insert(rows(storage, 0, 2))
    before = snapshot(u)
    with pytest.raises(FailedPrecondition, match=r"array 'field/action' has shape \(3,\)"):
        u.load_state_dict(meta, arrays)
    assert_same_state(before, snapshot(u))
    check_rows(storage, u.sample(2))  # still a working table


@pytest.mark.parametrize(
    "batch, exc, msg",
    [
        (0, InvalidArgument, "batch_size 0"),
        (-2, InvalidArgument, "batch_size -2"),
        (CAP + 1, InvalidArgument, f"batch_size {CAP + 1} exceeds table 't' capacity {CAP}"),
        ("4", InvalidArgument, "batch_size '4'"),
        (True, InvalidArgument, "batch_size True"),
    ],
)
def test_bad_sample_arguments(combo, batch, exc, msg):
    storage, sampler = combo
    t = make(storage, sampler)
    t.insert(rows(storage, 0, 4))
    with pytest.raises(exc, match=msg):
        t.sample(batch)
    with pytest.raises(InvalidArgument, match="timeout -1"):
        t.sample(1, timeout=-1)
    assert t.info().samples == 0


def test_update_priorities_contract(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    t.insert(rows(storage, 0, CAP))
    t.sample(4) if consumes(sampler) else t.insert(rows(storage, CAP, 4))
    # Keys 0..3 are gone (overwritten or consumed); 4..7 present; 1000 never existed.
    result = t.update_priorities(np.array([0, 3, 4, 7, 1000], np.uint64), np.array([1.0, 1, 2, 2, 1]))
    assert (result.updated, result.stale_generation, result.unknown) == (2, 0, 3)
    with pytest.raises(InvalidArgument, match=r"priority\[1\] = nan"):
        t.update_priorities(np.array([4, 5], np.uint64), np.array([1.0, np.nan]))
    with pytest.raises(InvalidArgument, match=r"shape \(1,\); expected \(2,\)"):
        t.update_priorities(np.array([4, 5], np.uint64), np.array([1.0]))
    with pytest.raises(InvalidArgument, match="dtype float64; expected a 1-D uint64"):
        t.update_priorities(np.array([4.0, 5.0]), np.array([1.0, 1.0]))
    assert t.update_priorities(np.array([], np.uint64), np.array([])).updated == 0


def test_info_and_close(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    t.insert(rows(storage, 0, 5))
    t.sample(3)
    i = t.info()
    assert isinstance(i, TableInfo)
    assert (i.name, i.capacity, i.inserts, i.samples, i.storage, i.sampler) == ("t", CAP, 5, 3, storage, sampler)
    assert i.size == (2 if consumes(sampler) else 5)
    assert i.nbytes >= CAP * (SCHEMAS["ring"].row_nbytes() if storage == "ring" else 8)
    assert i.insert_blocked_s == 0.0 and i.sample_blocked_s == 0.0


def test_close_wakes_a_blocked_caller(combo):
    # Every combination really blocks: the table holds fewer items than min_size_to_sample.
    storage, sampler = combo
    t = make(storage, sampler, min_size_to_sample=CAP)
    t.insert(rows(storage, 0, 5))
    errors = []

    def blocked():
        try:
            t.sample(2, timeout=60)
        except Cancelled as err:
            errors.append(err.code)

    th = threading.Thread(target=blocked)
    th.start()
    for _ in range(3000):                    # until the sampler waits on the table's condition
        if t._cond._waiters:
            break
        threading.Event().wait(0.01)
    assert len(t._cond._waiters) == 1 and th.is_alive() and errors == []
    t.close()
    th.join(30)
    assert errors == ["CANCELLED"] and not th.is_alive()
    assert t.info().samples == 0 and t.info().sample_blocked_s > 0.0
    with pytest.raises(Cancelled):
        t.sample(1)
    with pytest.raises(Cancelled):
        t.insert(rows(storage, 5, 1))


def test_a_quiet_snapshot_is_the_state_dict(combo):
    storage, sampler = combo
    t = make(storage, sampler, seed=3)
    t.insert(rows(storage, 0, 10), priorities=np.linspace(1.0, 2.0, 10))
    snap = t.snapshot()
    meta, arrays = snap.finish()
    assert snap.dropped == 0
    combined = {**arrays, **{k: v.copy() for k, v in snap.live.items()}}
    assert not set(arrays) & set(snap.live)
    assert_same_state(snapshot(t), (json.dumps(meta, sort_keys=True), combined))


def test_a_snapshot_drops_exactly_the_items_overwritten_while_it_was_written(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    t.insert(rows(storage, 0, CAP), priorities=np.arange(1.0, CAP + 1.0))
    snap = t.snapshot()
    if consumes(sampler):
        t.sample(5)                       # FIFO never overwrites unread items: consume some first
    t.insert(rows(storage, CAP, 5), priorities=np.full(5, 100.0))   # overwrites the slots of keys 0..4
    meta, arrays = snap.finish()
    assert (snap.dropped, meta["oldest_key"], meta["next_key"]) == (5, 5, CAP)
    restored = make(storage, sampler)
    restored.load_state_dict(meta, {**arrays, **{k: v.copy() for k, v in snap.live.items()}})
    info = restored.info()
    assert info.size == CAP - 5
    if sampler == "prioritized":
        assert info.priority_mass == pytest.approx(sum(float(p) ** 0.6 for p in range(6, CAP + 1)))
    r = restored.sample(CAP - 5)
    check_rows(storage, r)                # every row is what was inserted under its key, none of the overwrite
    assert int(r.keys.min()) >= 5


def test_compact_keeps_the_other_rows_in_order(combo):
    storage, sampler = combo
    cols = rows(storage, 0, 12)
    cols["action"][[2, 3, 7]] = 99        # the rows a restore must drop
    loose = make(storage, sampler)
    loose.insert(cols, priorities=np.arange(1.0, 13.0))
    bounded_schema = Schema(tuple(
        dataclasses.replace(f, bounds=Bounds(low=0, high=50)) if f.name == "action" else f
        for f in SCHEMAS[storage].fields))
    t = Table(TableConfig(name="t", schema=bounded_schema, storage=storage, sampler=sampler, capacity=CAP))
    t.load_state_dict(*loose.state_dict())
    dropped, first = t.drop_invalid_rows()
    assert dropped == 3 and first == "index 2: field 'action' row 0 value 99: expected an integer in [0, 50]"
    kept = [k for k in range(12) if k not in (2, 3, 7)]
    info = t.info()
    assert (info.size, info.extra["oldest_key"], info.extra["next_key"], info.dropped_invalid_rows) == (9, 3, 12, 3)
    r = t.sample(9)
    assert set(r.keys.tolist()) <= set(range(3, 12))
    if consumes(sampler):
        assert r.keys.tolist() == list(range(3, 12))
    source = np.array(kept)[r.keys.astype(np.int64) - 3]      # new key 3 + i holds the i-th kept row
    for name, col in r.columns.items():
        np.testing.assert_array_equal(col, cols[name][source], err_msg=name)
    if sampler == "prioritized":
        assert info.priority_mass == pytest.approx(sum((k + 1.0) ** 0.6 for k in kept))
    assert t.drop_invalid_rows() == (0, "")
    assert t.insert(rows(storage, 12, 1)).tolist() == [12]   # the index sequence goes on


def test_clear_removes_every_item_and_restarts_the_limiter(combo):
    """A scenario's replay flush: nothing of before is sampled again, and sampling waits for a refill."""
    from replay.errors import DeadlineExceeded

    storage, sampler = combo
    spi = 1.0 if consumes(sampler) else 2.0
    t = make(storage, sampler, min_size_to_sample=4, samples_per_insert=spi, error_buffer=8.0)
    t.insert(rows(storage, 0, 10), timeout=10)
    t.sample(4, timeout=10)
    size = t.info().size
    assert t.clear() == size > 0
    assert t.info().size == 0
    with pytest.raises(DeadlineExceeded):
        t.sample(1, timeout=0)  # empty: below min_size_to_sample again
    # Keys of the removed items are unknown to priority updates (never another item's).
    assert t.update_priorities(np.arange(0, 10, dtype=np.uint64), np.ones(10)).unknown == 10
    # The refill is free (as at the start of a run) and then the band is centred: inserts may run
    # error_buffer / spi rows ahead, no more, and the sampler gets no burst of extra samples.
    t.insert(rows(storage, 10, 4), timeout=10)
    diff = t._limiter.diff  # noqa: SLF001 - the invariant under test
    assert diff == pytest.approx(t._limiter.min_diff + t.config.error_buffer)
    result = t.sample(2, timeout=10)
    assert (result.keys.astype(np.int64) >= 10).all()
    check_rows(storage, result)
    # The cleared state survives a checkpoint round trip.
    meta, arrays = t.state_dict()
    u = make(storage, sampler, min_size_to_sample=4, samples_per_insert=spi, error_buffer=8.0)
    u.load_state_dict(json.loads(json.dumps(meta)), {k: v.copy() for k, v in arrays.items()})
    assert (u.info().size, u.info().inserts) == (t.info().size, t.info().inserts)
    assert u._limiter.diff == pytest.approx(t._limiter.diff)  # noqa: SLF001


def test_clear_of_an_empty_table_is_a_no_op_on_items(combo):
    storage, sampler = combo
    t = make(storage, sampler)
    assert t.clear() == 0
    t.insert(rows(storage, 0, 3))
    assert t.info().size == 3
