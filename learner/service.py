"""The learner side of a run, in one process: algorithm, replay dataset, update loop, checkpoints.

Plain Python (no Ray): ``learner.ray_learner.RayLearner`` runs it as a Ray actor with its own
resources (a GPU, a learner node), and tests run it in-process. Everything it needs arrives as
values or picklable callables, so the learner package knows nothing of the system around it:

* ``make_algorithm(device) -> Algorithm`` builds the algorithm (an agent builder's method);
* ``client`` is the replay client (samples, priority updates), used from the prefetch thread;
* ``publish(version, weights, network)`` hands weights to the actors (a weight-store publisher);
* ``make_diagnostics(algorithm, probe_obs) -> {network: Diagnostics}`` (optional) builds the
  plasticity diagnostics once a held-out probe batch could be sampled from replay.

The driver calls ``train(seconds=..., env_steps=...)`` repeatedly (keeping one call queued so the
learner never idles); each call runs updates for about ``seconds`` and returns a
:class:`TrainReport` of what happened in it. ``env_steps`` (the run's count, from the actors)
anneals the importance exponent and, when replay has no rate limiter, paces updates to
``updates_per_env_step`` (so learning stays a function of env steps, not of machine speed).

Data-parallel ranks (``world_size`` > 1): every rank is a ``LearnerService`` with the same
arguments plus its ``rank`` and the driver's ``rendezvous`` address; the driver calls each method
on every rank at once (``learner.ray_learner.LearnerGroup``). The ranks join one
:class:`learner.parallel.ReplicaGroup`, sample their own batches, agree before each update whether
it happens (so a rank with no batch, an invalid one or a passed deadline never leaves the others
waiting in the gradient all-reduce), and share rank 0's probe batch. Rank 0 alone publishes
weights, runs the diagnostics and writes checkpoints; every checkpoint first checks that the
replicas' states are identical (:class:`learner.parallel.ReplicasDiverged` if not). ``restore``
reads the checkpoint on rank 0 and hands it to the others.

Example::

    service = LearnerService(make_algorithm=builder.make_algorithm, client=client, batch_size=128,
                             prioritized=False, publish=publisher, checkpoint_dir=run_dir / "checkpoints")
    extra = service.restore()                          # None on a fresh run
    report = service.train(seconds=0.25, env_steps=12_000)
    service.checkpoint({"counters": {...}})            # algorithm state + extra, atomically
    service.close()
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.checkpoint import load_latest_checkpoint, save_checkpoint, state_digest
from learner.core import Algorithm, InvalidBatch
from learner.dataset import Batch, ReplayDataset
from learner.loop import LearnerLoop, Prefetcher
from learner.parallel import SINGLE, ReplicaGroup
from replay.client import ShardUnavailable
from replay.errors import DeadlineExceeded

__all__ = ["LearnerService", "TrainReport", "resolve_device"]


@dataclass
class TrainReport:
    """What one :meth:`LearnerService.train` call did."""

    updates: int
    """Updates so far (the run's total, resumes included)."""
    new_updates: int
    """Updates in this call."""
    metric_sums: dict[str, float] = field(default_factory=dict)
    """Sum over this call's updates of each metric (divide by ``metric_counts`` for the mean)."""
    metric_counts: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)
    """Diagnostics measured during this call (``diag/...``), empty if none were due."""
    wait_seconds: float = 0.0
    """Seconds the update loop waited for a batch from replay."""
    update_seconds: float = 0.0
    diagnostics_seconds: float = 0.0
    wall_seconds: float = 0.0
    policy_lag_sum: float = 0.0
    policy_lag_count: int = 0
    published_version: int = 0
    probe_ready: bool = False
    """Whether the diagnostics' probe batch has been sampled (diagnostics run from then on)."""
    dropped_batches: int = 0
    """Invalid batches dropped so far (cumulative, this learner process)."""
    task_rows: dict[int, int] = field(default_factory=dict)
    """Rows trained on in this call per scenario task (which tasks the learner's data came from)."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LearnerService:
    """See the module docstring."""

    def __init__(
        self,
        *,
        make_algorithm: Callable[[torch.device], Algorithm],
        client: Any,
        batch_size: int,
        prioritized: bool,
        publish: Callable[[int, Any, Any], Any],
        checkpoint_dir: str | os.PathLike,
        publish_every: int = 50,
        beta_start: float = 0.4,
        total_env_steps: int = 1,
        updates_per_env_step: float = 0.0,
        prefetch_batches: int = 4,
        batches_per_sample: int = 1,
        sample_seed: int | None = None,
        make_diagnostics: Callable[[Algorithm, torch.Tensor], Mapping[str, Any]] | None = None,
        probe_size: int = 256,
        device: str = "auto",
        num_threads: int = 0,
        flush_denormal: bool = True,
        rank: int = 0,
        world_size: int = 1,
        rendezvous: str | None = None,
        backend: str = "auto",
    ):
        # Before the algorithm's first op: threads torch starts later inherit the setting (pthreads copy the
        # floating-point environment of the thread that creates them); see LearnerConfig.flush_denormal.
        torch.set_flush_denormal(bool(flush_denormal))
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        if world_size > 1:
            if not rendezvous:
                raise ValueError(f"world_size {world_size} needs the rendezvous address (host:port) of the ranks' group")
            self.group = ReplicaGroup.join(rendezvous, rank=rank, world_size=world_size, device=self.device,
                                           backend=backend)
            self.algorithm = make_algorithm(self.device, parallel=self.group)
        else:
            self.group = SINGLE
            self.algorithm = make_algorithm(self.device)
        self.client = client
        self.checkpoint_dir = Path(checkpoint_dir)
        self.updates_per_env_step = float(updates_per_env_step)
        self.probe_size = int(probe_size)
        self._make_diagnostics = make_diagnostics
        self._publish = publish if self.group.is_main else _publish_nothing   # one rank publishes
        self._publish_every = int(publish_every)
        self._prioritized = bool(prioritized)
        self._prefetch_batches = int(prefetch_batches)
        self.dataset = ReplayDataset(client, batch_size=batch_size, prioritized=prioritized, beta_start=beta_start,
                                     total_env_steps=total_env_steps, device=self.device,
                                     batches_per_sample=batches_per_sample, seed=sample_seed)
        self._start_updates = 0
        self._loop: LearnerLoop | None = None
        self._probe_ready = make_diagnostics is None
        self._probe_obs: Any = None      # rank 0's probe rows, sampled and not yet shared (data-parallel)
        self._held: list[Batch] = []     # data-parallel: this rank's valid batches, waiting for the others'.

    # -- lifecycle ---------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Where this learner runs: process id, device, torch threads, its rank of how many."""
        return {"pid": os.getpid(), "device": str(self.device), "torch_threads": torch.get_num_threads(),
                "rank": self.group.rank, "ranks": self.group.world_size}

    def restore(self) -> dict[str, Any] | None:
        """Load the newest checkpoint in ``checkpoint_dir``; return what was saved beside the algorithm.

        The returned dict also holds ``state_digest``: the digest of the algorithm state as loaded
        (:func:`learner.checkpoint.state_digest`), so a caller can check that the learner really
        continues from the checkpoint. None when there is no checkpoint.
        """
        if self._loop is not None:
            raise RuntimeError("restore() must come before the first train() call")
        # Data-parallel: rank 0 reads the file (only its node need see the checkpoint dir), the others get it from it.
        state = load_latest_checkpoint(self.checkpoint_dir) if self.group.is_main else None
        state = self.group.broadcast_object(state)
        if state is None:
            return None
        self.algorithm.load_state_dict(state["algorithm"])
        extra = {k: v for k, v in state.items() if k != "algorithm"}
        self._start_updates = int(extra.get("counters", {}).get("updates", 0))
        extra["state_digest"] = state_digest(self.algorithm.state_dict())
        return extra

    def _start(self) -> LearnerLoop:
        # prefetch_batches counts batches; the queue holds sample calls of batches_per_sample each.
        calls = -(-self._prefetch_batches // self.dataset.batches_per_sample)
        prefetcher = Prefetcher(sample=self.dataset.sample, depth=calls).start()
        loop = LearnerLoop(algorithm=self.algorithm, prefetcher=prefetcher,
                           update_priorities=self.client.update_priorities if self._prioritized else None,
                           publish=self._publish, publish_every=self._publish_every,
                           start_updates=self._start_updates)
        # Ranks built from one seed (or one checkpoint) start identical; anything else is a bug to catch now.
        self.group.check_identical(state_digest(self.algorithm.state_dict()), what="before the first update")
        loop.publish()  # the actors act with the learner's weights from the first step (resumes included)
        return loop

    def _sample_probe(self) -> Any:
        """The held-out probe rows for diagnostics, or None if replay cannot give them without waiting."""
        try:
            return self.client.sample(self.probe_size, beta=1.0, timeout=0.0).columns["obs"]
        except (DeadlineExceeded, ShardUnavailable):
            return None

    def _set_probe(self, loop: LearnerLoop, obs: Any) -> None:
        probe = torch.from_numpy(obs).to(self.device)
        set_probe = getattr(self.algorithm, "set_probe", None)
        if callable(set_probe):   # interventions that read data (every rank: the same rows)
            set_probe(probe)
        if self.group.is_main:    # diagnostics: on one rank, of the model every rank holds
            loop.diagnostics = dict(self._make_diagnostics(self.algorithm, probe))
        self._probe_ready = True

    # -- work --------------------------------------------------------------------------------------

    def train(self, *, seconds: float, env_steps: int) -> TrainReport:
        """Update for about ``seconds``; ``env_steps`` is the run's env-step count now."""
        if self._loop is None:
            self._loop = self._start()
        loop = self._loop
        self.dataset.progress(env_steps=env_steps)
        start = time.perf_counter()
        deadline = start + max(0.0, seconds)
        c = loop.counters
        before = (c.updates, loop.prefetcher.wait_seconds, c.update_seconds, c.diagnostics_seconds)
        lag_sum, lag_count = c.policy_lag_sum, c.policy_lag_count
        task_rows = dict(c.task_rows)
        report = TrainReport(updates=c.updates, new_updates=0)
        if self.group.world_size > 1:
            self._train_replicated(loop, report, deadline=deadline, env_steps=env_steps)
        else:
            self._train_alone(loop, report, deadline=deadline, env_steps=env_steps)
        _add_metrics(report, loop.flush())   # a GPU update read one update late: this call's last one
        report.updates = c.updates
        report.new_updates = c.updates - before[0]
        report.wait_seconds = loop.prefetcher.wait_seconds - before[1]
        report.update_seconds = c.update_seconds - before[2]
        report.diagnostics_seconds = c.diagnostics_seconds - before[3]
        report.policy_lag_sum = c.policy_lag_sum - lag_sum
        report.policy_lag_count = c.policy_lag_count - lag_count
        report.published_version = c.published_version
        report.wall_seconds = time.perf_counter() - start
        report.probe_ready = self._probe_ready
        report.dropped_batches = c.dropped_batches
        report.task_rows = {t: n - task_rows.get(t, 0) for t, n in c.task_rows.items() if n != task_rows.get(t, 0)}
        return report

    def _train_alone(self, loop: LearnerLoop, report: TrainReport, *, deadline: float, env_steps: int) -> None:
        """:meth:`train`'s loop on a single learner."""
        while time.perf_counter() < deadline:
            if not self._probe_ready:
                obs = self._sample_probe()
                if obs is not None:
                    self._set_probe(loop, obs)
            if not self._allowed_updates(env_steps):
                time.sleep(min(0.005, max(0.0, deadline - time.perf_counter())))
                continue
            _add_metrics(report, loop.step(timeout=max(0.001, min(0.05, deadline - time.perf_counter()))))

    def _train_replicated(self, loop: LearnerLoop, report: TrainReport, *, deadline: float, env_steps: int) -> None:
        """:meth:`train`'s loop on data-parallel ranks. Each round, every rank says whether it can go on, how
        many valid batches it holds (up to ``prefetch_batches``) and how many updates pacing allows; all
        ranks then run the smallest count, so their updates (and the collectives in them) pair up and no
        rank waits in an all-reduce the others never enter. One round per several updates: the
        agreement costs about as much as the gradient all-reduce itself."""
        group, check = self.group, getattr(self.algorithm, "check_batch", None)
        while True:
            while len(self._held) < self._prefetch_batches:   # top up; wait briefly only when holding none
                wait = max(0.001, min(0.02, deadline - time.perf_counter())) if not self._held else 0.0005
                batch = loop.next_batch(timeout=wait)
                if batch is None:
                    break
                try:
                    if check is not None:
                        check(batch.tensors, weights=batch.weights)
                    self._held.append(batch)
                except InvalidBatch as exc:   # refused here, on this rank alone: the others keep theirs
                    loop.drop_invalid(exc)
            if not self._probe_ready and group.is_main and self._probe_obs is None:
                self._probe_obs = self._sample_probe()
            go_on, updates, share_probe = group.agree([
                time.perf_counter() < deadline,
                min(len(self._held), self._allowed_updates(env_steps)),
                self._probe_ready or not group.is_main or self._probe_obs is not None,
            ])
            if share_probe and not self._probe_ready:
                self._set_probe(loop, group.broadcast_object(self._probe_obs))
                self._probe_obs = None
            if not go_on:
                return
            for _ in range(updates):
                _add_metrics(report, loop.train_on(self._held.pop(0)))
            if not updates and self._allowed_updates(env_steps) == 0:
                time.sleep(min(0.005, max(0.0, deadline - time.perf_counter())))

    def _allowed_updates(self, env_steps: int) -> int:
        """Updates pacing allows now, at most ``prefetch_batches``: without a replay rate limiter, updates
        stay below ``updates_per_env_step`` * env steps (0 = not paced)."""
        if self.updates_per_env_step <= 0:
            return self._prefetch_batches
        due = math.ceil(self.updates_per_env_step * env_steps) - self._loop.counters.updates
        return max(0, min(self._prefetch_batches, due))

    def sample_task(self, task: int) -> None:
        """Sample from ``task``'s replay table from now on (per-task tables: ``replay.task_tables.TaskTables``)."""
        self.client.set_sampling_task(task)

    def task_switch(self, task: int, *, discard_prefetched: bool = False) -> dict[str, float]:
        """Tell the algorithm (and its interventions) that the task changed; publish the result.

        ``discard_prefetched`` (after a replay flush) drops the batches sampled before it, so that no
        update trains on flushed rows; their number is reported as ``learner_discarded_batches``."""
        metrics = dict(self.algorithm.task_switch(task))
        if self._loop is not None:
            if discard_prefetched:
                held, self._held = len(self._held), []
                metrics["learner_discarded_batches"] = float(self._loop.prefetcher.discard() + held)
            self._loop.publish()
        return metrics

    def checkpoint(self, extra: Mapping[str, Any] | None = None) -> str:
        """Write the algorithm state plus ``extra`` atomically; return the file's path."""
        updates = self._loop.counters.updates if self._loop is not None else self._start_updates
        extra = dict(extra or {})
        if "counters" in extra:  # the learner's own count is the true one (the driver's may be a call behind)
            extra["counters"] = dict(extra["counters"], updates=updates)
        algorithm_state = self.algorithm.state_dict()
        self.group.check_identical(state_digest(algorithm_state), what=f"at the checkpoint of update {updates}")
        if not self.group.is_main:
            return ""
        state = {"algorithm": algorithm_state, **extra}
        return str(save_checkpoint(self.checkpoint_dir, state, step=updates))

    def close(self) -> None:
        """Stop the prefetch and priority threads (pending priority updates are sent first)."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self.group.close()


def _publish_nothing(version: int, weights: Any, network: Any) -> None:
    """The publisher of every rank but rank 0 (the replicas are identical: one copy reaches the actors)."""


def _add_metrics(report: TrainReport, metrics: Mapping[str, float] | None) -> None:
    """One update's metrics into the call's report (``diag/...`` keep their latest value, the rest sum)."""
    for key, value in (metrics or {}).items():
        if key.startswith("diag/"):
            report.diagnostics[key] = value
            continue
        report.metric_sums[key] = report.metric_sums.get(key, 0.0) + value
        report.metric_counts[key] = report.metric_counts.get(key, 0) + 1
