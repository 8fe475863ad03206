"""Atomic learner checkpoints: write to a temporary file, fsync, rename; keep the newest few.

    save_checkpoint(run_dir / "checkpoints", {"algorithm": dqn.state_dict(), "counters": {...}}, step=1200)
    state = load_latest_checkpoint(run_dir / "checkpoints")   # None when there is none yet

A crash mid-write leaves only a ``*.tmp`` file behind, which loading ignores, so the previous
checkpoint stays usable. :func:`state_digest` fingerprints a state (weights, optimizer moments and
step counts, RNG states), so a resumed learner can be checked against the file it resumed from.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^learner-(\d{12})\.pt$")


def save_checkpoint(directory: Path, state: dict[str, Any], *, step: int, keep: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"learner-{step:012d}.pt"
    tmp = directory / f".learner-{step:012d}.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_latest_checkpoint(directory: Path) -> dict[str, Any] | None:
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    # weights_only=False: the state holds numpy RNG states and counters next to tensors; the file is our own.
    return torch.load(checkpoints[-1], map_location="cpu", weights_only=False)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_digest(state: Any) -> str:
    """SHA-256 of a nested state (dicts, lists, tensors, arrays, numbers, strings), in a canonical order.

    Equal states give equal digests whatever the devices or dict insertion order; any changed
    weight, optimizer moment, step count or RNG state changes it.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, np.ndarray):
            digest.update(f"A{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    feed(state)
    return digest.hexdigest()
