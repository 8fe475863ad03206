#!/usr/bin/env bash
# Check a built image (deploy/image/build.sh) by running it the way the cluster does: a read-only root file
# system, HOME and /tmp on tmpfs, a volume at /data, a large /dev/shm for Ray's object store.
#
#   deploy/image/test.sh                          # the image build.sh built last (runs/image/build.env)
#   deploy/image/test.sh registry.example.com/evergreen:0.1.0
#
# 1. `evergreen` with the default CMD (--help) exits 0;
# 2. the image works under the manifests' uid (10001, the image's user): torch, ray and the trainer import;
# 3. `evergreen train --preset cartpole --learner.total_env_steps 3000` runs to the end (exit 0) and writes
#    config.json and metrics.jsonl to the volume;
# 4. a replay shard (`evergreen replay serve`, with a token) answers the gRPC health service SERVING for ""
#    and its service name, and serves /metrics; SIGTERM stops it with exit 0;
# then prints the image's size and build time.
#
# Environment: SHM_SIZE (default 2g), TRAIN_TIMEOUT (seconds, default 900), READ_ONLY (1: --read-only).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
BUILD_INFO="${BUILD_INFO:-runs/image/build.env}"
SHM_SIZE="${SHM_SIZE:-2g}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-900}"
READ_ONLY="${READ_ONLY:-1}"

IMAGE_REF="" BUILD_SECONDS=""
if [ -f "$BUILD_INFO" ]; then
  # shellcheck disable=SC1090  # written by build.sh
  . "$BUILD_INFO"
fi
ref="${1:-${IMAGE_REF:-registry.example.com/evergreen:$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}}"
if ! podman image exists "$ref"; then
  echo "test.sh: no image $ref: run deploy/image/build.sh first" >&2
  exit 1
fi

mkdir -p runs/image
id="evergreen-image-test-$$"
volume="$id-data"
cleanup() {
  podman rm -f "$id-train" "$id-replay" >/dev/null 2>&1 || true
  podman volume rm -f "$volume" >/dev/null 2>&1 || true
}
trap cleanup EXIT

common=(--shm-size "$SHM_SIZE" --tmpfs "/tmp:rw,mode=1777" --env HOME=/tmp)
if [ "$READ_ONLY" = 1 ]; then common+=(--read-only); fi
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== 1. $ref --help"
podman run --rm "${common[@]}" "$ref" >/dev/null || fail "evergreen --help did not exit 0"

echo "== 2. as uid 10001 (the manifests' runAsUser)"
podman run --rm "${common[@]}" --user 10001:10001 --entrypoint python3 "$ref" -c \
  'import getpass, torch, ray, evergreen.train; print("user", getpass.getuser(), "torch", torch.__version__, "ray", ray.__version__)' \
  || fail "imports as uid 10001"

echo "== 3. evergreen train --preset cartpole --learner.total_env_steps 3000"
podman volume create "$volume" >/dev/null   # empty: takes /data's owner (the image's user) on first mount
train_start=$(date +%s)
podman run -d --name "$id-train" "${common[@]}" --volume "$volume:/data" "$ref" \
  train --preset cartpole --learner.total_env_steps 3000 --run-dir /data/runs/image-test >/dev/null
if ! timeout "$TRAIN_TIMEOUT" podman wait "$id-train" >"$repo/runs/image/train.rc" 2>/dev/null; then
  podman logs --tail 50 "$id-train" >&2 || true
  fail "training did not finish within $TRAIN_TIMEOUT s"
fi
train_seconds=$(( $(date +%s) - train_start ))
rc="$(tr -d '[:space:]' <"$repo/runs/image/train.rc")"
podman logs "$id-train" >"$repo/runs/image/train.log" 2>&1 || true
if [ "$rc" != 0 ]; then
  tail -n 50 "$repo/runs/image/train.log" >&2
  fail "evergreen train exited $rc (log: runs/image/train.log)"
fi
podman run --rm "${common[@]}" --volume "$volume:/data" --entrypoint python3 "$ref" -c '
import json, pathlib, sys
run = pathlib.Path("/data/runs/image-test")
assert (run / "config.json").is_file(), "no config.json"
lines = [l for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
assert lines, "metrics.jsonl is empty"
steps = json.loads(lines[-1]).get("env_steps")
print(f"run dir: {sorted(p.name for p in run.iterdir())}; {len(lines)} metrics records; last env_steps={steps}")
' || fail "the run directory on /data is incomplete"

echo "== 4. replay shard: gRPC health and /metrics"
podman run -d --name "$id-replay" "${common[@]}" --entrypoint bash "$ref" -c '
python3 -c "from replay.auth import write_token_file; write_token_file(\"/tmp/replay.token\")"
exec evergreen replay serve --host 127.0.0.1 --port 50051 --metrics-port 9401 --token-file /tmp/replay.token \
  --table "name=replay,capacity=1000,schema=obs:float32:4;action:int64"' >/dev/null
for _ in $(seq 120); do
  podman logs "$id-replay" 2>/dev/null | grep -q REPLAY_SERVER_READY && break
  [ "$(podman inspect --format '{{.State.Running}}' "$id-replay")" = true ] || break
  sleep 0.5
done
podman logs "$id-replay" 2>&1 | grep -q REPLAY_SERVER_READY || { podman logs "$id-replay" >&2; fail "the shard did not start"; }
podman exec "$id-replay" python3 -c '
import urllib.request
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from replay.server import SERVICE_NAME
with grpc.insecure_channel("127.0.0.1:50051") as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)
        print(f"health {service or chr(34) * 2}: SERVING")
text = urllib.request.urlopen("http://127.0.0.1:9401/metrics", timeout=10).read().decode()
assert "evergreen_replay_" in text, "no evergreen_replay_* family on /metrics"
print("metrics: evergreen_replay_* served")
' || fail "replay shard health"
podman stop --time 30 "$id-replay" >/dev/null
replay_rc="$(podman inspect --format '{{.State.ExitCode}}' "$id-replay")"
[ "$replay_rc" = 0 ] || fail "the shard exited $replay_rc on SIGTERM"

bytes="$(podman image inspect --format '{{.Size}}' "$ref")"
echo "== PASS $ref"
echo "   image size: $((bytes / 1024 / 1024)) MiB"
if [ -n "$BUILD_SECONDS" ] && [ "$IMAGE_REF" = "$ref" ]; then
  echo "   build time: $BUILD_SECONDS s (deploy/image/build.sh)"
else
  echo "   build time: unknown (not built by deploy/image/build.sh here)"
fi
echo "   cartpole 3000 env steps in the image: $train_seconds s"
