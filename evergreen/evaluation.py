"""Evaluating a policy on the tasks of a run: the protocol, human-normalized Atari scores, `evergreen eval`.

The protocol (Machado et al. 2018 for Atari): an almost greedy policy (epsilon 0.001), sticky actions
0.25, episodes capped at 108,000 emulator frames, no episode end at a life loss; for every env K
episodes, each from its own seeded environment (the first episode of each of K envs, so short
episodes are not over-represented as they would be by taking the first K to finish). Evaluation
never writes to replay.

    evergreen eval runs/cartpole-shifts-20261202-150000                # newest checkpoint, every task
    evergreen eval RUN --checkpoint 40000 --tasks nominal,permuted --episodes 20

    results = evaluate_run(run_dir, episodes=10)      # [TaskScore(task, mean, std, episodes, normalized)]
    print(format_table(results))

Atari scores are also reported human-normalized, ``(score - random) / (human - random)``, with the
random and human reference scores in :data:`ATARI_REFERENCE_SCORES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ATARI_REFERENCE_SCORES", "TaskScore", "evaluate_policy", "evaluate_run", "format_table",
           "human_normalized", "main"]

#: (random, human) scores per ALE game (noop starts). Source: the reference table of Mnih et al. 2015
#: (Nature, "Human-level control through deep reinforcement learning"), extended to 57 games and used
#: unchanged by the Atari-57 literature since (e.g. DeepMind's DQN Zoo and the rliable library).
#: Games whose published values disagree between sources (Video Pinball's random score) are left out.
ATARI_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "alien": (227.8, 7127.7),
    "amidar": (5.8, 1719.5),
    "assault": (222.4, 742.0),
    "asterix": (210.0, 8503.3),
    "asteroids": (719.1, 47388.7),
    "atlantis": (12850.0, 29028.1),
    "bank_heist": (14.2, 753.1),
    "battle_zone": (2360.0, 37187.5),
    "beam_rider": (363.9, 16926.5),
    "bowling": (23.1, 160.7),
    "boxing": (0.1, 12.1),
    "breakout": (1.7, 30.5),
    "centipede": (2090.9, 12017.0),
    "chopper_command": (811.0, 7387.8),
    "crazy_climber": (10780.5, 35829.4),
    "demon_attack": (152.1, 1971.0),
    "double_dunk": (-18.6, -16.4),
    "enduro": (0.0, 860.5),
    "fishing_derby": (-91.7, -38.7),
    "freeway": (0.0, 29.6),
    "frostbite": (65.2, 4334.7),
    "gopher": (257.6, 2412.5),
    "gravitar": (173.0, 3351.4),
    "hero": (1027.0, 30826.4),
    "ice_hockey": (-11.2, 0.9),
    "jamesbond": (29.0, 302.8),
    "kangaroo": (52.0, 3035.0),
    "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3),
    "montezuma_revenge": (0.0, 4753.3),
    "ms_pacman": (307.3, 6951.6),
    "name_this_game": (2292.3, 8049.0),
    "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3),
    "qbert": (163.9, 13455.0),
    "riverraid": (1338.5, 17118.0),
    "road_runner": (11.5, 7845.0),
    "robotank": (2.2, 11.9),
    "seaquest": (68.4, 42054.7),
    "space_invaders": (148.0, 1668.7),
    "star_gunner": (664.0, 10250.0),
    "tennis": (-23.8, -8.3),
    "time_pilot": (3568.0, 5229.2),
    "tutankham": (11.4, 167.6),
    "up_n_down": (533.4, 11693.2),
    "venture": (0.0, 1187.5),
    "wizard_of_wor": (563.5, 4756.5),
    "zaxxon": (32.5, 9173.3),
}

#: The protocol's exploration rate and Atari settings.
EVAL_EPSILON = 0.001
EVAL_STICKY_ACTIONS = 0.25
EVAL_MAX_EPISODE_FRAMES = 108_000


def human_normalized(env_id: str, score: float) -> float | None:
    """``(score - random) / (human - random)`` for an Atari game in the table, else None."""
    from actors.envs import atari_game_name, is_atari_id

    if not is_atari_id(env_id):
        return None
    reference = ATARI_REFERENCE_SCORES.get(atari_game_name(env_id))
    if reference is None:
        return None
    random, human = reference
    return (score - random) / (human - random)


@dataclass(frozen=True)
class TaskScore:
    """The evaluation of one task: mean and standard deviation of the episode returns."""

    task: str
    env_id: str
    mean: float
    std: float
    episodes: int
    normalized: float | None = None
    """Human-normalized mean (Atari games in the reference table), else None."""


def evaluation_env_config(env_config: Any, *, episodes: int, seed: int) -> Any:
    """The protocol's env settings: ``episodes`` envs; for Atari sticky actions, the frame cap, no life loss."""
    changes: dict[str, Any] = {"num_envs": episodes, "seed": seed}
    if env_config.is_atari:
        changes.update(sticky_actions=EVAL_STICKY_ACTIONS, max_episode_frames=EVAL_MAX_EPISODE_FRAMES,
                       episodic_life=False)
    return dataclasses.replace(env_config, **changes)


def evaluate_policy(policy: Any, task: Any, *, episodes: int = 10, seed: int = 1_000_000,
                    max_steps: int = 1_000_000) -> TaskScore:
    """Returns of the first episode of each of ``episodes`` envs of ``task`` (an ``actors.tasks.EnvTask``).

    ``policy`` is an ``actors.policy.Policy`` (its ``act`` is called with ``env_steps=0``); ``max_steps``
    bounds the vector steps (an episode that never ends is an error, not a hang).
    """
    from actors.envs import make_vector_env

    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    config = evaluation_env_config(task.env_config, episodes=episodes, seed=seed)
    env = make_vector_env(config, variation=task.variation, task_name=task.name)
    returns = np.full(episodes, np.nan)
    try:
        obs = env.reset()
        for _ in range(max_steps):
            decision = policy.act(obs, env_steps=0)
            obs, _, terminated, truncated, info = env.step(decision.actions)
            ended = np.flatnonzero((terminated | truncated) & ~info["autoreset"])
            finished, _ = env.pop_episode_stats()  # in the order of the envs that ended on this step
            for env_index, value in zip(ended.tolist(), finished.tolist(), strict=True):
                if np.isnan(returns[env_index]):
                    returns[env_index] = value
            if not np.isnan(returns).any():
                break
        else:
            raise RuntimeError(f"task {task.name!r}: {int(np.isnan(returns).sum())} of {episodes} evaluation "
                               f"episodes did not end within {max_steps} steps")
    finally:
        env.close()
    mean = float(returns.mean())
    return TaskScore(task=task.name, env_id=config.id, mean=mean, std=float(returns.std()), episodes=episodes,
                     normalized=human_normalized(config.id, mean))


def evaluate_run(run_dir: str | Path, *, checkpoint: int | None = None, tasks: list[str] | None = None,
                 episodes: int = 10, epsilon: float = EVAL_EPSILON) -> list[TaskScore]:
    """Evaluate a run's checkpoint (the newest, or the one written at update ``checkpoint``) on its tasks."""
    import torch

    from actors.envs import env_spec
    from evergreen.agents import make_builder
    from evergreen.config import read_config
    from evergreen.scenario import Scenario
    from learner.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.json)")
    config = read_config(config_path)
    directory = Path(config.learner.checkpoint_dir) if config.learner.checkpoint_dir else run_dir / "checkpoints"
    files = list_checkpoints(directory)
    if not files:
        raise ValueError(f"{run_dir}: no learner checkpoint in {directory}")
    if checkpoint is None:
        path = files[-1]
    else:
        by_step = {int(p.stem.split("-")[-1]): p for p in files}
        if checkpoint not in by_step:
            raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint in {directory}; "
                             f"there are {sorted(by_step)}")
        path = by_step[checkpoint]
    scenario = Scenario.from_config(config)
    chosen = list(enumerate(scenario.env_tasks()))
    if tasks:
        names = scenario.task_names()
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"--tasks: unknown task(s) {unknown}; this run's tasks are {names}")
        chosen = [(i, t) for i, t in chosen if t.name in tasks]
    builder = make_builder(config, env_spec(config.env))
    algorithm = builder.make_algorithm(torch.device("cpu"))
    algorithm.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["algorithm"])
    policy = builder.make_eval_policy(algorithm.acting_network(), epsilon=epsilon)
    print(f"evergreen eval: {path} ({len(chosen)} task(s) x {episodes} episodes, epsilon {epsilon:g})", flush=True)
    return [evaluate_policy(policy, task, episodes=episodes, seed=1_000_000 + 1_000 * index) for index, task in chosen]


def evaluate_weights(builder: Any, weights: Any, tasks: list[Any], *, episodes: int, epsilon: float,
                     seed: int) -> list[dict[str, Any]]:
    """Evaluate acting ``weights`` (a state dict, or a whole network) on ``tasks`` (``actors.tasks.EnvTask``).

    What a run's evaluation process does (a Ray task in ``evergreen train``): it builds the agent's
    acting network, loads the weights, and runs the protocol on every task; returns one dict per task
    (the :class:`TaskScore` fields).
    """
    import torch

    torch.set_num_threads(1)
    policy = builder.make_eval_policy(builder.acting_network(), epsilon=epsilon)
    policy.load_weights(weights)
    return [dataclasses.asdict(evaluate_policy(policy, task, episodes=episodes, seed=seed + 1_000 * index))
            for index, task in enumerate(tasks)]


class RunEvaluations:
    """Driver side of evaluation during a run: evaluation Ray tasks on the published weights, their
    results appended to ``<run dir>/evaluations.jsonl`` as they finish.

    ``submit(reason, env_steps=..., visit=...)`` takes the weight store's newest weights at that moment
    (so an evaluation "at the end of a visit" sees the weights before the switch's interventions) and
    starts one evaluation process; ``poll()`` writes what finished; ``finish()`` waits for the rest. One
    line per evaluation: ``{"env_steps", "visit", "reason", "version", "scores": {task: TaskScore fields}}``.
    """

    def __init__(self, *, builder: Any, tasks: list[Any], store: Any, run_dir: Path, episodes: int,
                 epsilon: float, seed: int, options: dict[str, Any], on_result: Any = None):
        import ray

        self._remote = ray.remote(_evaluate_remote).options(**options)
        self.builder, self.tasks, self.store = builder, tasks, store
        self.episodes, self.epsilon, self.seed = episodes, epsilon, seed
        self.path = Path(run_dir) / "evaluations.jsonl"
        self._pending: list[tuple[Any, dict[str, Any]]] = []
        self._on_result = on_result  # e.g. the telemetry exporter's update_evaluation(scores)
        self.last: dict[str, Any] | None = None

    def submit(self, reason: str, *, env_steps: int, visit: int) -> bool:
        """Start an evaluation of the newest weights; False before the first publish."""
        import ray

        version, holder = ray.get(self.store.latest.remote())
        if version < 0 or not holder:
            return False
        ref = self._remote.remote(self.builder, holder, self.tasks, episodes=self.episodes, epsilon=self.epsilon,
                                  seed=self.seed + env_steps)
        self._pending.append((ref, {"env_steps": int(env_steps), "visit": int(visit), "reason": reason,
                                    "version": int(version)}))
        return True

    def poll(self, *, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Write (and return) the evaluations that finished."""
        import json

        import ray

        done = []
        while self._pending:
            ref, meta = self._pending[0]
            ready, _ = ray.wait([ref], timeout=timeout)
            if not ready:
                break
            self._pending.pop(0)
            scores = ray.get(ref)
            entry = {**meta, "scores": {s["task"]: s for s in scores}}
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            summary = ", ".join(f"{s['task']} {s['mean']:.1f}" for s in scores)
            print(f"  evaluation at env step {meta['env_steps']:,} ({meta['reason']}): {summary}", flush=True)
            self.last = entry
            if self._on_result is not None:
                try:
                    self._on_result(entry["scores"])
                except ValueError as exc:  # a bad value must not stop a multi-day run
                    print(f"  evaluation telemetry: {exc}", flush=True)
            done.append(entry)
        return done

    def finish(self, *, timeout: float = 600.0) -> None:
        """Wait for every pending evaluation (each up to ``timeout`` seconds)."""
        while self._pending:
            if not self.poll(timeout=timeout):
                print(f"  evaluation: {len(self._pending)} still running after {timeout:g} s; not waited for",
                      flush=True)
                return


def _evaluate_remote(builder: Any, holder: list[Any], tasks: list[Any], *, episodes: int, epsilon: float,
                     seed: int) -> list[dict[str, Any]]:
    import ray

    from evergreen.weights import as_weights

    return evaluate_weights(builder, as_weights(ray.get(holder[0])), tasks, episodes=episodes, epsilon=epsilon,
                            seed=seed)


def format_table(scores: list[TaskScore]) -> str:
    lines = ["| task | env | episodes | mean return | std | human-normalized |", "|---|---|---:|---:|---:|---:|"]
    for s in scores:
        normalized = "" if s.normalized is None else f"{s.normalized:.3f}"
        lines.append(f"| {s.task} | {s.env_id} | {s.episodes} | {s.mean:.1f} | {s.std:.1f} | {normalized} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evergreen eval", description="Evaluate a run's checkpoint on its tasks.")
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", type=int, default=None, help="the checkpoint's update count (default newest)")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: every task)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    parser.add_argument("--epsilon", type=float, default=EVAL_EPSILON, help="exploration rate (default 0.001)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.epsilon <= 1.0:
        print(f"evergreen eval: --epsilon {args.epsilon}: expected a value in [0, 1]", file=sys.stderr)
        return 2
    try:
        scores = evaluate_run(args.run_dir, checkpoint=args.checkpoint, episodes=args.episodes,
                              tasks=[t for t in args.tasks.split(",") if t] or None, epsilon=args.epsilon)
    except ValueError as exc:
        print(f"evergreen eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(scores))
    return 0
