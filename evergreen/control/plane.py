"""The control plane: what a run is doing, and what it was asked to do, readable from any shell.

Redis is authoritative: a command is a key the run's driver reads at each of its polls (every 0.5 s),
so it cannot be lost the way a missed pub/sub message can (pub/sub could only be a wake-up hint, and
the driver wakes twice a second anyway, so none is used). Every key of a run lives under ``evergreen:run:<run>:``:

=====================================  ======================================================  ==========
key                                    holds                                                   lifetime
=====================================  ======================================================  ==========
``evergreen:runs``                     sorted set: run name -> start time                      pruned
``evergreen:run:<run>``                hash: name, state, config_digest, start_time, owner,    finished +
                                       run_dir, max_actors, heartbeat_s, updated, summary      retention
``evergreen:run:<run>:components``     sorted set: ``kind/id`` -> last heartbeat time          pruned
``evergreen:run:<run>:c:<kind>/<id>``  JSON of one component (state, node, pid, rates, ...)    3 heartbeats
``evergreen:run:<run>:desired_actors`` the actor count asked for (``evergreen scale``)          the run's
``evergreen:run:<run>:stop``           why a stop was asked for (``evergreen stop``)           the run's
``evergreen:run:<run>:task``           JSON: the scenario's current task (index, name, visit)  the run's
=====================================  ======================================================  ==========

Nothing grows without bound: a component entry expires three heartbeat periods after its last
heartbeat (an actor that left simply stops beating), the index sets drop names whose entry is gone
each time they are read, and when a run ends its keys get a retention TTL (``retention_s``, 7 days by
default) so that a long-lived cluster Redis forgets old runs by itself.

Example (a real Redis; ``evergreen.control.redis_server.EmbeddedRedis`` starts one)::

    plane = RedisControlPlane.connect("redis://127.0.0.1:6379/0", password="...")
    plane.register_run("cartpole-1", config_digest="ab12...", run_dir="runs/cartpole-1", max_actors=8,
                       heartbeat_s=2.0)
    plane.heartbeat("cartpole-1", "actor", "3", {"state": "running", "node": "n1", "pid": 4242})
    plane.set_desired_actors("cartpole-1", 4)          # what `evergreen scale cartpole-1 --actors 4` does
    plane.desired_actors("cartpole-1")                 # -> 4, read by the run's driver at its next poll
    plane.components("cartpole-1")                     # -> [{"kind": "actor", "id": "3", "state": ..., ...}]
    plane.finish_run("cartpole-1", state="finished", summary={"env_steps": 50_000})
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["ControlPlane", "ControlPlaneError", "RedisControlPlane", "RUN_STATES", "check_run_name"]

#: What ``state`` of a run may say: "starting", "running" and "stopping" runs have a driver beating,
#: the others are final. ``run_info`` reports "lost" for a run whose driver stopped beating unannounced.
RUN_STATES = ("starting", "running", "stopping", "finished", "stopped", "failed")
#: Component kinds a run registers.
COMPONENT_KINDS = ("driver", "learner", "replay", "actor", "evaluator")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREFIX = "evergreen"


class ControlPlaneError(RuntimeError):
    """The control plane cannot be reached, refused the credentials, or holds no such run."""


def check_run_name(run: str) -> str:
    """``run`` if it is a valid run name (letters, digits, ``.``, ``_``, ``-``; at most 128), else ValueError."""
    if not isinstance(run, str) or not _NAME.match(run):
        raise ValueError(f"run name {run!r} is invalid: expected 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return run


class ControlPlane(Protocol):
    """What the driver writes and the commands read (see the module docstring for the data)."""

    def register_run(self, run: str, *, config_digest: str, run_dir: str, max_actors: int,
                     heartbeat_s: float, desired_actors: int) -> None: ...
    def set_run_state(self, run: str, state: str, **fields: Any) -> None: ...
    def finish_run(self, run: str, *, state: str, summary: Mapping[str, Any] | None = None) -> None: ...
    def run_info(self, run: str) -> dict[str, Any] | None: ...
    def runs(self) -> list[dict[str, Any]]: ...
    def heartbeat(self, run: str, kind: str, component_id: str, data: Mapping[str, Any]) -> None: ...
    def components(self, run: str) -> list[dict[str, Any]]: ...
    def set_desired_actors(self, run: str, count: int) -> None: ...
    def desired_actors(self, run: str) -> int | None: ...
    def request_stop(self, run: str, reason: str) -> None: ...
    def stop_requested(self, run: str) -> str | None: ...
    def set_task(self, run: str, task: Mapping[str, Any]) -> None: ...
    def task(self, run: str) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


def _owner() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class RedisControlPlane:
    """:class:`ControlPlane` on a Redis server (redis-py). See the module docstring."""

    def __init__(self, client: Any, *, retention_s: float = 7 * 86_400.0):
        self._redis = client
        self.retention_s = float(retention_s)

    @classmethod
    def connect(cls, url: str, *, password: str | None = None, timeout_s: float = 5.0,
                **kwargs: Any) -> RedisControlPlane:
        """Connect and check the server answers (ControlPlaneError naming the address if not)."""
        import redis

        client = redis.Redis.from_url(url, password=password, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s, decode_responses=True,
                                      health_check_interval=30)
        where = _safe_url(url)
        try:
            client.ping()
        except redis.exceptions.AuthenticationError as exc:
            client.close()
            if password is None:
                raise ControlPlaneError(f"the control plane Redis at {where} needs a password (--control.password_env "
                                        f"or --control.password_file): {exc}") from None
            raise ControlPlaneError(f"the control plane Redis at {where} refused the password ({exc})") from None
        except redis.exceptions.ResponseError as exc:
            client.close()
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise ControlPlaneError(f"the control plane Redis at {where} needs a password "
                                        f"(--control.password_env or --control.password_file): {exc}") from None
            raise ControlPlaneError(f"the control plane Redis at {where} failed: {exc}") from None
        except redis.exceptions.RedisError as exc:
            client.close()
            raise ControlPlaneError(f"the control plane Redis at {where} is unreachable: {exc}") from None
        return cls(client, **kwargs)

    # -- keys --------------------------------------------------------------------------------------
    @staticmethod
    def _key(run: str, *parts: str) -> str:
        return ":".join((PREFIX, "run", check_run_name(run), *parts))

    # -- runs --------------------------------------------------------------------------------------
    def register_run(self, run: str, *, config_digest: str, run_dir: str, max_actors: int,
                     heartbeat_s: float, desired_actors: int) -> None:
        """A run starts (or resumes): its record, its desired actor count; an old stop request is cleared."""
        now = time.time()
        key = self._key(run)
        fields = {"name": run, "state": "starting", "config_digest": config_digest, "run_dir": str(run_dir),
                  "max_actors": int(max_actors), "heartbeat_s": float(heartbeat_s), "owner": _owner(),
                  "start_time": now, "updated": now}
        with self._redis.pipeline() as pipe:
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.delete(self._key(run, "stop"))
            pipe.set(self._key(run, "desired_actors"), int(desired_actors))
            for sub in ("", ":desired_actors", ":task", ":components"):   # a resumed run was given a TTL
                pipe.persist(key + sub)
            pipe.zadd(f"{PREFIX}:runs", {run: now})
            pipe.execute()

    def set_run_state(self, run: str, state: str, **fields: Any) -> None:
        if state not in RUN_STATES:
            raise ValueError(f"run state {state!r} is invalid: expected one of {list(RUN_STATES)}")
        values = {"state": state, "updated": time.time(), **fields}
        self._redis.hset(self._key(run), mapping={k: json.dumps(v) for k, v in values.items()})

    def finish_run(self, run: str, *, state: str, summary: Mapping[str, Any] | None = None) -> None:
        """The run ended (``state`` final): record it; every key of the run expires after the retention."""
        if state not in ("finished", "stopped", "failed"):
            raise ValueError(f"final run state {state!r} is invalid: expected finished, stopped or failed")
        self.set_run_state(run, state, summary=dict(summary or {}))
        ttl = max(1, int(self.retention_s))
        with self._redis.pipeline() as pipe:
            for sub in ("", ":desired_actors", ":task", ":stop", ":components"):
                pipe.expire(self._key(run) + sub, ttl)
            pipe.execute()

    def run_info(self, run: str) -> dict[str, Any] | None:
        raw = self._redis.hgetall(self._key(run))
        if not raw:
            return None
        info = {k: json.loads(v) for k, v in raw.items()}
        # A driver that died without saying so stops beating: its entry expires, the run is lost. (While
        # "starting" it has not beaten yet: Ray, the shards and the learner come up first.)
        if info.get("state") in ("running", "stopping") and not self._redis.exists(self._key(run, "c", "driver/0")):
            info["state"] = "lost"
        return info

    def runs(self) -> list[dict[str, Any]]:
        """Every run this Redis knows, oldest first (names whose record expired are dropped from the index)."""
        out, gone = [], []
        for name in self._redis.zrange(f"{PREFIX}:runs", 0, -1):
            info = self.run_info(name) if _NAME.match(name) else None
            (out.append(info) if info else gone.append(name))
        if gone:
            self._redis.zrem(f"{PREFIX}:runs", *gone)
        return out

    # -- components --------------------------------------------------------------------------------
    def heartbeat(self, run: str, kind: str, component_id: str, data: Mapping[str, Any]) -> None:
        """Component ``kind/component_id`` is alive with ``data``; its entry expires after 3 heartbeats."""
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"component kind {kind!r} is invalid: expected one of {list(COMPONENT_KINDS)}")
        self.heartbeats(run, [(kind, str(component_id), data)])

    def heartbeats(self, run: str, entries: list[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Several heartbeats in one round trip (the driver beats for every component it heard from)."""
        info_ttl = self._redis.hget(self._key(run), "heartbeat_s")
        ttl_ms = max(1, int(3 * 1000 * (json.loads(info_ttl) if info_ttl else 2.0)))
        now = time.time()
        with self._redis.pipeline() as pipe:
            for kind, component_id, data in entries:
                member = f"{kind}/{component_id}"
                value = {"kind": kind, "id": component_id, "last_heartbeat": now, **data}
                pipe.set(self._key(run, "c", member), json.dumps(value, default=float), px=ttl_ms)
                pipe.zadd(self._key(run, "components"), {member: now})
            pipe.execute()

    def components(self, run: str) -> list[dict[str, Any]]:
        """Every component whose entry has not expired, by kind then id."""
        members = self._redis.zrange(self._key(run, "components"), 0, -1)
        if not members:
            return []
        values = self._redis.mget([self._key(run, "c", m) for m in members])
        out, gone = [], []
        for member, value in zip(members, values, strict=True):
            (out.append(json.loads(value)) if value else gone.append(member))
        if gone:
            self._redis.zrem(self._key(run, "components"), *gone)
        order = {k: i for i, k in enumerate(COMPONENT_KINDS)}
        return sorted(out, key=lambda c: (order.get(c["kind"], 99), _natural(c["id"])))

    def forget_component(self, run: str, kind: str, component_id: str) -> None:
        """A component that left for good (a retired actor): drop its entry now, not at its expiry."""
        member = f"{kind}/{component_id}"
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key(run, "c", member))
            pipe.zrem(self._key(run, "components"), member)
            pipe.execute()

    # -- commands ----------------------------------------------------------------------------------
    def set_desired_actors(self, run: str, count: int) -> None:
        """Ask the run for ``count`` actors (ValueError for a count outside [0, the run's max_actors])."""
        info = self.run_info(run)
        if info is None:
            raise ControlPlaneError(f"no run {run!r} in the control plane")
        limit = int(info.get("max_actors", 0))
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= limit:
            raise ValueError(f"--actors {count!r} is invalid: expected an integer in [0, {limit}] "
                             f"(the run's control.max_actors)")
        self._redis.set(self._key(run, "desired_actors"), count)

    def desired_actors(self, run: str) -> int | None:
        value = self._redis.get(self._key(run, "desired_actors"))
        return None if value is None else int(value)

    def request_stop(self, run: str, reason: str) -> None:
        if self.run_info(run) is None:
            raise ControlPlaneError(f"no run {run!r} in the control plane")
        self._redis.set(self._key(run, "stop"), str(reason)[:500])

    def stop_requested(self, run: str) -> str | None:
        return self._redis.get(self._key(run, "stop"))

    def set_task(self, run: str, task: Mapping[str, Any]) -> None:
        self._redis.set(self._key(run, "task"), json.dumps(dict(task)))

    def task(self, run: str) -> dict[str, Any] | None:
        value = self._redis.get(self._key(run, "task"))
        return None if value is None else json.loads(value)

    def close(self) -> None:
        self._redis.close()


def _natural(value: str) -> tuple:
    """Sort key that puts actor 10 after actor 9."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(value)))


def _safe_url(url: str) -> str:
    """``url`` without any password in it (for messages and logs)."""
    return re.sub(r"//[^@/]*@", "//***@", url)
