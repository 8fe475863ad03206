"""The learner as Ray actors: ``LearnerService`` ranks in their own processes, behind one handle.

    group = LearnerGroup.start(num_ranks=2, options={"num_cpus": 1, "num_gpus": 1}, **service_kwargs)
    extra = ray.get(group.restore.remote())               # every rank restores; rank 0's answer
    report = ray.get(group.train.remote(seconds=0.25, env_steps=12_000))   # learner.service.TrainReport
    group.raise_failures()                                # a rank whose call failed: its error, now
    group.kill()

Experience does not pass through Ray: each rank samples replay over gRPC from inside its process.
With one rank the group is a plain Ray actor behind the same interface, so the driver has one code path.
"""

from __future__ import annotations

from typing import Any

import ray

from learner.service import LearnerService


class LearnerProcess(LearnerService):
    """``LearnerService`` plus where it runs (node id), for placement checks and ``evergreen status``."""

    def info(self) -> dict:
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}


RayLearner = ray.remote(LearnerProcess)


class _EveryRank:
    """``group.<method>.remote(...)``: the call on every rank at once (collectives pair up); rank 0's ref."""

    def __init__(self, group: LearnerGroup, name: str):
        self._group, self._name = group, name

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        group = self._group
        refs = [getattr(rank, self._name).remote(*args, **kwargs) for rank in group.ranks]
        group._pending.extend(refs[1:])
        return refs[0]


class LearnerGroup:
    """The run's learner ranks as one handle (see the module docstring).

    Every method call goes to every rank, since the ranks' collectives must pair up; the caller
    waits on rank 0's answer (the one that publishes and checkpoints). Other ranks' answers are
    checked by :meth:`raise_failures` (the driver calls it with each report): a rank that failed
    stops the run with its own error rather than with rank 0's timeout in a collective.
    """

    def __init__(self, ranks: list[Any], rendezvous: Any = None):
        if not ranks:
            raise ValueError("a learner group needs at least one rank")
        self.ranks = list(ranks)
        self._rendezvous = rendezvous   # the driver-hosted store: alive as long as the group
        self._pending: list[ray.ObjectRef] = []

    @classmethod
    def start(cls, *, num_ranks: int, options: dict[str, Any], **service_kwargs: Any) -> LearnerGroup:
        """``num_ranks`` learner actors with ``options`` each (Ray resources); several form one group at a
        rendezvous this process hosts on its node's address. ``sample_seed`` differs per rank."""
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be an integer >= 1, got {num_ranks!r}")
        if num_ranks == 1:
            return cls([RayLearner.options(**options).remote(**service_kwargs)])
        from learner.parallel import Rendezvous, local_ip

        rendezvous = Rendezvous(local_ip())
        seed = service_kwargs.pop("sample_seed", None)
        ranks = [RayLearner.options(**options).remote(
            **service_kwargs, rank=rank, world_size=num_ranks, rendezvous=rendezvous.address,
            # Each rank draws its own batches (rank 0 the single learner's: a 1-rank run is unchanged).
            sample_seed=None if seed is None else seed + 100_003 * rank)
            for rank in range(num_ranks)]
        return cls(ranks, rendezvous)

    def __getattr__(self, name: str) -> _EveryRank:
        if name.startswith("_"):
            raise AttributeError(name)
        return _EveryRank(self, name)

    def raise_failures(self) -> None:
        """Raise the error of any other rank's finished call that failed (rank 0's: the caller's ``ray.get``)."""
        if not self._pending:
            return
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        for ref in done:
            ray.get(ref)   # raises the rank's error

    def kill(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)


__all__ = ["LearnerGroup", "LearnerProcess", "RayLearner"]
