#!/usr/bin/env bash
# Build the image's local base, localhost/evergreen-base:<release>, from Debian packages: no registry pull.
#
#   deploy/image/build-base.sh                 # the machine's Debian release, the mirrors apt already uses
#   RELEASE=bookworm deploy/image/build-base.sh
#   MIRRORS='deb http://deb.debian.org/debian bookworm main' deploy/image/build-base.sh
#
# mmdebstrap --variant=minbase (Essential packages and apt) plus python3, python3-venv (the Dockerfile makes
# its venv with `python3 -m venv`, which brings pip), ca-certificates and wget (KubeRay's probes use it).
# The tarball is imported with `podman import`. Needs mmdebstrap and podman
# (apt-get install mmdebstrap podman runc uidmap); run as root, or as a user with subuids for
# mmdebstrap's unshare mode.
#
# Environment: RELEASE (default VERSION_CODENAME of /etc/os-release), MIRRORS (sources.list lines, one per
# line; default: the host's enabled deb entries for RELEASE, RELEASE-updates and RELEASE-security),
# BASE_IMAGE (default localhost/evergreen-base:RELEASE), PACKAGES (extra packages, comma-separated).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

for tool in mmdebstrap podman; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build-base.sh: $tool is not installed (apt-get install mmdebstrap podman runc uidmap)" >&2
    exit 1
  fi
done

if [ -z "${RELEASE:-}" ]; then
  # shellcheck disable=SC1091  # the host's file, read for VERSION_CODENAME
  RELEASE="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
fi
if [ -z "$RELEASE" ]; then
  echo "build-base.sh: cannot tell the Debian release from /etc/os-release; set RELEASE=bookworm" >&2
  exit 1
fi
BASE_IMAGE="${BASE_IMAGE:-localhost/evergreen-base:$RELEASE}"

# The host's apt sources as one-line entries: sources.list and sources.list.d/*.list (one-line format),
# sources.list.d/*.sources (deb822). Only what apt itself reads (not *.disabled, *.save, ...), only `deb`
# entries for the release's own suites, with their signed-by keyring (debian-archive-keyring, which apt
# depends on, puts the same file into the image).
host_mirrors() {
  local release="$1" files=() f
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list; do [ -f "$f" ] && files+=("$f"); done
  if [ ${#files[@]} -gt 0 ]; then
    awk -v rel="$release" '
      { sub(/#.*/, "") }
      $1 == "deb" {
        opts = ""; i = 2
        if ($2 ~ /^\[/) { while ($i !~ /\]$/ && i < NF) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
        suite = $(i + 1)
        if (suite == rel || suite == rel "-updates" || suite == rel "-security") print
      }' "${files[@]}"
  fi
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v rel="$release" '
      function flush(   n, u, s, us, ss, k, j, opt) {
        if (types ~ /(^| )deb( |$)/ && enabled != "no") {
          opt = (signed != "" && signed !~ /BEGIN PGP/) ? "[signed-by=" signed "] " : ""
          n = split(uris, us, " "); k = split(suites, ss, " ")
          for (u = 1; u <= n; u++) for (j = 1; j <= k; j++)
            if (ss[j] == rel || ss[j] == rel "-updates" || ss[j] == rel "-security")
              print "deb " opt us[u] " " ss[j] " " comps
        }
        types = uris = suites = comps = signed = enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      {
        key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
        if (key == "types") types = $0
        else if (key == "uris") uris = $0
        else if (key == "suites") suites = $0
        else if (key == "components") comps = $0
        else if (key == "signed-by") signed = $0
        else if (key == "enabled") enabled = tolower($0)
      }
      END { flush() }' "$f"
  done
}

mirrors=()
if [ -n "${MIRRORS:-}" ]; then
  while IFS= read -r line; do [ -n "$line" ] && mirrors+=("$line"); done <<<"$MIRRORS"
else
  while IFS= read -r line; do [ -n "$line" ] && mirrors+=("$line"); done < <(host_mirrors "$RELEASE")
fi
if [ ${#mirrors[@]} -eq 0 ]; then
  echo "build-base.sh: no enabled deb entry for $RELEASE in /etc/apt/sources.list{,.d/*}; set MIRRORS" >&2
  exit 1
fi
echo "== mirrors for $RELEASE:"
printf '   %s\n' "${mirrors[@]}"

work="$(mktemp -d "${TMPDIR:-/tmp}/evergreen-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tarball="$work/rootfs.tar"

packages="python3,python3-venv,ca-certificates,wget${PACKAGES:+,$PACKAGES}"
start=$(date +%s)
echo "== mmdebstrap --variant=minbase $RELEASE (+ $packages)"
mmdebstrap --variant=minbase --format=tar \
  --include="$packages" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  "$RELEASE" "$tarball" "${mirrors[@]}"

echo "== podman import -> $BASE_IMAGE"
podman import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "evergreen base: mmdebstrap minbase $RELEASE + $packages" \
  "$tarball" "$BASE_IMAGE"

size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
echo "== $BASE_IMAGE: $((size / 1024 / 1024)) MiB, $(( $(date +%s) - start )) s"
