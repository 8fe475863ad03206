"""Per-task replay tables (``replay.task_tables.TaskTables``) over two real in-process gRPC shards:
rows routed by their task column, sampling from the current task only, priority updates back to the
table a batch came from, and an old task's actors never stuck behind a table nobody samples."""

from __future__ import annotations

import pickle
import threading
import zlib

import numpy as np
import pytest

from replay import errors
from replay.schema import Schema
from replay.server import ReplayServer
from replay.table import TableConfig
from replay.task_tables import TaskTables, task_table_names

SCHEMA = Schema.parse("obs:float32:2,task:int64")
NAMES = task_table_names("replay", 3)


def _writer_for(shard: int, n: int = 2) -> str:
    return next(f"writer-{i}" for i in range(1000) if zlib.crc32(f"writer-{i}".encode()) % n == shard)


def _rows(tasks: list[int], first: int = 0) -> dict[str, np.ndarray]:
    ids = np.arange(first, first + len(tasks), dtype=np.float32)
    return {"obs": np.stack([ids, ids], axis=1), "task": np.asarray(tasks, dtype=np.int64)}


@pytest.fixture
def shards():
    # A tight ratio band (8 samples per insert, 16 rows of slack): an unsampled table blocks inserts fast.
    configs = [TableConfig(name=name, schema=SCHEMA, capacity=256, sampler="prioritized", priority_exponent=1.0,
                           min_size_to_sample=2, samples_per_insert=8.0, error_buffer=16.0) for name in NAMES]
    servers = [ReplayServer(tables=configs, port=0, shard_index=i) for i in range(2)]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def tables(shards):
    t = TaskTables.connect([s.address for s in shards], names=NAMES, timeout=10.0, seed=0)
    yield t
    t.close()


def _sizes(shards) -> dict[str, int]:
    return {name: sum(s.tables[name].info().size for s in shards) for name in NAMES}


def test_rows_go_to_their_task_table_and_a_straddling_batch_is_split_in_row_order(tables, shards):
    keys = tables.insert(_rows([0, 0, 0]), writer_key=_writer_for(0))
    assert keys.tolist() == [0, 1, 2] and _sizes(shards) == {NAMES[0]: 3, NAMES[1]: 0, NAMES[2]: 0}
    keys = tables.insert(_rows([0, 2, 2, 0], first=10), writer_key=_writer_for(1))   # an actor's switch mid-batch
    shard1 = np.uint64(1 << 48)
    assert keys.tolist() == [shard1 + 0, shard1 + 0, shard1 + 1, shard1 + 1]          # each table's own keys
    assert _sizes(shards) == {NAMES[0]: 5, NAMES[1]: 0, NAMES[2]: 2}
    assert sorted(shards[1].tables[NAMES[2]].sample(2).columns["obs"][:, 0].tolist()) == [11.0, 12.0]
    assert sum(i.size for i in tables.info()) == 7        # the run's replay size adds every table


def test_bad_task_columns_are_refused_and_nothing_is_stored(tables, shards):
    for columns, message in ((_rows([0, 3]), "task ids 0..3"), (_rows([-1]), "task ids -1..-1"),
                             ({"obs": np.zeros((2, 2), np.float32)}, "route rows by their 'task' column"),
                             ({"obs": np.zeros((1, 2), np.float32), "task": np.array([0.5])}, "1-D integer")):
        with pytest.raises(ValueError, match=message):
            tables.insert(columns, writer_key="w")
    assert _sizes(shards) == dict.fromkeys(NAMES, 0)
    with pytest.raises(ValueError, match=r"task 3 is not a task .* \[0, 2\]"):
        tables.set_sampling_task(3)
    with pytest.raises(ValueError, match="not one of these per-task tables"):
        tables.update_priorities(np.zeros(1, np.uint64), np.ones(1), table="other")


def test_sampling_follows_the_task_and_priorities_return_to_the_batch_table(tables, shards):
    tables.tie_inserts_to(0)
    tables.insert(_rows([0] * 4), writer_key=_writer_for(0))
    tables.insert(_rows([1] * 4, first=100), writer_key=_writer_for(0))
    old = tables.sample(4, beta=1.0, timeout=5.0)
    assert old.table == NAMES[0] and set(old.columns["task"].tolist()) == {0}
    tables.set_sampling_task(1)                           # the learner switched; the old batch's update is late
    new = tables.sample(4, beta=1.0, timeout=5.0)
    assert new.table == NAMES[1] and set(new.columns["task"].tolist()) == {1}
    tables.update_priorities(old.keys, np.full(4, 50.0), table=old.table)
    # The same key numbers exist in both tables: only task 0's items changed (its mass grew, task 1's did not).
    mass = {name: shards[0].tables[name].info().priority_mass for name in NAMES[:2]}
    assert mass[NAMES[0]] > 4 * 10 and mass[NAMES[1]] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="sent to the client of table"):
        tables.clients[1].update_priorities(old.keys, np.ones(4), table=old.table)


def test_an_old_task_table_releases_its_waiting_inserts_and_a_returning_sampler_gets_no_burst(tables, shards):
    writer = _writer_for(0)
    tables.tie_inserts_to(0)
    tables.insert(_rows([0] * 4), writer_key=writer)      # fills to min size, then the band: 2 + 2 rows
    with pytest.raises(errors.DeadlineExceeded):
        tables.insert(_rows([0] * 2), writer_key=writer, timeout=0.2)   # nobody samples table 0
    done = threading.Event()

    def old_task_actor():                                 # blocked in the old table's limiter
        tables.insert(_rows([0] * 2, first=50), writer_key=writer, timeout=30.0)
        done.set()

    thread = threading.Thread(target=old_task_actor)
    thread.start()
    assert not done.wait(0.5)
    tables.tie_inserts_to(1)                              # the switch: table 0 is left, its actor goes on
    assert done.wait(10.0)
    thread.join()
    for start in range(100, 400, 20):                     # many more inserts, never held back
        tables.insert(_rows([0] * 20, first=start), writer_key=writer, timeout=0.0)
    tables.tie_inserts_to(0)                              # cycle 2: back on task 0, band rebased
    tables.set_sampling_task(0)
    tables.sample(2, timeout=0.0)                         # within the band's slack ...
    with pytest.raises(errors.DeadlineExceeded):
        tables.sample(32, timeout=0.0)                    # ... but no burst for the 300 rows inserted meanwhile
    with pytest.raises(errors.DeadlineExceeded):
        tables.insert(_rows([0] * 4), writer_key=writer, timeout=0.0)    # and inserts are tied again


def test_a_copy_pickles_by_address_and_keeps_its_own_sampling_task(tables, shards):
    tables.insert(_rows([2] * 3), writer_key="w")
    tables.set_sampling_task(2)
    copy = pickle.loads(pickle.dumps(tables))
    assert copy.sampling_task == 2 and copy.table == NAMES[2] and copy.clients[2] is copy._by_table[NAMES[2]]
    assert copy.sample(3, timeout=5.0).table == NAMES[2]
    copy.set_sampling_task(0)
    assert tables.sampling_task == 2
    copy.close()


def test_a_fifo_table_refuses_to_release_its_inserts(shards):
    config = TableConfig(name="queue", schema=SCHEMA, capacity=8, sampler="fifo")
    with ReplayServer(tables=[config], port=0) as server:
        client = TaskTables.connect([server.address], names=["queue"], timeout=5.0).clients[0]
        with pytest.raises(errors.ReplayError, match="fifo"):
            client.release_inserts(True)
        client.close()
