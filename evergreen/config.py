"""The run config: one tree of frozen dataclasses, validated in one place.

    cfg = load_config(preset="cartpole", overrides={"learner": {"total_env_steps": 50_000}})
    cfg.validate()                      # every cross-field rule lives here
    save_config(cfg, run_dir / "config.json")

Presets are JSON files in ``configs/`` holding a partial tree on top of these defaults. The
component configs (env, network, dqn) are the components' own dataclasses; the sections the
system adds (replay, actors, learner, plasticity, ray and the per-component placement) are
defined here. ``algorithm`` picks the agent builder (``evergreen.agents``), which validates the
sections only it reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.envs import EnvConfig
from evergreen.configtools import from_dict, to_dict
from evergreen.scenario import ScenarioConfig
from learner.dqn import DQNConfig
from learner.networks import NetworkConfig
from learner.sac import SACConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Placement:
    """Ray resources of one component's processes: where Ray may place them and what they reserve."""

    num_cpus: float = 1.0
    """Logical CPUs each process reserves (Ray's ``num_cpus``)."""
    num_gpus: float = 0.0
    """GPUs each process reserves (Ray's ``num_gpus``); the learner uses one when it has any."""
    resources: dict = field(default_factory=dict)
    """Custom Ray resources each process needs, e.g. {"replay": 1} to run only on nodes started with
    --resources '{"replay": 4}'."""


@dataclass(frozen=True)
class RayConfig:
    address: str = ""
    """Ray cluster to join: "" starts a local Ray for this run; "auto" or "ray://host:10001" joins one."""
    num_cpus: int = 0
    """Local Ray only: logical CPUs; 0 = enough for every component's placement (they share the cores)."""


@dataclass(frozen=True)
class ReplayConfig:
    num_shards: int = 1
    """Replay shards, each a separate gRPC server process; capacity is split evenly between them."""
    capacity: int = 100_000
    """Total transitions held across all shards."""
    sampler: Literal["uniform", "prioritized"] = "prioritized"
    """How the learner samples: uniformly, or proportional to priority**alpha (PER)."""
    priority_exponent: float = 0.6
    """PER alpha: 0 is uniform, 1 is fully proportional to |TD error|."""
    importance_beta_start: float = 0.4
    """PER importance-sampling exponent at the start; annealed linearly to 1 over the run."""
    min_size_to_sample: int = 1_000
    """Transitions a shard must hold before the learner may sample from it."""
    samples_per_insert: float = 0.0
    """Replay ratio enforced by the rate limiter (sampled rows per inserted row); 0 disables it."""
    error_buffer: float = 0.0
    """Slack of the samples-per-insert limiter, in sampled rows; 0 picks max(10 batches, 1% capacity)."""
    storage: Literal["auto", "ring", "atari"] = "auto"
    """Storage layout: "atari" stores each frame once; "auto" picks it for image observations."""
    checkpoint_dir: str = ""
    """Where each shard checkpoints, on its node: a path with {shard} (and optionally {run}); "" = <run dir>/replay/shard-{shard}."""
    host: str = "auto"
    """Address shards bind: "auto" = 127.0.0.1 for a local run, the node's IP on a cluster."""
    metrics_port: int = 0
    """Port of each shard's /metrics on its host's address (0: a free one, named in ports.json); a fixed port
    lets Prometheus scrape shards on a cluster (one shard per node, as the Kubernetes replay group places them)."""
    placement: Placement = field(default_factory=Placement)
    """Ray resources of each shard process."""


@dataclass(frozen=True)
class ActorsConfig:
    num_actors: int = 1
    """Ray actor processes stepping environments (each owns env.num_envs environments)."""
    n_step: int = 3
    """n of the n-step returns written to replay."""
    gamma: float = 0.99
    """Discount factor."""
    epsilon_base: float = 0.4
    """Ape-X exploration: actor i of N acts with epsilon_base ** (1 + epsilon_alpha * i / (N - 1))."""
    epsilon_alpha: float = 7.0
    """Ape-X exploration spread across actors (see epsilon_base)."""
    epsilon_start: float = 1.0
    """Epsilon at the start of the run, decayed linearly to the actor's Ape-X epsilon."""
    epsilon_decay_steps: int = 10_000
    """Env steps per actor over which epsilon decays from epsilon_start to the actor's own value."""
    insert_batch_size: int = 64
    """Transitions an actor buffers before one gRPC insert."""
    weight_poll_steps: int = 50
    """Vector-env steps (per actor) between checks for newer learner weights."""
    restart_backoff_s: float = 1.0
    """Delay before a crashed actor is replaced (doubles on each crash within the window)."""
    max_restarts: int = 5
    """Crashes tolerated within restart_window_s before the run stops with an error."""
    restart_window_s: float = 300.0
    """Window over which crashes are counted for max_restarts."""
    placement: Placement = field(default_factory=Placement)
    """Ray resources of each actor process."""


@dataclass(frozen=True)
class LearnerConfig:
    batch_size: int = 64
    """Transitions per learner update."""
    total_env_steps: int = 100_000
    """The run stops after this many environment steps (summed over actors)."""
    stop_at_return: float | None = None
    """Stop early once the mean return of the last ``stop_window`` episodes reaches this; null never stops early."""
    stop_window: int = 100
    """Episodes the ``stop_at_return`` mean is over (records' ``return_mean_100`` stays over the last 100)."""
    updates_per_env_step: float = 0.25
    """Learner pacing without a replay rate limiter: target updates per env step (0 = as fast as possible)."""
    publish_every: int = 50
    """Publish weights to actors every K updates."""
    checkpoint_every_s: float = 300.0
    """Checkpoint (learner + replay shards) every this many seconds, and at the end."""
    prefetch_batches: int = 4
    """Sampled batches kept ready by the prefetch thread."""
    batches_per_sample: int = 1
    """Batches fetched from replay in one sample call (> 1 for small networks, whose update costs less than a call)."""
    device: str = "auto"
    """Torch device for the learner: "auto" (cuda if present), "cpu", "cuda", "cuda:1"."""
    num_threads: int = 0
    """Torch intra-op threads for the learner; 0 = its placement's num_cpus (at least 1)."""
    flush_denormal: bool = True
    """Flush denormal floats (below ~1.2e-38) to zero in the learner's CPU math. Denormal arithmetic is many
    times slower on x86, and such values appear as a network trains: without this an SAC update on the CPU
    slowed by 11% within its first 1,000 updates. Flushing them changes no result that matters."""
    log_every_s: float = 5.0
    """Seconds between progress lines and metrics-log records."""
    checkpoint_dir: str = ""
    """Where the learner writes checkpoints, on its node; "" = <run dir>/checkpoints."""
    placement: Placement = field(default_factory=Placement)
    """Ray resources of each learner rank's process (num_gpus 1 on a GPU node)."""
    num_ranks: int = 1
    """Data-parallel learner ranks (one torch.distributed group: NCCL on CUDA, gloo on the CPU). Each samples
    its own batch_size rows, so an update trains on num_ranks * batch_size; rank 0 publishes and checkpoints."""


@dataclass(frozen=True)
class PlasticityConfig:
    interventions: str = ""
    """Comma-separated interventions, e.g. "layer_norm,weight_decay,redo" (evergreen train --help lists them)."""
    options: dict = field(default_factory=dict)
    """Per-intervention options as JSON, e.g. {"redo": {"period": 1000}}."""
    diagnostics: str = "dormant_ratio,srank,weight_norm,effective_lr,grad_norm,feature_norm"
    """Comma-separated diagnostics computed on a held-out probe batch; empty disables them."""
    diagnostics_every: int = 1000
    """Compute diagnostics every this many updates."""
    probe_size: int = 256
    """States in the held-out probe batch used by diagnostics and interventions that need data."""


@dataclass(frozen=True)
class EvaluationConfig:
    every_env_steps: int = 0
    """Evaluate every task of the run every this many env steps (0 = not periodically)."""
    at_switch: bool = True
    """With a continual scenario: evaluate every task at the end of each visit and at the end of the run
    (what forgetting and average performance are computed from)."""
    episodes: int = 10
    """Episodes per task and evaluation (the first episode of each of this many seeded envs)."""
    epsilon: float = 0.001
    """Exploration rate of the evaluation policy (Machado et al.: 0.001 for Atari)."""
    placement: Placement = field(default_factory=lambda: Placement(num_cpus=0.5))
    """Ray resources of each evaluation process (it runs beside training and never writes to replay)."""


@dataclass(frozen=True)
class ControlConfig:
    enabled: bool = True
    """Register the run in a control plane (`evergreen status/scale/stop/runs`); false = none at all."""
    redis_url: str = ""
    """Redis of the control plane (redis://host:port/db, rediss://..., unix://...); "" = a Redis of the
    run's own on 127.0.0.1 with a generated password (evergreen.control.redis_server), stopped at the end."""
    password_env: str = "EVERGREEN_REDIS_PASSWORD"
    """Environment variable that holds redis_url's password (a password never goes in a URL or a flag)."""
    password_file: str = ""
    """File whose first line is redis_url's password; takes precedence over password_env."""
    heartbeat_s: float = 2.0
    """How often the driver writes every component's heartbeat; an entry expires after 3 periods."""
    max_actors: int = 32
    """The most actors `evergreen scale RUN --actors N` may ask for."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run name; the run directory is runs_dir/name-<timestamp>."""
    seed: int = 0
    """Seed for environments, networks and samplers."""
    runs_dir: str = "runs"
    """Where run directories are created (and runs_dir/prometheus_targets, the Prometheus file_sd folder)."""
    telemetry_port: int = 0
    """Port of the run's Prometheus /metrics endpoint; 0 picks a free one (recorded in the run dir)."""
    telemetry_host: str = "127.0.0.1"
    """Address the run's /metrics binds: loopback for a local run; "0.0.0.0" to be scraped from other hosts."""
    algorithm: str = "dqn"
    """Agent builder (evergreen.agents): "dqn" (discrete actions) or "sac" (continuous actions)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray: local or an existing cluster."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Environment."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Q-network architecture."""
    dqn: DQNConfig = field(default_factory=DQNConfig)
    """DQN-family algorithm."""
    sac: SACConfig = field(default_factory=SACConfig)
    """Soft actor-critic (continuous actions)."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay service."""
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    """Actors."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner loop."""
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    """Plasticity interventions and diagnostics."""
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    """Continual scenario: the tasks a run goes through (evergreen.scenario); none = the env above."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Evaluation of the current policy on every task, beside training (evergreen.evaluation)."""
    control: ControlConfig = field(default_factory=ControlConfig)
    """Control plane: the run's registry, heartbeats and commands on Redis (evergreen.control)."""

    def validate(self) -> RunConfig:
        """Check every field and cross-field rule; raise ValueError naming the first bad value."""
        from evergreen.agents import AGENTS
        from evergreen.scenario import Scenario

        _check(self.algorithm in AGENTS, "algorithm", self.algorithm, f"one of {sorted(AGENTS)}")
        self.env.validate()
        Scenario.from_config(self)  # its tasks' fields (whether one network serves them all: at train start)
        AGENTS[self.algorithm].validate(self)
        r, a, lrn, p = self.replay, self.actors, self.learner, self.plasticity
        ev = self.evaluation
        _check(ev.every_env_steps >= 0, "evaluation.every_env_steps", ev.every_env_steps, ">= 0")
        _check(ev.episodes >= 1, "evaluation.episodes", ev.episodes, ">= 1")
        _check(0.0 <= ev.epsilon <= 1.0, "evaluation.epsilon", ev.epsilon, "in [0, 1]")
        for name, placement in (("replay", r.placement), ("actors", a.placement), ("learner", lrn.placement),
                                ("evaluation", ev.placement)):
            _check_placement(f"{name}.placement", placement)
        c = self.control
        _check(c.redis_url == "" or c.redis_url.split("://", 1)[0] in ("redis", "rediss", "unix"), "control.redis_url",
               c.redis_url, '"" (a Redis of the run\'s own) or a redis://, rediss:// or unix:// URL')
        _check("@" not in c.redis_url, "control.redis_url", "<hidden: it contains '@'>",
               "a URL without credentials (the password goes in control.password_env or control.password_file, "
               "so that it never lands in config.json or a log)")
        _check(c.heartbeat_s > 0, "control.heartbeat_s", c.heartbeat_s, "> 0 seconds")
        _check(c.max_actors >= a.num_actors, "control.max_actors", c.max_actors,
               f">= actors.num_actors ({a.num_actors})")
        _check(isinstance(self.ray.address, str), "ray.address", self.ray.address, 'a string: "", "auto" or "ray://host:port"')
        _check(self.ray.num_cpus >= 0, "ray.num_cpus", self.ray.num_cpus, ">= 0")
        if r.checkpoint_dir:
            _check("{shard}" in r.checkpoint_dir or r.num_shards == 1, "replay.checkpoint_dir", r.checkpoint_dir,
                   "a path containing {shard}, so that shards do not share a directory")
            try:
                r.checkpoint_dir.format(shard=0, run="run")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"replay.checkpoint_dir = {r.checkpoint_dir!r} is invalid: only {{shard}} and {{run}} "
                                 f"may appear in braces ({exc})") from None
        _check(bool(r.host), "replay.host", r.host, '"auto" or an address to bind')
        _check(r.num_shards >= 1, "replay.num_shards", r.num_shards, "an integer >= 1")
        _check(r.capacity >= r.num_shards * 2, "replay.capacity", r.capacity, f">= 2 * replay.num_shards ({r.num_shards})")
        _check(0.0 <= r.priority_exponent <= 1.0, "replay.priority_exponent", r.priority_exponent, "in [0, 1]")
        _check(0.0 <= r.importance_beta_start <= 1.0, "replay.importance_beta_start", r.importance_beta_start, "in [0, 1]")
        _check(r.min_size_to_sample >= 1, "replay.min_size_to_sample", r.min_size_to_sample, ">= 1")
        _check(
            r.min_size_to_sample * 1 <= r.capacity // r.num_shards,
            "replay.min_size_to_sample", r.min_size_to_sample,
            f"<= capacity per shard ({r.capacity // r.num_shards}); otherwise sampling never starts",
        )
        _check(lrn.batch_size >= 1, "learner.batch_size", lrn.batch_size, ">= 1")
        _check(isinstance(lrn.stop_window, int) and not isinstance(lrn.stop_window, bool) and lrn.stop_window >= 1,
               "learner.stop_window", lrn.stop_window, "an integer >= 1")
        _check(
            r.min_size_to_sample * r.num_shards >= lrn.batch_size,
            "replay.min_size_to_sample", r.min_size_to_sample,
            f">= learner.batch_size / num_shards ({math.ceil(lrn.batch_size / r.num_shards)})",
        )
        _check(r.samples_per_insert >= 0, "replay.samples_per_insert", r.samples_per_insert, ">= 0")
        _check(r.error_buffer >= 0, "replay.error_buffer", r.error_buffer, ">= 0")
        if r.samples_per_insert and r.error_buffer:
            call = lrn.batch_size * lrn.batches_per_sample
            need = max(call, 2 * self.actors.insert_batch_size * r.samples_per_insert) / 2
            _check(r.error_buffer >= need, "replay.error_buffer", r.error_buffer,
                   f">= {need:g} so that one sample call ({call} rows: learner.batch_size x "
                   "learner.batches_per_sample) and one insert call "
                   f"(~2 x actors.insert_batch_size x samples_per_insert) fit in the limiter's band; or 0 for automatic")
        _check(a.num_actors >= 1, "actors.num_actors", a.num_actors, ">= 1")
        _check(a.n_step >= 1, "actors.n_step", a.n_step, ">= 1")
        _check(0.0 < a.gamma <= 1.0, "actors.gamma", a.gamma, "in (0, 1]")
        _check(0.0 <= a.epsilon_base <= 1.0, "actors.epsilon_base", a.epsilon_base, "in [0, 1]")
        _check(0.0 <= a.epsilon_start <= 1.0, "actors.epsilon_start", a.epsilon_start, "in [0, 1]")
        _check(a.epsilon_decay_steps >= 0, "actors.epsilon_decay_steps", a.epsilon_decay_steps, ">= 0")
        _check(a.insert_batch_size >= 1, "actors.insert_batch_size", a.insert_batch_size, ">= 1")
        _check(a.weight_poll_steps >= 1, "actors.weight_poll_steps", a.weight_poll_steps, ">= 1")
        _check(a.max_restarts >= 0, "actors.max_restarts", a.max_restarts, ">= 0")
        _check(lrn.total_env_steps >= 1, "learner.total_env_steps", lrn.total_env_steps, ">= 1")
        _check(lrn.updates_per_env_step >= 0, "learner.updates_per_env_step", lrn.updates_per_env_step, ">= 0")
        _check(lrn.publish_every >= 1, "learner.publish_every", lrn.publish_every, ">= 1")
        _check(lrn.checkpoint_every_s > 0, "learner.checkpoint_every_s", lrn.checkpoint_every_s, "> 0")
        _check(lrn.prefetch_batches >= 1, "learner.prefetch_batches", lrn.prefetch_batches, ">= 1")
        _check(lrn.batches_per_sample >= 1, "learner.batches_per_sample", lrn.batches_per_sample, ">= 1")
        _check(lrn.batch_size * lrn.batches_per_sample <= r.capacity // r.num_shards, "learner.batches_per_sample",
               lrn.batches_per_sample, f"at most {max(1, (r.capacity // r.num_shards) // lrn.batch_size)}: one sample "
               f"call (learner.batch_size x batches_per_sample rows) must fit in a shard's capacity "
               f"({r.capacity // r.num_shards})")
        _check(lrn.log_every_s > 0, "learner.log_every_s", lrn.log_every_s, "> 0")
        _check(
            lrn.device == "auto" or lrn.device == "cpu" or lrn.device.startswith("cuda"),
            "learner.device", lrn.device, '"auto", "cpu", "cuda" or "cuda:N"',
        )
        _check(isinstance(lrn.num_ranks, int) and not isinstance(lrn.num_ranks, bool) and lrn.num_ranks >= 1,
               "learner.num_ranks", lrn.num_ranks, "an integer >= 1")
        _check(lrn.num_ranks == 1 or ":" not in lrn.device, "learner.device", lrn.device,
               '"auto", "cpu" or "cuda" with learner.num_ranks > 1 (each rank gets its own GPU from Ray, '
               'learner.placement.num_gpus)')
        _check(p.diagnostics_every >= 1, "plasticity.diagnostics_every", p.diagnostics_every, ">= 1")
        _check(p.probe_size >= 2, "plasticity.probe_size", p.probe_size, ">= 2")
        _check(0 <= self.telemetry_port <= 65535, "telemetry_port", self.telemetry_port, "a port in [0, 65535]")
        _check(isinstance(self.telemetry_host, str) and bool(self.telemetry_host.strip()), "telemetry_host",
               self.telemetry_host, 'an address to bind, e.g. "127.0.0.1" or "0.0.0.0"')
        _check(0 <= self.replay.metrics_port <= 65535, "replay.metrics_port", self.replay.metrics_port,
               "a port in [0, 65535] (0: a free one)")
        if p.interventions:
            from plasticity.interventions import bind_interventions

            # Raises with the valid names, options and (per intervention) networks.
            bind_interventions(p.interventions, p.options, networks=AGENTS[self.algorithm].networks)
        if p.diagnostics:
            from plasticity.diagnostics import parse_names

            parse_names(p.diagnostics)  # raises with the valid names
        return self


def _check_placement(name: str, placement: Placement) -> None:
    _check(placement.num_cpus >= 0, f"{name}.num_cpus", placement.num_cpus, ">= 0")
    _check(placement.num_gpus >= 0, f"{name}.num_gpus", placement.num_gpus, ">= 0")
    ok = all(isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
             for k, v in placement.resources.items())
    _check(ok, f"{name}.resources", placement.resources, 'an object of resource name -> amount > 0, e.g. {"replay": 1}')


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r} is invalid: expected {expected}")


def preset_path(preset: str) -> Path:
    """A preset name from configs/ (``cartpole``) or a path to a JSON file."""
    candidate = Path(preset)
    if candidate.suffix == ".json" and candidate.exists():
        return candidate
    path = CONFIG_DIR / f"{preset}.json"
    if not path.exists():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown preset {preset!r}: expected one of {available} or a path to a .json file")
    return path


def load_config(*, preset: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the preset's values, then ``overrides`` (same nested shape)."""
    config = RunConfig()
    if preset:
        path = preset_path(preset)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"preset {path}: not valid JSON: {exc}") from exc
        data.pop("$comment", None)
        config = from_dict(RunConfig, data, base=config)
    if overrides:
        config = from_dict(RunConfig, overrides, base=config)
    return config


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as JSON atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, json.loads(Path(path).read_text()))
