"""Shared frames (``replay.frames``): a stacked column sent as its distinct frames plus indices.

The client-side split must be exact, a table must store exactly what a dense insert of the same rows
stores, the wire form must round-trip and agree with the generated protobuf classes, and every
malformed form (indices outside the frames, wrong dtypes and shapes, frames without columns) must be
refused by name, storing nothing.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import replay.frames
from replay.codec import InsertRequestParts, InsertRequestView, decode_array, payload_nbytes
from replay.errors import InvalidArgument
from replay.frames import SharedFrames, share_frames
from replay.proto import replay_pb2
from replay.schema import Schema
from replay.storage import AtariStorage
from replay.table import Table, TableConfig
from tests.unit.replay.test_replay_atari_storage import (
    _columns,
    _schema,
    interleave,
    make_frames,
    stream_transitions,
)


def test_docstring_example():
    assert doctest.testmod(replay.frames).failed == 0


def _streams(pad="repeat", seed=0):
    rng = np.random.default_rng(seed)
    streams, next_id = [], 0
    for _ in range(4):
        o, x, next_id = stream_transitions(next_id, ep_lens=rng.integers(1, 12, size=6).tolist(), n=3, pad=pad)
        streams.append((o, x))
    return interleave(streams, rng, max_batch=24)


@pytest.mark.parametrize("pad", ["repeat", "zero"])
def test_share_frames_is_exact_and_keeps_each_frame_once(pad):
    for obs_ids, nxt_ids in _streams(pad):
        columns = _columns(obs_ids, nxt_ids, 0)
        shared = share_frames(columns, names=("obs", "next_obs"))
        assert shared["obs"].frames is shared["next_obs"].frames
        assert shared["action"] is columns["action"]
        np.testing.assert_array_equal(shared["obs"].materialize(), columns["obs"])
        np.testing.assert_array_equal(shared["next_obs"].materialize(), columns["next_obs"])
        distinct = np.unique(np.concatenate([obs_ids.ravel(), nxt_ids.ravel()])).size
        assert shared["obs"].frames.shape[0] == distinct
        assert shared["obs"].index.dtype == np.int32 and shared["obs"].shape == columns["obs"].shape


def test_share_frames_bad_input_names_the_column():
    cols = _columns(np.zeros((2, 4), int), np.ones((2, 4), int), 0)
    with pytest.raises(ValueError, match="no column 'next_state'"):
        share_frames(cols, names=("obs", "next_state"))
    with pytest.raises(ValueError, match="column 'reward' has shape \\(2,\\)"):
        share_frames(cols, names=("obs", "reward"))
    with pytest.raises(ValueError, match="column 'next_obs' is uint8 \\(2, 4, 3, 8\\)"):
        share_frames({**cols, "next_obs": cols["next_obs"][:, :, :3]}, names=("obs", "next_obs"))


@pytest.mark.parametrize("pad", ["repeat", "zero"])
def test_atari_storage_stores_shared_frames_exactly_as_dense(pad):
    dense = AtariStorage(schema=_schema(), capacity=40)
    shared = AtariStorage(schema=_schema(), capacity=40)
    key = 0
    for obs_ids, nxt_ids in _streams(pad, seed=1):
        cols = _columns(obs_ids, nxt_ids, key)
        evicted_dense = dense.commit(dense.prepare(cols, n=len(obs_ids)), first_key=key)
        evicted_shared = shared.commit(shared.prepare(share_frames(cols, names=("obs", "next_obs")),
                                                      n=len(obs_ids)), first_key=key)
        assert evicted_dense == evicted_shared
        key += len(obs_ids)
    assert dense.frames_written == shared.frames_written
    np.testing.assert_array_equal(dense.pool, shared.pool)
    np.testing.assert_array_equal(dense.index, shared.index)
    live = np.arange(key - 40, key, dtype=np.uint64)
    for name in ("obs", "next_obs", "action"):
        np.testing.assert_array_equal(dense.gather(live)[name], shared.gather(live)[name])


def test_separate_frame_arrays_per_column_also_work():
    obs_ids, nxt_ids = _streams()[0]
    cols = _columns(obs_ids, nxt_ids, 0)
    a, b = share_frames(cols, names=("obs",))["obs"], share_frames(cols, names=("next_obs",))["next_obs"]
    st = AtariStorage(schema=_schema(), capacity=64)
    st.commit(st.prepare({**cols, "obs": a, "next_obs": b}, n=len(obs_ids)), first_key=0)
    got = st.gather(np.arange(len(obs_ids), dtype=np.uint64))
    np.testing.assert_array_equal(got["obs"], cols["obs"])
    np.testing.assert_array_equal(got["next_obs"], cols["next_obs"])
    distinct = np.unique(np.concatenate([obs_ids.ravel(), nxt_ids.ravel()])).size
    assert st.frames_written == distinct      # frames in both arrays are still stored once


def test_unreferenced_frames_are_not_stored():
    cols = _columns(np.array([[0, 1, 2, 3]]), np.array([[1, 2, 3, 4]]), 0)
    shared = share_frames(cols, names=("obs", "next_obs"))
    extra = np.concatenate([shared["obs"].frames, make_frames(np.array([50, 51]))])
    padded = {**cols, "obs": SharedFrames(extra, shared["obs"].index),
              "next_obs": SharedFrames(extra, shared["next_obs"].index)}
    st = AtariStorage(schema=_schema(), capacity=8)
    st.commit(st.prepare(padded, n=1), first_key=0)
    assert st.frames_written == 5


def test_a_ring_table_materializes_shared_frames():
    schema = Schema.parse("obs:uint8:4x6x8,action:int64,reward:float32,next_obs:uint8:4x6x8")
    table = Table(TableConfig(name="r", schema=schema, capacity=64))
    obs_ids, nxt_ids = _streams()[0]
    cols = _columns(obs_ids, nxt_ids, 0)
    table.insert(share_frames(cols, names=("obs", "next_obs")))
    got = table.sample(len(obs_ids) * 3, timeout=0)
    rows = got.columns["action"]
    np.testing.assert_array_equal(got.columns["obs"], cols["obs"][rows])
    np.testing.assert_array_equal(got.columns["next_obs"], cols["next_obs"][rows])


def _shared_batch():
    cols = _columns(np.array([[0, 1, 2, 3], [1, 2, 3, 4]]), np.array([[3, 4, 5, 6], [4, 5, 6, 7]]), 0)
    return cols, share_frames(cols, names=("obs", "next_obs"))


@pytest.mark.parametrize("change, message", [
    (lambda f, i: (f, i.astype(np.int64)), r"field 'obs': shared-frame index is int64 \(2, 4\); expected int32 \(rows, 4\)"),
    (lambda f, i: (f, i[:, :3]), r"shared-frame index is int32 \(2, 3\); expected int32 \(rows, 4\)"),
    (lambda f, i: (f, np.where(i == 2, 8, i).astype(np.int32)),
     r"field 'obs' row 0 stack position 2: frame index 8 is outside the 8 shared frames"),
    (lambda f, i: (f, np.where(i == 3, -1, i).astype(np.int32)),
     r"field 'obs' row 0 stack position 3: frame index -1 is outside"),
    (lambda f, i: (f[:, :, :4], i), r"shared frames have shape \(8, 6, 4\); expected \(frames >= 1, 6, 8\)"),
    (lambda f, i: (f.astype(np.int16), i), r"shared frames have dtype int16; expected uint8"),
    (lambda f, i: (f[:0], i), r"shared frames have shape \(0, 6, 8\)"),
])
def test_malformed_shared_frames_are_refused_and_store_nothing(change, message):
    cols, shared = _shared_batch()
    frames, index = change(shared["obs"].frames, shared["obs"].index)
    bad = {**shared, "obs": SharedFrames(frames, index)}
    table = Table(TableConfig(name="a", schema=_schema(), capacity=16, storage="atari"))
    with pytest.raises(InvalidArgument, match=message):
        table.insert(bad)
    assert table.info().size == 0 and table._storage.frames_written == 0
    table.insert(shared)          # the well-formed batch is fine
    assert table.info().size == 2


def test_shared_frames_of_a_scalar_field_or_outside_bounds_are_refused():
    schema = Schema.parse("obs:uint8:4x6x8:0..200,action:int64,reward:float32,next_obs:uint8:4x6x8")
    table = Table(TableConfig(name="a", schema=schema, capacity=16, storage="atari"))
    cols, shared = _shared_batch()
    with pytest.raises(InvalidArgument, match=r"field 'obs \(shared frames; row = frame\)' row \d+ element \d+ value "
                                              r"2\d\d: expected"):
        table.insert(shared)     # random frame content has bytes above 200
    scalar = SharedFrames(np.zeros((2,), np.int64), np.zeros((2, 1), np.int32))
    with pytest.raises(InvalidArgument, match="field 'action' is a scalar"):
        table.insert({**shared, "action": scalar})
    assert table.info().size == 0


def test_wire_form_round_trips_and_matches_the_generated_classes():
    cols, shared = _shared_batch()
    parts = InsertRequestParts(table="t", writer_key="w", columns=shared, writer_id="x", sequence=3)
    dense_parts = InsertRequestParts(table="t", writer_key="w", columns=cols, writer_id="x", sequence=3)
    assert parts.nbytes < dense_parts.nbytes / 1.5
    assert payload_nbytes(shared) == shared["obs"].frames.nbytes + 2 * shared["obs"].index.nbytes + \
        cols["action"].nbytes + cols["reward"].nbytes
    data = parts.to_bytes(2.5)
    view = InsertRequestView(data)
    assert isinstance(view.columns["obs"], SharedFrames) and view.columns["obs"].frames is view.columns["next_obs"].frames
    for name in cols:
        got = view.columns[name]
        np.testing.assert_array_equal(got.materialize() if isinstance(got, SharedFrames) else got, cols[name])
    message = replay_pb2.InsertRequest.FromString(data)
    assert set(message.columns) == {"action", "reward"} and set(message.frame_index) == {"obs", "next_obs"}
    np.testing.assert_array_equal(decode_array(message.frames), shared["obs"].frames)
    np.testing.assert_array_equal(decode_array(message.frame_index["obs"]), shared["obs"].index)
    assert (message.timeout_s, message.sequence) == (2.5, 3)
    # A message the generated classes wrote parses the same.
    again = InsertRequestView(message.SerializeToString())
    np.testing.assert_array_equal(again.columns["next_obs"].materialize(), cols["next_obs"])


def _request(**fields) -> bytes:
    message = replay_pb2.InsertRequest(table="t", writer_key="w")
    for name, array in fields.get("columns", {}).items():
        _fill(message.columns[name], array)
    if "frames" in fields:
        _fill(message.frames, fields["frames"])
    for name, array in fields.get("frame_index", {}).items():
        _fill(message.frame_index[name], array)
    return message.SerializeToString()


def _fill(out, array):
    out.data, out.dtype = array.tobytes(), array.dtype.name
    out.shape.extend(array.shape)


def test_hostile_wire_forms_are_refused():
    _, shared = _shared_batch()
    frames, index = shared["obs"].frames, shared["obs"].index
    with pytest.raises(InvalidArgument, match=r"columns 'obs' are sent as frame indices but the insert carries no"):
        InsertRequestView(_request(frame_index={"obs": index}))
    with pytest.raises(InvalidArgument, match="carries frames but no column refers to them"):
        InsertRequestView(_request(frames=frames))
    with pytest.raises(InvalidArgument, match="column 'obs' is sent both dense and as frame indices"):
        InsertRequestView(_request(columns={"obs": frames[:2]}, frames=frames, frame_index={"obs": index}))
    twice = _request(frames=frames, frame_index={"obs": index}) + _request(frames=frames)[len(_request()):]
    with pytest.raises(InvalidArgument, match="frames appear twice"):
        InsertRequestView(twice)
    encoded = _request(frames=frames, frame_index={"obs": index})
    bad_dtype = encoded.replace(b"\x12\x05uint8", b"\x12\x05uin|8")      # same length: the framing holds
    with pytest.raises(InvalidArgument, match=r"frames: dtype 'uin\|8' is not a numeric numpy dtype name"):
        InsertRequestView(bad_dtype)


def test_encoder_refuses_columns_over_different_frame_arrays():
    cols, shared = _shared_batch()
    other = SharedFrames(shared["next_obs"].frames.copy(), shared["next_obs"].index)
    with pytest.raises(ValueError, match="refer to different frames arrays"):
        InsertRequestParts(table="t", writer_key="w", columns={**shared, "next_obs": other})
