"""evergreen report: rendering from synthetic, trainer-shaped metrics logs; overlays; bad logs."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from evergreen.report import (
    ReportError,
    _diagnostics,
    _interventions,
    _summary,
    load_run,
    main,
    render_report,
)
from tests.unit.telemetry.report_runs import LAYERS, assert_png, make_run


def test_single_run_report(tmp_path):
    run = make_run(tmp_path, "pong-redo", interventions="redo")
    page = render_report([run])
    out = run / "report"
    assert page == out / "index.html"
    for name in ("learning_curve", "plasticity", "throughput", "losses", "interventions"):
        assert_png(out / f"{name}.png")
    text = page.read_text()
    embedded = re.findall(r'<figure id="(\w+)"><img alt="\w+" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [name for name, _ in embedded] == ["learning_curve", "plasticity", "throughput", "losses", "interventions"]
    for name, b64 in embedded:
        assert base64.b64decode(b64) == (out / f"{name}.png").read_bytes()
    assert "pong-redo (redo)" in text
    assert "<td>30,000</td>" in text  # final env steps
    assert "<td>39.00</td>" in text  # last and best mean return: 10 + 29


def test_summary_diagnostics_and_switches(tmp_path):
    run = load_run(make_run(tmp_path, "r", interventions="redo,layer_norm"))
    assert run.label == "r (redo,layer_norm)"
    assert run.switches() == [(16000.0, "Breakout")]
    diags = _diagnostics(run)
    assert sorted(diags) == ["dormant_ratio", "effective_lr", "plasticity_probe/ratio", "srank", "weight_norm"]
    assert diags["dormant_ratio"] == {**{layer: f"diag/dormant_ratio/{layer}" for layer in LAYERS},
                                      "total": "diag/dormant_ratio/total"}
    assert diags["srank"] == {"total": "diag/srank"}
    assert diags["plasticity_probe/ratio"] == {"total": "diag/plasticity_probe/ratio"}
    assert _interventions(run) == ["redo/units_reset", "redo/dormant_fraction"]
    assert _summary(run) == {"run": "r (redo,layer_norm)", "records": "30", "env steps": "30,000",
                             "updates": "3,000", "episodes": "60", "last return (100)": "39.00",
                             "best return (100)": "39.00", "wall time (s)": "150"}
    column = run.column("return_mean_100")
    assert np.isnan(column[0]) and column[1] == 11.0 and column[29] == 39.0


def test_overlay_compares_interventions(tmp_path):
    a = make_run(tmp_path, "pong-base", interventions="", tasks=False, seed=1)
    b = make_run(tmp_path, "pong-redo", interventions="redo", tasks=False, seed=2)
    page = render_report([a, b])
    out = tmp_path / "report-compare"
    assert page == out / "index.html"
    for name in ("learning_curve", "plasticity", "throughput", "losses", "interventions"):
        assert_png(out / f"{name}.png")
    text = page.read_text()
    assert "pong-base (no interventions)" in text and "pong-redo (redo)" in text
    assert text.count("<tr><td>") == 2
    # The overlay differs from each single-run learning curve.
    single = render_report([a], out=tmp_path / "single")
    assert (single.parent / "learning_curve.png").read_bytes() != (out / "learning_curve.png").read_bytes()


def test_log_without_diagnostics_or_interventions_skips_those_plots(tmp_path):
    run = make_run(tmp_path, "plain", interventions="", diags=False, tasks=False)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "plasticity.png").write_bytes(b"stale")
    page = render_report([run], out=out)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "learning_curve.png", "losses.png",
                                                     "throughput.png"]
    assert 'id="plasticity"' not in page.read_text()


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = make_run(tmp_path, "crashed", interventions="")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"time": 1800000200.0, "env_st')
    assert main([str(run)]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl:31: skipped a truncated last line" in err
    assert len(load_run(run).records) == 30


@pytest.mark.parametrize("content, message", [
    (None, "no metrics log; expected a run directory made by evergreen train"),
    ("", "holds no records yet"),
    ("\n\n", "holds no records yet"),
    ('{"env_steps": 1}\nnot json\n{"env_steps": 2}\n', "metrics.jsonl:2: not a JSON record"),
    ('[1, 2]\n{"env_steps": 2}\n', "metrics.jsonl:1: expected a JSON object, got list"),
    ('{"loss": 1.0}\n', "no record has env_steps"),
])
def test_bad_logs_are_clear_errors(tmp_path, capsys, content, message):
    run = tmp_path / "bad"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=re.escape(message)):
        render_report([run])
    assert main([str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "report").exists()


def test_missing_run_dir_and_no_partial_output(tmp_path):
    good = make_run(tmp_path, "good", interventions="")
    with pytest.raises(ReportError, match=r"missing: no such run directory"):
        render_report([good, tmp_path / "missing"], out=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(ReportError, match="no run directories given"):
        render_report([])
    with pytest.raises(SystemExit):
        main([])


def test_evaluations_are_plotted_per_task_with_the_task_stays_shaded(tmp_path):
    run = make_run(tmp_path, "continual", interventions="")
    entries = [{"env_steps": 5000 * k, "visit": k // 3, "reason": "periodic",
                "scores": {"Pong": {"mean": -21.0 + k}, "Breakout": {"mean": 2.0 * k}}} for k in range(1, 7)]
    (run / "evaluations.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\nnot json\n")
    warnings = []
    page = render_report([run], on_warning=warnings.append)
    assert_png(run / "report" / "evaluation.png")
    assert 'id="evaluation"' in page.read_text()
    assert any("evaluations.jsonl:7: skipped a line" in w for w in warnings)
    plain = make_run(tmp_path, "single", interventions="", tasks=False)
    render_report([plain])
    assert not (plain / "report" / "evaluation.png").exists()  # no evaluations: no plot
