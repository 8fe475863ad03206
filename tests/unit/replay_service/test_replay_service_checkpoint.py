"""Atomic checkpoint files: exact round trip, LATEST pointer, rotation, crash leftovers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from replay.checkpoint import MANIFEST, latest_checkpoint, read_checkpoint, write_checkpoint


def _state(n: int):
    meta = {"config": {"name": "t", "capacity": 10}, "inserts": n, "rng": np.int64(7)}
    arrays = {"storage/obs": np.arange(n * 4, dtype=np.float32).reshape(n, 4), "priorities": np.full(n, 0.5)}
    return meta, arrays


def test_round_trip_is_exact(tmp_path: Path):
    path = write_checkpoint(tmp_path, {"a": _state(3), "b": _state(1)})
    assert path == tmp_path / "ckpt-000001"
    assert (tmp_path / "LATEST").read_text() == "ckpt-000001\n"
    states = read_checkpoint(path)
    assert sorted(states) == ["a", "b"]
    meta, arrays = states["a"]
    assert meta == {"config": {"name": "t", "capacity": 10}, "inserts": 3, "rng": 7}
    np.testing.assert_array_equal(arrays["storage/obs"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert arrays["storage/obs"].dtype == np.float32
    np.testing.assert_array_equal(arrays["priorities"], [0.5, 0.5, 0.5])
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["tables"]["a"]["arrays"] == {"priorities": "0-0.npy", "storage/obs": "0-1.npy"}


def test_keeps_the_last_two_and_latest_names_the_newest(tmp_path: Path):
    for n in range(1, 5):
        write_checkpoint(tmp_path, {"a": _state(n)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-000003", "ckpt-000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000004"
    assert read_checkpoint(latest_checkpoint(tmp_path))["a"][0]["inserts"] == 4


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path: Path):
    write_checkpoint(tmp_path, {"a": _state(1)})
    leftover = tmp_path / ".tmp-ckpt-999-deadbeef"
    leftover.mkdir()
    (leftover / "0-0.npy").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000001"
    write_checkpoint(tmp_path, {"a": _state(2)})
    assert not leftover.exists()


def test_missing_latest_falls_back_to_the_highest_complete_checkpoint(tmp_path: Path):
    write_checkpoint(tmp_path, {"a": _state(1)})
    write_checkpoint(tmp_path, {"a": _state(2)})
    (tmp_path / "LATEST").unlink()       # crash between the rename and the pointer update
    (tmp_path / "ckpt-000003").mkdir()   # no manifest: not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000002"


def test_empty_directory_has_no_checkpoint(tmp_path: Path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_object_arrays_are_refused_and_leave_nothing(tmp_path: Path):
    with pytest.raises(TypeError, match="table 'a' array 'x' has dtype object"):
        write_checkpoint(tmp_path, {"a": ({}, {"x": np.array([object()])})})
    assert list(tmp_path.iterdir()) == []


def test_arrays_load_without_pickle(tmp_path: Path):
    path = write_checkpoint(tmp_path, {"a": _state(1)})
    np.save(path / "0-0.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        read_checkpoint(path)


def test_unknown_format_is_refused(tmp_path: Path):
    path = write_checkpoint(tmp_path, {"a": _state(1)})
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format 99 is not supported"):
        read_checkpoint(path)


def test_keep_must_be_positive(tmp_path: Path):
    with pytest.raises(ValueError, match="keep=0 must be >= 1"):
        write_checkpoint(tmp_path, {"a": _state(1)}, keep=0)
