"""The plasticity benchmark harness on a tiny configuration, and its summary arithmetic."""

from __future__ import annotations

import csv
import json

import pytest

from evergreen.bench import plasticity as B

ALL_METHODS = B.DEFAULT_METHODS.split(",")


def test_quick_run_writes_every_output_with_every_method(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = B.main(["--quick", "--tasks", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("per_task.csv", "results.json", "summary.json", "fit_per_task.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "per_task.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(ALL_METHODS) * 1 * 2  # methods x seeds x tasks
    assert {r["method"] for r in rows} == set(ALL_METHODS)
    assert {r["task"] for r in rows} == {"0", "1"}
    inputs, hidden_units = B.QUICK["inputs"], B.QUICK["width"] * B.QUICK["depth"]
    for row in rows:
        # fit counts correctly labelled inputs, dormant_ratio dormant hidden units: whole numbers of each
        assert float(row["fit"]) * inputs == round(float(row["fit"]) * inputs), row
        assert float(row["dormant_ratio"]) * hidden_units == round(float(row["dormant_ratio"]) * hidden_units), row
        assert float(row["fit"]) > 2 / B.BenchConfig().classes, row  # 30 steps learn well above chance (0.1)
    # Methods that cannot act within the first task's 30 steps (redo every 200 steps, shrink_perturb at
    # task switches, continual_backprop after maturity 100) start from the same weights as the
    # baseline, so their first task is the baseline's, exactly.
    first = {r["method"]: r for r in rows if r["task"] == "0"}
    for method in ("redo", "shrink_perturb", "continual_backprop"):
        for key in ("fit", "loss", "dormant_ratio", "srank", "weight_norm"):
            assert first[method][key] == first["baseline"][key], (method, key)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert list(summary) == ALL_METHODS
    assert (out / "fit_per_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ALL_METHODS:
        assert f"| {method} |" in printed
    # the default runs (method, seed) jobs in 2 worker processes; one process gives the same rows
    serial = B.run_benchmark(B.BenchConfig(**{**B.QUICK, "tasks": 2}, methods="baseline,redo", workers=1,
                                           out=str(tmp_path / "serial")), log=lambda s: None)
    parallel = [r for r in rows if r["method"] in ("baseline", "redo")]
    assert [(r["method"], r["task"], r["fit"]) for r in serial["rows"]] == [
        (r["method"], int(r["task"]), float(r["fit"])) for r in parallel
    ]


def test_same_seed_same_results(tmp_path):
    cfg = B.BenchConfig(**{**B.QUICK, "tasks": 2}, methods="baseline", out=str(tmp_path))
    a = B.run_one(cfg, "baseline", [], 0)
    b = B.run_one(cfg, "baseline", [], 0)
    assert [r["fit"] for r in a] == [r["fit"] for r in b]
    assert [r["weight_norm"] for r in a] == [r["weight_norm"] for r in b]


def _rows(method, seed, fits):
    return [{"method": method, "seed": seed, "task": t, "fit": f, "loss": 0.0, "dormant_ratio": 0.1 * t,
             "srank": 10.0 - t, "weight_norm": 2.0, "seconds": 1.0} for t, f in enumerate(fits)]


def test_summary_statistics_and_verdicts():
    cfg = B.BenchConfig(tasks=6, seeds=2)
    rows = (_rows("baseline", 0, [1.0, 0.9, 0.5, 0.3, 0.2, 0.1]) + _rows("baseline", 1, [0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
            + _rows("redo", 0, [1.0, 1.0, 1.0, 0.9, 0.9, 0.9]) + _rows("redo", 1, [0.8, 0.7, 0.7, 0.7, 0.7, 0.7]))
    s = B.summarize(rows, cfg)
    # baseline last-5: seed 0 (0.9+0.5+0.3+0.2+0.1)/5 = 0.4 < 0.5 -> lost; seed 1 0.8 -> kept
    assert s["baseline"]["last5_fit"][0] == pytest.approx((0.4 + 0.8) / 2)
    assert s["baseline"]["last5_fit"][1] == pytest.approx(0.2)
    assert s["baseline"]["verdicts"] == {0: "lost", 1: "kept"}
    assert s["baseline"]["first_fit"] == (pytest.approx(0.9), pytest.approx(0.1))
    # redo seed 0 last-5 0.94 >= 0.9 * 1.0 -> kept; seed 1 0.7 < 0.72 -> lost
    assert s["redo"]["verdicts"] == {0: "kept", 1: "lost"}
    assert s["redo"]["final_fit"] == (pytest.approx(0.8), pytest.approx(0.1))
    assert s["redo"]["dormant_ratio"] == (pytest.approx(0.5), 0.0)
    assert s["redo"]["srank"] == (pytest.approx(5.0), 0.0)
    table = B.format_table(s)
    assert "| redo | 0.900 ± 0.100 | 0.800 ± 0.100 | 0.820 ± 0.120 | 0.000 ± 0.000 | 0.000 ± 0.000 | 0.500 ± 0.000 |" in table


def test_bad_inputs():
    with pytest.raises(ValueError, match="bad method 'redo\\+'"):
        B.parse_methods("baseline,redo+")
    with pytest.raises(ValueError, match="method listed twice"):
        B.parse_methods("redo,redo")
    with pytest.raises(ValueError, match="no methods"):
        B.parse_methods(" , ")
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        B.BenchConfig(steps=0).validate()
    with pytest.raises(ValueError, match="lr must be"):
        B.BenchConfig(lr=-1.0).validate()
    with pytest.raises(ValueError, match="unknown intervention"):
        B.run_benchmark(B.BenchConfig(methods="baseline,not_a_method", out="/nonexistent/never"))
    with pytest.raises(ValueError, match="not NetworkConfig fields"):
        B.build_net(B.BenchConfig(), {"width": 3})
    assert B.main(["--tasks", "0"]) == 2


def test_measure_diagnostics_cost_reports_fractions():
    out = B.measure_diagnostics_cost(encoder="mlp", batch=8, probe=16, repeats=1, every=10, log=lambda s: None)
    assert set(out) == {"update_s", "diagnostics_s", "ratio_per_call", "fraction_at_schedule"}
    assert out["fraction_at_schedule"] == pytest.approx(out["diagnostics_s"] / (10 * out["update_s"]))
    with pytest.raises(ValueError, match="encoder must be"):
        B.measure_diagnostics_cost(encoder="resnet")


def test_cli_runs_the_benchmark_from_its_new_home(capsys):
    from evergreen.cli import main

    assert main(["bench", "plasticity", "--tasks", "0"]) == 2  # routed to evergreen.bench.plasticity.main
    assert "tasks must be an integer >= 1, got 0" in capsys.readouterr().err
