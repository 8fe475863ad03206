"""`evergreen train`: every component of a run, wired in one place, locally or on a Ray cluster.

    evergreen train --preset cartpole
    evergreen train --preset pong --plasticity layer_norm,weight_decay,redo --learner.total_env_steps 200000
    evergreen train --preset cartpole --ray.address auto      # an existing cluster (e.g. KubeRay)
    evergreen train --resume runs/cartpole-20261121-193000

The driver (this process) only coordinates: every component is a Ray actor with the resources
its ``placement`` declares, and experience goes actors -> replay shards -> learner over gRPC, never
through the driver or the object store. The links, in the order ``Trainer.run`` makes them:

1. agent builder  — ``evergreen.agents``: the algorithm's replay schema, learner, policy, adder,
   diagnostics and telemetry families, from the config and the env's spec;
2. Ray            — local (with a watchdog that ends it if this process is killed), or a cluster;
3. replay shards  — one ``replay.ray_shard.ShardActor`` per shard, each running a shard server on
   its node that refuses calls without the run's token and rows outside the agent's bounds,
   checkpointing to its directory (and restoring from it on ``--resume``);
4. telemetry      — this process serves the run's ``/metrics`` (learner and actor statistics);
5. weight store   — a Ray actor holding the latest (version, object ref) of the acting weights, and
   the continual scenario's current task (``evergreen.scenario``), which actors follow at their polls;
6. learner        — ``learner.ray_learner.LearnerGroup``: ``learner.num_ranks`` data-parallel ranks (one
   by default), each with the algorithm, a prefetching replay dataset, updates and priority write-back;
   rank 0 publishes weights, runs diagnostics and checkpoints; restored on ``--resume``;
7. actors         — ``actors.ray_actor.ActorPool``: each actor writes straight to replay over gRPC
   and pulls weights by version;
8. coordination   — learner ``train`` calls kept queued, actor statistics polled, the scenario's task
   switches at their env steps (learner first, then the store), records, progress line and checkpoints
   by ``evergreen.bookkeeping``; the run stops on its env-step budget, a solved task, Ctrl-C/SIGTERM,
   or a component that failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from evergreen.bookkeeping import Bookkeeping, Summary
from evergreen.config import RunConfig, load_config, read_config, save_config
from evergreen.configtools import add_flags, apply_flags
from evergreen.control.plane import ControlPlaneError
from evergreen.scenario import Scenario

#: Seconds of learner work per ``train`` call; two calls are kept queued so the learner never idles.
LEARNER_CHUNK_S = 0.25
#: Seconds between polls of the actors' statistics.
ACTOR_POLL_S = 0.5
#: At a task switch, how long the driver waits for every running actor to stop at the env-step gate
#: with its rows inserted, before it switches anyway (an actor stuck elsewhere must not stall the run).
GATE_DRAIN_S = 10.0
#: How often the driver checks that every replay shard's server runs, and how many crashes of one
#: shard within the window it restarts before it stops the run as a crash loop.
SHARD_CHECK_S = 1.0
SHARD_MAX_RESTARTS = 5
SHARD_RESTART_WINDOW_S = 600.0


class ComponentError(RuntimeError):
    """A component of the run (learner, replay shard) failed; the run stops, its checkpoint intact."""


class LearnerError(ComponentError):
    """The learner itself failed: its state cannot be checkpointed any more."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evergreen train",
        description="Train an agent with Ray actors, a sharded gRPC replay service and a PyTorch learner, "
                    "locally or on a Ray cluster (--ray.address).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="cartpole", help="a preset name from configs/ or a path to a JSON file")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="with --run-dir: continue the run there if it exists, else start it (an entrypoint that "
                             "a RayJob or a container restart runs again after a crash)")
    parser.add_argument("--plasticity", metavar="NAMES", dest="plasticity_shortcut",
                        help="shortcut for --plasticity.interventions, e.g. layer_norm,weight_decay,redo")
    parser.add_argument("--run-dir", metavar="DIR", help="exact run directory to create (default: runs_dir/name-time)")
    add_flags(parser, RunConfig)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume_if_exists:
        if not args.run_dir:
            print("evergreen train: --resume-if-exists needs --run-dir", file=sys.stderr)
            return 2
        if (Path(args.run_dir) / "config.json").exists():
            args.resume = args.run_dir
            print(f"evergreen train: {args.run_dir} holds a run: resuming it", flush=True)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.json").exists():
                raise ValueError(f"--resume {run_dir}: no config.json there; expected a run directory made by evergreen train")
            # Flags given with --resume override the stored config (e.g. a longer --learner.total_env_steps).
            stored = read_config(run_dir / "config.json")
            config = apply_flags(stored, args, RunConfig)
            before, now = stored.scenario.replay_at_switch, config.scenario.replay_at_switch
            if (before == "per_task") != (now == "per_task"):  # the shards' checkpoints hold the other layout
                raise ValueError(f"--resume {run_dir}: scenario.replay_at_switch {before!r} -> {now!r} changes the "
                                 "replay tables the shards restore; per-task tables can only continue as per_task")
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
    except ControlPlaneError as exc:
        print(f"evergreen train: the control plane could not start: {exc}\n"
              "  (--control.enabled false runs without one: no evergreen status/scale/stop)", file=sys.stderr)
        return 1
    except ComponentError as exc:
        print(f"evergreen train: stopped: {exc}\n"
              f"  the last checkpoint in {run_dir} is intact; fix the cause and resume with "
              f"evergreen train --resume {run_dir}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


def default_error_buffer(config: RunConfig) -> float:
    """Slack of the samples-per-insert limiter, in sampled rows: a few sample batches or insert calls.

    Small on purpose: the band bounds how far updates and env steps may drift apart (here a few
    batches either way), so a fast learner and a slow one train on the same data per update. It
    must hold one sample call (``batch_size * batches_per_sample`` rows) and one insert call
    (``insert_batch_size * spi`` sampled rows), or the limiter would refuse calls that could never fit.
    """
    spi, lrn = config.replay.samples_per_insert, config.learner
    return float(max(4 * lrn.batch_size, 2 * lrn.batch_size * lrn.batches_per_sample,
                     2 * config.actors.insert_batch_size * spi))


def table_config(config: RunConfig, *, fields: list, obs_shape: tuple[int, ...], obs_dtype: Any,
                 bounds: dict[str, Any] | None = None, num_tasks: int = 1) -> Any:
    """The replay table every shard holds: the columns the agent's adder writes, with the agent's bounds
    (and task ids within the scenario's ``num_tasks``)."""
    from replay.schema import Bounds, Field, Schema
    from replay.table import TableConfig

    r = config.replay
    bounds = dict(bounds or {})
    if any(name == "task" for name, _, _ in fields):
        bounds.setdefault("task", Bounds.index(num_tasks))
    schema = Schema(fields=tuple(Field(name=name, dtype=np.dtype(dtype).name, shape=tuple(shape), bounds=bounds.get(name))
                                 for name, dtype, shape in fields))
    storage = r.storage
    if storage == "auto":
        storage = "atari" if len(obs_shape) == 3 and np.dtype(obs_dtype) == np.uint8 else "ring"
    per_shard = r.capacity // r.num_shards
    min_size = max(1, min(r.min_size_to_sample, per_shard))
    error_buffer = r.error_buffer or default_error_buffer(config)
    return TableConfig(
        name="replay",
        schema=schema,
        capacity=per_shard,
        storage=storage,
        sampler=r.sampler,
        priority_exponent=r.priority_exponent,
        min_size_to_sample=min_size,
        samples_per_insert=r.samples_per_insert or None,
        error_buffer=error_buffer,
        seed=config.seed,
    )


def table_configs(config: RunConfig, scenario: Scenario, **table_kwargs: Any) -> list[Any]:
    """Every table a shard holds: the one of :func:`table_config`, or with ``replay_at_switch: per_task``
    one per task of the scenario (``replay.task<i>``), each an equal share of the capacity."""
    from replay.task_tables import task_table_names

    one = table_config(config, num_tasks=len(scenario.tasks), **table_kwargs)
    if scenario.replay_at_switch != "per_task":
        return [one]
    share = one.capacity // len(scenario.tasks)
    if share < 1:
        raise ValueError(f"replay.capacity = {config.replay.capacity} leaves no room for {len(scenario.tasks)} "
                         f"per-task tables on each of {config.replay.num_shards} shard(s); expected at least "
                         f"{len(scenario.tasks) * config.replay.num_shards}")
    return [dataclasses.replace(one, name=name, capacity=share, min_size_to_sample=min(one.min_size_to_sample, share),
                                seed=None if one.seed is None else one.seed + i)
            for i, name in enumerate(task_table_names(one.name, len(scenario.tasks)))]


class ReplayInserter:
    """Picklable ``insert(columns)`` for one actor: routes by the actor's writer key, waits out backpressure.

    An insert the rate limiter holds back past the call's timeout (the learner is behind, or still
    starting) is asked again: being held back is the limiter doing its job, not an actor failure. So is
    an insert whose shard is unreachable (restarting): the actor holds its batch until the shard is back.
    """

    def __init__(self, client: Any, writer_key: str):
        self.client, self.writer_key = client, writer_key

    @property
    def rows_lost(self) -> int:
        """Rows replay acknowledged to this actor and later lost with a shard crash (the client counts them)."""
        return int(getattr(self.client, "lost_rows", 0))

    def __call__(self, columns: dict[str, np.ndarray]) -> Any:
        from replay.client import ShardUnavailable
        from replay.errors import DeadlineExceeded

        while True:
            try:
                return self.client.insert(columns, writer_key=self.writer_key)
            except DeadlineExceeded:
                continue
            except ShardUnavailable:   # its shard is restarting: hold the batch and ask again
                time.sleep(0.5)


def _resources(placement: Any) -> dict[str, Any]:
    """Ray ``.options(...)`` for a component's placement."""
    options: dict[str, Any] = {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus}
    if placement.resources:
        options["resources"] = dict(placement.resources)
    return options


def _bundle(placement: Any) -> dict[str, float]:
    """A component's placement as an autoscaler resource bundle."""
    bundle = {"CPU": placement.num_cpus, "GPU": placement.num_gpus, **placement.resources}
    return {k: float(v) for k, v in bundle.items() if v}


def _ray_error(exc: BaseException) -> str:
    """The last line of a Ray error: the component's own exception, without Ray's traceback wrapper."""
    text = str(getattr(exc, "cause", None) or exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class Trainer:
    """One training run; ``run()`` returns a Summary. See the module docstring for the wiring."""

    def __init__(self, config: RunConfig, *, run_dir: Path, resume: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self._stop_reason: str | None = None
        self._shards: list[Any] = []
        self._shard_endpoints: list[tuple[str, int | None]] = []
        self._learner = None
        self._pool = None
        self._store = None
        self._evaluations = None
        self.scenario: Scenario | None = None
        self._telemetry = None
        self._guard = None
        self._control = None
        self._shard_spec: dict[str, Any] = {}
        self._shard_crashes: dict[int, deque] = {}
        self._shard_restarts: dict[int, int] = {}
        self._shards_checked = 0.0
        self._replay_info: list[Any] = []   # the latest answer of every shard (a restarting one answers none)
        self._heard: dict[str, Any] = {}   # what the control plane's heartbeats repeat (see _beat)
        self._started_ray = False
        self._targets_dir = Path(config.runs_dir) / "prometheus_targets"

    def _evaluates(self) -> bool:
        """Whether this run evaluates beside training (periodically, or at a scenario's switches)."""
        ev = self.config.evaluation
        return ev.every_env_steps > 0 or (ev.at_switch and self.scenario.switches)

    def request_stop(self, reason: str) -> None:
        """Ask a running ``run()`` to stop at its next loop iteration (checkpointing as usual)."""
        self._stop_reason = reason

    # -- setup -------------------------------------------------------------------------------------

    def _start_ray(self) -> None:
        import psutil
        import ray

        from evergreen.watchdog import ProcessGuard

        cfg = self.config
        if ray.is_initialized():  # e.g. a test that joined a cluster already
            return
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, log_to_driver=True, configure_logging=False)
        else:
            before = {p.pid for p in psutil.Process().children(recursive=True)}
            self._guard = ProcessGuard.start()
            # Room for as many actors as `evergreen scale` may ask for: on a Ray of the run's own, logical
            # CPUs are only accounting (Ray does not start a process per CPU), and its size is fixed at init.
            actors = max(cfg.actors.num_actors, cfg.control.max_actors if cfg.control.enabled else 0)
            need = (cfg.replay.num_shards * cfg.replay.placement.num_cpus
                    + cfg.learner.num_ranks * cfg.learner.placement.num_cpus
                    + actors * cfg.actors.placement.num_cpus
                    + (cfg.evaluation.placement.num_cpus if self._evaluates() else 0.0))
            # Logical CPUs: enough for every component's reservation; they share the machine's cores.
            # address="local": a Ray of this run's own, even where RAY_ADDRESS is set or a `ray start`
            # cluster runs on the machine (with no address, ray.init would join the latest of those).
            options = dict(address="local", num_cpus=cfg.ray.num_cpus or max(int(np.ceil(need)), os.cpu_count() or 1),
                           include_dashboard=False, log_to_driver=True, configure_logging=False)
            try:
                ray.init(**options)
            except RuntimeError as exc:
                # Seen once in a loaded CI run: Ray's GCS server never wrote its port file (no log of it either)
                # and ray.init timed out. Starting a fresh local Ray again costs seconds; a real fault fails again.
                print(f"  ray: the local Ray did not start ({exc}); starting it again", file=sys.stderr)
                ray.shutdown()
                ray.init(**options)
            self._guard.watch(p for p in psutil.Process().children(recursive=True) if p.pid not in before)
        self._started_ray = True

    def _start_replay(self, tables: list[Any]) -> Any:
        """Start the shards; return the run's replay client (a TaskTables with per-task tables)."""
        import ray

        from replay.auth import ensure_token_file
        from replay.client import ReplayClient
        from replay.ray_shard import ShardActor
        from replay.task_tables import TaskTables

        r = self.config.replay
        # The run's replay token: made once (0600, in the run dir), read again on --resume; shards refuse
        # calls without it. It travels to shards, actors and the learner inside Ray, never on a command line.
        token = ensure_token_file(self.run_dir / "replay.token")
        template = r.checkpoint_dir or str(self.run_dir / "replay" / "shard-{shard}")
        # What a replacement needs (see _restart_shard): the same tables, directory and token.
        self._shard_spec = dict(tables=tables, token=token, template=template)
        for index in range(r.num_shards):
            directory = template.format(shard=index, run=self.run_dir.name)
            self._shards.append(ShardActor.options(**_resources(r.placement)).remote(
                tables, checkpoint_dir=directory, shard_index=index, host=r.host,
                cluster=bool(self.config.ray.address), token=token, metrics_port=r.metrics_port,
                # After a crash the shard's limiter may be ahead of the learner's checkpoint: re-centre it.
                rebase_limiter_on_restore=self.resume))
        try:
            self._shard_endpoints = ray.get([s.endpoint.remote() for s in self._shards])
        except ray.exceptions.RayError as exc:
            raise ComponentError(f"a replay shard failed to start: {_ray_error(exc)}") from exc
        addresses = [address for address, _ in self._shard_endpoints]
        if len(tables) > 1:
            return TaskTables.connect(addresses, names=[t.name for t in tables], token=token)
        return ReplayClient(addresses, table=tables[0].name, token=token)

    def _start_telemetry(self, builder: Any) -> None:
        """The run's /metrics endpoint, and a Prometheus file_sd targets file naming every exporter."""
        from evergreen.telemetry import TelemetryExporter, write_targets

        cfg = self.config
        self._telemetry = TelemetryExporter(run=self.run_dir.name, task=cfg.env.id, batch_size=cfg.learner.batch_size,
                                            port=cfg.telemetry_port, host=cfg.telemetry_host,
                                            families=builder.telemetry_families,
                                            networks=builder.networks)
        port = self._telemetry.start()
        # Where Prometheus reaches each exporter: a shard's metrics at its gRPC address's host (its node on
        # a cluster); the run's at telemetry_host, or at this node's address where that is a wildcard bind.
        from learner.parallel import local_ip

        wildcard = cfg.telemetry_host in ("0.0.0.0", "::")
        write_targets(self.run_dir, {"learner": port, "replay": [mp for _, mp in self._shard_endpoints]},
                      hosts={"learner": local_ip() if wildcard else cfg.telemetry_host,
                             "replay": [address.rsplit(":", 1)[0] for address, _ in self._shard_endpoints]},
                      sd_dir=self._targets_dir)
        print(f"  metrics: run http://127.0.0.1:{port}/metrics, replay "
              + ", ".join(f"http://{address.rsplit(':', 1)[0]}:{mp}/metrics" for address, mp in self._shard_endpoints))

    def _start_learner(self, builder: Any, client: Any, publisher: Any) -> Any:
        from learner.ray_learner import LearnerGroup

        cfg, lrn = self.config, self.config.learner
        # learner.num_ranks ranks, each with its placement; several form one data-parallel group.
        self._learner = LearnerGroup.start(
            num_ranks=lrn.num_ranks, options=_resources(lrn.placement),
            make_algorithm=builder.make_algorithm, client=client, batch_size=lrn.batch_size,
            prioritized=cfg.replay.sampler == "prioritized", publish=publisher,
            checkpoint_dir=lrn.checkpoint_dir or str(self.run_dir / "checkpoints"),
            publish_every=lrn.publish_every, beta_start=cfg.replay.importance_beta_start,
            total_env_steps=lrn.total_env_steps,
            # Pacing without a replay rate limiter; with one, the limiter ties updates to env steps.
            updates_per_env_step=0.0 if cfg.replay.samples_per_insert else lrn.updates_per_env_step,
            prefetch_batches=lrn.prefetch_batches,
            # Several batches per replay call, each call's rows drawn with the run's seed.
            batches_per_sample=lrn.batches_per_sample, sample_seed=cfg.seed,
            make_diagnostics=builder.make_diagnostics if cfg.plasticity.diagnostics else None,
            probe_size=cfg.plasticity.probe_size, device=lrn.device,
            num_threads=lrn.num_threads or max(1, int(lrn.placement.num_cpus)), flush_denormal=lrn.flush_denormal,
        )
        return self._learner

    def _start_actors(self, builder: Any, client: Any, store: Any, *, env_steps: int, episodes: int,
                      num_actors: int) -> Any:
        from actors.ray_actor import ActorPool
        from evergreen.weights import RayWeightSource

        cfg, a = self.config, self.config.actors
        weight_source = RayWeightSource(store)
        # On resume, each actor's exploration schedule continues where the run left off.
        step_offset = env_steps // max(1, a.num_actors)
        # Every task of the scenario; an actor follows the store's current task from its first poll.
        tasks = self.scenario.env_tasks() if self.scenario.switches else None

        def actor_kwargs(index: int) -> dict[str, Any]:
            return dict(
                env_config=cfg.env,
                policy=builder.make_policy(actor_index=index, env_steps_offset=step_offset),
                adder=builder.make_adder(),
                insert=ReplayInserter(client, writer_key=f"actor-{index}"),
                weights_source=weight_source,
                actor_index=index, env_steps_offset=step_offset,
                insert_batch_size=a.insert_batch_size, weights_poll_interval=a.weight_poll_steps,
                seed=cfg.seed * 10_007 + index * 1_000 + episodes, tasks=tasks,
            )

        self._pool = ActorPool(num_actors, actor_kwargs, restart_backoff_s=a.restart_backoff_s,
                               max_restarts_per_window=a.max_restarts, restart_window_s=a.restart_window_s,
                               actor_options=_resources(a.placement))
        self._pool.start()
        return self._pool

    def _record_placement(self) -> bool:
        """Where every component runs (node ids, pids), in <run dir>/placement.json; True once all answered."""
        import ray

        try:
            actors = self._pool.placement(timeout_s=1.0)
            ranks = ray.get([rank.info.remote() for rank in self._learner.ranks], timeout=10)
            placement = {
                "learner": ranks[0],
                "learner_ranks": ranks,
                "replay": ray.get([s.info.remote() for s in self._shards], timeout=10),
                "actors": actors,
                "driver": {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()},
            }
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"  placement: could not ask every component yet ({_ray_error(exc)})", file=sys.stderr)
            return False
        (self.run_dir / "placement.json").write_text(json.dumps(placement, indent=2, sort_keys=True) + "\n")
        return len(actors) == self._pool.num_actors

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> Summary:
        import ray

        from actors.envs import env_spec
        from evergreen.agents import make_builder
        from evergreen.weights import WeightPublisher, WeightStore

        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            save_config(cfg, self.run_dir / "config.json")
        spec = env_spec(cfg.env)
        builder = make_builder(cfg, spec)
        scenario = self.scenario = Scenario.from_config(cfg)
        if scenario.switches:
            scenario.check_compatible()  # one network must serve every task: refused before anything starts
        tables = table_configs(cfg, scenario, fields=builder.replay_fields(), obs_shape=spec.observation_shape,
                               obs_dtype=spec.observation_dtype, bounds=builder.replay_bounds())
        print(f"evergreen train: run dir {self.run_dir} ({'resuming' if self.resume else 'new run'}); "
              f"algorithm {cfg.algorithm}, env {cfg.env.id} obs {spec.observation_shape} "
              f"{spec.observation_dtype.name}, actions {spec.actions}")
        # Signal handlers can only be installed from the main thread (a run started from another thread,
        # e.g. in a test or a notebook, is stopped with request_stop instead).
        main_thread = threading.current_thread() is threading.main_thread()
        previous_handlers = ({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
                             if main_thread else {})
        books = None
        final_state = "failed"   # what the control plane records if run() does not return normally
        summary = None
        try:
            from evergreen.control.driver import RunControl

            # First: a run that is meant to be controllable and is not would leave `evergreen stop` blind.
            self._control = RunControl.open(cfg, self.run_dir)
            if self._control is not None:
                print(f"  control plane: run {self._control.run!r} on "
                      f"{'a Redis of its own' if self._control.server else cfg.control.redis_url} "
                      f"(evergreen status {self.run_dir})")
            self._start_ray()
            print(f"  ray: {'cluster ' + cfg.ray.address if cfg.ray.address else 'local'}, "
                  f"{ray.cluster_resources().get('CPU', 0):g} logical CPUs, {len(ray.nodes())} node(s)")
            client = self._start_replay(tables)
            self._start_telemetry(builder)
            books = Bookkeeping(self.run_dir, telemetry=self._telemetry, stop_at_return=cfg.learner.stop_at_return,
                                stop_window=cfg.learner.stop_window)
            store = self._store = WeightStore.remote()
            publisher = WeightPublisher(store, actor_keys=set(builder.acting_network().state_dict()))
            learner = self._start_learner(builder, client, publisher)
            try:
                extra = ray.get(learner.restore.remote()) if self.resume else None
            except ray.exceptions.RayError as exc:
                raise ComponentError(f"the learner failed to start: {_ray_error(exc)}") from exc
            if self.resume:
                if extra is None:
                    raise RuntimeError(f"--resume {self.run_dir}: no learner checkpoint in "
                                       f"{cfg.learner.checkpoint_dir or self.run_dir / 'checkpoints'}")
                books.resume_from(extra)
                # What the learner holds after restoring: a test (or a user) can check it against the file.
                (self.run_dir / "resumed.json").write_text(json.dumps(
                    {"updates": books.counters["updates"], "env_steps": books.counters["env_steps"],
                     "state_digest": extra["state_digest"]}) + "\n")
                print(f"  resumed at env step {books.counters['env_steps']:,}, update {books.counters['updates']:,}")
            if scenario.switches:  # actors start on the current visit's task (a resumed run's included)
                visit = scenario.visits[books.counters["visit"]]
                books.set_task(index=visit.task, name=scenario.tasks[visit.task].name)
                ray.get(store.set_task.remote(visit.task))
                if self._control is not None:
                    self._control.set_task({"index": visit.task, "name": books.task, "visit": visit.index})
                if scenario.replay_at_switch == "per_task":  # the learner samples the visit's table only
                    client.tie_inserts_to(visit.task, timeout=60.0)
                    ray.get(learner.sample_task.remote(visit.task))
                print(f"  scenario: {len(scenario.tasks)} tasks x {scenario.cycles} cycle(s), "
                      f"{scenario.total_steps:,} env steps; on visit {visit.index} (task {books.task!r})")
            # Actors step until the next task switch or the run's end, then wait at the store's gate for the
            # driver (see evergreen.weights): switches and the run's end are tied to env steps, not speed.
            ray.get(store.open_gate.remote(env_steps=books.counters["env_steps"],
                                           hold_at=self._gate_limit(books.counters["visit"])))
            # A resumed run continues with the actor count it had (it may have been scaled).
            num_actors = min(int(extra.get("num_actors", cfg.actors.num_actors)), cfg.control.max_actors) \
                if extra else cfg.actors.num_actors
            self._start_actors(builder, client, store, env_steps=books.counters["env_steps"],
                               episodes=books.counters["episodes"], num_actors=num_actors)
            if self._control is not None:
                self._control.set_desired_actors(num_actors)
            if self._evaluates():
                from evergreen.evaluation import RunEvaluations

                ev = cfg.evaluation
                # Evaluation processes never write to replay: they act on the store's newest weights.
                self._evaluations = RunEvaluations(
                    builder=builder, store=store, run_dir=self.run_dir, episodes=ev.episodes, epsilon=ev.epsilon,
                    tasks=scenario.env_tasks(),
                    seed=cfg.seed * 7_919 + 1_000_000, options=_resources(ev.placement),
                    on_result=self._telemetry.update_evaluation if self._telemetry is not None else None)

            def on_signal(signum, _frame):
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                self._stop_reason = f"interrupted ({name}); checkpoint written"

            # SIGINT (Ctrl-C) and SIGTERM (docker stop, Kubernetes) both stop at the next iteration,
            # checkpoint, and shut everything down in order.
            for sig in previous_handlers:
                signal.signal(sig, on_signal)
            summary = self._coordinate(books, client)
            final_state = "stopped" if self._stop_reason else "finished"
            return summary
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self._shutdown()
            if books is not None:
                books.close()
            if self._control is not None:
                end = {"env_steps": books.counters["env_steps"], "updates": books.counters["updates"]} if books else {}
                if summary is not None:
                    end.update(stopped_by=summary.stopped_by, mean_return_100=summary.mean_return_100)
                self._control.close(state=final_state, summary=end)

    def _gate_limit(self, visit: int) -> int:
        """The env step at which actors next wait for the driver: the end of visit ``visit`` when
        another visit follows it, else the run's end."""
        limit = self.config.learner.total_env_steps
        if self.scenario is not None and self.scenario.switches and visit + 1 < len(self.scenario.visits):
            limit = min(limit, self.scenario.visits[visit].end)
        return limit

    def _read_gate(self) -> dict[str, Any]:
        import ray

        try:
            return ray.get(self._store.gate.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise ComponentError(f"the weight store (the actors' env-step gate) failed: {_ray_error(exc)}") from exc

    def _coordinate(self, books: Bookkeeping, client: Any) -> Summary:
        import ray

        from replay.errors import ReplayError

        lrn = self.config.learner
        learner, pool = self._learner, self._pool
        inflight: deque = deque()

        def train_call():
            return learner.train.remote(seconds=LEARNER_CHUNK_S, env_steps=books.counters["env_steps"])

        def take_report(ref) -> None:
            try:
                books.add_learner_report(ray.get(ref))
                learner.raise_failures()   # the other ranks' calls (data-parallel learner)
            except ray.exceptions.RayError as exc:
                raise LearnerError(f"the learner failed: {_ray_error(exc)}") from exc

        def poll_actors() -> Any:
            pool.check()  # raises if an actor is crash-looping
            stats = pool.stats()
            books.add_actor_stats(stats)
            return stats

        def checkpoint() -> None:
            # The learner first: it is what --resume needs; replay shards can lose at most the
            # transitions since their previous checkpoint, which only costs a little data.
            try:
                # The actor count too: a run scaled with `evergreen scale` resumes at that count.
                extra = dict(books.checkpoint_extra(), num_actors=pool.num_actors)
                ray.get(learner.checkpoint.remote(extra))
            except ray.exceptions.RayError as exc:
                raise LearnerError(f"the learner checkpoint failed: {_ray_error(exc)}") from exc
            try:
                client.checkpoint(timeout=120.0)
            except Exception as exc:  # noqa: BLE001 - reported; the run goes on / ends regardless
                print(f"  replay checkpoint failed ({exc}); shards keep their previous checkpoint", file=sys.stderr)

        def follow_scenario(gate: dict[str, Any]) -> None:
            """Switch tasks when the run's env steps reached the next visit (each switch exactly once:
            the visit index is in every checkpoint, beside the learner state that saw the switch).

            The actors' count at the store's gate decides: they wait there from the visit's end, so the
            switch is made with every running actor stopped and its old-task rows inserted."""
            target = self.scenario.visit_at(gate["env_steps"]).index
            if target == books.counters["visit"]:
                return
            drain_until = time.time() + GATE_DRAIN_S

            def keep_training() -> None:
                # The learner goes on with the old task meanwhile: a held actor may be waiting for the rate
                # limiter to take its last insert, which only the learner's sampling allows.
                if not inflight:
                    inflight.append(train_call())
                ready, _ = ray.wait([inflight[0]], timeout=0.05)
                if ready:
                    take_report(inflight.popleft())
                    inflight.append(train_call())

            while gate["closed"] and len(gate["held"]) < pool.running and time.time() < drain_until:
                keep_training()
                gate = self._read_gate()
            if gate["closed"] and len(gate["held"]) < pool.running:
                print(f"  task switch: {len(gate['held'])} of {pool.running} actors reached the env-step gate "
                      f"within {GATE_DRAIN_S:g} s; switching without the others", file=sys.stderr)
            switch_steps = gate["env_steps"]
            # The records say which task each env step was on: take in the held actors' statistics (their
            # chunks end within a second) so that the switch's record counts every old-task step.
            while books.counters["env_steps"] < switch_steps and time.time() < drain_until:
                keep_training()
                poll_actors()
            while inflight:  # the queued updates finish on the old task first
                take_report(inflight.popleft())
            if self._evaluations is not None and cfg_eval.at_switch:  # the end of the visit: its weights, pre-switch
                self._evaluations.submit(f"end of visit {books.counters['visit']}",
                                         env_steps=books.counters["env_steps"], visit=books.counters["visit"])
            for index in range(books.counters["visit"] + 1, target + 1):  # visits too short to see: each once
                visit = self.scenario.visits[index]
                task = self.scenario.tasks[visit.task]
                flush = self.scenario.replay_at_switch == "flush"
                per_task = self.scenario.replay_at_switch == "per_task"
                try:
                    # The store's task first (actors act on it once the gate opens), then the replay
                    # (flush: emptied; per-task: only the new task's table stays rate limited), then the
                    # learner, which drops the batches it sampled before. The held actors inserted their
                    # old-task rows already, so a flush leaves none behind (replay_current_task_fraction
                    # shows it); an actor that missed the drain wait lands at most a poll's worth.
                    ray.get(self._store.set_task.remote(visit.task))
                    flushed = float(client.clear(timeout=60.0)) if flush else None
                    if per_task:
                        client.tie_inserts_to(visit.task, timeout=60.0)
                        ray.get(learner.sample_task.remote(visit.task))
                    metrics = ray.get(learner.task_switch.remote(visit.task, discard_prefetched=flush or per_task))
                except (ray.exceptions.RayError, ReplayError) as exc:
                    raise ComponentError(f"the task switch to {task.name!r} failed: {_ray_error(exc)}") from exc
                if flushed is not None:
                    metrics["replay_flushed_rows"] = flushed
                books.task_switch(visit=index, index=visit.task, task=task.name, env_steps=switch_steps,
                                  metrics=metrics)
                if self._control is not None:
                    self._control.set_task({"index": visit.task, "name": task.name, "visit": index})
                done = ", ".join(f"{k} {v:g}" for k, v in sorted(metrics.items()))
                print(f"  task switch at env step {switch_steps:,}: visit {index}, task "
                      f"{task.name!r} ({task.variation.describe()}){'; ' + done if done else ''}", flush=True)
            try:  # the actors go on, on the new task, until the next switch or the run's end
                ray.get(self._store.open_gate.remote(hold_at=self._gate_limit(target)))
            except ray.exceptions.RayError as exc:
                raise ComponentError(f"the weight store failed after the task switch: {_ray_error(exc)}") from exc
            inflight.extend(train_call() for _ in range(2))

        cfg_eval = self.config.evaluation
        every = cfg_eval.every_env_steps
        next_eval = (books.counters["env_steps"] // every + 1) * every if every else None

        inflight.extend(train_call() for _ in range(2))
        stats = poll_actors()
        if self._control is not None:
            self._control.set_state("running", pid=os.getpid())
        placement_recorded = False
        last_log = last_ckpt = last_poll = time.time()
        stopped_by = "reached learner.total_env_steps"
        # The actors' returned chunks when all were first seen waiting at the run's final gate: once each has
        # returned another, every step it took is in the books.
        held_at_end: dict[int, int] | None = None
        try:
            while True:
                ready, _ = ray.wait([inflight[0]], timeout=ACTOR_POLL_S)
                if ready:
                    take_report(inflight.popleft())
                    inflight.append(train_call())
                now = time.time()
                if now - last_poll >= ACTOR_POLL_S:
                    stats = poll_actors()
                    last_poll = now
                    self._supervise_shards(books)
                    if self._control is not None:
                        self._follow_control(books, stats, client)
                    gate = self._read_gate()
                    if self.scenario.switches:
                        follow_scenario(gate)
                    at_end = gate["closed"] and gate["hold_at"] >= lrn.total_env_steps \
                        and len(gate["held"]) >= pool.running
                    held_at_end = (pool.chunks() if held_at_end is None else held_at_end) if at_end else None
                    if next_eval is not None and books.counters["env_steps"] >= next_eval:
                        self._evaluations.submit("periodic", env_steps=books.counters["env_steps"],
                                                 visit=books.counters["visit"])
                        next_eval = (books.counters["env_steps"] // every + 1) * every
                    if self._evaluations is not None:
                        self._evaluations.poll()
                if books.counters["env_steps"] >= lrn.total_env_steps:
                    break
                if held_at_end is not None and all(count >= 1 and count != held_at_end.get(index)
                                                   for index, count in pool.chunks().items()):
                    # Every actor waits at the final gate and has returned its statistics since: take them in.
                    # Short of the total even then, an actor died between reporting its steps and returning them.
                    stats = poll_actors()
                    if books.counters["env_steps"] < lrn.total_env_steps:
                        stopped_by = (f"reached learner.total_env_steps at the actors' gate "
                                      f"({gate['env_steps']:,} env steps reported)")
                    break
                if books.solved:
                    stopped_by = (f"solved: mean return of the last {lrn.stop_window} episodes "
                                  f"{books.stop_window_mean:.1f} >= {lrn.stop_at_return}")
                    break
                if self._stop_reason:
                    stopped_by = self._stop_reason
                    break
                if now - last_log >= lrn.log_every_s:
                    books.emit(replay_info=self._info(client), pool_stats=stats)
                    if not placement_recorded and stats.running == pool.num_actors:
                        placement_recorded = self._record_placement()
                    if self._guard is not None:
                        self._guard.watch_descendants()  # worker processes started since (actors, restarts)
                    last_log = now
                if now - last_ckpt >= lrn.checkpoint_every_s:
                    self._supervise_shards(books, force=True)   # a dead shard would stall the checkpoint call
                    checkpoint()
                    last_ckpt = now
        except Exception as exc:
            # Another component failed (actors crash-looping, a shard that will not come back): the learner
            # state is still sane, so keep what it learned since the last periodic checkpoint.
            if not isinstance(exc, LearnerError):
                try:
                    while inflight:
                        take_report(inflight.popleft())
                    checkpoint()
                    print(f"  final checkpoint written before stopping ({type(exc).__name__})", file=sys.stderr)
                except Exception as again:  # noqa: BLE001 - the first failure is the one to report
                    print(f"  (no final checkpoint: {again})", file=sys.stderr)
            raise
        finally:
            while inflight:  # let the queued learner calls finish, so the counts are final
                take_report(inflight.popleft())
        books.emit(replay_info=self._info(client), pool_stats=stats)  # the log ends on the run's final state
        checkpoint()
        if self._evaluations is not None:  # the end of the run: what forgetting is measured against
            self._evaluations.submit("end of run", env_steps=books.counters["env_steps"], visit=books.counters["visit"])
            self._evaluations.finish()
            if self.scenario.switches:
                self._write_continual_summary()
        line = books.learner_time_line()
        if line:
            print(line)
        return books.summary(stopped_by=stopped_by)

    # -- the control plane ---------------------------------------------------------------------------

    def _follow_control(self, books: Bookkeeping, stats: Any, client: Any) -> None:
        """Apply `evergreen scale` / `evergreen stop` requests; beat for every component when due."""
        control, pool = self._control, self._pool
        desired, stop = control.commands()
        if stop and not self._stop_reason:
            self._stop_reason = f"stopped by `evergreen stop` ({stop}); checkpoint written"
            control.set_state("stopping")
            print(f"  control plane: stop requested ({stop})", flush=True)
        if desired is not None and desired != pool.num_actors:
            # The control plane checked the bounds; check again (it may be an external Redis anyone can write).
            if 0 <= desired <= self.config.control.max_actors:
                print(f"  control plane: actors {pool.num_actors} -> {desired}", flush=True)
                pool.resize(desired)
                self._request_cluster_resources(desired)
            elif self._heard.get("refused_desired") != desired:
                self._heard["refused_desired"] = desired
                print(f"  control plane: ignored a desired actor count of {desired} (control.max_actors is "
                      f"{self.config.control.max_actors})", file=sys.stderr)
        if control.due():
            control.beat(self._heartbeat_entries(books, stats, client))

    def _actor_whereabouts(self) -> dict[int, dict]:
        """Node and pid of each running actor, asked without waiting: an actor answers between its chunks
        of env steps, so the answer is collected at a later heartbeat (asked again for new handles)."""
        import ray

        asked: dict[Any, tuple[int, Any]] = self._heard.setdefault("actor_asked", {})
        known: dict[int, tuple[Any, dict]] = self._heard.setdefault("actor_where", {})
        handles = self._pool.handles()
        for index, handle in handles.items():
            if (index not in known or known[index][0] is not handle) and \
                    not any(h is handle for h, _ in asked.values()):
                asked[handle.info.remote()] = (handle, index)
        if asked:
            ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=0)
            for ref in ready:
                handle, index = asked.pop(ref)
                with contextlib.suppress(ray.exceptions.RayError):   # it crashed: its restart is asked next time
                    known[index] = (handle, ray.get(ref))
        return {i: info for i, (h, info) in known.items() if handles.get(i) is h}

    # -- replay shards that come back ---------------------------------------------------------------

    def _info(self, client: Any, *, fresh_only: bool = False) -> list[Any]:
        """Every shard's TableInfo; while a shard restarts, the latest answers (or [] with ``fresh_only``)."""
        from replay.errors import ReplayError

        try:
            self._replay_info = client.info(timeout=3.0)
        except ReplayError:
            return [] if fresh_only else self._replay_info
        return self._replay_info

    def _supervise_shards(self, books: Bookkeeping, *, force: bool = False) -> None:
        """Once a second (or now, with ``force``): restart a shard whose server died (see _restart_shard)."""
        import ray

        now = time.monotonic()
        if not force and now - self._shards_checked < SHARD_CHECK_S:
            return
        self._shards_checked = now
        refs = [shard.health.remote() for shard in self._shards]
        for index, ref in enumerate(refs):
            try:
                health = ray.get(ref, timeout=10.0)
            except ray.exceptions.GetTimeoutError:
                continue   # busy (a checkpoint): alive
            except ray.exceptions.RayError as exc:   # the shard's Ray actor itself is gone
                health = {"alive": False, "actor_gone": True, "stderr_tail": _ray_error(exc)}
            if not health["alive"]:
                self._restart_shard(index, health, books)

    def _restart_shard(self, index: int, health: dict, books: Bookkeeping) -> None:
        """Bring shard ``index`` back on the same address from its last checkpoint, at a new generation.

        Clients reconnect by themselves (same address); meanwhile the learner samples the other shards
        and the shard's actors hold their batches. The rows the shard acknowledged since its checkpoint
        are lost: every writer's client counts them at its next insert (``replay_rows_lost``). A shard
        that crashes more than ``SHARD_MAX_RESTARTS`` times in ``SHARD_RESTART_WINDOW_S`` stops the run."""
        import ray

        from replay.ray_shard import ShardActor

        start = time.monotonic()
        crashes = self._shard_crashes.setdefault(index, deque())
        while crashes and start - crashes[0] > SHARD_RESTART_WINDOW_S:
            crashes.popleft()
        crashes.append(start)
        error = (health.get("stderr_tail") or "").strip().splitlines()
        last = error[-1] if error else f"exit status {health.get('returncode')}"
        if len(crashes) > SHARD_MAX_RESTARTS:
            raise ComponentError(f"replay shard {index} crashed {len(crashes)} times within "
                                 f"{SHARD_RESTART_WINDOW_S:g} s; not restarting it. Last error: {last}")
        address, metrics_port = self._shard_endpoints[index]
        print(f"  replay shard {index} ({address}) died ({last}); restarting it from its last checkpoint",
              file=sys.stderr, flush=True)
        try:
            if health.get("actor_gone"):   # a new host actor, told to take over the old ports
                ray.kill(self._shards[index], no_restart=True)
                r, spec = self.config.replay, self._shard_spec
                self._shards[index] = ShardActor.options(**_resources(r.placement)).remote(
                    spec["tables"], checkpoint_dir=spec["template"].format(shard=index, run=self.run_dir.name),
                    shard_index=index, host=r.host, cluster=bool(self.config.ray.address), token=spec["token"],
                    rebase_limiter_on_restore=True, port=int(address.rsplit(":", 1)[1]),
                    metrics_port=metrics_port or 0)
                new_address, _ = ray.get(self._shards[index].endpoint.remote(), timeout=180)
                if new_address != address:
                    raise ComponentError(f"replay shard {index} came back at {new_address}, not {address} (another "
                                         "node): its clients cannot follow it; resume the run")
            else:
                ray.get(self._shards[index].restart.remote(), timeout=180)
        except ray.exceptions.RayError as exc:
            raise ComponentError(f"replay shard {index} could not be restarted: {_ray_error(exc)}") from exc
        self._shard_restarts[index] = self._shard_restarts.get(index, 0) + 1
        self._heard.pop("replay", None)   # its pid changed: ask again at the next heartbeat
        recovery = time.monotonic() - start
        books.record_event("replay_shard_restarted", shard=index, address=address, error=last,
                           restart_s=round(recovery, 3), restarts=self._shard_restarts[index])
        print(f"  replay shard {index} is back at {address} after {recovery:.1f} s", file=sys.stderr, flush=True)

    def _request_cluster_resources(self, actors: int) -> None:
        """On a Ray cluster, ask the autoscaler for room for every component at ``actors`` actors (a KubeRay
        autoscaler then adds worker pods; until they come the new actors show as "starting")."""
        if not self.config.ray.address:
            return
        try:
            from ray.autoscaler.sdk import request_resources

            cfg = self.config
            bundles = [_bundle(cfg.actors.placement)] * actors + [_bundle(cfg.learner.placement)] * cfg.learner.num_ranks + \
                [_bundle(cfg.replay.placement)] * cfg.replay.num_shards
            request_resources(bundles=[b for b in bundles if b])
        except Exception as exc:  # noqa: BLE001 - no autoscaler: the actors wait for room instead
            print(f"  control plane: could not ask the autoscaler for room ({exc})", file=sys.stderr)

    def _heartbeat_entries(self, books: Bookkeeping, stats: Any, client: Any) -> list[tuple[str, str, dict]]:
        """One entry per component: the driver, the learner, each replay shard, each actor slot."""
        import ray

        now = time.monotonic()
        c = books.counters
        prev = self._heard.get("rates")
        rates = {}
        if prev is not None and now > prev[0]:
            rates = {"env_steps_per_s": round((c["env_steps"] - prev[1]) / (now - prev[0]), 1),
                     "updates_per_s": round((c["updates"] - prev[2]) / (now - prev[0]), 1)}
        self._heard["rates"] = (now, c["env_steps"], c["updates"])
        try:   # where the learner and the shards run: asked once (again for a restarted shard)
            if "learner" not in self._heard:   # every rank (data-parallel learner), rank 0 first
                self._heard["learner"] = ray.get([rank.info.remote() for rank in self._learner.ranks], timeout=5)
            if "replay" not in self._heard:
                self._heard["replay"] = ray.get([s.info.remote() for s in self._shards], timeout=5)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        record = books.last_record or {}
        entries: list[tuple[str, str, dict]] = [("driver", "0", {
            "state": "stopping" if self._stop_reason else "running", "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(), "env_steps": c["env_steps"], "updates": c["updates"],
            "episodes": c["episodes"], "visit": c["visit"], "task": books.task, **rates,
            "return_mean_100": record.get("return_mean_100"), "replay_rows_lost": books.replay_rows_lost})]
        for rank, learner in enumerate(self._heard.get("learner") or [{}] * len(self._learner.ranks)):
            entries.append(("learner", str(rank), {
                "state": "running", "pid": learner.get("pid"), "node": learner.get("node_id"),
                "device": learner.get("device"), "updates": c["updates"], "updates_per_s": rates.get("updates_per_s"),
                # The loop's own statistics are rank 0's (the ranks' updates pair up, their data waits differ).
                **({"policy_lag_updates": record.get("policy_lag_updates"),
                    "learner_wait_fraction": record.get("learner_wait_fraction")} if rank == 0 else {})}))
        infos = self._info(client, fresh_only=True)
        shard_info = self._heard.get("replay") or [{} for _ in self._shard_endpoints]
        per_shard = len(infos) // len(self._shard_endpoints) if infos else 0
        for index, (address, _) in enumerate(self._shard_endpoints):
            mine = [infos[t * len(self._shard_endpoints) + index] for t in range(per_shard)] if infos else []
            info = shard_info[index] if index < len(shard_info) else {}
            entries.append(("replay", str(index), {
                "state": "running" if mine else "unreachable", "address": address, "pid": info.get("pid"),
                "server_pid": info.get("server_pid"), "restarts": self._shard_restarts.get(index, 0),
                "node": info.get("node_id"), "generation": mine[0].generation if mine else None,
                "size": sum(i.size for i in mine), "capacity": sum(i.capacity for i in mine),
                "inserts": sum(i.inserts for i in mine), "samples": sum(i.samples for i in mine)}))
        slots = self._pool.describe()
        where = self._actor_whereabouts()
        for slot in slots:
            info = where.get(slot["index"], {}) if slot["state"] == "running" else {}
            entries.append(("actor", str(slot["index"]), {"state": slot["state"], "restarts": slot["restarts"],
                                                          "node": info.get("node_id"), "pid": info.get("pid")}))
        gone = self._heard.get("actors", set()) - {s["index"] for s in slots}
        for index in gone:   # retired by a scale-down: gone now, not three heartbeats from now
            self._control.forget("actor", str(index))
        self._heard["actors"] = {s["index"] for s in slots}
        return entries

    def _write_continual_summary(self) -> None:
        """continual.json: average performance, forgetting, visit AUCs and plasticity, from evaluations.jsonl."""
        from evergreen.continual import summarize_evaluations

        path = self.run_dir / "evaluations.jsonl"
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if not entries:
            return
        summary = summarize_evaluations(entries, self.scenario.visits, self.scenario.task_names())
        (self.run_dir / "continual.json").write_text(json.dumps(summary, indent=2) + "\n")
        if "average_performance" in summary:
            forgot = ", ".join(f"{k} {v:+.1f}" for k, v in summary["forgetting"].items())
            print(f"  continual: average performance {summary['average_performance']:.1f}; forgetting {forgot} "
                  f"({self.run_dir / 'continual.json'})")

    def _shutdown(self) -> None:
        """Stop everything this run started, in order: telemetry, actors, learner, shards, Ray."""
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
        if self._learner is not None:
            try:
                ray.get(self._learner.close.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001
                print(f"  (learner stop: {_ray_error(exc)})", file=sys.stderr)
            self._learner.kill()
        for shard in self._shards:
            try:
                ray.get(shard.stop.remote(), timeout=120)  # SIGTERM: the shard checkpoints and exits
            except Exception as exc:  # noqa: BLE001
                print(f"  (replay shard stop: {_ray_error(exc)})", file=sys.stderr)
            ray.kill(shard)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        if self._guard is not None:
            self._guard.release()
