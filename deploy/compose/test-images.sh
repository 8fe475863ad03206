#!/usr/bin/env bash
# FOR THE SMOKE TEST ONLY (tests/e2e/test_compose_smoke.py), not for deployments: stand-ins for the pinned
# Redis and Prometheus images of compose.yaml, built with podman from the local base image
# (deploy/image/build-base.sh) and Debian's packages, for machines that reach no container registry.
#
#   bash deploy/compose/test-images.sh         # localhost/evergreen-test-redis:bookworm,
#                                              # localhost/evergreen-test-prometheus:bookworm
#   REDIS_IMAGE=localhost/evergreen-test-redis:bookworm \
#   PROMETHEUS_IMAGE=localhost/evergreen-test-prometheus:bookworm podman-compose -f deploy/compose/compose.yaml ...
#
# They run compose.yaml's services unchanged, like the official images:
#   redis       redis-server and redis-cli on PATH (Debian's redis-server 7.0, not 7.4), /data owned by 999
#   prometheus  ENTRYPOINT /usr/bin/prometheus (Debian's 2.42, not 3.4: the same flags, config and rules),
#               WORKDIR /prometheus owned by nobody (prometheus-init chowns the volume), wget for the
#               health check (from the base image)
# Packages come from the mirrors of the base image's sources.list (apt over http). For an https mirror
# behind a TLS-inspecting proxy, CA_BUNDLE (default $PIP_CERT, else /etc/ssl/certs/ca-certificates.crt) is
# bind-mounted for the build only and given to apt; it is not stored in the images.
#
# Environment: BASE_IMAGE (default localhost/evergreen-base:<release of this machine>), TAG (default the
# release), REDIS_TEST_IMAGE, PROMETHEUS_TEST_IMAGE (the names), CA_BUNDLE. Extra arguments go to
# `podman build`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/../image/containers.conf}"

if ! command -v podman >/dev/null 2>&1; then
  echo "test-images.sh: podman is not installed (apt-get install podman runc uidmap)" >&2
  exit 1
fi
# shellcheck disable=SC1091  # the host's file, read for VERSION_CODENAME
release="${RELEASE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
BASE_IMAGE="${BASE_IMAGE:-localhost/evergreen-base:$release}"
TAG="${TAG:-$release}"
REDIS_TEST_IMAGE="${REDIS_TEST_IMAGE:-localhost/evergreen-test-redis:$TAG}"
PROMETHEUS_TEST_IMAGE="${PROMETHEUS_TEST_IMAGE:-localhost/evergreen-test-prometheus:$TAG}"
if ! podman image exists "$BASE_IMAGE"; then
  echo "test-images.sh: no base image $BASE_IMAGE: run deploy/image/build-base.sh first (or set BASE_IMAGE)" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/evergreen-test-images.XXXXXX")"
trap 'rm -rf "$work"' EXIT

build_args=(--pull=never --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE")
ca="${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -s "$ca" ]; then
  build_args+=(--volume "$ca:/run/host-ca.crt:ro")
fi

# One Containerfile per image: apt-get install PACKAGES with no daemon started (policy-rc.d), then SETUP.
containerfile() {
  local packages="$1" setup="$2"
  shift 2
  cat <<EOF
ARG BASE_IMAGE
FROM \${BASE_IMAGE}
RUN set -eu; \\
    apt_opts=""; if [ -s /run/host-ca.crt ]; then apt_opts="-o Acquire::https::CAInfo=/run/host-ca.crt"; fi; \\
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; \\
    apt-get \$apt_opts update; \\
    DEBIAN_FRONTEND=noninteractive apt-get \$apt_opts install -y --no-install-recommends $packages; \\
    rm -f /usr/sbin/policy-rc.d; apt-get clean; rm -rf /var/lib/apt/lists/*; \\
    $setup
EOF
  printf '%s\n' "$@"
}

build() {
  local ref="$1" file="$2"
  shift 2
  echo "== podman build $ref (base $BASE_IMAGE)"
  podman build "${build_args[@]}" --file "$file" --tag "$ref" "$@" "$work"
}

start=$(date +%s)
containerfile redis-server \
  'mkdir -p /data; chown 999:999 /data; redis-server --version' \
  'WORKDIR /data' 'USER 999:999' 'EXPOSE 6379' 'CMD ["redis-server"]' \
  >"$work/Containerfile.redis"
build "$REDIS_TEST_IMAGE" "$work/Containerfile.redis" "$@"

containerfile prometheus \
  'mkdir -p /prometheus; chown 65534:65534 /prometheus; prometheus --version' \
  'WORKDIR /prometheus' 'USER 65534:65534' 'EXPOSE 9090' 'ENTRYPOINT ["/usr/bin/prometheus"]' \
  'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
  >"$work/Containerfile.prometheus"
build "$PROMETHEUS_TEST_IMAGE" "$work/Containerfile.prometheus" "$@"

echo "== built $REDIS_TEST_IMAGE and $PROMETHEUS_TEST_IMAGE in $(( $(date +%s) - start )) s"
