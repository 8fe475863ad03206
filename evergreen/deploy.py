"""Kubernetes (KubeRay) manifests for a run, rendered from its run config.

    evergreen deploy render --preset pong --actors 8 --gpus 1 --out k8s/pong
    kubectl apply -k k8s/pong                      # after creating the two Secrets (deploy/README.md)

    evergreen deploy render --preset cartpole --out k8s/cp --replay.num_shards 2 --learner.total_env_steps 500000
    evergreen deploy tree                          # regenerate deploy/k8s (base = the defaults, overlays cpu/gpu)

The cluster's shape comes from the same config the run reads, so the two cannot drift apart:

* the head runs the driver (`evergreen train`) and no Ray work (num-cpus "0");
* the ``actors`` group hosts the actors (pod size from ``actors.placement``, one actor per CPU slot), the
  evaluation processes and, without a GPU group, the learner; its ceiling is ``control.max_actors`` so that
  `evergreen scale` never asks for more than the autoscaler may add;
* the ``replay`` group holds one shard per pod: each pod advertises exactly ``replay.placement`` (custom
  resources included, {"replay": 1} unless the config names others), so shards land there and nowhere else;
* with ``--gpus G`` a ``learner`` group of one pod with G GPUs, advertising {"learner": G}: the run gets
  ``learner.num_ranks G`` data-parallel ranks, each asking for one GPU and {"learner": 1}.

The RayJob's entrypoint is `evergreen train` with the preset and every override that the cluster needs
(``ray.address auto``, the Redis URL, the data paths) or that was given here, plus ``--resume-if-exists``
on a fixed run directory on the shared volume: re-submitting the job continues the run rather than
starting a second one. Secrets are never written here: the manifests refer to Secrets by name.

The output is plain YAML plus a ``kustomization.yaml``; ``deploy/k8s`` is what ``evergreen deploy tree``
writes (``base/`` for the defaults, ``overlays/gpu`` as a patch adding the GPU group), and a test checks
that the committed tree still matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from evergreen.config import RunConfig, load_config
from evergreen.configtools import add_flags, apply_flags

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "deploy" / "k8s"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"

CLUSTER = "evergreen"                 # the RayCluster's name (one per namespace); RayJobs select it
DATA = "/data"                        # the shared volume: run directories and replay shard checkpoints
RUNS_DIR = f"{DATA}/runs"
REPLAY_CHECKPOINTS = f"{DATA}/replay/{{run}}/shard-{{shard}}"
TELEMETRY_PORT = 9400                 # the run's /metrics (telemetry_port), on the head where the driver runs
REPLAY_METRICS_PORT = 9401            # each shard's /metrics (replay.metrics_port), one shard per replay pod
REDIS_PORT = 6379
REDIS_IMAGE = "redis:7.4.1"
REDIS_SECRET = "evergreen-redis"      # key "password"; created by hand, never rendered
RAY_TOKEN_SECRET = "evergreen-ray-token"  # key "auth_token" (KubeRay's key); created by hand, never rendered
DATA_CLAIM = "evergreen-data"
RAY_UID = 10001                       # the image's unprivileged user (Dockerfile: ARG UID)
REDIS_UID = 999                       # the redis image's "redis" user
MEMORY_PER_CPU_GI = 2                 # memory of a Ray worker pod per CPU slot


def _version(package: str, fallback: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return fallback


VERSION = _version("evergreen", "0.1.0")
RAY_VERSION = _version("ray", "2.9.0")    # the image is built from this project, so it has this Ray
DEFAULT_IMAGE = f"registry.example.com/evergreen:{VERSION}"   # a placeholder registry: use --image


@dataclasses.dataclass(frozen=True)
class Options:
    """What `render` needs beside the run config."""

    preset: str = "cartpole"
    actors: int | None = None         # actors to start with; None = the preset's actors.num_actors
    gpus: int = 0                     # GPUs of the learner pod; 0 = no GPU group, the learner runs on CPU
    namespace: str = "evergreen"
    image: str = DEFAULT_IMAGE
    storage: str = "100Gi"            # the shared ReadWriteMany volume at /data
    storage_class: str = ""           # "" = the cluster's default class
    replay_memory: str = "8Gi"        # memory of a replay pod (a shard holds capacity / num_shards rows)
    monitoring_namespace: str = "monitoring"
    operator_namespace: str = "kuberay-system"
    flags: tuple[tuple[str, str], ...] = ()   # config flags as given (path, value), forwarded to the run


# -- inputs -----------------------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")


def check_options(opts: Options) -> None:
    """Refuse bad input with the flag and the value, before anything is rendered."""
    if opts.preset.endswith(".json"):
        # The RayJob's driver reads the preset inside the image, where only configs/ is sure to exist.
        raise ValueError(f"--preset {opts.preset!r} is invalid here: expected the name of a preset in configs/ "
                         "(the image holds those); give changes to it as config flags")
    if opts.actors is not None and (isinstance(opts.actors, bool) or opts.actors < 1):
        raise ValueError(f"--actors {opts.actors!r} is invalid: expected an integer >= 1 (actors the run starts with)")
    if isinstance(opts.gpus, bool) or opts.gpus < 0:
        raise ValueError(f"--gpus {opts.gpus!r} is invalid: expected an integer >= 0 (GPUs of the learner pod)")
    for flag, value in (("--namespace", opts.namespace), ("--monitoring-namespace", opts.monitoring_namespace),
                        ("--operator-namespace", opts.operator_namespace)):
        if not _DNS_LABEL.fullmatch(value) or len(value) > 63:
            raise ValueError(f"{flag} {value!r} is invalid: expected a Kubernetes namespace name (a DNS label)")
    if ":" not in opts.image.rsplit("/", 1)[-1] or opts.image.endswith(":latest"):
        raise ValueError(f"--image {opts.image!r} is invalid: expected an image pinned to a version tag "
                         f"(e.g. ...evergreen:{VERSION}), never :latest or no tag")
    for flag, value in (("--storage", opts.storage), ("--replay-memory", opts.replay_memory)):
        if not _QUANTITY.fullmatch(value):
            raise ValueError(f"{flag} {value!r} is invalid: expected a Kubernetes quantity such as 100Gi")


def _flag_value(value: Any) -> str:
    """A config value as `evergreen train` reads it back from the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def run_flags(opts: Options) -> list[tuple[str, str]]:
    """The config flags of the run: what the cluster needs, then what was given (which wins)."""
    preset = load_config(preset=opts.preset)
    flags: dict[str, str] = {
        "ray.address": "auto",
        "runs_dir": RUNS_DIR,
        "telemetry_port": str(TELEMETRY_PORT),
        # Both exporters listen where the PodMonitors scrape them: the run's on the head pod's address,
        # each shard's on its own pod's address (shards bind the node IP on a cluster) at a fixed port.
        "telemetry_host": "0.0.0.0",
        "replay.metrics_port": str(REPLAY_METRICS_PORT),
        "control.redis_url": f"redis://evergreen-redis.{opts.namespace}.svc:{REDIS_PORT}/0",
        "replay.checkpoint_dir": REPLAY_CHECKPOINTS,
    }
    # Shards must find a replay pod: without custom resources of their own they would land anywhere.
    if not preset.replay.placement.resources:
        flags["replay.placement.resources"] = _flag_value({"replay": 1})
    if opts.actors is not None:
        flags["actors.num_actors"] = str(opts.actors)
    if opts.gpus:   # one learner rank per GPU, all in the learner pod (data-parallel when G > 1)
        flags["learner.placement.num_gpus"] = "1"
        flags["learner.placement.resources"] = _flag_value({"learner": 1})
        if opts.gpus > 1:
            flags["learner.num_ranks"] = str(opts.gpus)
    flags.update(dict(opts.flags))
    return sorted(flags.items())


def resolve(opts: Options) -> tuple[RunConfig, list[tuple[str, str]]]:
    """The run's config (validated) and the flags that make it from the preset."""
    check_options(opts)
    flags = run_flags(opts)
    config = apply_flags(load_config(preset=opts.preset), argparse.Namespace(**dict(flags)), RunConfig).validate()
    if config.ray.address != "auto":
        raise ValueError(f"ray.address = {config.ray.address!r} is invalid here: the RayJob's driver joins its own "
                         'cluster ("auto")')
    if not _DNS_LABEL.fullmatch(config.name) or len(config.name) > 40:
        raise ValueError(f"name = {config.name!r} is invalid here: the run name names Kubernetes objects, so it must "
                         "be a DNS label of at most 40 characters (lower case, digits, '-')")
    return config, flags


def entrypoint(opts: Options, config: RunConfig, flags: Sequence[tuple[str, str]]) -> str:
    args = ["evergreen", "train", "--preset", opts.preset, "--run-dir", f"{RUNS_DIR}/{config.name}",
            "--resume-if-exists"]
    for path, value in flags:
        args += [f"--{path}", value]
    return shlex.join(args)


# -- building blocks --------------------------------------------------------------------------------------

def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "evergreen", "app.kubernetes.io/part-of": "evergreen",
            "app.kubernetes.io/version": VERSION, "app.kubernetes.io/component": component}


def _meta(name: str, namespace: str, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": _labels(component), **extra}


def _container_security(uid: int) -> dict[str, Any]:
    # The restricted Pod Security Standard, plus a read-only root: writable paths are explicit volumes.
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security(uid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(cpu: str, memory: str, *, cpu_limit: str | None = None, extra: dict | None = None) -> dict:
    limits = {"cpu": cpu_limit or cpu, "memory": memory, **(extra or {})}
    return {"requests": {"cpu": cpu, "memory": memory, **(extra or {})}, "limits": limits}


def _ray_resources(resources: dict[str, float]) -> str:
    # KubeRay passes this to `ray start --resources=...` through a shell: a JSON object inside quotes.
    return json.dumps(json.dumps(dict(sorted(resources.items())), separators=(", ", ": ")))


def _ray_pod(opts: Options, *, container: str, resources: dict, ports: list[dict], data: bool,
             env: list[dict] | None = None, automount_token: bool = False, tolerations: list | None = None,
             shm: str = "1Gi") -> dict[str, Any]:
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
                                     {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    if data:
        mounts.append({"name": "data", "mountPath": DATA})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": DATA_CLAIM}})
    spec: dict[str, Any] = {
        # Only the head needs an API token (its autoscaler sidecar talks to the API server).
        "automountServiceAccountToken": automount_token,
        "securityContext": _pod_security(RAY_UID),
        "containers": [{
            "name": container,
            "image": opts.image,
            # Ray, torch.compile and Triton write caches under $HOME and /tmp: both on the tmp volume.
            "env": [{"name": "HOME", "value": "/tmp"}, *(env or [])],
            **({"ports": ports} if ports else {}),
            "resources": resources,
            "securityContext": _container_security(RAY_UID),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if tolerations:
        spec["tolerations"] = tolerations
    return spec


def _ceil_cpus(*amounts: float) -> int:
    return max(1, *(math.ceil(a) for a in amounts))


# -- the objects ------------------------------------------------------------------------------------------

def namespace(opts: Options) -> dict:
    labels = {**_labels("namespace"), "kubernetes.io/metadata.name": opts.namespace,
              # Every pod here meets the restricted profile; the API server then refuses any that does not.
              "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": opts.namespace, "labels": labels}}


def data_claim(opts: Options) -> dict:
    # ReadWriteMany: the head (run directory), the replay pods (shard checkpoints) and the learner's pod
    # (learner checkpoints in the run directory) all mount it, possibly on different nodes.
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": opts.storage}}}
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(DATA_CLAIM, opts.namespace, "storage"), "spec": spec}


def actor_group(opts: Options, config: RunConfig) -> dict:
    a, ev, lrn = config.actors.placement, config.evaluation.placement, config.learner.placement
    cpus = _ceil_cpus(a.num_cpus, ev.num_cpus, lrn.num_cpus)
    per_pod = math.floor(cpus / a.num_cpus) if a.num_cpus else config.control.max_actors
    pods = math.ceil(config.actors.num_actors / per_pod)
    # Room for control.max_actors actors (the `evergreen scale` ceiling), the learner when there is no GPU
    # group, and the evaluation processes: the last two each get a pod of headroom.
    ceiling = math.ceil(config.control.max_actors / per_pod) + 2
    params: dict[str, str] = {"num-cpus": str(cpus)}
    if a.resources:
        params["resources"] = _ray_resources({k: v * per_pod for k, v in a.resources.items()})
    memory = f"{MEMORY_PER_CPU_GI * cpus}Gi"
    return {
        "groupName": "actors", "replicas": pods, "minReplicas": 0, "maxReplicas": ceiling,
        "rayStartParams": params,
        "template": {"metadata": {"labels": _labels("actors")},
                     # The learner runs here when there is no GPU group: it checkpoints into the run directory.
                     "spec": _ray_pod(opts, container="ray-worker", resources=_resources(str(cpus), memory),
                                      ports=[], data=True)},
    }


def replay_group(opts: Options, config: RunConfig) -> dict:
    r = config.replay
    cpus = _ceil_cpus(r.placement.num_cpus)
    ports = [{"name": "replay-metrics", "containerPort": REPLAY_METRICS_PORT, "protocol": "TCP"}]
    return {
        # One shard per pod: a pod advertises exactly what one shard reserves.
        "groupName": "replay", "replicas": r.num_shards, "minReplicas": 0, "maxReplicas": r.num_shards,
        "rayStartParams": {"num-cpus": str(cpus), "resources": _ray_resources(r.placement.resources)},
        "template": {"metadata": {"labels": _labels("replay")},
                     "spec": _ray_pod(opts, container="ray-worker", ports=ports, data=True,
                                      resources=_resources(str(cpus), opts.replay_memory))},
    }


def learner_group(opts: Options, config: RunConfig) -> dict:
    lrn, ranks = config.learner.placement, config.learner.num_ranks
    cpus = _ceil_cpus(lrn.num_cpus * ranks)   # the pod holds every rank: room for all of them
    gpu = {"nvidia.com/gpu": str(opts.gpus)}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": "learner", "replicas": 1, "minReplicas": 0, "maxReplicas": 1,
        "rayStartParams": {"num-cpus": str(cpus), "num-gpus": str(opts.gpus),
                           "resources": _ray_resources({k: v * ranks for k, v in lrn.resources.items()})},
        "template": {"metadata": {"labels": _labels("learner")},
                     "spec": _ray_pod(opts, container="ray-worker", ports=[], data=True, tolerations=tolerations,
                                      resources=_resources(str(cpus), f"{8 * max(cpus, 2)}Gi", extra=gpu),
                                      shm="8Gi")},
    }


def ray_cluster(opts: Options, config: RunConfig) -> dict:
    head_ports = [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001},
                  {"name": "run-metrics", "containerPort": TELEMETRY_PORT}]
    for p in head_ports:
        p["protocol"] = "TCP"
    # The driver runs on the head and is the only process that talks to Redis.
    redis_env = [{"name": config.control.password_env,
                  "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "password"}}}]
    head = _ray_pod(opts, container="ray-head", ports=head_ports, data=True, env=redis_env, automount_token=True,
                    resources=_resources("1", "4Gi", cpu_limit="2"))
    groups = [actor_group(opts, config), replay_group(opts, config)]
    if opts.gpus:
        groups.append(learner_group(opts, config))
    spec = {
        "rayVersion": RAY_VERSION,
        # Every Ray call needs the token; KubeRay hands it to every Ray container and the job submitter.
        "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",            # KubeRay then sets RAY_enable_autoscaler_v2 and restartPolicy Never
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,  # an actor pod outlives a short gap between runs or a scale-down
            "resources": _resources("500m", "512Mi"),
            "securityContext": _container_security(RAY_UID),
            "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
        "headGroupSpec": {
            # The head does no Ray work: it runs the driver, GCS, the dashboard and the autoscaler.
            "rayStartParams": {"num-cpus": "0"},
            "template": {"metadata": {"labels": _labels("head")}, "spec": head},
        },
        "workerGroupSpecs": groups,
    }
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(CLUSTER, opts.namespace, "ray"),
            "spec": spec}


def ray_job(opts: Options, config: RunConfig, flags: Sequence[tuple[str, str]]) -> dict:
    submitter = {
        "metadata": {"labels": {**_labels("submitter"), "evergreen.io/role": "submitter"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(RAY_UID),
            "containers": [{
                "name": "ray-job-submitter", "image": opts.image,
                "env": [{"name": "HOME", "value": "/tmp"}],
                "resources": _resources("200m", "512Mi", cpu_limit="1"),
                "securityContext": _container_security(RAY_UID),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
        },
    }
    spec = {
        # A long-lived cluster shared by runs: KubeRay refuses backoffLimit with clusterSelector, so a
        # retry is a re-submitted RayJob, which --resume-if-exists turns into a resume of the same run.
        "clusterSelector": {"ray.io/cluster": CLUSTER},
        "entrypoint": entrypoint(opts, config, flags),
        "entrypointNumCpus": 0,        # the driver only coordinates; the head advertises no CPUs
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter,
        "submitterConfig": {"backoffLimit": 2},
    }
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": _meta(f"evergreen-{config.name}", opts.namespace, "run"), "spec": spec}


def redis(opts: Options) -> list[dict]:
    selector = {"app.kubernetes.io/name": "evergreen", "app.kubernetes.io/component": "redis"}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta("evergreen-redis", opts.namespace, "redis"),
               "spec": {"selector": selector, "ports": [{"name": "redis", "port": REDIS_PORT,
                                                         "targetPort": "redis", "protocol": "TCP"}]}}
    # The password goes into a config file on a memory volume, not onto redis-server's command line
    # (where every process in the pod could read it).
    write_config = ('umask 077; printf "requirepass %s\\nappendonly yes\\ndir /data\\nport 6379\\n" '
                    '"$REDIS_PASSWORD" > /conf/redis.conf')
    password = {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "password"}}}
    security = _container_security(REDIS_UID)
    pod = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(REDIS_UID),
        "initContainers": [{"name": "config", "image": REDIS_IMAGE, "command": ["sh", "-c", write_config],
                            "env": [password], "resources": _resources("50m", "32Mi"), "securityContext": security,
                            "volumeMounts": [{"name": "conf", "mountPath": "/conf"}]}],
        "containers": [{
            "name": "redis", "image": REDIS_IMAGE, "command": ["redis-server", "/conf/redis.conf"],
            "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
            "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "failureThreshold": 6},
            "resources": _resources("100m", "256Mi", cpu_limit="500m"), "securityContext": security,
            "volumeMounts": [{"name": "conf", "mountPath": "/conf", "readOnly": True},
                             {"name": "data", "mountPath": "/data"}],
        }],
        "volumes": [{"name": "conf", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta("evergreen-redis", opts.namespace, "redis"),
        "spec": {
            "serviceName": "evergreen-redis", "replicas": 1, "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": _labels("redis")}, "spec": pod},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}],
        },
    }
    return [service, statefulset]


def network_policies(opts: Options) -> list[dict]:
    ns = opts.namespace
    ray_pods = {"matchLabels": {"ray.io/cluster": CLUSTER}}
    head = {"matchLabels": {"ray.io/cluster": CLUSTER, "ray.io/node-type": "head"}}
    redis_pods = {"matchLabels": {"app.kubernetes.io/name": "evergreen", "app.kubernetes.io/component": "redis"}}
    submitter = {"matchLabels": {"evergreen.io/role": "submitter"}}

    def in_namespace(name: str) -> dict:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    def tcp(*ports: int) -> list[dict]:
        return [{"protocol": "TCP", "port": p} for p in ports]

    def policy(name: str, selector: dict, *, ingress: list | None = None, egress: list | None = None) -> dict:
        spec: dict[str, Any] = {"podSelector": selector, "policyTypes": []}
        if ingress is not None:
            spec["policyTypes"].append("Ingress")
            spec["ingress"] = ingress
        if egress is not None:
            spec["policyTypes"].append("Egress")
            spec["egress"] = egress
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": _meta(name, ns, "network"), "spec": spec}

    dns = {"to": [{**in_namespace("kube-system"), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    return [
        # Nothing in or out unless a policy below allows it.
        policy("default-deny", {}, ingress=[], egress=[]),
        policy("allow-dns", {}, egress=[dns]),
        # Ray nodes talk to each other on many dynamic ports (GCS, raylets, object store, workers) and so do
        # the replay shards (their gRPC port is picked at start): the run's pods, and only they, reach them.
        policy("ray-internal", ray_pods, ingress=[{"from": [{"podSelector": ray_pods}]}],
               egress=[{"to": [{"podSelector": ray_pods}]},
                       {"to": [{"podSelector": redis_pods}], "ports": tcp(REDIS_PORT)}]),
        policy("redis-from-run", redis_pods, ingress=[{"from": [{"podSelector": ray_pods}], "ports": tcp(REDIS_PORT)}]),
        # The job submitter and the KubeRay operator use the head's dashboard API (job submission and status).
        policy("ray-head-api", head, ingress=[{"from": [{"podSelector": submitter},
                                                        in_namespace(opts.operator_namespace)],
                                               "ports": tcp(8265)}]),
        policy("submitter-to-head", submitter, egress=[{"to": [{"podSelector": head}], "ports": tcp(8265)}]),
        # The autoscaler sidecar in the head pod calls the Kubernetes API; its address is cluster-specific,
        # so narrow this ipBlock to your API server's where you can.
        policy("ray-head-to-apiserver", head, egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                                                       "ports": tcp(443, 6443)}]),
        # Metrics only from Prometheus' namespace.
        policy("metrics-from-monitoring", head, ingress=[{"from": [in_namespace(opts.monitoring_namespace)],
                                                          "ports": tcp(TELEMETRY_PORT)}]),
        policy("replay-metrics-from-monitoring", {"matchLabels": {"ray.io/cluster": CLUSTER, "ray.io/group": "replay"}},
               ingress=[{"from": [in_namespace(opts.monitoring_namespace)], "ports": tcp(REPLAY_METRICS_PORT)}]),
    ]


def monitors(opts: Options) -> list[dict]:
    def pod_monitor(name: str, selector: dict, port: str, job: str) -> dict:
        return {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": _meta(name, opts.namespace, "monitoring"),
            "spec": {
                "selector": {"matchLabels": selector},
                "podMetricsEndpoints": [{
                    "port": port, "path": "/metrics", "interval": "5s", "scrapeTimeout": "4s",
                    # The exporters label their own series with run and shard (as in prometheus.yml).
                    "honorLabels": True,
                    # alerts.yml and the dashboards select targets by these job names.
                    "relabelings": [{"action": "replace", "targetLabel": "job", "replacement": job}],
                }],
            },
        }

    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": _meta("evergreen-alerts", opts.namespace, "monitoring"),
            "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]}}
    return [
        pod_monitor("evergreen-run", {"ray.io/cluster": CLUSTER, "ray.io/node-type": "head"}, "run-metrics",
                    "evergreen-learner"),
        pod_monitor("evergreen-replay", {"ray.io/cluster": CLUSTER, "ray.io/group": "replay"}, "replay-metrics",
                    "evergreen-replay"),
        rule,
    ]


def dashboards(opts: Options) -> list[dict]:
    maps = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        meta = _meta(f"evergreen-dashboard-{path.stem}", opts.namespace, "dashboards",
                     annotations={"grafana_folder": "Evergreen"})
        meta["labels"]["grafana_dashboard"] = "1"     # what Grafana's dashboard sidecar watches for
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {path.name: path.read_text()}})
    return maps


def render(opts: Options) -> dict[str, list[dict]]:
    """Every object, by the file it goes to (in apply order)."""
    config, flags = resolve(opts)
    return {
        "namespace.yaml": [namespace(opts)],
        "storage.yaml": [data_claim(opts)],
        "redis.yaml": redis(opts),
        "networkpolicies.yaml": network_policies(opts),
        "raycluster.yaml": [ray_cluster(opts, config)],
        "rayjob.yaml": [ray_job(opts, config, flags)],
        "monitoring.yaml": monitors(opts),
        "dashboards.yaml": dashboards(opts),
    }


# -- writing ----------------------------------------------------------------------------------------------

WIDTH = 4096    # long lines (the RayJob entrypoint) stay on one line rather than being folded


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line strings (dashboards, alert expressions) as blocks, so that the files stay readable.
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(objects: Sequence[dict]) -> str:
    return "".join("---\n" + yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=WIDTH) for o in objects)


HEADER = "# Generated by `evergreen deploy {command}` (evergreen/deploy.py); edit that, not this file.\n"


def write(files: dict[str, list[dict]], out: Path, *, command: str = "render") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in files.items():
        (out / name).write_text(HEADER.format(command=command) + dump(objects))
        written.append(out / name)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": list(files)}
    (out / "kustomization.yaml").write_text(HEADER.format(command=command) + yaml.dump(kustomization, sort_keys=False))
    return [*written, out / "kustomization.yaml"]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def patch_ops(old: Any, new: Any, path: str = "") -> list[dict]:
    """JSON-patch (RFC 6902) operations that turn ``old`` into ``new``: appends to lists where ``new``
    extends ``old``, so that the gpu overlay reads as "add a worker group"."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
            else:
                ops += patch_ops(old[key], value, f"{path}/{_escape(key)}")
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old):
        ops = []
        for i, value in enumerate(old):
            ops += patch_ops(value, new[i], f"{path}/{i}")
        return ops + [{"op": "add", "path": f"{path}/-", "value": value} for value in new[len(old):]]
    return [] if old == new else [{"op": "replace", "path": path, "value": new}]


def tree(out: Path = K8S_DIR, *, opts: Options | None = None) -> list[Path]:
    """deploy/k8s: base/ (the defaults), overlays/cpu (the base as it is), overlays/gpu (plus a 1-GPU learner)."""
    opts = opts or Options()
    base = render(opts)
    gpu = render(dataclasses.replace(opts, gpus=1))
    written = write(base, out / "base", command="tree")
    cpu_dir, gpu_dir = out / "overlays" / "cpu", out / "overlays" / "gpu"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    gpu_dir.mkdir(parents=True, exist_ok=True)
    header = HEADER.format(command="tree")
    cpu = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"]}
    (cpu_dir / "kustomization.yaml").write_text(header + yaml.dump(cpu, sort_keys=False))
    patches = []
    for name, objects in base.items():
        for old, new in zip(objects, gpu[name], strict=True):
            ops = patch_ops(old, new)
            if ops:
                target = {"group": old["apiVersion"].rpartition("/")[0], "version": old["apiVersion"].rpartition("/")[2],
                          "kind": old["kind"], "name": old["metadata"]["name"]}
                patches.append({"target": target, "patch": yaml.dump(ops, Dumper=_Dumper, sort_keys=False, width=WIDTH)})
    kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"],
            "patches": patches}
    (gpu_dir / "kustomization.yaml").write_text(header + yaml.dump(kust, Dumper=_Dumper, sort_keys=False, width=WIDTH))
    return [*written, cpu_dir / "kustomization.yaml", gpu_dir / "kustomization.yaml"]


# -- command line -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evergreen deploy",
        description="Render KubeRay/Kubernetes manifests for a run from its config (see deploy/README.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    render_p = sub.add_parser("render", help="manifests for one run: RayCluster, RayJob, Redis, policies, monitoring")
    render_p.add_argument("--preset", default="cartpole", help="a preset name from configs/ or a path to a JSON file")
    # dest names apart from the config's own `actors` section, which add_flags below maps too.
    render_p.add_argument("--actors", dest="start_actors", metavar="N", type=int, default=None,
                          help="actors the run starts with (default: the preset's actors.num_actors)")
    render_p.add_argument("--gpus", dest="learner_gpus", metavar="G", type=int, default=0,
                          help="GPUs of the learner pod; 0 = the learner runs on CPU")
    render_p.add_argument("--out", metavar="DIR", required=True, type=Path, help="directory to write the YAML files to")
    render_p.add_argument("--namespace", default="evergreen")
    render_p.add_argument("--image", default=DEFAULT_IMAGE, help="the Evergreen image, pinned to a version tag")
    render_p.add_argument("--storage", default="100Gi", help="size of the shared ReadWriteMany volume at /data")
    render_p.add_argument("--storage-class", default="", help="its storage class (default: the cluster's)")
    render_p.add_argument("--replay-memory", default="8Gi", help="memory of each replay pod")
    render_p.add_argument("--monitoring-namespace", default="monitoring", help="Prometheus' namespace")
    render_p.add_argument("--operator-namespace", default="kuberay-system", help="the KubeRay operator's namespace")
    add_flags(render_p, RunConfig)    # every `evergreen train` config flag, forwarded to the run
    tree_p = sub.add_parser("tree", help="regenerate the kustomize tree deploy/k8s from the defaults")
    tree_p.add_argument("--out", type=Path, default=K8S_DIR)
    return parser


def _given_flags(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    defaults = RunConfig()
    leaves = {f.name for f in dataclasses.fields(RunConfig) if not dataclasses.is_dataclass(getattr(defaults, f.name))}
    return tuple((k, v) for k, v in vars(args).items() if "." in k or k in leaves)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tree":
            written = tree(args.out)
        else:
            opts = Options(preset=args.preset, actors=args.start_actors, gpus=args.learner_gpus,
                           namespace=args.namespace, image=args.image, storage=args.storage,
                           storage_class=args.storage_class,
                           replay_memory=args.replay_memory, monitoring_namespace=args.monitoring_namespace,
                           operator_namespace=args.operator_namespace, flags=_given_flags(args))
            written = write(render(opts), args.out)
    except ValueError as exc:
        print(f"evergreen deploy: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    target = args.out if args.command == "render" else args.out / "overlays" / "cpu"
    print(f"apply with: kubectl apply --server-side -k {target}  (create the Secrets first: deploy/README.md)")
    return 0

