"""Chaos benchmark: a CartPole run of several minutes that loses components and gets them back.

While `evergreen train` runs (started as a user would, `--run-dir D --resume-if-exists`, so that the
command that restarts it after a crash is the same one), this script, from outside the run:

* kills a random actor every ``--actor-kill-every`` seconds (SIGKILL of the actor's process),
* kills the replay shard's server once (SIGKILL), 5 s after a checkpoint,
* scales the actors 1 -> 3 -> 1 through `evergreen scale`,
* kills the driver once (SIGKILL of `evergreen train`; the run's watchdog ends its local Ray) and
  starts the same command again, which resumes the run from its last checkpoint,

and measures, for each fault: the time until the component is back (from `evergreen status`), the env
steps and updates lost (the driver's: counters last seen minus the checkpoint's), the replay rows lost
against their bound (the shard's inserts at the crash minus those in its last checkpoint), and whether
the counters after the resume equal the checkpoint's. It samples the resident memory of every component
(driver, learner, replay host and server, actors, the run's Redis) every few seconds and fits a slope per
hour to each, once replay is full.

    python benchmarks/chaos.py                       # ~7 minutes on 2 CPUs; table + benchmarks/results/chaos.json
    python benchmarks/chaos.py --total-env-steps 60000 --actor-kill-every 30   # a shorter pass

Targets (issue 11): the run finishes; nothing is lost beyond the bounds; every recovery under 30 s;
no component's memory grows by more than 1 % per hour once replay is full.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evergreen.control.commands import locate  # noqa: E402  (how `evergreen status` finds a run)
from learner.checkpoint import load_latest_checkpoint  # noqa: E402
from replay.auth import read_token_file  # noqa: E402
from replay.client import ReplayClient  # noqa: E402

RECOVERY_TARGET_S = 30.0
INSERT_BATCH = 64   # actors.insert_batch_size of the preset: the rows one writer can have in flight


class Run:
    """The `evergreen train` process under test, and what `evergreen status` says about it."""

    def __init__(self, run_dir: Path, args: argparse.Namespace):
        self.run_dir, self.args = run_dir, args
        self.log = open(run_dir.parent / "train.log", "a")  # noqa: SIM115 - closed at the end
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "evergreen", "train", "--preset", "cartpole", "--run-dir", str(self.run_dir),
                "--resume-if-exists", "--runs_dir", str(self.run_dir.parent / "runs"),
                "--learner.total_env_steps", str(a.total_env_steps), "--learner.stop_at_return", "1e9",
                "--dqn.compile", "false", "--replay.capacity", str(a.replay_capacity),
                "--replay.min_size_to_sample", "500", "--learner.checkpoint_every_s", str(a.checkpoint_every_s),
                "--learner.log_every_s", "2", "--control.heartbeat_s", "1", "--control.max_actors", "3",
                "--actors.restart_backoff_s", "1",
                # The kills are the benchmark's, one a minute: not the crash loop the pool guards against.
                "--actors.restart_window_s", str(max(1.0, a.actor_kill_every - 10))]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def status(self) -> dict | None:
        """`evergreen status --json`, or None while the control plane is not up."""
        try:
            target = locate(argparse.Namespace(run=str(self.run_dir), runs_dir="runs", redis_url="", password_file=""))
            plane = target.connect()
        except Exception:  # noqa: BLE001 - starting, or between a crash and its restart
            return None
        try:
            run = plane.run_info(target.run)
            return None if run is None else {"run": run, "components": plane.components(target.run),
                                             "control_pid": (target.file_data or {}).get("pid")}
        except Exception:  # noqa: BLE001
            return None
        finally:
            plane.close()

    def components(self, kind: str) -> list[dict]:
        s = self.status()
        return [] if s is None else [c for c in s["components"] if c["kind"] == kind]

    def driver(self) -> dict:
        found = self.components("driver")
        return found[0] if found else {}

    def wait(self, predicate, what: str, timeout_s: float = 120.0) -> float:
        """Seconds until ``predicate()`` holds; AssertionError after ``timeout_s``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if predicate():
                return time.monotonic() - start
            if self.proc is not None and self.proc.poll() is not None and what != "the run to end":
                raise RuntimeError(f"evergreen train exited ({self.proc.returncode}) while waiting for {what}")
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")

    def scale(self, n: int) -> None:
        subprocess.run([sys.executable, "-m", "evergreen", "scale", str(self.run_dir), "--actors", str(n)],
                       check=True, cwd=ROOT, capture_output=True)

    def running_actors(self) -> list[dict]:
        return [c for c in self.components("actor") if c.get("state") == "running" and c.get("pid")]


class Memory:
    """Resident memory of every component, sampled by pid (a restarted component is a new series)."""

    def __init__(self):
        self.samples: dict[str, list[tuple[float, float, bool]]] = {}

    def sample(self, status: dict | None, replay_full: bool) -> None:
        if status is None:
            return
        now = time.monotonic()
        pids = {f"redis/{status['control_pid']}": status["control_pid"]} if status.get("control_pid") else {}
        for c in status["components"]:
            for key in ("pid", "server_pid"):
                if c.get(key):
                    name = "replay-server" if key == "server_pid" else c["kind"]
                    pids[f"{name}/{c['id']}/{c[key]}"] = c[key]
        for series, pid in pids.items():
            try:
                rss = psutil.Process(int(pid)).memory_info().rss
            except (psutil.Error, ValueError):
                continue
            self.samples.setdefault(series, []).append((now, rss / 2**20, replay_full))

    def slopes(self, min_minutes: float = 5.0) -> list[dict]:
        """A linear fit per series over its samples once replay was full, for the series that lived at
        least ``min_minutes`` from then on (a minute or two of a restarted actor says nothing per hour)."""
        out = []
        for series, points in sorted(self.samples.items()):
            full = [(t, m) for t, m, f in points if f]
            if len(full) < 3 or full[-1][0] - full[0][0] < 60 * min_minutes:
                continue
            t = np.array([p[0] for p in full]) / 3600.0
            m = np.array([p[1] for p in full])
            slope = float(np.polyfit(t - t[0], m, 1)[0])          # MiB per hour
            out.append({"component": series.rsplit("/", 1)[0], "pid": int(series.rsplit("/", 1)[1]),
                        "minutes": round((t[-1] - t[0]) * 60, 1), "rss_mib": round(float(m.mean()), 1),
                        "slope_mib_per_h": round(slope, 2), "slope_pct_per_h": round(100 * slope / m.mean(), 2)})
        return out


def replay_checkpoint_inserts(run_dir: Path, *, before: float) -> int:
    """Rows inserted into the shard as of its newest checkpoint written before the wall time ``before``
    (the one a crash at ``before`` restores): its manifest's rate-limiter count."""
    manifests = [json.loads(p.read_text()) for p in (run_dir / "replay" / "shard-0").glob("ckpt-*/manifest.json")]
    manifest = max((m for m in manifests if m["created_unix_s"] < before), key=lambda m: m["created_unix_s"])
    return int(manifest["tables"]["replay"]["meta"]["limiter"]["inserts"])


def rows_lost_so_far(run_dir: Path) -> int:
    """replay_rows_lost of the newest metrics record (per run segment)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1]).get("replay_rows_lost", 0)) if lines else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total-env-steps", type=int, default=150_000)
    p.add_argument("--replay-capacity", type=int, default=30_000)
    p.add_argument("--checkpoint-every-s", type=float, default=30.0)
    p.add_argument("--actor-kill-every", type=float, default=60.0)
    p.add_argument("--shard-kill-at", type=float, default=80.0)
    p.add_argument("--driver-kill-at", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos.json"))
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="evergreen-chaos-"))
    run = Run(work / "chaos", args)
    memory = Memory()
    faults: list[dict] = []
    print(f"chaos: run dir {run.run_dir}; log {work / 'train.log'}", flush=True)
    run.start()
    run.wait(lambda: (s := run.status()) is not None and s["run"]["state"] == "running" and run.running_actors(),
             "the run to be running", timeout_s=180)
    t0 = time.monotonic()
    plan = sorted([(15.0, "scale", 3), (args.shard_kill_at, "kill_shard", None), (140.0, "scale", 1),
                   (args.driver_kill_at, "kill_driver", None)]
                  + [(t, "kill_actor", None) for t in np.arange(args.actor_kill_every, 3600, args.actor_kill_every)])
    next_sample = 0.0
    shard_client = None

    def replay_full() -> bool:
        shards = run.components("replay")
        return bool(shards) and shards[0].get("size", 0) >= shards[0].get("capacity", 1)

    while run.proc.poll() is None:
        now = time.monotonic() - t0
        if now >= next_sample:
            memory.sample(run.status(), replay_full())
            next_sample = now + 5.0
        if run.proc.poll() is not None:
            break
        if not plan or plan[0][0] > now:
            time.sleep(0.25)
            continue
        at, kind, value = plan.pop(0)
        fault = {"fault": kind if kind != "scale" else f"scale to {value}", "at_s": round(now, 1)}
        try:
            if kind == "scale":
                run.scale(value)
                fault["recovery_s"] = round(run.wait(lambda v=value: len(run.running_actors()) == v,
                                                     f"{value} running actors"), 2)
            elif kind == "kill_actor":
                actors = run.running_actors()
                if not actors:
                    continue
                victim = rng.choice(actors)
                fault["fault"] = f"kill actor {victim['id']}"
                os.kill(int(victim["pid"]), signal.SIGKILL)
                fault["recovery_s"] = round(run.wait(
                    lambda v=victim: any(a["id"] == v["id"] and a["pid"] != v["pid"] for a in run.running_actors()),
                    f"actor {victim['id']} back"), 2)
                fault["bound"] = "its unsent insert batch (<= 64 rows) and its chunk's uncounted steps (~1 s)"
            elif kind == "kill_shard":
                (shard,) = run.components("replay")
                placement = json.loads((run.run_dir / "placement.json").read_text())
                server_pid = placement["replay"][0]["server_pid"]
                if shard_client is None:
                    shard_client = ReplayClient([shard["address"]], timeout=10,
                                                token=read_token_file(run.run_dir / "replay.token"))
                # A checkpoint, 5 s of writes, then the crash: every writer of those 5 s is still running
                # when the shard comes back, so each finds and counts its own loss (a writer that stopped
                # between a checkpoint and a crash is not there to count its rows; see docs).
                shard_client.checkpoint()
                time.sleep(5.0)
                lost_before = rows_lost_so_far(run.run_dir)
                writers = len(run.running_actors())
                written = shard_client.info()[0].inserts
                os.kill(int(server_pid), signal.SIGKILL)
                killed_wall = time.time()
                generation = shard.get("generation", 0)
                fault["recovery_s"] = round(run.wait(
                    lambda g=generation: any(c.get("generation") == g + 1 and c.get("state") == "running"
                                             for c in run.components("replay")), "the shard back"), 2)
                # The checkpoint it restored (read now: one written after the reading above would count).
                checkpointed = replay_checkpoint_inserts(run.run_dir, before=killed_wall)
                time.sleep(8.0)   # every writer finds its loss at its next insert; then the record says it
                fault["rows_lost"] = rows_lost_so_far(run.run_dir) - lost_before
                expected = written - checkpointed
                fault["bound"] = (f"{expected} rows written since its checkpoint, +- one insert batch per "
                                  f"writer in flight ({writers} x {INSERT_BATCH})")
                fault["within_bound"] = abs(fault["rows_lost"] - expected) <= writers * INSERT_BATCH
            elif kind == "kill_driver":
                seen = run.driver()
                os.kill(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
                killed = time.monotonic()
                state = load_latest_checkpoint(run.run_dir / "checkpoints")
                counters = state["counters"]
                fault["env_steps_lost"] = seen.get("env_steps", 0) - counters["env_steps"]
                fault["updates_lost"] = seen.get("updates", 0) - counters["updates"]
                time.sleep(3.0)   # the watchdog ends the old local Ray
                run.start()       # the same command: it finds the run and resumes it
                run.wait(lambda c=counters: (run.run_dir / "resumed.json").exists() and
                         json.loads((run.run_dir / "resumed.json").read_text())["env_steps"] == c["env_steps"],
                         "the resume", timeout_s=180)
                run.wait(lambda: (s := run.status()) is not None and s["run"]["state"] == "running" and
                         run.running_actors(), "the resumed run to be running", timeout_s=180)
                fault["recovery_s"] = round(time.monotonic() - killed, 2)
                resumed = json.loads((run.run_dir / "resumed.json").read_text())
                fault["counters_equal_checkpoint"] = (resumed["updates"] == counters["updates"] and
                                                      resumed["env_steps"] == counters["env_steps"])
                fault["bound"] = f"<= {args.checkpoint_every_s:g} s of training (the checkpoint period)"
                # The new segment's scale is the config's again (1 actor): the plan goes on from there.
                shard_client = None
        except (AssertionError, RuntimeError) as exc:
            fault["error"] = str(exc)
        fault["recovered"] = "error" not in fault and fault.get("recovery_s", 0) < RECOVERY_TARGET_S
        faults.append(fault)
        print(f"  {fault}", flush=True)
    run.proc.wait()
    finished = run.proc.returncode == 0
    final = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    result = {"finished": finished, "returncode": run.proc.returncode, "env_steps": final["env_steps"],
              "updates": final["updates"], "wall_s": round(time.monotonic() - t0, 1), "faults": faults,
              "memory": memory.slopes(), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    run.log.close()
    return 0 if finished and all(f["recovered"] and f.get("within_bound", True) for f in faults) else 1


def print_table(result: dict) -> None:
    print(f"\nrun finished: {result['finished']} (exit {result['returncode']}), {result['env_steps']:,} env steps, "
          f"{result['updates']:,} updates, {result['wall_s']:.0f} s")
    print("| fault | at (s) | recovery (s) | env steps lost | updates lost | rows lost | bound | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for f in result["faults"]:
        ok = f["recovered"] and f.get("within_bound", True) and f.get("counters_equal_checkpoint", True)
        print(f"| {f['fault']} | {f['at_s']:.0f} | {f.get('recovery_s', '-')} | {f.get('env_steps_lost', '-')} | "
              f"{f.get('updates_lost', '-')} | {f.get('rows_lost', '-')} | {f.get('bound', '')} | "
              f"{'yes' if ok else 'NO: ' + f.get('error', 'see json')} |")
    print("\n| component | pid | minutes (replay full) | RSS (MiB) | slope (MiB/h) | slope (%/h) |")
    print("|---|---|---|---|---|---|")
    for m in result["memory"]:
        print(f"| {m['component']} | {m['pid']} | {m['minutes']} | {m['rss_mib']} | {m['slope_mib_per_h']} | "
              f"{m['slope_pct_per_h']} |")


if __name__ == "__main__":
    sys.exit(main())
