"""Scenarios: an ordered list of tasks, each run for a number of env steps, cycled a number of times.

A scenario is the ``scenario`` section of the run config. Each task is a JSON object::

    "scenario": {
      "steps_per_task": 20000,            # for tasks that do not set their own "steps"
      "cycles": 2,                        # the task list is run through twice
      "tasks": [
        {"name": "short-pole", "variation": {"params": {"length": 0.25}}},
        {"name": "long-pole",  "variation": {"params": {"length": 1.0}}, "steps": 30000},
        {"name": "permuted",   "variation": {"permute_observations": true, "seed": 7}}
      ]
    }

A task may also name another ``env`` (the run's ``env.id`` by default), as long as every task has the
same observation shape and action space, so that one network serves them all. With no tasks the run
is the single task it always was (task 0, the run's env, no switches).

The schedule is a pure function of the run's env-step count, so a switch happens at the same env
step on any machine and after any ``--resume``::

    scenario = Scenario.from_config(config)          # validated; names each bad field
    visit = scenario.visit_at(env_steps=45_000)      # Visit(index=2, task=0, start=40000, end=60000)
    scenario.tasks[visit.task].env_config           # what the actors step during that visit

A *visit* is one stay on one task (task 0 on the second cycle is another visit of task 0). The last
visit continues past its end when the run is longer than the scenario.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from actors.envs import EnvConfig, make_vector_env
from actors.tasks import EnvTask, TaskVariation

__all__ = ["Scenario", "ScenarioConfig", "Task", "Visit"]

_TASK_KEYS = ("name", "env", "steps", "variation")
#: What may happen to replay at a task switch (``scenario.replay_at_switch``).
REPLAY_AT_SWITCH = ("keep", "flush", "per_task")


@dataclass(frozen=True)
class ScenarioConfig:
    tasks: tuple[dict, ...] = ()
    """Tasks in order, each an object {"name", "env", "steps", "variation"} (only "variation" or "env" is
    needed); empty = one task, the run's env, no switches. "variation" is an actors.tasks.TaskVariation
    ({"params": {...}, "permute_observations": bool, "permute_actions": bool, "seed": int})."""
    steps_per_task: int = 0
    """Env steps of each task that does not set its own "steps"."""
    cycles: int = 1
    """How many times the task list is run through (a run longer than that stays on the last task)."""
    replay_at_switch: str = "keep"
    """What happens to replay at a switch: "keep" (the old tasks' transitions stay and are sampled),
    "flush" (every shard is emptied; the learner waits for min_size_to_sample rows of the new task) or
    "per_task" (one table per task on every shard, each 1/num_tasks of replay.capacity; actors write each
    row to its task's table, the learner samples the current task's table only; a task's table keeps
    its rows for its next visit)."""


@dataclass(frozen=True)
class Task:
    """One task of a scenario: a name, the env config the actors step, and its length in env steps."""

    index: int
    name: str
    env_config: EnvConfig
    steps: int
    variation: TaskVariation = field(default_factory=TaskVariation)


@dataclass(frozen=True)
class Visit:
    """One stay on one task: visit ``index`` (0, 1, ...) of task ``task`` over env steps [start, end)."""

    index: int
    task: int
    start: int
    end: int


class Scenario:
    """See the module docstring."""

    def __init__(self, tasks: list[Task], *, cycles: int = 1, replay_at_switch: str = "keep"):
        if not tasks:
            raise ValueError("a scenario needs at least one task")
        self.tasks = tuple(tasks)
        self.cycles = int(cycles)
        visits, start = [], 0
        for _ in range(self.cycles):
            for task in self.tasks:
                visits.append(Visit(index=len(visits), task=task.index, start=start, end=start + task.steps))
                start += task.steps
        self.visits = tuple(visits)
        self.replay_at_switch = replay_at_switch

    @property
    def total_steps(self) -> int:
        """Env steps of the whole scenario (every cycle)."""
        return self.visits[-1].end

    @property
    def switches(self) -> bool:
        """Whether the task ever changes."""
        return len(self.visits) > 1

    def visit_at(self, env_steps: int) -> Visit:
        """The visit that env step ``env_steps`` belongs to (the last one past the scenario's end)."""
        for visit in self.visits:
            if env_steps < visit.end:
                return visit
        return self.visits[-1]

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def env_tasks(self) -> list[EnvTask]:
        """What an actor or an evaluation process needs to step each task, in task order."""
        return [EnvTask(name=t.name, env_config=t.env_config, variation=t.variation) for t in self.tasks]

    @classmethod
    def from_config(cls, config: Any) -> Scenario:
        """The scenario of a run config (``config.scenario``, ``config.env``); ValueError naming the bad field."""
        sc: ScenarioConfig = config.scenario
        if sc.replay_at_switch not in REPLAY_AT_SWITCH:
            raise ValueError(f"scenario.replay_at_switch = {sc.replay_at_switch!r} is invalid: expected one of "
                             f"{list(REPLAY_AT_SWITCH)}")
        if isinstance(sc.cycles, bool) or not isinstance(sc.cycles, int) or sc.cycles < 1:
            raise ValueError(f"scenario.cycles = {sc.cycles!r} is invalid: expected an integer >= 1")
        if isinstance(sc.steps_per_task, bool) or not isinstance(sc.steps_per_task, int) or sc.steps_per_task < 0:
            raise ValueError(f"scenario.steps_per_task = {sc.steps_per_task!r} is invalid: expected an integer >= 0")
        if not sc.tasks:
            name = config.env.id
            return cls([Task(index=0, name=name, env_config=config.env, steps=config.learner.total_env_steps)],
                       replay_at_switch=sc.replay_at_switch)
        tasks = [_task(i, raw, config) for i, raw in enumerate(sc.tasks)]
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario.tasks: task names must differ, got {names}")
        return cls(tasks, cycles=sc.cycles, replay_at_switch=sc.replay_at_switch)

    def check_compatible(self) -> None:
        """ValueError unless every task has the first task's observation shape/dtype and action space.

        Builds one throwaway env per task with its variation (what ``evergreen train`` does before it
        starts anything), so a scenario that one network cannot serve, or a parameter its env does
        not have, fails before the run starts.
        """
        first = None
        for task in self.tasks:
            try:
                env = make_vector_env(task.env_config.replace(num_envs=1), variation=task.variation)
            except ValueError as exc:
                raise ValueError(f"scenario.tasks[{task.index}] ({task.name!r}): {exc}") from exc
            spec = env.spec
            env.close()
            if first is None:
                first = (task, spec)
                continue
            if spec != first[1]:
                raise ValueError(
                    f"scenario.tasks[{task.index}] ({task.name!r}): observations {spec.observation_shape} "
                    f"{spec.observation_dtype}, actions {spec.actions}; task 0 ({first[0].name!r}) has "
                    f"{first[1].observation_shape} {first[1].observation_dtype}, {first[1].actions}: every task "
                    "must have the same observation shape and action space (for Atari use env.full_action_space)")


def _task(index: int, raw: Any, config: Any) -> Task:
    where = f"scenario.tasks[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} = {raw!r} is invalid: expected an object with keys from {list(_TASK_KEYS)}")
    unknown = sorted(set(raw) - set(_TASK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {list(_TASK_KEYS)}")
    steps = raw.get("steps", config.scenario.steps_per_task)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}.steps = {steps!r} is invalid: expected an integer >= 1 "
                         "(or set scenario.steps_per_task)")
    env_id = raw.get("env", config.env.id)
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"{where}.env = {env_id!r} is invalid: expected an environment id")
    env_config = dataclasses.replace(config.env, id=env_id)
    try:
        env_config.validate()
        variation = TaskVariation.from_dict(raw.get("variation", {}), default_seed=index)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    name = raw.get("name", f"{env_id}#{index}" if raw.get("variation") else env_id)
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError(f"{where}.name = {name!r} is invalid: expected a string of 1-64 characters")
    return Task(index=index, name=name, env_config=env_config, steps=steps, variation=variation)
