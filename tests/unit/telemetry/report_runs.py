"""Synthetic run directories shaped like `evergreen train` writes them, for the report tests.

    run = make_run(tmp_path, "pong-redo-s1", interventions="redo", seed=1, offset=2.0)
    render_report([run])

``return_mean_100`` of record ``i`` is ``10 + i + offset`` (None for the first record), at env steps
``start + 1000 * i``: known curves, so that means and spreads over seeds can be checked exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

# Layer names as plasticity.layers.layer_names gives them (one name per layer in every diagnostic).
LAYERS = ("encoder.fc0", "encoder.fc0.norm", "head.q.out")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_run(root: Path, name: str, *, interventions: str, n: int = 30, tasks: bool = True, diags: bool = True,
             seed: int = 0, offset: float = 0.0, start: int = 1000, config: dict[str, Any] | None = None,
             evaluations: bool = False, continual: dict[str, Any] | None = None) -> Path:
    """A run directory with config.json and a metrics.jsonl like Trainer._record writes.

    ``seed`` goes into config.json (and seeds the noise of env steps/s); ``config`` is merged into
    config.json; ``evaluations`` adds an evaluations.jsonl (both tasks every 5000 env steps, scores
    ``offset + k``), ``continual`` is written as continual.json.
    """
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir()
    base = {"name": name, "seed": seed, "runs_dir": str(root), "telemetry_port": 9000 + seed,
            "plasticity": {"interventions": interventions}}
    (run / "config.json").write_text(json.dumps(_merge(base, config or {})))
    lines = []
    for i in range(n):
        steps = start + 1000 * i
        rec = {
            "time": 1_800_000_000.0 + 5 * i, "elapsed_s": 5.0 * (i + 1), "env_steps": steps, "updates": 100 * (i + 1),
            "episodes": 2 * (i + 1), "env_steps_per_s": 200.0 + rng.normal(), "updates_per_s": 20.0,
            "return_mean_100": None if i == 0 else 10.0 + i + offset,
            "return_recent": None if i % 3 == 0 else 9.0 + i + offset,
            "replay_size": min(steps, 20_000), "learner_wait_fraction": 0.1, "policy_lag_updates": 4.0,
            "actor_restarts": 0 if i < 10 else 1, "num_actors": 2,
            "loss": 1.0 / (i + 1), "td_error": 0.5, "q": 0.1 * i, "grad_norm": 1.5, "lr": 1e-4,
        }
        if tasks:
            rec["task"] = "Pong" if i < n // 2 else "Breakout"
        if interventions:
            rec["redo/units_reset"] = 3.0 if i % 10 == 9 else 0.0
            rec["redo/dormant_fraction"] = 0.05
        if diags and i >= 2:
            for name_ in ("dormant_ratio", "weight_norm", "effective_lr"):
                for j, layer in enumerate(LAYERS):
                    rec[f"diag/{name_}/{layer}"] = 0.01 * (j + 1) * (1 + i / n)
                rec[f"diag/{name_}/total"] = 0.02 * (1 + i / n) + 0.001 * offset
            rec["diag/srank"] = 50.0 - i
            rec["diag/plasticity_probe/ratio"] = 1.0 + 0.01 * i
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if evaluations:
        last = start + 1000 * (n - 1)
        entries = [{"env_steps": steps, "visit": 0 if steps <= last // 2 else 1, "reason": "periodic",
                    "scores": {"Pong": {"mean": offset + k}, "Breakout": {"mean": offset + 2 * k}}}
                   for k, steps in enumerate(range(5000, last + 1, 5000), 1)]
        (run / "evaluations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    if continual is not None:
        (run / "continual.json").write_text(json.dumps(continual))
    return run


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5_000, f"{path}: only {len(data)} bytes"
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert float(pixels[..., :3].std()) > 0.01, f"{path} is blank"
