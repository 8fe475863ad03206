"""One replay table per scenario task, behind the calls a one-table client answers.

With ``scenario.replay_at_switch: "per_task"`` every shard holds one table per task of the scenario
(``replay.task0``, ``replay.task1``, ...). :class:`TaskTables` makes them look like one client:

* ``insert`` routes each row to its task's table by the row's ``task`` column (an insert batch that
  straddles a switch is split; each part keeps its writer's exactly-once sequence on its own table);
* ``sample`` draws from the table of the task the learner trains on now (``set_sampling_task``), and
  the batch names its table (``SampleBatch.table``), so that its priority updates go back there even
  when the learner switched tasks in between (``update_priorities(..., table=batch.table)``);
* ``tie_inserts_to(task)`` (the driver, at a switch) releases every other table's inserts from the
  samples-per-insert limit and ties the task's table to it again with a rebased band: an actor still
  on the old task must not wait for samples of a table nobody samples any more, and a table the
  learner returns to in a later cycle gives it no burst of samples for the rows inserted meanwhile
  (``RateLimiter.release_inserts``).

The split of the run's capacity: ``replay.capacity`` stays the memory budget, each task's table gets
an equal share of it (see ``evergreen.train.table_configs``).

Example (a driver and a learner; both hold a copy, which pickles by address like ReplayClient)::

    tables = TaskTables.connect(addresses, names=task_table_names("replay", 3), token=token)
    tables.tie_inserts_to(0)                                  # driver: only task 0's table is rate limited
    tables.insert(columns, writer_key="actor-0")              # rows go to replay.task<columns["task"]>
    batch = tables.sample(128, beta=0.4, timeout=1.0)         # from replay.task0
    tables.set_sampling_task(1); tables.tie_inserts_to(1)     # a switch: learner side, driver side
    tables.update_priorities(batch.keys, priorities, table=batch.table)   # still to replay.task0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from replay.client import PRIORITY_TIMEOUT_S, ReplayClient, SampleBatch

__all__ = ["TaskTables", "task_table_names"]


def task_table_names(base: str, num_tasks: int) -> list[str]:
    """The table names of ``num_tasks`` per-task tables: ``<base>.task0``, ``<base>.task1``, ..."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r}: expected an int >= 1")
    return [f"{base}.task{i}" for i in range(num_tasks)]


class TaskTables:
    """See the module docstring. ``clients[i]`` is the client of task ``i``'s table."""

    def __init__(self, clients: Sequence[Any], *, sampling_task: int = 0):
        if not clients:
            raise ValueError("TaskTables needs one client per task; got none")
        self.clients = list(clients)
        self._by_table = {c.table: c for c in self.clients}
        if len(self._by_table) != len(self.clients):
            raise ValueError(f"two tasks share a table: {[c.table for c in self.clients]}")
        self.sampling_task = 0
        self.set_sampling_task(sampling_task)

    @classmethod
    def connect(cls, addresses: Sequence[str], *, names: Sequence[str], **client_kwargs: Any) -> TaskTables:
        """One :class:`ReplayClient` per table name (keyword arguments as ReplayClient's)."""
        return cls([ReplayClient(addresses, table=name, **client_kwargs) for name in names])

    @property
    def num_tasks(self) -> int:
        return len(self.clients)

    @property
    def table(self) -> str:
        """The table sampled now (what a one-table client's ``table`` attribute says)."""
        return self.clients[self.sampling_task].table

    def _check_task(self, task: int) -> int:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task!r} is not a task of these per-task tables; expected an int in "
                             f"[0, {self.num_tasks - 1}]")
        return int(task)

    # -- the learner's side ----------------------------------------------------------------------
    def set_sampling_task(self, task: int) -> None:
        """Sample from ``task``'s table from the next call on (no RPC: each holder of a copy sets its own)."""
        self.sampling_task = self._check_task(task)

    def sample(self, batch_size: int, *, beta: float = 0.4, timeout: float | None = None) -> SampleBatch:
        return self.clients[self.sampling_task].sample(batch_size, beta=beta, timeout=timeout)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray, *, table: str | None = None,
                          timeout: float | None = PRIORITY_TIMEOUT_S) -> int:
        """Priority updates for a batch of ``table`` (its ``SampleBatch.table``; None = the sampled table now)."""
        client = self.clients[self.sampling_task] if table is None else self._by_table.get(table)
        if client is None:
            raise ValueError(f"table {table!r} is not one of these per-task tables {sorted(self._by_table)}")
        return client.update_priorities(keys, priorities, timeout=timeout)

    # -- the actors' side --------------------------------------------------------------------------
    def insert(self, columns: Mapping[str, np.ndarray], *, writer_key: str, priorities: np.ndarray | None = None,
               timeout: float | None = None) -> np.ndarray:
        """Insert each row into its task's table; the keys come back in row order."""
        if "task" not in columns:
            raise ValueError(f"per-task tables route rows by their 'task' column; the insert has only "
                             f"{sorted(columns)}")
        tasks = np.asarray(columns["task"])
        if tasks.ndim != 1 or not np.issubdtype(tasks.dtype, np.integer):
            raise ValueError(f"the 'task' column must be a 1-D integer array, got {tasks.dtype} {tasks.shape}")
        if tasks.size == 0:
            raise ValueError("an insert of 0 rows; expected at least one")
        lo, hi = int(tasks.min()), int(tasks.max())
        if lo < 0 or hi >= self.num_tasks:
            raise ValueError(f"task ids {lo}..{hi} in the insert; these per-task tables hold tasks 0.."
                             f"{self.num_tasks - 1}")
        if lo == hi:  # the usual case: a whole batch of one task
            return self.clients[lo].insert(columns, writer_key=writer_key, priorities=priorities, timeout=timeout)
        keys = np.empty(tasks.size, dtype=np.uint64)
        for task in np.unique(tasks):   # a batch that straddles the actor's switch: one insert per table
            rows = tasks == task
            part = {name: np.ascontiguousarray(np.asarray(array)[rows]) for name, array in columns.items()}
            part_priorities = None if priorities is None else np.asarray(priorities)[rows]
            keys[rows] = self.clients[int(task)].insert(part, writer_key=writer_key, priorities=part_priorities,
                                                        timeout=timeout)
        return keys

    # -- the driver's side -------------------------------------------------------------------------
    def tie_inserts_to(self, task: int, *, timeout: float | None = None) -> None:
        """Only ``task``'s table keeps the samples-per-insert limit on its inserts (every shard).

        The new table is tied first: if a release fails halfway, no table was left both released and
        sampled, only an old table still limited (its actors wait until the call is repeated)."""
        task = self._check_task(task)
        self.clients[task].release_inserts(False, timeout=timeout)
        for other, client in enumerate(self.clients):
            if other != task:
                client.release_inserts(True, timeout=timeout)

    def info(self, *, timeout: float | None = None) -> list[Any]:
        """Every table's ``TableInfo`` on every shard (sizes and counts add up to the run's replay)."""
        return [info for client in self.clients for info in client.info(timeout=timeout)]

    def config(self, *, timeout: float | None = None) -> Any:
        return self.clients[self.sampling_task].config(timeout=timeout)

    def checkpoint(self, *, timeout: float | None = None) -> list[str]:
        """Checkpoint every shard (a shard's checkpoint holds all of its tables)."""
        return self.clients[0].checkpoint(timeout=timeout)

    def rebase_rate_limiter(self, *, timeout: float | None = None) -> list[str]:
        return [line for client in self.clients for line in client.rebase_rate_limiter(timeout=timeout)]

    def clear(self, *, timeout: float | None = None) -> int:
        return sum(client.clear(timeout=timeout) for client in self.clients)

    @property
    def lost_rows(self) -> int:
        """Rows a shard acknowledged and later lost, over every table (see ``ReplayClient.lost_rows``)."""
        return sum(c.lost_rows for c in self.clients)

    @property
    def duplicate_inserts(self) -> int:
        return sum(c.duplicate_inserts for c in self.clients)

    @property
    def priority_update_counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for c in self.clients:
            for key, value in c.priority_update_counts.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.clients[0].addresses

    @property
    def num_shards(self) -> int:
        return self.clients[0].num_shards

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __repr__(self) -> str:
        return f"TaskTables({[c.table for c in self.clients]!r}, sampling {self.table!r})"
