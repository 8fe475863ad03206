"""A replay shard as a Ray actor, so that Ray places it (custom resources put shards on replay nodes).

The actor starts the shard server as its own child process (``replay.launch.ShardProcess``: the
tuned allocator, a final checkpoint on SIGTERM, and a stop with checkpoint when its parent dies)
on the node Ray chose, bound to ``host`` ("auto": this node's IP when the run spans a cluster,
127.0.0.1 otherwise), and reports the address clients should dial.

    shard = ShardActor.options(num_cpus=1, resources={"replay": 1}).remote(
        [table_config], checkpoint_dir="/data/replay/shard-0", shard_index=0, host="auto", cluster=True,
        token=token, rebase_limiter_on_restore=resume)
    address, metrics_port = ray.get(shard.endpoint.remote())
    ray.get(shard.health.remote())      # {"alive": False, "returncode": -9, "stderr_tail": ...} after a crash
    ray.get(shard.restart.remote())     # same ports, restored from its last checkpoint, a new generation
    ray.get(shard.stop.remote())        # final checkpoint, then the server exits

``token`` (the run's token as a string: the driver's token file may not exist on the shard's node)
is written to a private 0600 file on the shard's node and passed with ``--token-file``; ``token_file``
names such a file that already exists there. ``tls`` is a ``replay.auth.ServerTls``. Both listeners
bind ``host``; ``port`` and ``metrics_port`` (0: free ones) let a replacement actor take over a dead
one's address, so that every client's address list stays valid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray

from replay.auth import ServerTls
from replay.launch import ShardProcess
from replay.table import TableConfig


class ShardHost:
    """The body of the Ray actor: owns one ``ShardProcess`` on the actor's node."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        *,
        checkpoint_dir: str | None,
        shard_index: int,
        host: str = "auto",
        cluster: bool = False,
        metrics: bool = True,
        token: str | None = None,
        token_file: str | None = None,
        tls: ServerTls | None = None,
        rebase_limiter_on_restore: bool = False,
        max_blocked_calls: int | None = None,
        port: int = 0,
        metrics_port: int | None = 0,
    ) -> None:
        if host == "auto":
            # Other nodes must reach a shard of a cluster run; a local run stays on loopback.
            host = ray.util.get_node_ip_address() if cluster else "127.0.0.1"
        self._shard = ShardProcess(
            list(tables), checkpoint_dir=checkpoint_dir, shard_index=shard_index, host=host,
            port=port, metrics_port=metrics_port if metrics else None, extra_args=["--metrics-host", host],
            token=token, token_file=token_file, tls=tls, rebase_limiter_on_restore=rebase_limiter_on_restore,
            max_blocked_calls=max_blocked_calls,
        )

    def endpoint(self) -> tuple[str, int | None]:
        """(gRPC address ``host:port``, metrics port or None)."""
        return self._shard.address, self._shard.metrics_port

    def info(self) -> dict[str, Any]:
        """Where the shard runs: node id, the host actor's pid and the server's pid."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "server_pid": self._shard.pid, "address": self._shard.address}

    def alive(self) -> bool:
        return self._shard.alive

    def health(self) -> dict[str, Any]:
        """Whether the server process runs; if not, its exit status and the last lines of its stderr."""
        if self._shard.alive:
            return {"alive": True}
        tail = self._shard.stderr_tail().strip().splitlines()[-5:]
        return {"alive": False, "returncode": self._shard.returncode, "stderr_tail": "\n".join(tail)}

    def restart(self) -> dict[str, Any]:
        """Start the server again on the same ports from its last checkpoint (a new key generation), with
        its rate limiter rebased (the learner and the actors went on without it); returns ``info()``."""
        self._shard.rebase_limiter_on_restore = True
        self._shard.restart()
        return self.info()

    def stop(self) -> int | None:
        """SIGTERM the server (it checkpoints, if it has a directory); its exit status."""
        return self._shard.stop()


ShardActor = ray.remote(ShardHost)

__all__ = ["ShardActor", "ShardHost"]
