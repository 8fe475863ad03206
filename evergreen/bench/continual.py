"""A continual scenario run in lockstep, in one process: the benchmark harness of ``benchmarks/continual_control.py``.

The parts are the system's own: the agent builder's actor policy, adder and algorithm (interventions
and diagnostics included), a real replay :class:`replay.table.Table` behind
:class:`replay.local.LocalReplayClient`, the learner's :class:`learner.dataset.ReplayDataset` and
:class:`learner.loop.LearnerLoop`, the run's :class:`evergreen.scenario.Scenario`, the evaluation
protocol (:func:`evergreen.evaluation.evaluate_policy`) and the continual metrics
(:func:`evergreen.continual.summarize_evaluations`). What is left out is the distribution: no Ray, no
gRPC, no threads. The actor steps ``weight_poll_steps`` vector steps, then the learner makes exactly
the updates the rate ``samples_per_insert / batch_size`` allows for the env steps so far, and so on.
Learning is then a function of the config and the seed only, never of the machine's speed, and a run
costs what its updates and env steps cost, which is what lets a 15-run comparison fit in minutes.

    config = load_config(preset="cartpole-shifts", overrides={...}).validate()
    result = run_lockstep(config, eval_every=2_000, eval_episodes=5)
    result["continual"]["average_performance"], result["continual"]["forgetting"]
    result["curve"][-1]       # {"env_steps", "updates", "task", "visit", "return", "diag/dormant_ratio", ...}

Task switches happen as in ``evergreen train``: at the first actor chunk past the visit's end the
tasks are evaluated with the weights before the switch (``"end of visit V"``), then
``Algorithm.task_switch`` runs the interventions' hooks, replay is kept or flushed as
``scenario.replay_at_switch`` says, and the actor moves to the new task at its next weight poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["run_lockstep"]


class _Weights:
    """The actor's weights source: the learner's newest published weights, and the scenario's task."""

    def __init__(self):
        self.version, self.state, self.task = -1, None, 0

    def publish(self, version: int, weights: dict[str, torch.Tensor], network: torch.nn.Module) -> None:
        # In one process the actor may share the tensors: nothing writes them until the next publish,
        # and the learner's acting_weights() are fresh CPU copies.
        self.version, self.state = version, weights

    def latest_version(self) -> int:
        return self.version

    def get(self, version: int) -> dict[str, torch.Tensor] | None:
        return self.state

    def current_task(self) -> int:
        return self.task


class _SyncBatches:
    """The learner loop's prefetcher surface, sampling in the caller's thread (nothing runs ahead)."""

    def __init__(self, dataset: Any):
        self.dataset, self._queue, self.wait_seconds = dataset, [], 0.0

    def get(self, *, timeout: float | None = None) -> Any:
        if not self._queue:
            self._queue = self.dataset.sample(timeout=0) or []
        return self._queue.pop(0) if self._queue else None

    def stop(self) -> None:
        self._queue = []


def _evaluate(builder: Any, algorithm: Any, tasks: list[Any], indices: list[int], *, episodes: int,
              epsilon: float, seed: int) -> dict[str, dict[str, float]]:
    from evergreen.evaluation import evaluate_policy

    network = builder.acting_network()
    network.load_state_dict(algorithm.acting_weights())
    policy = builder.make_eval_policy(network, epsilon=epsilon)
    scores = {}
    for index in indices:
        score = evaluate_policy(policy, tasks[index], episodes=episodes, seed=seed + 1_000 * index)
        scores[score.task] = {"mean": score.mean, "std": score.std, "episodes": score.episodes}
    return scores


def run_lockstep(config: Any, *, eval_every: int = 0, eval_episodes: int = 5, log_every: int = 1_000,
                 progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run ``config`` (a validated ``RunConfig`` with a scenario) to ``learner.total_env_steps``.

    Evaluates the current task every ``eval_every`` env steps (0 = only at the end of each visit and of
    the run, where every task is evaluated), with ``eval_episodes`` episodes per task. Returns a
    JSON-able dict: ``curve`` (one point per ``log_every`` env steps: training return, loss,
    diagnostics), ``evaluations`` (entries as in ``evaluations.jsonl``), ``continual`` (the summary of
    :func:`evergreen.continual.summarize_evaluations`), ``switch_metrics`` and timings.
    """
    from actors.actor import Actor
    from actors.envs import env_spec
    from evergreen.agents import make_builder
    from evergreen.continual import summarize_evaluations
    from evergreen.scenario import Scenario
    from evergreen.train import table_config
    from learner.dataset import ReplayDataset
    from learner.loop import LearnerLoop
    from replay.errors import DeadlineExceeded
    from replay.local import LocalReplayClient
    from replay.table import Table

    for name, value in (("eval_every", eval_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (name == "log_every" and value < 1):
            raise ValueError(f"{name} = {value!r} is invalid: expected an integer >= {int(name == 'log_every')}")
    say = progress or (lambda _line: None)
    torch.set_num_threads(1)
    started = time.perf_counter()
    scenario = Scenario.from_config(config)
    scenario.check_compatible()
    tasks = scenario.env_tasks()
    spec = env_spec(config.env)
    builder = make_builder(config, spec)
    table = Table(table_config(config, fields=builder.replay_fields(), obs_shape=spec.observation_shape,
                               obs_dtype=spec.observation_dtype, bounds=builder.replay_bounds(),
                               num_tasks=len(scenario.tasks)))
    replay = LocalReplayClient(table)
    algorithm = builder.make_algorithm(torch.device("cpu"))
    lrn, act = config.learner, config.actors
    dataset = ReplayDataset(replay, batch_size=lrn.batch_size, prioritized=config.replay.sampler == "prioritized",
                            beta_start=config.replay.importance_beta_start, total_env_steps=lrn.total_env_steps,
                            batches_per_sample=lrn.batches_per_sample, seed=config.seed)
    weights = _Weights()
    loop = LearnerLoop(algorithm=algorithm, prefetcher=_SyncBatches(dataset),
                       update_priorities=replay.update_priorities if dataset.prioritized else None,
                       publish=weights.publish, publish_every=lrn.publish_every)
    loop.publish()
    actor = Actor(env_config=config.env, policy=builder.make_policy(actor_index=0, env_steps_offset=0),
                  adder=builder.make_adder(), insert=replay.insert, weights_source=weights,
                  insert_batch_size=act.insert_batch_size, weights_poll_interval=act.weight_poll_steps,
                  seed=config.seed, async_inserts=False, tasks=tasks, task=0)
    # Updates per env step: the rate the replay limiter holds a system run to.
    rate = (config.replay.samples_per_insert or 0.0) / lrn.batch_size
    if rate <= 0:
        raise ValueError("run_lockstep paces updates by replay.samples_per_insert; it must be > 0")
    p = config.plasticity
    ev = config.evaluation
    env_steps, visit = 0, scenario.visits[0]
    probe_ready, probe = not p.diagnostics, None
    curve: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    switch_metrics: list[dict[str, Any]] = []
    window_returns: list[float] = []
    window_metrics: dict[str, list[float]] = {}
    next_log, next_eval = log_every, eval_every or None
    rows_at_log: dict[int, int] = {}
    eval_seconds = 0.0

    def evaluate(reason: str, indices: list[int]) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        scores = _evaluate(builder, algorithm, tasks, indices, episodes=eval_episodes, epsilon=ev.epsilon,
                           seed=config.seed * 7_919 + 1_000_000)
        eval_seconds += time.perf_counter() - t0
        evaluations.append({"env_steps": env_steps, "visit": visit.index, "reason": reason,
                            "version": loop.counters.updates, "scores": scores})

    try:
        while env_steps < lrn.total_env_steps:
            now = scenario.visit_at(env_steps)
            if now.index != visit.index:
                if ev.at_switch:
                    evaluate(f"end of visit {visit.index}", list(range(len(tasks))))
                metrics = algorithm.task_switch(now.task)
                loop.publish()  # the actors act with the post-switch weights (a reset, a perturbation)
                flushed = replay.clear() if scenario.replay_at_switch == "flush" else 0
                switch_metrics.append({"env_steps": env_steps, "visit": now.index, "task": now.task,
                                       "flushed_rows": flushed, **{k: float(v) for k, v in metrics.items()}})
                weights.task, visit = now.task, now
                say(f"  env steps {env_steps:>7}: visit {now.index}, task {tasks[now.task].name!r}")
            stats = actor.run(act.weight_poll_steps)
            env_steps += stats.env_steps
            for values in stats.episode_returns.values():
                window_returns.extend(values.tolist())
            if not probe_ready and table.info().size >= p.probe_size:
                try:  # the held-out probe batch of the diagnostics, once replay can give it
                    probe = torch.from_numpy(replay.sample(p.probe_size, timeout=0).columns["obs"])
                except DeadlineExceeded:
                    probe = None
            if not probe_ready and probe is not None:
                if callable(getattr(algorithm, "set_probe", None)):  # interventions that need data (ReDo)
                    algorithm.set_probe(probe)
                loop.diagnostics = dict(builder.make_diagnostics(algorithm, probe))
                probe_ready = True
            dataset.progress(env_steps=env_steps)
            while loop.counters.updates < int(rate * env_steps):
                try:
                    metrics = loop.step(timeout=0)
                except DeadlineExceeded:
                    metrics = None
                if metrics is None:  # replay below min_size_to_sample (the start, or just after a flush)
                    break
                for key, value in metrics.items():
                    window_metrics.setdefault(key, []).append(float(value))
            if env_steps >= next_log:
                point: dict[str, Any] = {"env_steps": env_steps, "updates": loop.counters.updates,
                                         "task": visit.task, "visit": visit.index,
                                         "return": float(np.mean(window_returns)) if window_returns else None,
                                         "episodes": len(window_returns)}
                rows = {t: n - rows_at_log.get(t, 0) for t, n in loop.counters.task_rows.items()}
                trained = sum(rows.values())
                # Of the rows trained on since the last point, the share collected on the current task.
                point["current_task_fraction"] = rows.get(visit.task, 0) / trained if trained else None
                rows_at_log = dict(loop.counters.task_rows)
                point.update({k: float(np.mean(v)) for k, v in window_metrics.items() if not k.startswith("diag/")})
                point.update(loop.last_diagnostics)
                curve.append(point)
                window_returns, window_metrics = [], {}
                next_log += log_every
            if next_eval is not None and env_steps >= next_eval:
                evaluate("periodic", [visit.task])
                next_eval += eval_every
        if ev.at_switch or eval_every:
            evaluate("end of run", list(range(len(tasks))))
    finally:
        actor.close()
        loop.close()
        table.close()
    wall = time.perf_counter() - started
    summary = summarize_evaluations(evaluations, scenario.visits, scenario.task_names()) if evaluations else {}
    say(f"  done: {env_steps} env steps, {loop.counters.updates} updates in {wall:.0f} s "
        f"({eval_seconds:.0f} s evaluating)")
    return {"env_steps": env_steps, "updates": loop.counters.updates, "wall_s": wall, "eval_s": eval_seconds,
            "tasks": scenario.task_names(),
            "visits": [{"index": v.index, "task": v.task, "start": v.start, "end": v.end} for v in scenario.visits],
            "curve": curve, "evaluations": evaluations, "switch_metrics": switch_metrics, "continual": summary}
