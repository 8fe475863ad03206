"""Continual-learning metrics from a run's evaluations and training curves (pure functions of arrays).

The inputs are what a continual run records: the scenario's visits (``evergreen.scenario.Visit``),
an evaluation of every task at the end of every visit, and curves of (env step, value) pairs.
Scores may be raw returns or normalized ones (``normalize``: 0 = a reference low such as a random
policy, 1 = a reference high such as the task's maximum); forward transfer and the plasticity ratio
are only meaningful on normalized scores.

    end = {visit.index: {task: score}}                      # evaluation at the end of each visit
    average_performance(end[last_visit])                    # mean over tasks at the end of the run
    forgetting(visits, end)                                 # per task: end of its last own visit - end of run
    auc(steps, values, start, end)                          # mean value of a curve over [start, end)
    visit_aucs(visits, curves)                              # {visit index: AUC of its own task's curve}
    plasticity(visits, aucs)                                # per visit: AUC / AUC of the task's first visit
    forward_transfer(aucs_of_first_visits, reference_aucs)  # (AUC - ref) / (1 - ref), per task

Definitions follow Continual World (Wolczyk et al. 2021): average performance is the mean score over
tasks after all training; forgetting of task i is its score at the end of its own training minus its
score at the end of everything (positive = forgotten); forward transfer of task i compares the area
under its learning curve with that of a single-task reference run. Plasticity (Lyle et al.;
Dohare et al.) is measured here as learning speed: the AUC of a task's k-th visit relative to its
first (below 1 = the network learns that task more slowly than it did the first time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["auc", "average_performance", "forgetting", "forward_transfer", "normalize", "plasticity",
           "summarize_evaluations", "visit_aucs"]


def normalize(value: float, *, low: float, high: float) -> float:
    """``(value - low) / (high - low)``: 0 at ``low`` (e.g. a random policy), 1 at ``high``."""
    if not high > low:
        raise ValueError(f"normalize: high {high!r} must exceed low {low!r}")
    return (float(value) - low) / (high - low)


def average_performance(scores: Mapping[str, float]) -> float:
    """Mean score over tasks (of the evaluation at the end of the run)."""
    if not scores:
        raise ValueError("average_performance: no task scores")
    return float(np.mean(list(scores.values())))


def forgetting(visits: Sequence[Any], end_scores: Mapping[int, Mapping[str, float]],
               task_names: Sequence[str]) -> dict[str, float]:
    """Per task: its score at the end of its last own visit minus its score at the end of the last visit.

    ``end_scores[v][name]`` is the evaluation of task ``name`` at the end of visit ``v``; tasks whose
    last own visit is the run's last visit have forgetting 0 by definition.
    """
    if not visits:
        raise ValueError("forgetting: no visits")
    last = visits[-1].index
    if last not in end_scores:
        raise ValueError(f"forgetting: no evaluation at the end of the last visit ({last})")
    out = {}
    for task, name in enumerate(task_names):
        own = [v.index for v in visits if v.task == task and v.index in end_scores]
        if not own:
            continue
        out[name] = float(end_scores[own[-1]][name] - end_scores[last][name])
    return out


def auc(steps: Sequence[float], values: Sequence[float], start: float, end: float) -> float:
    """Mean value of the curve through ``(steps, values)`` over ``[start, end)`` (trapezoids, the curve
    held flat before its first and after its last point); NaN when the curve has no point at all."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape or steps.ndim != 1:
        raise ValueError(f"auc: steps {steps.shape} and values {values.shape} must be 1-d and equal in length")
    if not end > start:
        raise ValueError(f"auc: end {end!r} must exceed start {start!r}")
    if steps.size == 0:
        return float("nan")
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    grid = np.concatenate([[start], steps[(steps > start) & (steps < end)], [end]])
    curve = np.interp(grid, steps, values)  # flat beyond the ends
    area = np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(grid))
    return float(area / (end - start))


def visit_aucs(visits: Sequence[Any], curves: Mapping[int, tuple[Sequence[float], Sequence[float]]]
               ) -> dict[int, float]:
    """AUC of each visit on its own task's curve (``curves[task] = (env steps, values)``, the task's whole
    curve: between two of its points the curve is interpolated, so a visit starts from where the task's
    last evaluation before it left off)."""
    out = {}
    for visit in visits:
        if visit.task in curves and len(curves[visit.task][0]):
            steps, values = curves[visit.task]
            out[visit.index] = auc(steps, values, visit.start, visit.end)
    return out


def plasticity(visits: Sequence[Any], aucs: Mapping[int, float]) -> dict[int, float]:
    """Per later visit of a task: its AUC divided by the AUC of the task's first visit (1 = as fast)."""
    first: dict[int, float] = {}
    out = {}
    for visit in visits:
        if visit.index not in aucs:
            continue
        if visit.task not in first:
            first[visit.task] = aucs[visit.index]
        elif first[visit.task] > 0:
            out[visit.index] = float(aucs[visit.index] / first[visit.task])
    return out


def forward_transfer(aucs: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Continual World's forward transfer per task: ``(AUC - AUC_ref) / (1 - AUC_ref)`` on normalized
    scores, for the tasks that have a reference (a single-task run from scratch)."""
    out = {}
    for name, value in aucs.items():
        if name in reference:
            ref = float(reference[name])
            if ref >= 1.0:
                raise ValueError(f"forward_transfer: reference AUC of {name!r} is {ref}; expected < 1 "
                                 "(normalized scores)")
            out[name] = float((value - ref) / (1.0 - ref))
    return out


def summarize_evaluations(entries: Sequence[Mapping[str, Any]], visits: Sequence[Any],
                          task_names: Sequence[str]) -> dict[str, Any]:
    """The continual metrics of a run from its evaluation entries (``evaluations.jsonl`` lines).

    Uses the evaluations made at the end of each visit (``reason`` "end of visit V") and at the end
    of the run (which ends the last visit reached) for average performance and forgetting, and every
    evaluation as the tasks' curves for the visits' AUCs and the plasticity ratios. Visits the run
    did not reach are left out; the last visit reached ends where the run ended.
    """
    if not entries:
        raise ValueError("summarize_evaluations: no evaluations")
    final = max(e["env_steps"] for e in entries)
    reached = [v for v in visits if v.start < final or v.index == 0]
    last = reached[-1].index
    end: dict[int, dict[str, float]] = {}
    for e in entries:
        reason = e["reason"]
        if reason.startswith("end of visit "):
            end[int(reason.rsplit(" ", 1)[1])] = {t: s["mean"] for t, s in e["scores"].items()}
        elif reason == "end of run":
            end[last] = {t: s["mean"] for t, s in e["scores"].items()}
    curves: dict[int, tuple[list[float], list[float]]] = {}
    for e in sorted(entries, key=lambda e: e["env_steps"]):
        for task, name in enumerate(task_names):
            if name in e["scores"]:
                steps, values = curves.setdefault(task, ([], []))
                steps.append(float(e["env_steps"]))
                values.append(float(e["scores"][name]["mean"]))
    cut = [dataclasses.replace(v, end=min(v.end, max(final, v.start + 1))) for v in reached]
    aucs = visit_aucs(cut, curves)
    out: dict[str, Any] = {"env_steps": final, "visits_reached": len(reached),
                           "visit_auc": {str(k): v for k, v in aucs.items()},
                           "plasticity": {str(k): v for k, v in plasticity(cut, aucs).items()}}
    if last in end:
        out["average_performance"] = average_performance(end[last])
        out["final_scores"] = end[last]
        out["forgetting"] = forgetting(cut, end, task_names)
    return out
