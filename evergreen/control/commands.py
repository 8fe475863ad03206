"""``evergreen status``, ``scale``, ``stop`` and ``runs``: a running job seen and steered from any shell.

    evergreen status runs/cartpole-20261202-120000          # every component: state, node, heartbeat, rates
    evergreen status cartpole-20261202-120000 --json        # a run name is looked up in --runs-dir
    evergreen scale runs/cartpole-20261202-120000 --actors 3
    evergreen stop runs/cartpole-20261202-120000            # graceful: final checkpoint, like Ctrl-C
    evergreen runs                                          # every run under --runs-dir (or in --redis-url)

A run is found through ``<run dir>/control.json`` (written by ``evergreen train``, mode 0600): the
address of the run's own Redis and its password, or the URL of an external Redis and where its
password comes from (``--control.password_env`` / ``--control.password_file``). ``--redis-url``
talks to an external Redis directly; its password is read from ``$EVERGREEN_REDIS_PASSWORD`` or
``--password-file``, never from the command line.

Exit codes: 0 done, 1 the control plane could not be reached or the run is not running, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from evergreen.control.driver import read_password
from evergreen.control.plane import ControlPlaneError, RedisControlPlane, check_run_name
from evergreen.control.redis_server import CONTROL_FILE

__all__ = ["Target", "locate", "main"]


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"evergreen {command}")
    if command != "runs":
        p.add_argument("run", metavar="RUN", help="a run directory, or a run name (looked up in --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where run directories are (default: runs)")
    p.add_argument("--redis-url", default="", help="an external control-plane Redis (redis://host:port/db)")
    p.add_argument("--password-file", default="", help="file with --redis-url's password (else "
                   "$EVERGREEN_REDIS_PASSWORD)")
    if command in ("status", "runs"):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "scale":
        p.add_argument("--actors", type=int, required=True, metavar="N", help="the actor count to run with")
    if command == "stop":
        p.add_argument("--reason", default="requested from the command line", help="recorded with the stop")
    return p


class Target:
    """Where one run's control plane is, and what control.json says about the run."""

    def __init__(self, run: str, url: str, password: str | None, file_data: dict | None):
        self.run, self.url, self.password, self.file_data = run, url, password, file_data

    def connect(self) -> RedisControlPlane:
        return RedisControlPlane.connect(self.url, password=self.password, timeout_s=3.0)


def _external_password(args) -> str | None:
    return read_password(password_file=args.password_file, password_env="EVERGREEN_REDIS_PASSWORD")


def locate(args) -> Target:
    """The run ``args.run`` names (a directory or a name); ValueError if there is no such run."""
    given = Path(args.run)
    run_dir = given if (given / CONTROL_FILE).exists() else Path(args.runs_dir) / args.run
    control_file = run_dir / CONTROL_FILE
    if args.redis_url:   # an external Redis named on the command line: the run is a name there
        name = run_dir.name if control_file.exists() else args.run
        return Target(check_run_name(name), args.redis_url, _external_password(args), None)
    if not control_file.exists():
        where = f"{given}" if given.exists() else f"{given} or {run_dir}"
        raise ValueError(f"no run {args.run!r}: no {CONTROL_FILE} in {where} (a run directory of evergreen "
                         f"train; for a run on an external Redis pass --redis-url)")
    data = json.loads(control_file.read_text())
    if data.get("embedded"):
        password = data.get("password")
    else:
        password = read_password(password_file=data.get("password_file", ""),
                                 password_env=data.get("password_env", ""))
    return Target(data.get("run") or run_dir.name, data["url"], password, data)


def _ago(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{max(0.0, time.time() - float(t)):.1f}s ago"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


_DETAILS = {
    "driver": ("env_steps", "updates", "env_steps_per_s", "updates_per_s", "task", "return_mean_100",
               "replay_rows_lost"),
    "learner": ("updates_per_s", "policy_lag_updates", "learner_wait_fraction", "device"),
    "replay": ("address", "generation", "restarts", "size", "capacity", "inserts", "samples"),
    "actor": ("restarts",),
}


def _status_text(run: dict, components: list[dict], desired: int | None, task: dict | None) -> str:
    lines = [f"run {run['name']}: {run.get('state')}  (owner {run.get('owner')}, started "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run.get('start_time', 0)))}, "
             f"config {run.get('config_digest')})"]
    actors = [c for c in components if c["kind"] == "actor"]
    running = sum(1 for c in actors if c.get("state") == "running")
    pending = sum(1 for c in actors if c.get("state") == "starting")
    lines.append(f"actors: {running} running, {pending} pending, desired {_fmt(desired)} "
                 f"(max {run.get('max_actors')})" + (f"; task {task['name']!r} (visit {task['visit']})"
                                                     if task else ""))
    header = ("KIND", "ID", "STATE", "NODE", "PID", "HEARTBEAT", "DETAILS")
    rows = [header]
    for c in components:
        node = str(c.get("node") or "-")
        details = ", ".join(f"{k} {_fmt(c[k])}" for k in _DETAILS.get(c["kind"], ()) if c.get(k) is not None)
        rows.append((c["kind"], str(c["id"]), str(c.get("state", "-")), node[:12], str(c.get("pid") or "-"),
                     _ago(c.get("last_heartbeat")), details))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    if run.get("summary"):
        lines.append("summary: " + ", ".join(f"{k} {_fmt(v)}" for k, v in run["summary"].items()))
    return "\n".join(lines)


def _ended(target: Target) -> dict | None:
    """How a run on its own (now stopped) Redis ended, from control.json; None if it did not say."""
    data = target.file_data or {}
    if "state" not in data:
        return None
    return {"name": target.run, "state": data["state"], "summary": data.get("summary", {}),
            "ended": data.get("ended")}


def status(args) -> int:
    target = locate(args)
    try:
        plane = target.connect()
    except ControlPlaneError:
        ended = _ended(target)
        if ended is None:
            raise
        if args.json:
            print(json.dumps({"run": ended, "components": []}, indent=2))
        else:
            print(f"run {ended['name']}: {ended['state']} (its control plane ended with it)")
            if ended["summary"]:
                print("summary: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ended["summary"].items()))
        return 0
    try:
        run = plane.run_info(target.run)
        if run is None:
            raise ControlPlaneError(f"the control plane at {target.url} has no run {target.run!r}")
        components = plane.components(target.run)
        desired, task = plane.desired_actors(target.run), plane.task(target.run)
    finally:
        plane.close()
    if args.json:
        print(json.dumps({"run": run, "desired_actors": desired, "task": task, "components": components},
                         indent=2, default=str))
    else:
        print(_status_text(run, components, desired, task))
    return 0


def _live(plane: RedisControlPlane, run: str) -> None:
    info = plane.run_info(run)
    if info is None:
        raise ControlPlaneError(f"no run {run!r} in the control plane")
    if info.get("state") not in ("starting", "running"):
        raise ControlPlaneError(f"run {run!r} is {info.get('state')}, not running")


def scale(args) -> int:
    target = locate(args)
    plane = target.connect()
    try:
        _live(plane, target.run)
        before = plane.desired_actors(target.run)
        plane.set_desired_actors(target.run, args.actors)
    finally:
        plane.close()
    print(f"run {target.run}: desired actors {_fmt(before)} -> {args.actors} (the driver applies it within ~1 s; "
          f"see evergreen status)")
    return 0


def stop(args) -> int:
    target = locate(args)
    plane = target.connect()
    try:
        _live(plane, target.run)
        plane.request_stop(target.run, args.reason)
    finally:
        plane.close()
    print(f"run {target.run}: stop requested; it writes a final checkpoint and exits (resume with "
          f"evergreen train --resume <run dir>)")
    return 0


def runs(args) -> int:
    rows: list[dict] = []
    if args.redis_url:
        plane = RedisControlPlane.connect(args.redis_url, password=_external_password(args), timeout_s=3.0)
        try:
            rows = plane.runs()
        finally:
            plane.close()
    else:
        root = Path(args.runs_dir)
        for control_file in sorted(root.glob(f"*/{CONTROL_FILE}")):
            data = json.loads(control_file.read_text())
            name = data.get("run") or control_file.parent.name
            row = {"name": name, "run_dir": str(control_file.parent), "state": data.get("state")}
            if row["state"] is None:   # the run's Redis should be up: ask it
                try:
                    plane = Target(name, data["url"], data.get("password") if data.get("embedded") else
                                    read_password(password_file=data.get("password_file", ""),
                                                  password_env=data.get("password_env", "")), data).connect()
                    try:
                        row.update(plane.run_info(name) or {"state": "unknown"})
                    finally:
                        plane.close()
                except ControlPlaneError:
                    row["state"] = "lost"   # no final state written and no control plane: the driver died
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no runs in {args.redis_url or args.runs_dir}")
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        started = r.get("start_time")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started else ""
        print(f"{r['name'].ljust(width)}  {str(r.get('state')).ljust(9)}  {when}  {r.get('run_dir', '')}")
    return 0


COMMANDS = {"status": status, "scale": scale, "stop": stop, "runs": runs}


def main(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_args(argv)
    try:
        return COMMANDS[command](args)
    except ValueError as exc:
        print(f"evergreen {command}: {exc}", file=sys.stderr)
        return 2
    except ControlPlaneError as exc:
        print(f"evergreen {command}: {exc}", file=sys.stderr)
        return 1
