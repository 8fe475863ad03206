"""Offline checks of the Kubernetes manifests `evergreen deploy render` writes (and deploy/k8s).

Three validators, each shown to reject a broken manifest:
* built-in kinds against the Kubernetes OpenAPI schemas bundled with `kubernetes-validate` (strict: unknown
  fields are errors), Ray pod templates included (wrapped in a Pod);
* custom resources (RayCluster, RayJob, PodMonitor, PrometheusRule) against the openAPIV3Schema of the CRDs
  vendored in deploy/k8s/crds, made strict the same way (an unknown field is an error, as with
  `kubectl apply --validate=strict`);
* policies: requests and limits and a restrictive securityContext on every container, secrets only by
  reference, a default-deny NetworkPolicy in every namespace, who may reach Redis, replay and the metrics
  ports, pinned images; and that two configs' manifests differ exactly where the configs do.
"""

from __future__ import annotations

import copy
import functools
import json
import shlex
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from evergreen import deploy
from evergreen.config import RunConfig, load_config
from evergreen.configtools import apply_flags, to_dict

K8S_VERSION = "1.32.0"
CRDS = deploy.K8S_DIR / "crds"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- helpers ----------------------------------------------------------------------------------------------

@functools.cache
def rendered(**options: Any) -> dict[str, list[dict]]:
    return deploy.render(deploy.Options(**options))


def objects(**options: Any) -> list[dict]:
    return [o for objs in rendered(**options).values() for o in objs]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


SHAPES = [dict(), dict(gpus=1), dict(preset="pong", actors=8, gpus=2, namespace="rl-prod")]


def _strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused (the API server would drop them silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            # Every object must say what it is; metadata is the API server's business (a plain object here).
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def is_custom(obj: dict) -> bool:
    return (obj["apiVersion"], obj["kind"]) in crd_validators()


def validate_custom(obj: dict) -> None:
    errors = sorted(crd_validators()[(obj["apiVersion"], obj["kind"])].iter_errors(obj), key=lambda e: e.path)
    if errors:
        raise jsonschema.ValidationError("; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5]))


def validate_builtin(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayCluster's groups and a RayJob's submitter."""
    if obj["kind"] == "RayCluster":
        spec = obj["spec"]
        return [("head", spec["headGroupSpec"]["template"])] + [
            (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    if obj["kind"] == "RayJob":
        return [("submitter", obj["spec"]["submitterPodTemplate"])]
    if obj["kind"] in ("StatefulSet", "Deployment", "Job"):
        return [(obj["metadata"]["name"], obj["spec"]["template"])]
    return []


def containers(objs: list[dict]) -> list[tuple[str, dict]]:
    """Every container that will run, the autoscaler sidecar (KubeRay builds it from autoscalerOptions) too."""
    found = []
    for obj in objs:
        for where, template in pod_templates(obj):
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                found.append((f"{obj['kind']}/{obj['metadata']['name']}/{where}/{c['name']}", c))
        if obj["kind"] == "RayCluster" and obj["spec"].get("enableInTreeAutoscaling"):
            found.append((f"RayCluster/{obj['metadata']['name']}/autoscaler", obj["spec"]["autoscalerOptions"]))
    return found


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in
                (diff_paths(a[k], b[k], f"{path}/{k}") if k in a and k in b else [f"{path}/{k}"])]
    if isinstance(a, list) and isinstance(b, list):
        common = [p for i, (x, y) in enumerate(zip(a, b, strict=False)) for p in diff_paths(x, y, f"{path}/{i}")]
        return common + [f"{path}/{i}" for i in range(min(len(a), len(b)), max(len(a), len(b)))]
    return [] if a == b else [path]


def manifest_diff(old: list[dict], new: list[dict]) -> set[str]:
    def key(o: dict) -> str:
        return f"{o['kind']}/{o['metadata']['name']}"

    old_by, new_by = {key(o): o for o in old}, {key(o): o for o in new}
    assert set(old_by) == set(new_by)
    return {f"{k}{p}" for k in old_by for p in diff_paths(old_by[k], new_by[k])}


def apply_patch(doc: Any, ops: list[dict]) -> Any:
    """The RFC 6902 operations `patch_ops` emits (add, replace, remove), as kustomize applies them."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node.append(op["value"]) if last == "-" else node.__setitem__(int(last), op["value"])
        else:
            node[last] = op["value"]
    return doc


# -- validators -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_builtin_kinds_pass_strict_kubernetes_schemas(shape):
    builtin = [o for o in objects(**shape) if not is_custom(o)]
    assert {o["kind"] for o in builtin} >= {"Namespace", "PersistentVolumeClaim", "Service", "StatefulSet",
                                            "NetworkPolicy", "ConfigMap"}
    for obj in builtin:
        validate_builtin(obj)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ray_pod_templates_pass_strict_kubernetes_schemas(shape):
    # The CRD embeds PodTemplateSpec without Kubernetes' own strictness: check each template as a Pod.
    for obj in objects(**shape):
        for where, template in pod_templates(obj):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"check-{where}", **template["metadata"]},
                   "spec": template["spec"]}
            validate_builtin(pod)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_custom_resources_pass_vendored_crd_schemas(shape):
    custom = [o for o in objects(**shape) if is_custom(o)]
    assert sorted(o["kind"] for o in custom) == ["PodMonitor", "PodMonitor", "PrometheusRule", "RayCluster", "RayJob"]
    for obj in custom:
        validate_custom(obj)


def test_each_validator_rejects_a_broken_manifest():
    objs = copy.deepcopy(objects())
    redis = one(objs, "StatefulSet")
    redis["spec"]["replica"] = 1                             # a typo: only strict validation notices
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(redis)
    service = one(objs, "Service")
    service["spec"]["ports"][0]["port"] = "six-three-seven-nine"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(service)

    cluster = one(objs, "RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        validate_custom(broken)
    broken = copy.deepcopy(cluster)
    broken["spec"]["autoscalerOptions"]["version"] = "v3"
    with pytest.raises(jsonschema.ValidationError, match="version"):
        validate_custom(broken)
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["minReplica"] = 0   # unknown field
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        validate_custom(broken)
    job = copy.deepcopy(one(objs, "RayJob"))
    del job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    with pytest.raises(jsonschema.ValidationError, match="containers"):
        validate_custom(job)
    monitor = copy.deepcopy(one(objs, "PodMonitor", "evergreen-run"))
    monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="honorLabels"):
        validate_custom(monitor)
    rule = copy.deepcopy(one(objs, "PrometheusRule"))
    del rule["spec"]["groups"][0]["name"]
    with pytest.raises(jsonschema.ValidationError, match="name"):
        validate_custom(rule)


def test_vendored_crds_are_documented_and_have_token_auth():
    source = (CRDS / "SOURCE.md").read_text()
    for path in CRDS.glob("*.yaml"):
        assert path.name in source, f"{path.name} is not described in crds/SOURCE.md"
    assert "Apache-2.0" in source
    ray = crd_validators()[("ray.io/v1", "RayCluster")].schema["properties"]["spec"]["properties"]
    assert ray["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]


# -- policies ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_container_has_requests_limits_and_a_restrictive_security_context(shape):
    found = containers(objects(**shape))
    assert len(found) >= 6
    for where, c in found:
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: no cpu/memory {kind}"
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities") == {"drop": ["ALL"]}, where
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    for obj in objects(**shape):
        for where, template in pod_templates(obj):
            pod = template["spec"]["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}, where


def test_gpu_learner_has_gpu_limits_and_tolerations():
    groups = one(objects(gpus=2), "RayCluster")["spec"]["workerGroupSpecs"]
    group = [g for g in groups if g["groupName"] == "learner"][0]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert group["rayStartParams"]["num-gpus"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Two GPUs: two data-parallel learner ranks of one GPU each, and room for both in the pod.
    entrypoint = shlex.split(one(objects(gpus=2), "RayJob")["spec"]["entrypoint"])
    flags = dict(zip(entrypoint[::1], entrypoint[1::1], strict=False))
    assert flags["--learner.num_ranks"] == "2" and flags["--learner.placement.num_gpus"] == "1"
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"learner": 2}


SECRETISH = ("PASSWORD", "TOKEN", "SECRET", "KEY", "CREDENTIAL")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_secrets_only_by_reference(shape):
    objs = objects(**shape)
    assert not [o for o in objs if o["kind"] == "Secret"], "Secrets are created by hand, never rendered"
    refs = []
    for where, c in containers(objs):
        for env in c.get("env", []):
            if any(word in env["name"].upper() for word in SECRETISH):
                assert "value" not in env, f"{where}: {env['name']} has a literal value"
                refs.append(env["valueFrom"]["secretKeyRef"])
    assert {"name": deploy.REDIS_SECRET, "key": "password"} in refs
    job = one(objs, "RayJob")
    assert "password" not in job["spec"]["entrypoint"].lower()
    cluster = one(objs, "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": deploy.RAY_TOKEN_SECRET}
    # The run reads the password from the variable the head's env sets.
    config, _ = deploy.resolve(deploy.Options(**shape))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config.control.password_env in {e["name"] for e in head["env"] if "valueFrom" in e}
    assert "@" not in config.control.redis_url


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_namespace_has_default_deny(shape):
    objs = objects(**shape)
    namespaces = {o["metadata"]["namespace"] for o in objs if "namespace" in o["metadata"]}
    assert namespaces == {shape.get("namespace", "evergreen")}
    for ns in namespaces:
        deny = [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == ns
                and o["spec"]["podSelector"] == {} and set(o["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                and not o["spec"].get("ingress") and not o["spec"].get("egress")]
        assert deny, f"namespace {ns} has no default-deny NetworkPolicy"
    assert one(objs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _allows(objs: list[dict], direction: str, *, pod: dict, pod_ns: str, peer: dict, peer_ns: str, port: int) -> bool:
    """Whether the policies selecting ``pod`` allow traffic to (Egress) or from (Ingress) ``peer`` on a TCP port."""
    policies = [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == pod_ns
                and direction in o["spec"]["policyTypes"] and _matches(o["spec"]["podSelector"], pod)]
    if not policies:
        return True   # a pod no policy isolates (e.g. in another namespace) is not restricted
    for policy in policies:
        for rule in policy["spec"].get(direction.lower(), []):
            ports = rule.get("ports")
            if ports and not any(q.get("port") == port and q.get("protocol", "TCP") == "TCP" for q in ports):
                continue
            for p in rule.get("from" if direction == "Ingress" else "to", [{}]):
                if "ipBlock" in p:
                    return True   # conservatively: an ipBlock may cover pod addresses too
                ns_ok = (_matches(p["namespaceSelector"], {"kubernetes.io/metadata.name": peer_ns})
                         if "namespaceSelector" in p else peer_ns == pod_ns)
                if ns_ok and _matches(p.get("podSelector", {}), peer):
                    return True
    return False


def connection_allowed(objs: list[dict], *, src: dict, src_ns: str, dst: dict, dst_ns: str, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics for one TCP connection: the source's egress and the target's ingress."""
    return (_allows(objs, "Egress", pod=src, pod_ns=src_ns, peer=dst, peer_ns=dst_ns, port=port)
            and _allows(objs, "Ingress", pod=dst, pod_ns=dst_ns, peer=src, peer_ns=src_ns, port=port))


def _pods(objs: list[dict]) -> dict[str, dict]:
    """Labels of each kind of pod, with the ones KubeRay adds to Ray pods."""
    cluster = one(objs, "RayCluster")
    name = cluster["metadata"]["name"]
    pods = {"head": {**cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/cluster": name,
                     "ray.io/node-type": "head", "ray.io/group": "headgroup"}}
    for g in cluster["spec"]["workerGroupSpecs"]:
        pods[g["groupName"]] = {**g["template"]["metadata"]["labels"], "ray.io/cluster": name,
                                "ray.io/node-type": "worker", "ray.io/group": g["groupName"]}
    pods["redis"] = one(objs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pods["submitter"] = one(objs, "RayJob")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    pods["stranger"] = {"app": "something-else"}
    return pods


def test_network_policies_let_only_the_run_reach_redis_and_replay_and_monitoring_the_metrics():
    objs = objects(gpus=1)
    pods = _pods(objs)
    run_pods = ["head", "actors", "replay", "learner"]

    def allowed(src: str, dst: str, port: int, src_ns: str = "evergreen") -> bool:
        return connection_allowed(objs, src=pods[src], src_ns=src_ns, dst=pods[dst], dst_ns="evergreen", port=port)

    for src in run_pods:
        assert allowed(src, "redis", 6379)
        assert allowed(src, "replay", 43210)         # a shard's gRPC port is picked at start
    for src in ("submitter", "stranger"):
        assert not allowed(src, "redis", 6379)
        assert not allowed(src, "replay", 43210)
    assert not allowed("head", "redis", 6379, src_ns="monitoring")
    assert not allowed("stranger", "head", 6379, src_ns="other")
    assert allowed("stranger", "head", deploy.TELEMETRY_PORT, src_ns="monitoring")
    assert allowed("stranger", "replay", deploy.REPLAY_METRICS_PORT, src_ns="monitoring")
    assert not allowed("stranger", "head", deploy.TELEMETRY_PORT, src_ns="default")
    assert not allowed("stranger", "replay", 43210, src_ns="monitoring")
    assert not allowed("stranger", "redis", 6379, src_ns="monitoring")
    assert allowed("submitter", "head", 8265)
    assert allowed("stranger", "head", 8265, src_ns="kuberay-system")
    assert not allowed("submitter", "head", 6379)
    assert not allowed("redis", "head", 6379), "Redis opens no connections"
    assert not allowed("actors", "submitter", 8265)


def test_the_policy_check_can_fail():
    objs = copy.deepcopy(objects())
    one(objs, "NetworkPolicy", "redis-from-run")["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]
    pods = _pods(objs)
    assert not connection_allowed(objs, src=pods["submitter"], src_ns="evergreen", dst=pods["redis"], dst_ns="evergreen",
                                  port=6379), "the submitter's egress still stops it"
    one(objs, "NetworkPolicy", "submitter-to-head")["spec"]["egress"].append({"to": [{"podSelector": {}}]})
    assert connection_allowed(objs, src=pods["submitter"], src_ns="evergreen", dst=pods["redis"], dst_ns="evergreen",
                              port=6379)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_image_is_pinned(shape):
    images = {c["image"] for _, c in containers(objects(**shape)) if "image" in c}
    assert images
    for image in images:
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest" and "@" not in name, image
    assert f":{deploy.VERSION}" in one(objects(**shape), "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]


# -- the config and the cluster agree ---------------------------------------------------------------------

def test_more_actors_change_only_the_actor_group_and_the_run_flag():
    two, eight = objects(actors=2), objects(actors=8)
    assert manifest_diff(two, eight) == {"RayCluster/evergreen/spec/workerGroupSpecs/0/replicas",
                                         "RayJob/evergreen-cartpole/spec/entrypoint"}
    groups = one(eight, "RayCluster")["spec"]["workerGroupSpecs"]
    assert groups[0]["groupName"] == "actors" and groups[0]["replicas"] == 8
    old, new = (shlex.split(one(o, "RayJob")["spec"]["entrypoint"]) for o in (two, eight))
    assert [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b] == [old.index("2")]
    assert old[old.index("2") - 1] == "--actors.num_actors"


def test_a_gpu_adds_only_the_gpu_group_and_the_learner_placement():
    cpu, gpu = objects(), objects(gpus=1)
    assert manifest_diff(cpu, gpu) == {"RayCluster/evergreen/spec/workerGroupSpecs/2",
                                       "RayJob/evergreen-cartpole/spec/entrypoint"}
    old, new = (shlex.split(one(o, "RayJob")["spec"]["entrypoint"]) for o in (cpu, gpu))
    added = list(new)
    for token in old:
        added.remove(token)
    assert added == ["--learner.placement.num_gpus", "1", "--learner.placement.resources", '{"learner":1}']
    group = one(gpu, "RayCluster")["spec"]["workerGroupSpecs"][2]
    assert group["groupName"] == "learner"
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"learner": 1}


def test_worker_groups_follow_the_placement_sections():
    objs = objects(preset="pong", flags=(("replay.num_shards", "3"), ("replay.placement.resources", '{"ssd": 2}'),
                                         ("replay.placement.num_cpus", "2")))
    config, _ = deploy.resolve(deploy.Options(preset="pong", flags=(
        ("replay.num_shards", "3"), ("replay.placement.resources", '{"ssd": 2}'), ("replay.placement.num_cpus", "2"))))
    assert config.replay.num_shards == 3 and config.replay.placement.resources == {"ssd": 2}
    replay = [g for g in one(objs, "RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "replay"][0]
    assert replay["replicas"] == replay["maxReplicas"] == 3
    assert replay["rayStartParams"]["num-cpus"] == "2"
    assert json.loads(json.loads(replay["rayStartParams"]["resources"])) == {"ssd": 2}
    actors = one(objs, "RayCluster")["spec"]["workerGroupSpecs"][0]
    assert actors["maxReplicas"] == config.control.max_actors + 2     # `evergreen scale` ceiling + learner + eval
    assert "--replay.num_shards" in shlex.split(one(objs, "RayJob")["spec"]["entrypoint"])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_entrypoint_is_a_valid_train_command_for_the_same_config(shape):
    from evergreen.train import build_parser

    opts = deploy.Options(**shape)
    config, _ = deploy.resolve(opts)
    argv = shlex.split(one(objects(**shape), "RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["evergreen", "train"]
    args = build_parser().parse_args(argv[2:])
    assert args.resume_if_exists and args.run_dir == f"{deploy.RUNS_DIR}/{config.name}"
    assert args.preset == opts.preset
    trained = apply_flags(load_config(preset=args.preset), args, RunConfig).validate()
    assert to_dict(trained) == to_dict(config)
    assert trained.ray.address == "auto" and trained.telemetry_port == deploy.TELEMETRY_PORT
    assert trained.replay.checkpoint_dir.startswith(deploy.DATA)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_monitors_and_mounts_point_at_what_exists(shape):
    objs = objects(**shape)
    pods = _pods(objs)
    cluster = one(objs, "RayCluster")
    templates = dict(pod_templates(cluster))
    for monitor in [o for o in objs if o["kind"] == "PodMonitor"]:
        selected = [name for name, labels in pods.items() if _matches(monitor["spec"]["selector"], labels)]
        assert selected, monitor["metadata"]["name"]
        port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
        for name in selected:
            named = {p["name"] for p in templates[name]["spec"]["containers"][0].get("ports", [])}
            assert port in named, f"{monitor['metadata']['name']}: pod {name} has no port {port}"
    claim = one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    for name in ("head", "replay"):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in templates[name]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [claim], name
    job = one(objs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "backoffLimit" not in job["spec"], "KubeRay refuses backoffLimit together with clusterSelector"


def test_prometheus_rule_and_dashboards_come_from_deploy():
    objs = objects()
    rule = one(objs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(deploy.ALERTS.read_text())["groups"]
    maps = [o for o in objs if o["kind"] == "ConfigMap"]
    files = sorted(deploy.DASHBOARDS.glob("*.json"))
    assert len(maps) == len(files) >= 2
    for cm, path in zip(maps, files, strict=True):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())


def test_deploy_k8s_is_what_tree_writes(tmp_path):
    deploy.tree(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(deploy.K8S_DIR) for p in deploy.K8S_DIR.rglob("*")
                       if p.is_file() and p.parts[len(deploy.K8S_DIR.parts)] != "crds")
    assert written == committed
    for rel in written:
        assert (tmp_path / rel).read_text() == (deploy.K8S_DIR / rel).read_text(), (
            f"deploy/k8s/{rel} is stale: run `evergreen deploy tree`")


def test_gpu_overlay_is_the_gpu_render():
    base = {}
    for path in (deploy.K8S_DIR / "base").glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj.get("kind") != "Kustomization":
                base[(obj["kind"], obj["metadata"]["name"])] = obj
    overlay = yaml.safe_load((deploy.K8S_DIR / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    for patch in overlay["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        base[key] = apply_patch(base[key], yaml.safe_load(patch["patch"]))
    expected = {(o["kind"], o["metadata"]["name"]): o for o in objects(gpus=1)}
    assert base == expected


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay, shape", [("cpu", {}), ("gpu", {"gpus": 1})])
def test_kustomize_builds_each_overlay_into_the_render(overlay, shape):
    built = subprocess.run(["kubectl", "kustomize", str(deploy.K8S_DIR / "overlays" / overlay)], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    docs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(built) if o}
    assert docs == {(o["kind"], o["metadata"]["name"]): o for o in objects(**shape)}


# -- the command line -------------------------------------------------------------------------------------

def test_render_writes_a_kustomize_directory(tmp_path, capsys):
    from evergreen.cli import main

    assert main(["deploy", "render", "--preset", "pong", "--actors", "4", "--gpus", "1", "--out", str(tmp_path),
                 "--learner.total_env_steps", "5000000"]) == 0
    kust = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    files = [p for p in tmp_path.glob("*.yaml") if p.name != "kustomization.yaml"]
    assert sorted(kust["resources"]) == sorted(p.name for p in files)
    docs = [d for p in files for d in yaml.safe_load_all(p.read_text())]
    entry = shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])
    assert entry[entry.index("--learner.total_env_steps") + 1] == "5000000"
    assert entry[entry.index("--actors.num_actors") + 1] == "4"
    assert "kubectl apply" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["--preset", "no-such-preset"], "no-such-preset"),
    (["--preset", "/tmp/mine.json"], "/tmp/mine.json"),
    (["--actors", "-1"], "--actors -1"),
    (["--actors", "0"], "--actors 0"),
    (["--gpus", "-2"], "--gpus -2"),
    (["--image", "evergreen:latest"], "evergreen:latest"),
    (["--image", "evergreen"], "'evergreen'"),
    (["--namespace", "Not_A_Namespace"], "Not_A_Namespace"),
    (["--replay.num_shards", "0"], "replay.num_shards = 0"),
    (["--ray.address", "ray://elsewhere:10001"], "ray://elsewhere:10001"),
])
def test_render_refuses_bad_input_naming_the_value(tmp_path, capsys, argv, named):
    out = tmp_path / "out"
    assert deploy.main(["render", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and err.startswith("evergreen deploy: ")
    assert not out.exists(), "nothing is written for bad input"


def test_usage_lists_deploy():
    from evergreen.cli import USAGE

    assert "deploy render" in USAGE

