"""Data-parallel learner ranks: one ``torch.distributed`` group whose replicas stay bit-identical.

Every rank holds a full copy of the algorithm and samples its own batches from replay; one update
is the same update on every rank because the gradients are averaged before the optimizer steps,
every random draw comes from a generator seeded identically on all ranks, and every decision that
reads data (ReDo's dormant scores, continual backprop's utilities, observation statistics) is
reduced across ranks before it is taken. An algorithm sees the group only through
:class:`ReplicaGroup`'s small interface (``grad_sync``, ``all_reduce_mean``, ``gather_rows``,
``rank``, ``world_size``); :data:`SINGLE` is the one-process group, where each is the identity.

The driver hosts the rendezvous (a ``TCPStore`` that lives as long as the run) and hands its
address to every rank, which joins::

    rendezvous = Rendezvous()                                          # driver side: host:port
    group = ReplicaGroup.join(rendezvous.address, rank=r, world_size=2, device=torch.device("cpu"))
    dqn = DQN(..., parallel=group)                                     # gradients averaged over ranks
    go_on, updates = group.agree([before_deadline, valid_batches_held])  # the minimum over ranks
    group.check_identical(state_digest(dqn.state_dict()), what="after the reset")
    group.close()

Collectives on CPU go over gloo; on CUDA devices the gradients go over NCCL and the small control
messages (flags, objects) over a gloo group beside it, so that a control message never waits on
device work.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SINGLE", "ReplicaGroup", "ReplicasDiverged", "Rendezvous", "SingleProcess"]

#: How long a collective may wait for the other ranks before it fails (a dead or stuck rank).
COLLECTIVE_TIMEOUT_S = 120.0


class ReplicasDiverged(RuntimeError):
    """The ranks' replicas are no longer identical (a bug, or a rank fed different state)."""


class SingleProcess:
    """The group of one: every collective is the identity (what an algorithm sees outside DDP)."""

    rank = 0
    world_size = 1
    is_main = True

    def grad_sync(self, grads: Sequence[torch.Tensor]) -> None:
        """Average ``grads`` in place across ranks (here: nothing to average)."""

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (here: ``tensor``)."""
        return tensor

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0, in rank order (here: ``tensor``)."""
        return tensor

    def agree(self, values: Sequence[int | bool]) -> list[int]:
        """Each value's minimum over ranks (for flags: AND) (here: as given)."""
        return [int(v) for v in values]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (here: ``obj``)."""
        return obj

    def check_identical(self, digest: str, *, what: str) -> None:
        """Raise :class:`ReplicasDiverged` unless every rank's ``digest`` is the same (here: nothing to compare)."""

    def close(self) -> None:
        pass


SINGLE = SingleProcess()


class Rendezvous:
    """The group's meeting point, hosted by the driver: a ``TCPStore`` on a free port of ``host``.

    ``host`` is an address every rank can reach (on a Ray cluster, the driver node's IP). Keep the
    object alive while the group runs: NCCL reads the store when it builds a communicator.
    """

    def __init__(self, host: str = "127.0.0.1"):
        import torch.distributed as dist

        self.host = host
        self._store = dist.TCPStore(host, 0, None, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        self.address = f"{host}:{self._store.port}"


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous address must be 'host:port', got {address!r}")
    return host, int(port)


def local_ip() -> str:
    """This node's address as other nodes see it (Ray's view when Ray runs here, else the hostname's)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return socket.gethostbyname(socket.gethostname())


class ReplicaGroup(SingleProcess):
    """One rank of a ``torch.distributed`` group (see the module docstring). Build it with :meth:`join`."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device, control_group: Any):
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.device = device
        self._control = control_group   # gloo: flags and objects (the default group itself on CPU)

    @classmethod
    def join(cls, address: str, *, rank: int, world_size: int, device: torch.device,
             backend: str = "auto", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> ReplicaGroup:
        """Join the group at ``address`` (a :class:`Rendezvous`) as ``rank`` of ``world_size``; blocks until
        every rank has joined. ``backend``: "auto" (NCCL on CUDA, else gloo), "gloo" or "nccl"."""
        import torch.distributed as dist

        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
            raise ValueError(f"world_size must be an integer >= 2 (one rank needs no group), got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the nccl backend needs a CUDA device, got {device}")
        if dist.is_initialized():
            raise RuntimeError("this process is already in a torch.distributed group")
        host, port = _parse_address(address)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        return cls(rank=rank, world_size=world_size, device=device, control_group=control)

    # -- what algorithms call --------------------------------------------------------------------

    def grad_sync(self, grads: Sequence[torch.Tensor]) -> None:
        """Average ``grads`` in place: one all-reduce of their flattened concatenation (one message
        per update, whatever the number of tensors; the order is the caller's, the same on every rank)."""
        import torch.distributed as dist

        grads = [g for g in grads if g is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        parts = torch.split(flat, [g.numel() for g in grads])
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads, strict=True)])

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        reduced = tensor.detach().clone()
        dist.all_reduce(reduced)
        return reduced.div_(self.world_size)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, in rank order; each rank's ``tensor`` must have the same shape."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        return torch.cat(parts)

    # -- what the learner service calls ----------------------------------------------------------

    def agree(self, values: Sequence[int | bool]) -> list[int]:
        """Each value's minimum over ranks (for flags: AND), in one small all-reduce on the control group:
        what keeps every rank on the same branch (how many updates, go on or stop), so that no rank
        waits in a collective the others never enter."""
        import torch.distributed as dist

        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._control)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def check_identical(self, digest: str, *, what: str) -> None:
        import torch.distributed as dist

        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, str(digest), group=self._control)
        if len(set(digests)) != 1:
            raise ReplicasDiverged(f"learner replicas differ {what}: state digests by rank {digests}")

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
