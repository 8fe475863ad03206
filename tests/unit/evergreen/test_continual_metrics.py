"""Continual metrics on constructed curves and evaluations, with the values worked out by hand."""

from __future__ import annotations

import math

import pytest

from evergreen.continual import (
    auc,
    average_performance,
    forgetting,
    forward_transfer,
    normalize,
    plasticity,
    visit_aucs,
)
from evergreen.scenario import Visit

# Two tasks, two cycles of 100 env steps each: visits a, b, a, b.
VISITS = [Visit(0, 0, 0, 100), Visit(1, 1, 100, 200), Visit(2, 0, 200, 300), Visit(3, 1, 300, 400)]


def test_auc_is_the_mean_of_the_curve_over_the_interval():
    assert auc([0, 100], [0, 1], 0, 100) == pytest.approx(0.5)  # a ramp
    assert auc([0, 50, 100], [0, 1, 1], 0, 100) == pytest.approx(0.75)
    assert auc([50], [2.0], 0, 100) == pytest.approx(2.0)  # flat beyond the only point
    assert auc([0, 100], [0, 1], 50, 100) == pytest.approx(0.75)  # half the ramp
    assert math.isnan(auc([], [], 0, 10))
    with pytest.raises(ValueError, match="end 0 must exceed start 5"):
        auc([0], [1], 5, 0)
    with pytest.raises(ValueError, match="must be 1-d and equal in length"):
        auc([0, 1], [1], 0, 1)


def test_forgetting_and_average_performance_from_end_of_visit_evaluations():
    end = {0: {"a": 0.9, "b": 0.1}, 1: {"a": 0.5, "b": 0.8}, 2: {"a": 0.95, "b": 0.4}, 3: {"a": 0.6, "b": 0.9}}
    # a: last own visit 2 (0.95) - end of run (0.6) = 0.35; b's last own visit is the last one: 0
    assert forgetting(VISITS, end, ["a", "b"]) == pytest.approx({"a": 0.35, "b": 0.0})
    assert average_performance(end[3]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no evaluation at the end of the last visit"):
        forgetting(VISITS, {0: end[0]}, ["a", "b"])
    with pytest.raises(ValueError, match="no task scores"):
        average_performance({})


def test_plasticity_compares_each_later_visit_with_the_first_visit_of_its_task():
    curves = {0: ([0, 100, 200, 300], [0.0, 1.0, 0.0, 0.5]),   # task a learns half as fast the 2nd time
              1: ([100, 200, 300, 400], [0.0, 0.8, 0.0, 0.8])}  # task b as fast
    aucs = visit_aucs(VISITS, curves)
    assert aucs == pytest.approx({0: 0.5, 1: 0.4, 2: 0.25, 3: 0.4})
    assert plasticity(VISITS, aucs) == pytest.approx({2: 0.5, 3: 1.0})


def test_forward_transfer_and_normalization():
    assert normalize(-20.7, low=-20.7, high=14.6) == 0.0 and normalize(14.6, low=-20.7, high=14.6) == 1.0
    assert forward_transfer({"a": 0.6, "b": 0.2, "c": 0.5}, {"a": 0.2, "b": 0.6}) == pytest.approx(
        {"a": 0.5, "b": -1.0})  # (0.6-0.2)/0.8, (0.2-0.6)/0.4; c has no reference
    with pytest.raises(ValueError, match="expected < 1"):
        forward_transfer({"a": 1.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="must exceed low"):
        normalize(1.0, low=1.0, high=1.0)


def test_a_runs_evaluations_summarize_into_the_continual_metrics():
    from evergreen.continual import summarize_evaluations

    def entry(steps, reason, a, b):
        return {"env_steps": steps, "visit": 0, "reason": reason,
                "scores": {"a": {"mean": a}, "b": {"mean": b}}}

    entries = [entry(0, "periodic", 0.0, 0.0), entry(100, "end of visit 0", 1.0, 0.0),
               entry(200, "end of visit 1", 0.5, 0.8), entry(300, "end of visit 2", 0.75, 0.0),
               entry(400, "end of run", 0.25, 0.8)]
    summary = summarize_evaluations(entries, VISITS, ["a", "b"])
    assert summary["visits_reached"] == 4 and summary["env_steps"] == 400
    assert summary["average_performance"] == pytest.approx(0.525)
    assert summary["forgetting"] == pytest.approx({"a": 0.5, "b": 0.0})  # a: 0.75 at its end, 0.25 at the run's
    # a's curve: 0 -> 1 over visit 0 (AUC 0.5); 0.5 -> 0.75 over visit 2 (0.625); b: 0 -> 0.8 (0.4), 0 -> 0.8 (0.4)
    assert summary["visit_auc"] == pytest.approx({"0": 0.5, "1": 0.4, "2": 0.625, "3": 0.4})
    assert summary["plasticity"] == pytest.approx({"2": 1.25, "3": 1.0})
    with pytest.raises(ValueError, match="no evaluations"):
        summarize_evaluations([], VISITS, ["a", "b"])
