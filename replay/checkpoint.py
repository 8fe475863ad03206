"""Atomic on-disk checkpoints of a replay shard's tables.

    from replay.checkpoint import write_checkpoint, latest_checkpoint, read_checkpoint
    path = write_checkpoint("ckpts", {name: table.state_dict() for name, table in tables.items()})
    states = read_checkpoint(latest_checkpoint("ckpts"))      # {name: (meta, arrays)}
    tables["replay"].load_state_dict(*states["replay"])

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
checkpoint never executes code from disk.
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
_NAME = re.compile(r"^ckpt-(\d{6,})$")
_TMP_PREFIX = ".tmp-ckpt-"

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


def write_checkpoint(directory: str | os.PathLike, states: Mapping[str, TableState], *, keep: int = 2) -> Path:
    """Write ``{table name: (meta, arrays)}`` as a new checkpoint under ``directory``; return its path.

    Keeps the newest ``keep`` checkpoints (``keep >= 1``) and removes older ones and stale temporaries.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 (the checkpoint just written is always kept)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest: dict = {"format": FORMAT_VERSION, "created_unix_s": time.time(), "tables": {}}
        for t_index, (name, (meta, arrays)) in enumerate(sorted(states.items())):
            files = {}
            for a_index, (array_name, array) in enumerate(sorted(arrays.items())):
                array = np.asarray(array)
                if array.dtype.hasobject:
                    raise TypeError(f"table {name!r} array {array_name!r} has dtype object; checkpoints hold "
                                    "numeric arrays only (no pickle)")
                # File names are indices, not array names, so any array name is safe on any filesystem.
                file_name = f"{t_index}-{a_index}.npy"
                with open(tmp / file_name, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                files[array_name] = file_name
            manifest["tables"][name] = {"meta": meta, "arrays": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, default=_json_default, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        existing = _checkpoint_dirs(directory)
        number = existing[-1][0] + 1 if existing else 1
        final = directory / f"ckpt-{number:06d}"
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = directory / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, directory / LATEST)
    _fsync_dir(directory)
    for _, old in _checkpoint_dirs(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for entry in directory.iterdir():
        # Leftovers of writers that crashed: ours have been renamed by now, and the server writes one
        # checkpoint at a time (one shard owns one checkpoint directory).
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return final


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
