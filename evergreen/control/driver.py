"""The driver's side of the control plane: register the run, beat for its components, read commands.

The driver is the one process that hears from every component anyway (learner reports, actor
statistics, shard info), so it writes their heartbeats: an entry says when the driver last heard
from that component, and the whole run's entries expire when the driver itself stops (a run whose
driver died shows as ``lost``). Commands (``evergreen scale``, ``evergreen stop``) are keys read at
every poll of the driver's loop, so they take effect within about a second.

A control plane that fails during a run (a Redis restarted or unreachable) never stops training:
the failure is reported at most once a minute and the next heartbeat tries again.

    control = RunControl.open(config, run_dir)           # None with control.enabled = false
    control.set_state("running")
    if control.due():
        control.beat([("driver", "0", {"state": "running", "env_steps": 1200})])
    desired, stop = control.commands()                   # (int or None, reason or None)
    control.close(state="finished", summary={"env_steps": 50_000})
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evergreen.control.plane import ControlPlaneError, RedisControlPlane
from evergreen.control.redis_server import CONTROL_FILE, EmbeddedRedis, write_private_json

__all__ = ["RunControl", "config_digest", "read_password", "run_name"]


def run_name(run_dir: Path) -> str:
    """The run's name in the control plane: its directory's name, with anything but ``[A-Za-z0-9._-]`` as ``-``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(run_dir).resolve().name).lstrip("._-")[:128]
    return name or "run"


def config_digest(config: Any) -> str:
    """sha256 of the run config's JSON (which runs share a config, at a glance in ``evergreen runs``)."""
    import dataclasses

    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_password(*, password_file: str = "", password_env: str = "") -> str | None:
    """The password of an external Redis: ``password_file``'s first line, else ``$password_env``, else None."""
    if password_file:
        try:
            lines = Path(password_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"control.password_file {password_file!r} cannot be read: {exc.strerror}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"control.password_file {password_file!r} is empty; expected the password on line 1")
        return lines[0].strip()
    if password_env:
        return os.environ.get(password_env) or None
    return None


class RunControl:
    """See the module docstring."""

    def __init__(self, plane: RedisControlPlane, run: str, *, heartbeat_s: float, server: EmbeddedRedis | None = None):
        self.plane, self.run, self.heartbeat_s, self.server = plane, run, float(heartbeat_s), server
        self._last_beat = -float("inf")
        self._last_warning = -float("inf")

    @classmethod
    def open(cls, config: Any, run_dir: Path) -> RunControl | None:
        """Connect to (or start) the run's control plane and register the run; None if disabled.

        ControlPlaneError / RuntimeError when it cannot: a run asked to be controllable that is not
        would leave its user without `evergreen stop`, so this is refused up front."""
        c = config.control
        if not c.enabled:
            return None
        run_dir = Path(run_dir)
        server = None
        if c.redis_url:
            password = read_password(password_file=c.password_file, password_env=c.password_env)
            plane = RedisControlPlane.connect(c.redis_url, password=password)
            # How to reach it from another shell; the password stays where it was (an env var or a file).
            write_private_json(run_dir / CONTROL_FILE, {"url": c.redis_url, "embedded": False,
                                                        "password_env": c.password_env,
                                                        "password_file": c.password_file})
        else:
            server = EmbeddedRedis.start(run_dir)
            try:
                plane = RedisControlPlane.connect(server.url, password=server.password)
            except ControlPlaneError:
                server.stop()
                raise
        control = cls(plane, run_name(run_dir), heartbeat_s=c.heartbeat_s, server=server)
        try:
            plane.register_run(control.run, config_digest=config_digest(config), run_dir=str(run_dir.resolve()),
                               max_actors=c.max_actors, heartbeat_s=c.heartbeat_s,
                               desired_actors=config.actors.num_actors)
            control._write_run_file(run_dir)
        except Exception:
            control.close(state=None)
            raise
        return control

    def _write_run_file(self, run_dir: Path) -> None:
        path = run_dir / CONTROL_FILE
        data = json.loads(path.read_text())
        data["run"] = self.run
        write_private_json(path, data)

    # -- during the run ----------------------------------------------------------------------------
    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the control plane must never stop training
            now = time.monotonic()
            if now - self._last_warning >= 60.0:
                self._last_warning = now
                print(f"  control plane: {what} failed ({type(exc).__name__}: {exc}); training goes on",
                      file=sys.stderr)
            return None

    def set_state(self, state: str, **fields: Any) -> None:
        self._guard("a state update", self.plane.set_run_state, self.run, state, **fields)

    def set_task(self, task: Mapping[str, Any]) -> None:
        self._guard("a task update", self.plane.set_task, self.run, task)

    def set_desired_actors(self, count: int) -> None:
        """The actor count the run starts with (a resumed run: the one it had)."""
        self._guard("setting the desired actors", self.plane.set_desired_actors, self.run, count)

    def due(self) -> bool:
        """Whether a heartbeat period passed since the last :meth:`beat`."""
        return time.monotonic() - self._last_beat >= self.heartbeat_s

    def beat(self, entries: list[tuple[str, str, Mapping[str, Any]]]) -> None:
        self._last_beat = time.monotonic()
        self._guard("a heartbeat", self.plane.heartbeats, self.run, entries)

    def forget(self, kind: str, component_id: str) -> None:
        self._guard("removing a component", self.plane.forget_component, self.run, kind, component_id)

    def commands(self) -> tuple[int | None, str | None]:
        """(the desired actor count, the stop reason) as the control plane holds them now."""
        desired = self._guard("reading the desired actors", self.plane.desired_actors, self.run)
        stop = self._guard("reading a stop request", self.plane.stop_requested, self.run)
        return desired, stop

    # -- the end -----------------------------------------------------------------------------------
    def close(self, *, state: str | None, summary: Mapping[str, Any] | None = None) -> None:
        """Record the final ``state`` (None: leave the record as it is), then stop the embedded Redis.

        With an embedded Redis the end is also written to ``control.json`` (and the password, now
        useless, dropped from it), so that ``evergreen status`` can still say how the run ended."""
        if state is not None:
            self._guard("recording the end of the run", self.plane.finish_run, self.run, state=state,
                        summary=summary)
        try:
            self.plane.close()
        finally:
            if self.server is not None:
                self.server.stop()
                if state is not None and self.server.control_file is not None:
                    self._guard("recording the end in control.json", self._record_end, self.server.control_file,
                                state, summary)

    def _record_end(self, path: Path, state: str, summary: Mapping[str, Any] | None) -> None:
        data = json.loads(path.read_text())
        data.pop("password", None)
        data.update(state=state, ended=time.time(), summary=dict(summary or {}))
        write_private_json(path, data)
