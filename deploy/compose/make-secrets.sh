#!/usr/bin/env bash
# The secret files of deploy/compose/compose.yaml: random hex (the Redis config file takes it verbatim).
#
#   deploy/compose/make-secrets.sh                         # make the missing ones, keep the others
#   deploy/compose/make-secrets.sh --rotate redis_password # replace one (deploy/README.md, "Compose")
#
# Files: redis_password, ray_token, grafana_admin_password in EVERGREEN_SECRETS_DIR (default
# deploy/compose/secrets, which .gitignore keeps out of git). The directory is 0700 and the files 0644:
# compose (outside Swarm) bind-mounts a secret's file with the host's owner and mode, and the containers
# read it as other users (Evergreen 10001, Redis 999, Grafana 472), so the directory is what keeps other
# local users out.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${EVERGREEN_SECRETS_DIR:-$here/secrets}"
case "$dir" in /*) ;; *) dir="$here/$dir" ;; esac   # relative to deploy/compose, as in compose.yaml
names=(redis_password ray_token grafana_admin_password)

rotate=""
if [ $# -gt 0 ]; then
  if [ "$1" != "--rotate" ] || [ $# -ne 2 ]; then
    echo "usage: $0 [--rotate NAME]   (NAME: ${names[*]})" >&2
    exit 2
  fi
  rotate="$2"
  case " ${names[*]} " in *" $rotate "*) ;; *) echo "make-secrets.sh: unknown secret '$rotate' (one of: ${names[*]})" >&2; exit 2 ;; esac
fi

mkdir -p "$dir"
chmod 0700 "$dir"
for name in "${names[@]}"; do
  path="$dir/$name"
  if [ -s "$path" ] && [ "$name" != "$rotate" ]; then
    echo "kept    $path"
    continue
  fi
  tmp="$(mktemp "$dir/.$name.XXXXXX")"
  # 32 random bytes as 64 hex digits, no newline.
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$path"
  echo "wrote   $path"
done
