"""Atomic on-disk checkpoints of a replay shard's tables.

    from replay.checkpoint import write_checkpoint, latest_checkpoint, read_checkpoint
    path = write_checkpoint("ckpts", {name: table.state_dict() for name, table in tables.items()})
    states = read_checkpoint(latest_checkpoint("ckpts"))      # {name: (meta, arrays)}
    tables["replay"].load_state_dict(*states["replay"])

    # What a shard does: large arrays written from the table's memory while it keeps serving.
    with CheckpointWriter("ckpts") as writer:
        snap = table.snapshot()                            # a moment under the table lock
        for name, array in snap.live.items():
            writer.add_array("replay", name, array)        # outside the lock
        meta, arrays = snap.finish()                       # a moment under the lock
        for name, array in arrays.items():
            writer.add_array("replay", name, array)
        writer.add_table("replay", meta)
        path = writer.commit()

Layout of ``checkpoint_dir``::

    LATEST                      name of the newest complete checkpoint ("ckpt-000007")
    ckpt-000006/, ckpt-000007/  the last ``keep`` checkpoints
        manifest.json           per table: its state_dict() metadata (config, schema, counters,
                                sampler and rate-limiter state) and the file holding each array
        <table-index>-<array-index>.npy

A checkpoint is written into a hidden temporary directory inside ``checkpoint_dir``, every file and the
directory are fsynced, and only then is it renamed to its final name and ``LATEST`` replaced (write,
fsync, ``os.replace``). A crash at any point leaves the previous checkpoint intact and ``LATEST``
naming a complete one. Arrays are plain ``.npy`` files loaded with ``allow_pickle=False``: restoring a
checkpoint never executes code from disk. Array bytes are written in 16 MiB pieces straight from the
array's memory (no copy; the GIL is released during each write).

Housekeeping: :func:`remove_stale_temporaries` (called by a shard when it starts) removes the
temporary directories of writers that crashed; ``GENERATION`` holds the last key generation a shard
started with (:func:`next_generation`), so that a shard that crashes before its first checkpoint still
starts a new generation when it comes back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"
GENERATION = "GENERATION"
_NAME = re.compile(r"^ckpt-(\d{6,})$")
_TMP_PREFIX = ".tmp-ckpt-"
_CHUNK = 16 << 20

TableState = tuple[dict, dict[str, np.ndarray]]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value):
    # state_dict metadata may carry numpy scalars or small arrays (counters, rng state); store them as
    # plain JSON numbers/lists rather than failing the whole checkpoint.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint metadata value {value!r} of type {type(value).__name__} is not JSON-serializable")


def _checkpoint_dirs(directory: Path) -> list[tuple[int, Path]]:
    found = []
    if directory.is_dir():
        for entry in directory.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir() and (entry / MANIFEST).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory`` (``LATEST``, else the highest-numbered), or None."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        target = directory / pointer.read_text().strip()
        if _NAME.match(target.name) and (target / MANIFEST).is_file():
            return target
    # LATEST is replaced after the rename, so a crash between the two leaves a newer complete checkpoint
    # that LATEST does not name yet; every ckpt-* directory with a manifest is complete by construction.
    found = _checkpoint_dirs(directory)
    return found[-1][1] if found else None


def _write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save(path, array)`` without copying the array: header, then its bytes in pieces, fsynced."""
    if array.dtype.hasobject:
        raise TypeError("object arrays cannot be checkpointed")
    array = np.ascontiguousarray(array)   # a view for the (always contiguous) table arrays
    header = np.lib.format.header_data_from_array_1_0(array)
    with open(path, "wb") as f:
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:   # header too large for format 1.0
            f.seek(0)
            np.lib.format.write_array_header_2_0(f, header)
        data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
        for start in range(0, len(data), _CHUNK):
            f.write(data[start:start + _CHUNK])
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class CheckpointWriter:
    """Writes one checkpoint into a temporary directory, array by array; :meth:`commit` makes it the
    latest (see the module docstring). Used as a context manager, an exception removes what was written."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (the checkpoint just written is always kept)")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tmp = self.directory / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self._tables: dict[str, dict] = {}
        self._order: dict[str, int] = {}
        self._done = False

    def add_array(self, table: str, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"table {table!r} array {name!r} has dtype object; checkpoints hold "
                            "numeric arrays only (no pickle)")
        t_index = self._order.setdefault(table, len(self._order))
        entry = self._tables.setdefault(table, {"meta": None, "arrays": {}})
        # File names are indices, not array names, so any array name is safe on any filesystem.
        file_name = f"{t_index}-{len(entry['arrays'])}.npy"
        _write_npy(self._tmp / file_name, array)
        entry["arrays"][name] = file_name

    def add_table(self, table: str, meta: dict) -> None:
        self._order.setdefault(table, len(self._order))
        self._tables.setdefault(table, {"meta": None, "arrays": {}})["meta"] = meta

    def commit(self) -> Path:
        """Write the manifest, move the checkpoint into place, update ``LATEST``, rotate; return its path."""
        directory = self.directory
        try:
            manifest = {"format": FORMAT_VERSION, "created_unix_s": time.time(), "tables": self._tables}
            _write_text(self._tmp / MANIFEST, json.dumps(manifest, default=_json_default, indent=1, sort_keys=True))
            _fsync_dir(self._tmp)
            existing = _checkpoint_dirs(directory)
            number = existing[-1][0] + 1 if existing else 1
            final = directory / f"ckpt-{number:06d}"
            os.rename(self._tmp, final)
            _fsync_dir(directory)
        except BaseException:
            self.abort()
            raise
        self._done = True
        pointer_tmp = directory / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _write_text(pointer_tmp, final.name + "\n")
        os.replace(pointer_tmp, directory / LATEST)
        _fsync_dir(directory)
        for _, old in _checkpoint_dirs(directory)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        remove_stale_temporaries(directory)
        return final

    def abort(self) -> None:
        if not self._done:
            self._done = True
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_checkpoint(directory: str | os.PathLike, states: Mapping[str, TableState], *, keep: int = 2) -> Path:
    """Write ``{table name: (meta, arrays)}`` as a new checkpoint under ``directory``; return its path.

    Keeps the newest ``keep`` checkpoints (``keep >= 1``) and removes older ones and stale temporaries.
    """
    with CheckpointWriter(directory, keep=keep) as writer:
        for name, (meta, arrays) in sorted(states.items()):
            for array_name, array in sorted(arrays.items()):
                writer.add_array(name, array_name, array)
            writer.add_table(name, meta)
        return writer.commit()


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files and directories that crashed writers left in ``directory``; return
    their names. Only one writer may use a directory at a time (a shard owns its checkpoint directory)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)


def next_generation(directory: str | os.PathLike, *, at_least: int = 0) -> int:
    """The key generation a shard starting over ``directory`` uses: one more than both the last one
    started there (the ``GENERATION`` file) and ``at_least`` - 1; written (fsynced) before it is returned,
    so that no two starts over one directory ever use the same generation."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / GENERATION
    last = -1
    if path.is_file():
        try:
            last = int(path.read_text().strip())
        except ValueError:
            last = -1    # unreadable: at_least (from the restored tables) still moves it forward
    generation = max(last + 1, at_least)
    tmp = directory / f"{_TMP_PREFIX}{GENERATION}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _write_text(tmp, f"{generation}\n")
    os.replace(tmp, path)
    _fsync_dir(directory)
    return generation


def read_checkpoint(path: str | os.PathLike) -> dict[str, TableState]:
    """``{table name: (meta, arrays)}`` from one checkpoint directory (``ValueError`` if it is malformed)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path} is not a replay checkpoint: {MANIFEST} is missing")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    states: dict[str, TableState] = {}
    for name, entry in manifest["tables"].items():
        arrays = {array_name: np.load(path / file_name, allow_pickle=False)
                  for array_name, file_name in entry["arrays"].items()}
        states[name] = (entry["meta"], arrays)
    return states
