#!/usr/bin/env bash
# Build Evergreen's image with podman from the local base (deploy/image/build-base.sh); nothing is pulled.
#
#   deploy/image/build.sh                                  # CPU torch: registry.example.com/evergreen:<version>
#   TORCH_VARIANT=cu126 deploy/image/build.sh              # CUDA torch (tag <version>-cu126)
#   IMAGE=registry.internal/ml/evergreen deploy/image/build.sh && podman push registry.internal/ml/evergreen:0.1.0
#
# Environment:
#   IMAGE            repository (default registry.example.com/evergreen, the name the manifests use:
#                    evergreen/deploy.py DEFAULT_IMAGE; a placeholder, so set it to push)
#   TAG              default the project's version (pyproject.toml), plus -<variant> for a CUDA build
#   BASE_IMAGE       default localhost/evergreen-base:<release of this machine>
#   TORCH_VARIANT    cpu (default) or a CUDA tag of the PyTorch index (cu126, cu128, ...)
#   TORCH_INDEX_URL  default: empty when WHEELS_DIR holds the torch wheel (default index + the wheels),
#                    else the Dockerfile's default (the PyTorch index of TORCH_VARIANT)
#   WHEELS_DIR       local wheel cache, bind-mounted at /wheels for pip (default /opt/wheels if it has torch)
#   PIP_CA_BUNDLE    CA bundle for pip behind a TLS-inspecting proxy, given as the build secret pip_ca (never
#                    stored in the image; default $PIP_CERT, else /etc/ssl/certs/ca-certificates.crt)
#   BUILD_INFO       where the build's reference and duration are written for test.sh
#                    (default runs/image/build.env)
# Extra arguments go to `podman build`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

if ! command -v podman >/dev/null 2>&1; then
  echo "build.sh: podman is not installed (apt-get install podman runc uidmap)" >&2
  exit 1
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
if [ -z "$version" ]; then
  echo "build.sh: no version in pyproject.toml" >&2
  exit 1
fi
# shellcheck disable=SC1091  # the host's file, read for VERSION_CODENAME
release="${RELEASE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
variant="${TORCH_VARIANT:-cpu}"
torch_version="$(sed -n 's/.*pip install -q torch==\([0-9][0-9.]*\).*/\1/p' Makefile | head -n 1)"
torch_version="${TORCH_VERSION:-${torch_version:-2.13.0}}"
IMAGE="${IMAGE:-registry.example.com/evergreen}"
if [ "$variant" = cpu ]; then TAG="${TAG:-$version}"; else TAG="${TAG:-$version-$variant}"; fi
BASE_IMAGE="${BASE_IMAGE:-localhost/evergreen-base:$release}"
BUILD_INFO="${BUILD_INFO:-runs/image/build.env}"
ref="$IMAGE:$TAG"

if ! podman image exists "$BASE_IMAGE"; then
  echo "build.sh: no base image $BASE_IMAGE: run deploy/image/build-base.sh first (or set BASE_IMAGE)" >&2
  exit 1
fi

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision="$revision-dirty"; fi

args=(
  --pull=never
  --file Dockerfile
  --tag "$ref"
  --build-arg "BASE_IMAGE=$BASE_IMAGE"
  --build-arg "TORCH_VERSION=$torch_version"
  --build-arg "TORCH_VARIANT=$variant"
  --build-arg "VERSION=$version"
  --build-arg "REVISION=$revision"
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
)

ca="${PIP_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -s "$ca" ]; then
  args+=(--secret "id=pip_ca,src=$ca")
  echo "== pip CA bundle (build secret, not stored): $ca"
fi

wheels="${WHEELS_DIR:-/opt/wheels}"
have_torch_wheel=0
if [ -d "$wheels" ] && compgen -G "$wheels/torch-$torch_version+$variant-*.whl" >/dev/null; then
  have_torch_wheel=1
fi
if [ -n "${WHEELS_DIR:-}" ] || [ "$have_torch_wheel" = 1 ]; then
  args+=(--volume "$wheels:/wheels:ro" --build-arg "PIP_FIND_LINKS=/wheels")
  echo "== local wheels: $wheels (at /wheels)"
fi
if [ -n "${TORCH_INDEX_URL+set}" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
elif [ "$have_torch_wheel" = 1 ]; then
  args+=(--build-arg "TORCH_INDEX_URL=")   # torch from the wheel cache, its dependencies from the default index
fi

# Docker image format: the OCI format has no SHELL instruction, and the Dockerfile's RUN lines rely on
# bash with pipefail (podman ignores SHELL with a warning otherwise).
args+=(--format docker)
echo "== podman build $ref (base $BASE_IMAGE, torch $torch_version+$variant)"
start=$(date +%s)
podman build "${args[@]}" "$@" .
seconds=$(( $(date +%s) - start ))

size=$(podman image inspect --format '{{.Size}}' "$ref")
mkdir -p "$(dirname "$BUILD_INFO")"
{
  echo "IMAGE_REF=$ref"
  echo "BUILD_SECONDS=$seconds"
  echo "IMAGE_BYTES=$size"
  echo "BASE_IMAGE=$BASE_IMAGE"
  echo "TORCH_VARIANT=$variant"
} >"$BUILD_INFO"
echo "== built $ref: $((size / 1024 / 1024)) MiB in $seconds s (recorded in $BUILD_INFO)"
