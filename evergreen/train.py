"""`evergreen train`: every component of a local run, wired in one place.

    evergreen train --preset cartpole
    evergreen train --preset pong --plasticity layer_norm,weight_decay,redo --learner.total_env_steps 200000
    evergreen train --resume runs/cartpole-20261121-193000

The links, in the order ``Trainer.run`` makes them:

1. replay shards  — ``replay.launch.ShardProcess`` per shard (separate processes, port 0, each with a
   checkpoint directory in the run dir, from which it restores on ``--resume``);
2. Ray            — local, ``num_cpus`` from the machine, no dashboard; only the process/placement layer;
3. weight store   — a Ray actor holding the latest (version, object ref) of the learner's weights;
4. learner        — ``learner.dqn.DQN`` (plain PyTorch) with the run's plasticity interventions;
5. actors         — ``actors.ray_actor.ActorPool``: each actor writes straight to replay over gRPC
   (experience never passes through this process) and pulls weights by version;
6. learner loop   — ``learner.loop.LearnerLoop``: a prefetch thread samples from replay, updates,
   priorities go back to the owning shard, weights are published every K updates;
7. bookkeeping    — progress line, metrics log (JSON lines), checkpoints every N seconds and at
   the end (Ctrl-C included), plasticity diagnostics on a held-out probe batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evergreen.config import RunConfig, load_config, read_config, save_config
from evergreen.configtools import add_flags, apply_flags


@dataclass
class Summary:
    run_dir: str
    env_steps: int
    updates: int
    episodes: int
    wall_seconds: float
    mean_return_100: float | None
    solved: bool
    stopped_by: str

    def format(self) -> str:
        ret = "n/a" if self.mean_return_100 is None else f"{self.mean_return_100:.1f}"
        return (
            f"\n== evergreen train: {self.stopped_by}\n"
            f"   run dir        {self.run_dir}\n"
            f"   env steps      {self.env_steps:,}\n"
            f"   updates        {self.updates:,}\n"
            f"   episodes       {self.episodes:,}\n"
            f"   mean return    {ret} (last 100 episodes){'  SOLVED' if self.solved else ''}\n"
            f"   wall time      {self.wall_seconds:.0f} s\n"
            f"   resume with    evergreen train --resume {self.run_dir}\n"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evergreen train",
        description="Train a DQN-family agent with Ray actors, a sharded gRPC replay service and a PyTorch learner.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="cartpole", help="a preset name from configs/ or a path to a JSON file")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--plasticity", metavar="NAMES", dest="plasticity_shortcut",
                        help="shortcut for --plasticity.interventions, e.g. layer_norm,weight_decay,redo")
    parser.add_argument("--run-dir", metavar="DIR", help="exact run directory to create (default: runs_dir/name-time)")
    add_flags(parser, RunConfig)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.json").exists():
                raise ValueError(f"--resume {run_dir}: no config.json there; expected a run directory made by evergreen train")
            # Flags given with --resume override the stored config (e.g. a longer --learner.total_env_steps).
            config = apply_flags(read_config(run_dir / "config.json"), args, RunConfig)
        else:
            config = apply_flags(load_config(preset=args.preset), args, RunConfig)
            run_dir = None
        if args.plasticity_shortcut is not None:
            config = dataclasses.replace(
                config, plasticity=dataclasses.replace(config.plasticity, interventions=args.plasticity_shortcut)
            )
        config.validate()
    except ValueError as exc:
        print(f"evergreen train: {exc}", file=sys.stderr)
        return 2
    if run_dir is None:
        run_dir = Path(args.run_dir) if args.run_dir else Path(config.runs_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / "config.json").exists():
            print(f"evergreen train: {run_dir} already holds a run; use --resume {run_dir}", file=sys.stderr)
            return 2
    from actors.ray_actor import ActorPoolError

    try:
        summary = Trainer(config, run_dir=run_dir, resume=bool(args.resume)).run()
    except ActorPoolError as exc:
        print(f"evergreen train: stopped: actors crash-looping: {exc}\n"
              f"  the last checkpoint in {run_dir} is intact; fix the cause and resume with "
              f"evergreen train --resume {run_dir}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


def env_spec(config: RunConfig) -> tuple[tuple[int, ...], str, int]:
    """Observation shape, dtype and action count, read off one throwaway environment."""
    from actors.envs import make_vector_env

    env = make_vector_env(config.env.replace(num_envs=1))
    try:
        return tuple(env.observation_shape), np.dtype(env.observation_dtype).name, int(env.num_actions)
    finally:
        env.close()


def default_error_buffer(config: RunConfig) -> float:
    """Slack of the samples-per-insert limiter: room for several sample batches and insert calls.

    The limiter refuses calls that could never fit in its band (2 * error_buffer), and an actor's
    insert call may carry a few batches' worth of rows at episode ends, hence the factor 4.
    """
    spi = config.replay.samples_per_insert
    per_shard = config.replay.capacity // config.replay.num_shards
    return float(max(10 * config.learner.batch_size, 4 * config.actors.insert_batch_size * spi, 0.01 * per_shard))


def table_config(config: RunConfig, *, obs_shape, obs_dtype) -> Any:
    """The replay table every shard holds, with the schema the actors' adder writes."""
    from actors.adder import schema as adder_schema
    from replay.schema import Field, Schema
    from replay.table import TableConfig

    r = config.replay
    fields = tuple(Field(name=name, dtype=np.dtype(dtype).name, shape=tuple(shape))
                   for name, dtype, shape in adder_schema(obs_shape, obs_dtype))
    storage = r.storage
    if storage == "auto":
        storage = "atari" if len(obs_shape) == 3 and np.dtype(obs_dtype) == np.uint8 else "ring"
    per_shard = r.capacity // r.num_shards
    min_size = max(1, min(r.min_size_to_sample, per_shard))
    error_buffer = r.error_buffer or default_error_buffer(config)
    return TableConfig(
        name="replay",
        schema=Schema(fields=fields),
        capacity=per_shard,
        storage=storage,
        sampler=r.sampler,
        priority_exponent=r.priority_exponent,
        min_size_to_sample=min_size,
        samples_per_insert=r.samples_per_insert or None,
        error_buffer=error_buffer,
        seed=config.seed,
    )


def per_sample_td_loss(network: torch.nn.Module, batch: dict[str, torch.Tensor], *, algorithm: Any) -> torch.Tensor:
    """Per-sample Huber TD loss of ``network`` on a replay batch, with the algorithm's target network.

    The loss whose curvature (``hessian_max_eig``) and per-sample gradient agreement
    (``grad_interference``) the diagnostics measure; distributional heads are reduced to their mean.
    """
    def q(net: torch.nn.Module, obs: torch.Tensor) -> torch.Tensor:
        out = net(obs)
        return out.mean(dim=-1) if out.dim() == 3 else out

    action = batch["action"].long()
    with torch.no_grad():
        next_q = q(algorithm.target, batch["next_obs"])
        best = q(network, batch["next_obs"]).argmax(dim=1, keepdim=True) if algorithm.config.double \
            else next_q.argmax(dim=1, keepdim=True)
        target = batch["reward"] + batch["discount"] * next_q.gather(1, best).squeeze(1)
    taken = q(network, batch["obs"]).gather(1, action[:, None]).squeeze(1)
    return torch.nn.functional.huber_loss(taken, target, reduction="none", delta=algorithm.config.huber_delta)


class ReplayInserter:
    """Picklable ``insert(columns)`` for one actor: routes by the actor's writer key."""

    def __init__(self, client: Any, writer_key: str):
        self.client, self.writer_key = client, writer_key

    def __call__(self, columns: dict[str, np.ndarray]) -> Any:
        return self.client.insert(columns, writer_key=self.writer_key)


def exploration_schedule(actors: Any, *, index: int, step_offset: int = 0) -> Any:
    """Linear decay from epsilon_start to actor ``index``'s Ape-X epsilon, resumed at ``step_offset``."""
    from actors.policy import ConstantEpsilon, LinearEpsilon, apex_epsilon

    end = apex_epsilon(index=index, num_actors=actors.num_actors, base=actors.epsilon_base, alpha=actors.epsilon_alpha)
    remaining = actors.epsilon_decay_steps - step_offset
    if remaining <= 0:
        return ConstantEpsilon(end)
    full = LinearEpsilon(start=actors.epsilon_start, end=end, steps=max(1, actors.epsilon_decay_steps))
    return LinearEpsilon(start=full(step_offset), end=end, steps=remaining)


class Trainer:
    """One local training run; ``run()`` returns a Summary. See the module docstring for the wiring."""

    def __init__(self, config: RunConfig, *, run_dir: Path, resume: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self._stop_reason: str | None = None
        self._shards: list[Any] = []
        self._pool = None
        self._telemetry = None
        self._targets_dir = Path(config.runs_dir) / "prometheus_targets"

    def request_stop(self, reason: str) -> None:
        """Ask a running ``run()`` to stop at its next loop iteration (checkpointing as usual)."""
        self._stop_reason = reason

    # -- setup -------------------------------------------------------------------------------------

    def _start_replay(self, table) -> Any:
        from replay.client import ReplayClient
        from replay.launch import ShardProcess

        for i in range(self.config.replay.num_shards):
            shard = ShardProcess([table], checkpoint_dir=self.run_dir / "replay" / f"shard-{i}", shard_index=i,
                                 metrics_port=0)
            self._shards.append(shard)
        return ReplayClient([s.address for s in self._shards], table=table.name)

    def _start_telemetry(self) -> None:
        """The learner's /metrics endpoint, and a Prometheus file_sd targets file naming every exporter."""
        from evergreen.telemetry import TelemetryExporter, write_targets

        cfg = self.config
        self._telemetry = TelemetryExporter(run=self.run_dir.name, task=cfg.env.id, batch_size=cfg.learner.batch_size,
                                            port=cfg.telemetry_port)
        port = self._telemetry.start()
        write_targets(self.run_dir, {"learner": port, "replay": [s.metrics_port for s in self._shards]},
                      sd_dir=self._targets_dir)
        print(f"  metrics: learner http://127.0.0.1:{port}/metrics, replay "
              + ", ".join(f"http://127.0.0.1:{s.metrics_port}/metrics" for s in self._shards))

    def _device(self) -> torch.device:
        want = self.config.learner.device
        if want == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(want)

    def run(self) -> Summary:
        import ray

        from actors.ray_actor import ActorPool
        from evergreen.weights import RayWeightSource, WeightPublisher, WeightStore
        from learner.checkpoint import load_latest_checkpoint
        from learner.dqn import DQN
        from learner.networks import build_network
        from plasticity.interventions import build_interventions

        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            save_config(cfg, self.run_dir / "config.json")
        obs_shape, obs_dtype, num_actions = env_spec(cfg)
        table = table_config(cfg, obs_shape=obs_shape, obs_dtype=obs_dtype)
        log = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in finally
        print(f"evergreen train: run dir {self.run_dir} ({'resuming' if self.resume else 'new run'}); "
              f"env {cfg.env.id} obs {obs_shape} {obs_dtype}, {num_actions} actions")
        cpus = os.cpu_count() or 2
        if cfg.learner.num_threads:
            torch.set_num_threads(cfg.learner.num_threads)
        else:
            torch.set_num_threads(max(1, cpus - 1))
        previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            client = self._start_replay(table)
            self._start_telemetry()
            ray.init(num_cpus=max(cpus, cfg.actors.num_actors + 1), include_dashboard=False,
                     log_to_driver=True, configure_logging=False, ignore_reinit_error=True)
            interventions = build_interventions(cfg.plasticity.interventions, cfg.plasticity.options) \
                if cfg.plasticity.interventions else []
            device = self._device()
            algorithm = DQN(cfg.dqn, cfg.network, obs_shape=obs_shape, num_actions=num_actions,
                            obs_dtype=obs_dtype, device=str(device), seed=cfg.seed, interventions=interventions)
            counters = {"env_steps": 0, "updates": 0, "episodes": 0, "elapsed_s": 0.0}
            returns: deque[float] = deque(maxlen=100)
            if self.resume:
                state = load_latest_checkpoint(self.run_dir / "checkpoints")
                if state is None:
                    raise RuntimeError(f"--resume {self.run_dir}: no learner checkpoint in {self.run_dir / 'checkpoints'}")
                algorithm.load_state_dict(state["algorithm"])
                counters.update(state["counters"])
                returns.extend(state["recent_returns"])
                print(f"  resumed at env step {counters['env_steps']:,}, update {counters['updates']:,}")
            # Actors build the learner's architecture: the network config with the interventions' overrides.
            network_factory = functools.partial(build_network, algorithm.network_config, obs_shape=obs_shape,
                                                num_actions=num_actions, obs_dtype=obs_dtype)
            store = WeightStore.remote()
            publisher = WeightPublisher(store, network=lambda: algorithm.online,
                                        actor_keys=set(network_factory().state_dict()))
            publisher(counters["updates"], algorithm.weights())
            weight_source = RayWeightSource(store)
            a = cfg.actors
            # On resume, each actor's exploration schedule continues where the run left off.
            step_offset = counters["env_steps"] // max(1, a.num_actors)

            def actor_kwargs(index: int) -> dict[str, Any]:
                return dict(
                    env_config=cfg.env,
                    network_factory=network_factory,
                    insert=ReplayInserter(client, writer_key=f"actor-{index}"),
                    weights_source=weight_source,
                    n_step=a.n_step, gamma=a.gamma,
                    epsilon=exploration_schedule(a, index=index, step_offset=step_offset),
                    actor_index=index, num_actors=a.num_actors,
                    insert_batch_size=a.insert_batch_size, weights_poll_interval=a.weight_poll_steps,
                    seed=cfg.seed * 10_007 + index * 1_000 + counters["episodes"],
                )

            self._pool = ActorPool(a.num_actors, actor_kwargs, restart_backoff_s=a.restart_backoff_s,
                                   max_restarts_per_window=a.max_restarts, restart_window_s=a.restart_window_s)
            self._pool.start()

            def on_signal(signum, _frame):
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                self._stop_reason = f"interrupted ({name}); checkpoint written"

            # SIGINT (Ctrl-C) and SIGTERM (docker stop, Kubernetes) both stop at the next iteration,
            # checkpoint, and shut everything down in order.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
            return self._learn(algorithm=algorithm, client=client, publisher=publisher, counters=counters,
                               returns=returns, log=log, device=device)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self._shutdown()
            log.close()

    # -- the loop ----------------------------------------------------------------------------------

    def _learn(self, *, algorithm, client, publisher, counters, returns, log, device) -> Summary:
        from learner.checkpoint import save_checkpoint
        from learner.loop import Batch, LearnerLoop, Prefetcher
        from replay.errors import DeadlineExceeded

        cfg, lrn = self.config, self.config.learner
        total = lrn.total_env_steps
        base_elapsed = counters["elapsed_s"]
        t0 = time.time()
        prioritized = cfg.replay.sampler == "prioritized"

        def beta() -> float:
            progress = min(1.0, counters["env_steps"] / total)
            return cfg.replay.importance_beta_start + (1.0 - cfg.replay.importance_beta_start) * progress

        def sample(timeout: float):
            try:
                return client.sample(lrn.batch_size, beta=beta(), timeout=timeout)
            except DeadlineExceeded:
                return None  # replay still filling, or the rate limiter holds the learner back

        def convert(raw) -> Batch:
            tensors = {k: torch.from_numpy(v).to(device, non_blocking=True)
                       for k, v in raw.columns.items() if k != "policy_version"}
            weights = torch.from_numpy(raw.weights).to(device) if prioritized else None
            return Batch(tensors=tensors, keys=raw.keys, weights=weights,
                         policy_version=raw.columns.get("policy_version"))

        def poll_actors() -> Any:
            self._pool.check()  # raises if an actor is crash-looping
            stats = self._pool.stats()
            counters["env_steps"] += stats.env_steps
            counters["episodes"] += stats.num_episodes
            for task_returns in stats.episode_returns.values():
                returns.extend(float(r) for r in task_returns)
            return stats

        diagnostics = self._wait_for_diagnostics(algorithm, client, poll_actors) if cfg.plasticity.diagnostics else None
        prefetcher = Prefetcher(sample=sample, convert=convert, depth=lrn.prefetch_batches).start()
        loop = LearnerLoop(algorithm=algorithm, prefetcher=prefetcher,
                           update_priorities=client.update_priorities if prioritized else None,
                           publish=publisher, publish_every=lrn.publish_every,
                           diagnostics=diagnostics, start_updates=counters["updates"])
        last_log = last_ckpt = last_poll = time.time()
        last_steps, last_updates, last_wait = counters["env_steps"], counters["updates"], 0.0
        window: dict[str, list[float]] = {}
        interval_returns: list[float] = []
        interval_episodes: dict[str, dict[str, list[float]]] = {}
        stopped_by = "reached learner.total_env_steps"

        def checkpoint() -> None:
            # The learner first: it is local and what --resume needs; replay shards can lose at most the
            # transitions since their previous checkpoint, which only costs a little data.
            save_checkpoint(self.run_dir / "checkpoints", {
                "algorithm": algorithm.state_dict(),
                "counters": dict(counters, elapsed_s=base_elapsed + time.time() - t0),
                "recent_returns": list(returns),
            }, step=counters["updates"])
            try:
                client.checkpoint(timeout=120.0)
            except Exception as exc:  # noqa: BLE001 - reported; the run goes on / ends regardless
                print(f"  replay checkpoint failed ({exc}); shards keep their previous checkpoint", file=sys.stderr)

        def emit(now: float) -> None:
            """One metrics-log record, progress line and telemetry update for the interval ending now."""
            nonlocal last_log, last_steps, last_updates, last_wait, interval_episodes
            dt = max(now - last_log, 1e-6)
            record = self._record(counters, returns, interval_returns, window, loop, client, stats,
                                  env_rate=(counters["env_steps"] - last_steps) / dt,
                                  update_rate=(counters["updates"] - last_updates) / dt,
                                  wait_fraction=(prefetcher.wait_seconds - last_wait) / dt,
                                  elapsed=base_elapsed + now - t0)
            log.write(json.dumps(record) + "\n")
            print(self._progress_line(record), flush=True)
            try:
                self._telemetry.update(record, episodes_by_task=interval_episodes)
            except ValueError as exc:  # a malformed metric must not stop a multi-day run
                print(f"  telemetry: {exc}", file=sys.stderr)
            window.clear()
            interval_returns.clear()
            interval_episodes = {}
            last_log, last_steps, last_updates = now, counters["env_steps"], counters["updates"]
            last_wait = prefetcher.wait_seconds

        stats = None
        try:
            while True:
                now = time.time()
                if stats is None or now - last_poll >= 0.5:
                    stats = poll_actors()
                    for task, task_returns in stats.episode_returns.items():
                        interval_returns.extend(float(r) for r in task_returns)
                        into = interval_episodes.setdefault(task, {"returns": [], "lengths": []})
                        into["returns"].extend(float(r) for r in task_returns)
                        into["lengths"].extend(float(n) for n in stats.episode_lengths.get(task, ()))
                    last_poll = now
                if counters["env_steps"] >= total:
                    break
                if lrn.stop_at_return is not None and len(returns) >= 100 and np.mean(returns) >= lrn.stop_at_return:
                    stopped_by = f"solved: mean return of the last 100 episodes {np.mean(returns):.1f} >= {lrn.stop_at_return}"
                    break
                if self._stop_reason:
                    stopped_by = self._stop_reason
                    break
                # Pacing without a replay rate limiter: keep updates near updates_per_env_step * env steps.
                ahead = (lrn.updates_per_env_step > 0 and not cfg.replay.samples_per_insert
                         and counters["updates"] >= lrn.updates_per_env_step * counters["env_steps"])
                if ahead:
                    time.sleep(0.005)
                else:
                    metrics = loop.step(timeout=0.2)
                    if metrics is not None:
                        counters["updates"] = loop.counters.updates
                        for k, v in metrics.items():
                            window.setdefault(k, []).append(float(v))
                if now - last_log >= lrn.log_every_s:
                    emit(now)
                if now - last_ckpt >= lrn.checkpoint_every_s:
                    checkpoint()
                    last_ckpt = now
            emit(time.time())  # the log ends on the run's final state
        finally:
            loop.close()
        checkpoint()
        c = loop.counters
        if c.update_seconds > 0:
            print(f"  learner: {c.update_seconds:.1f} s in updates, {c.diagnostics_seconds:.2f} s in diagnostics "
                  f"({100 * c.diagnostics_seconds / c.update_seconds:.1f}% of update time), "
                  f"{prefetcher.wait_seconds:.1f} s waiting on replay")
        mean_return = float(np.mean(returns)) if returns else None
        solved = bool(lrn.stop_at_return is not None and len(returns) >= 100 and mean_return >= lrn.stop_at_return)
        return Summary(run_dir=str(self.run_dir), env_steps=counters["env_steps"], updates=counters["updates"],
                       episodes=counters["episodes"], wall_seconds=time.time() - t0 + base_elapsed,
                       mean_return_100=mean_return, solved=solved, stopped_by=stopped_by)

    def _wait_for_diagnostics(self, algorithm, client, poll_actors):
        """Diagnostics on a held-out probe batch: sampled once from replay when it first can be."""
        from plasticity.diagnostics import Diagnostics
        from replay.errors import DeadlineExceeded

        p = self.config.plasticity
        while True:
            poll_actors()
            if self._stop_reason:
                return None
            try:
                raw = client.sample(p.probe_size, beta=1.0, timeout=1.0)
                break
            except DeadlineExceeded:
                continue
        probe = torch.from_numpy(raw.columns["obs"]).to(algorithm.device)
        algorithm.set_probe(probe)
        return Diagnostics(algorithm.online, names=p.diagnostics, every=p.diagnostics_every, probe_obs=probe,
                           loss_fn=functools.partial(per_sample_td_loss, algorithm=algorithm))

    def _record(self, counters, returns, interval_returns, window, loop, client, stats, *,
                env_rate, update_rate, wait_fraction, elapsed):
        info = client.info()
        record: dict[str, Any] = {
            "time": time.time(), "elapsed_s": round(elapsed, 2),
            "env_steps": counters["env_steps"], "updates": counters["updates"], "episodes": counters["episodes"],
            "env_steps_per_s": round(env_rate, 1), "updates_per_s": round(update_rate, 2),
            "return_mean_100": float(np.mean(returns)) if returns else None,
            "return_recent": float(np.mean(interval_returns)) if interval_returns else None,
            "replay_size": int(sum(i.size for i in info)),
            "replay_inserts": int(sum(i.inserts for i in info)),
            "learner_wait_fraction": round(min(1.0, wait_fraction), 4),
            "policy_lag_updates": loop.take_policy_lag(),
            # Learner version minus the oldest version any actor acted with in this interval.
            "actor_policy_lag_updates": (loop.counters.published_version - stats.min_policy_version
                                         if stats.min_policy_version >= 0 else None),
            "actor_restarts": stats.restarts_total, "num_actors": stats.num_actors,
            "actors_running": stats.running,
        }
        for key, values in window.items():
            record[key] = float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else None
        record.update(loop.last_diagnostics)
        return record

    @staticmethod
    def _progress_line(r: dict[str, Any]) -> str:
        ret = "   n/a" if r["return_mean_100"] is None else f"{r['return_mean_100']:6.1f}"
        lag = "n/a" if r["policy_lag_updates"] is None else f"{r['policy_lag_updates']:.0f}"
        loss = "n/a" if r.get("loss") is None else f"{r['loss']:.4f}"
        return (f"[{r['elapsed_s']:7.1f}s] env {r['env_steps']:>9,} ({r['env_steps_per_s']:6.0f}/s) | "
                f"upd {r['updates']:>8,} ({r['updates_per_s']:5.1f}/s) | return(100) {ret} | "
                f"episodes {r['episodes']:,} | replay {r['replay_size']:,} | lag {lag} | "
                f"wait {100 * r['learner_wait_fraction']:.0f}% | loss {loss}")

    def _shutdown(self) -> None:
        import ray

        from evergreen.telemetry import clear_targets

        if self._telemetry is not None:
            self._telemetry.stop()
            clear_targets(self.run_dir, sd_dir=self._targets_dir)

        if self._pool is not None:
            try:
                self._pool.stop()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway; say so
                print(f"  (actor pool stop: {exc})", file=sys.stderr)
        for shard in self._shards:
            shard.stop()
        if ray.is_initialized():
            ray.shutdown()
