"""Shared by the benchmarks: run the full system (`evergreen train`) for a measured window.

    result = run_system(config, warmup_s=10, seconds=30)
    result["updates_per_s"], result["env_steps_per_s"], result["wait"]

The window starts ``warmup_s`` after the first learner update and lasts ``seconds``; rates come
from the run's own metrics log (the records at the window's ends), so they count only work done
inside the window.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evergreen.train import Trainer


def burn_cpu() -> None:
    """The body of a CPU-burning process (benchmarks' ``--burn``: the machine under load)."""
    os.setsid()  # its own group, so the benchmark's Ctrl-C handling is not involved
    while True:
        pass


@contextlib.contextmanager
def cpu_burners(count: int) -> Iterator[None]:
    """``count`` CPU-burning processes for the duration of the block (killed by pid at its end).

        with cpu_burners(args.burn):
            rows = [run(seed) for seed in seeds]
    """
    burners = [multiprocessing.Process(target=burn_cpu, daemon=True) for _ in range(count)]
    for burner in burners:
        burner.start()
    try:
        yield
    finally:
        for burner in burners:
            os.kill(burner.pid, signal.SIGKILL)
            burner.join()


def run_system(config: Any, *, warmup_s: float, seconds: float, run_dir: Path | None = None,
               timeout_s: float = 900.0) -> dict[str, Any]:
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="evergreen-bench-system-"))
    trainer = Trainer(config, run_dir=run_dir)
    log = run_dir / "metrics.jsonl"

    def read() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def watch() -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            time.sleep(1.0)
            records = read()
            started = [r for r in records if r["updates"] > 0]
            if started and records[-1]["elapsed_s"] >= started[0]["elapsed_s"] + warmup_s + seconds:
                break
        trainer.request_stop("benchmark window complete")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    trainer.run()
    records = read()
    t_start = next(r["elapsed_s"] for r in records if r["updates"] > 0) + warmup_s
    steady = [r for r in records if r["elapsed_s"] >= t_start]
    first, last = steady[0], steady[-1]
    span = max(1e-9, last["elapsed_s"] - first["elapsed_s"])

    def mean(key: str) -> float:
        values = [r[key] for r in steady[1:] if r.get(key) is not None]
        return float(np.mean(values)) if values else float("nan")

    return {"env_steps_per_s": (last["env_steps"] - first["env_steps"]) / span,
            "updates_per_s": (last["updates"] - first["updates"]) / span,
            "policy_lag": mean("policy_lag_updates"), "actor_policy_lag": mean("actor_policy_lag_updates"),
            "wait": mean("learner_wait_fraction"), "span_s": span, "run_dir": str(run_dir)}
