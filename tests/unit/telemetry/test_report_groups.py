"""evergreen report over seeds: grouping runs, mean ± standard error on a common grid, the comparison table."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pytest

from evergreen.report import (
    ReportError,
    _series,
    group_runs,
    load_run,
    main,
    mean_and_sem,
    mean_and_spread,
    render_report,
)
from tests.unit.telemetry.report_runs import assert_png, make_run


def groups_table(page) -> list[dict[str, str]]:
    """The comparison table of a report page, as {column: cell} per group."""
    table = re.search(r'<table id="groups">(.*?)</table>', page.read_text()).group(1)
    head = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", table)]
    rows = re.findall(r'<tr class="group">(.*?)</tr>', table)
    return [dict(zip(head, (html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)), strict=True))
            for row in rows]


def names(groups) -> list[tuple[str, list[str]]]:
    return [(g.label, [r.path.name for r in g.runs]) for g in groups]


@pytest.fixture
def experiment(tmp_path):
    """Three baseline seeds, two redo seeds, and a baseline with another learning rate: four configs."""
    lr = {"dqn": {"lr": 0.001}}
    dirs = [make_run(tmp_path, f"base-s{s}", interventions="", seed=s, config=lr, tasks=False) for s in (0, 1, 2)]
    dirs += [make_run(tmp_path, f"redo-s{s}", interventions="redo", seed=s, config=lr, tasks=False) for s in (0, 1)]
    dirs.append(make_run(tmp_path, "base-fast-s0", interventions="", config={"dqn": {"lr": 0.01}}, tasks=False))
    return [load_run(d) for d in dirs]


def test_group_by_config_puts_seeds_of_one_config_together(experiment):
    assert names(group_runs(experiment)) == [
        ("baseline [dqn.lr=0.001]", ["base-s0", "base-s1", "base-s2"]),
        ("redo", ["redo-s0", "redo-s1"]),
        ("baseline [dqn.lr=0.01]", ["base-fast-s0"]),
    ]
    groups = group_runs(experiment)
    assert groups[0].seeds() == [0, 1, 2]
    assert groups[2].name == "base-fast-s0 (no interventions)"  # a group of one keeps its run's label
    assert groups[0].name == "baseline [dqn.lr=0.001]"


def test_other_group_by_modes(experiment):
    assert names(group_runs(experiment, "interventions")) == [
        ("baseline", ["base-s0", "base-s1", "base-s2", "base-fast-s0"]), ("redo", ["redo-s0", "redo-s1"])]
    assert names(group_runs(experiment, "none")) == [(r.label, [r.path.name]) for r in experiment]
    assert names(group_runs(experiment, "plasticity.interventions, dqn.lr")) == [
        ("baseline, dqn.lr=0.001", ["base-s0", "base-s1", "base-s2"]), ("redo, dqn.lr=0.001", ["redo-s0", "redo-s1"]),
        ("baseline, dqn.lr=0.01", ["base-fast-s0"])]
    assert names(group_runs(experiment, "dqn")) == [  # a sub-tree compares by content
        ('dqn={"lr": 0.001}', [r.path.name for r in experiment[:5]]), ('dqn={"lr": 0.01}', ["base-fast-s0"])]


def test_bad_group_by_is_a_clear_error_and_writes_nothing(experiment, tmp_path, capsys):
    with pytest.raises(ReportError, match=r"has no field 'dqn\.nope'; expected one of config, interventions, none, "
                                          r"or config fields such as: dqn\.lr"):
        group_runs(experiment, "dqn.nope")
    with pytest.raises(ReportError, match=r"has no field 'nope'.*such as: dqn, name, plasticity, runs_dir, seed"):
        group_runs(experiment, "nope")
    with pytest.raises(ReportError, match="an empty field name"):
        group_runs(experiment, "dqn.lr,")
    dirs = [str(r.path) for r in experiment]
    assert main([*dirs, "--out", str(tmp_path / "cmp"), "--group-by", "dqn.nope"]) == 2
    assert "config.json has no field 'dqn.nope'" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    (experiment[1].path / "config.json").unlink()
    with pytest.raises(ReportError, match=r"base-s1/config\.json: missing or unreadable, and --group-by "
                                          r"interventions reads it; use --group-by none"):
        render_report(dirs, group_by="interventions")


def test_run_without_config_is_its_own_group_with_a_warning(experiment, tmp_path):
    (experiment[1].path / "config.json").unlink()
    warnings = []
    render_report([r.path for r in experiment[:3]], out=tmp_path / "cmp", on_warning=warnings.append)
    assert any("base-s1/config.json: missing; the run is not grouped" in w for w in warnings)
    assert [row["runs"] for row in groups_table(tmp_path / "cmp" / "index.html")] == ["2", "1"]


def test_mean_and_spread_on_the_env_steps_every_curve_covers():
    a = ([0, 10, 20, 30], [0, 10, 20, 30])  # y = x
    b = ([45, 5, 15, 25, 35, np.nan], [47, 7, 17, 27, 37, 1.0])  # y = x + 2, unsorted, a NaN point
    s = mean_and_spread([a, b])
    assert s.n == 2
    np.testing.assert_array_equal(s.steps, [5, 10, 15, 20, 25, 30])  # [max first, min last]: no extrapolation
    np.testing.assert_allclose(s.mean, s.steps + 1.0)
    np.testing.assert_allclose(s.sem, 1.0)  # std of {y, y + 2} (ddof 1) is sqrt(2); / sqrt(2)
    np.testing.assert_allclose(s.low, s.steps)
    np.testing.assert_allclose(s.high, s.steps + 2)
    flat = mean_and_spread([([0, 10], [1, 1]), ([0, 10], [2, 2]), ([0, 5, 10], [3, 3, 3])])
    np.testing.assert_array_equal(flat.steps, [0, 5, 10])
    np.testing.assert_allclose(flat.mean, 2.0)
    np.testing.assert_allclose(flat.sem, 1 / math.sqrt(3))


def test_mean_and_spread_edge_cases():
    # Of two points at one env step the later one counts (a resumed run logs the step again).
    s = mean_and_spread([([0, 10, 10], [0, 5, 10]), ([0, 10], [0, 10])])
    np.testing.assert_allclose(s.mean, [0, 10])
    assert mean_and_spread([([0, 10], [1, 2]), ([20, 30], [1, 2])]) is None  # disjoint ranges
    assert mean_and_spread([([0, 10], [1, 2])]) is None  # one curve is no spread
    assert mean_and_spread([([0, 10], [1, 2]), ([0, 10], [np.nan, np.nan])]) is None  # the other has no points
    touching = mean_and_spread([([0, 10], [0, 10]), ([10, 20], [20, 30])])
    np.testing.assert_array_equal(touching.steps, [10])
    np.testing.assert_allclose(touching.mean, [15])
    assert mean_and_sem([1.0, 3.0, float("nan"), None]) == (2.0, 1.0, 2)
    mean, sem, n = mean_and_sem([4.0])
    assert (mean, n) == (4.0, 1) and math.isnan(sem)
    assert mean_and_sem([])[2] == 0


def test_a_group_is_drawn_as_mean_with_a_band_over_the_common_range(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    long = load_run(make_run(tmp_path, "long", interventions="", n=30))  # returns at 2000 .. 30000
    short = load_run(make_run(tmp_path, "short", interventions="", n=20, start=6000, offset=2.0))  # 7000 .. 25000
    fig, ax = plt.subplots()
    curves = [(r.column("env_steps"), r.column("return_mean_100")) for r in (long, short)]
    assert _series(ax, curves, label="g", color="C0")
    (line,) = ax.lines
    x, y = line.get_xdata(), line.get_ydata()
    assert (x[0], x[-1]) == (7000, 25000)
    # long: 9 + x/1000; short: 6 + x/1000 -> mean 7.5 + x/1000, standard error 1.5 (half their gap).
    np.testing.assert_allclose(y, 7.5 + x / 1000)
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(6 + 7.0) and band[:, 1].max() == pytest.approx(9 + 25.0)
    assert ax.get_legend_handles_labels()[1] == ["g (2 runs: mean, ±1 standard error)"]
    ax.clear()
    apart = load_run(make_run(tmp_path, "apart", interventions="", n=5, start=40_000))
    _series(ax, curves[:1] + [(apart.column("env_steps"), apart.column("return_mean_100"))], label="g", color="C0")
    assert len(ax.lines) == 2 and not ax.collections  # no common range: each run on its own
    assert ax.get_legend_handles_labels()[1] == ["g (runs do not overlap)"]
    plt.close(fig)


def test_grouped_report_has_the_comparison_table(tmp_path):
    lr = {"dqn": {"lr": 0.001}}
    dirs = [make_run(tmp_path, f"base-s{s}", interventions="", seed=s, offset=off, config=lr, evaluations=True,
                     continual={"average_performance": 5.0, "forgetting": {"Pong": 1.0}} if s == 2 else None)
            for s, off in ((0, 0.0), (1, 2.0), (2, 4.0))]
    dirs += [make_run(tmp_path, f"redo-s{s}", interventions="redo", seed=s, offset=off, config=lr, evaluations=True,
                      continual={"average_performance": ap, "forgetting": forgot})
             for s, off, ap, forgot in ((0, 0.0, 10.0, {"Pong": 1.0, "Breakout": 3.0}),
                                        (1, 6.0, 12.0, {"Pong": 3.0, "Breakout": 5.0}))]
    dirs.append(make_run(tmp_path, "ln-s0", interventions="layer_norm", config=lr))
    page = render_report(dirs)
    out = tmp_path / "report-compare"
    for name in ("learning_curve", "evaluation", "plasticity", "throughput", "losses", "interventions"):
        assert_png(out / f"{name}.png")
    assert groups_table(page) == [
        # final return 10 + 29 + offset: {39, 41, 43} -> 41 ± 2/sqrt(3); {39, 45} -> 42 ± 3
        {"group": "baseline", "runs": "3", "seeds": "0, 1, 2", "env steps": "30,000",
         "final return (100)": "41.00 ± 1.15", "average performance": "5.00 (1 of 3)",
         "forgetting (mean over tasks)": "1.00 (1 of 3)"},
        {"group": "redo", "runs": "2", "seeds": "0, 1", "env steps": "30,000", "final return (100)": "42.00 ± 3.00",
         "average performance": "11.00 ± 1.00", "forgetting (mean over tasks)": "3.00 ± 1.00"},
        {"group": "ln-s0 (layer_norm)", "runs": "1", "seeds": "0", "env steps": "30,000",
         "final return (100)": "39.00", "average performance": "n/a", "forgetting (mean over tasks)": "n/a"},
    ]
    text = page.read_text()
    assert text.count("<tr><td>") == 6  # the per-run table is still there, one row per run
    assert "±1 standard error" in text
    # Grouping changes the plots: the per-run overlay of the same runs draws other curves.
    overlay = render_report(dirs, out=tmp_path / "overlay", group_by="none")
    assert (overlay.parent / "learning_curve.png").read_bytes() != (out / "learning_curve.png").read_bytes()
    assert [row["runs"] for row in groups_table(overlay)] == ["1"] * 6


def test_groups_end_at_different_steps_and_without_continual_metrics(tmp_path):
    dirs = [make_run(tmp_path, "a-s0", interventions="redo", seed=0, n=30),
            make_run(tmp_path, "a-s1", interventions="redo", seed=1, n=25, offset=1.0)]
    page = render_report(dirs, out=tmp_path / "cmp")
    (row,) = groups_table(page)
    assert row == {"group": "redo", "runs": "2", "seeds": "0, 1", "env steps": "25,000–30,000",
                   "final return (100)": "37.00 ± 2.00"}  # {39, 10 + 24 + 1}: the last value of each run


def test_repeated_seeds_and_unreadable_continual_json_warn(tmp_path):
    a = make_run(tmp_path, "a", interventions="", seed=3)
    b = make_run(tmp_path, "b", interventions="", seed=3)
    (b / "continual.json").write_text("{oops")
    warnings = []
    page = render_report([a, b], on_warning=warnings.append)
    assert any("group baseline: several runs have seed 3" in w for w in warnings)
    assert any("b/continual.json: unreadable" in w for w in warnings)
    assert "several runs have seed 3" in page.read_text()


def test_cli_group_by(tmp_path, capsys):
    dirs = [str(make_run(tmp_path, f"r{s}", interventions="", seed=s)) for s in (0, 1)]
    assert main([*dirs, "--out", str(tmp_path / "cmp"), "--group-by", "interventions"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert groups_table(tmp_path / "cmp" / "index.html")[0]["runs"] == "2"
