#!/usr/bin/env bash
# CI only: make the local base image of deploy/Dockerfile, because CI reaches no container
# registry. A Debian bookworm root file system from Debian packages (Python 3.11, venv, pip),
# imported as `cdimf-base:bookworm`, plus this machine's CA bundle as `cdimf-ci-base:bookworm`
# (the machine's network may inspect TLS; the bundle holds its CA). Reuses images already there.
set -euo pipefail
BASE=cdimf-base:bookworm
CI_BASE=cdimf-ci-base:bookworm

# shellcheck source=.ci/debian_mirror.sh
. "$(dirname "$0")/debian_mirror.sh"

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$(debian_mirror)" >/dev/null
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
fi

if ! docker image inspect "$CI_BASE" >/dev/null 2>&1; then
  context=$(mktemp -d)
  cp /etc/ssl/certs/ca-certificates.crt "$context/ca-certificates.crt"
  printf 'FROM %s\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n' "$BASE" > "$context/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t "$CI_BASE" "$context" >/dev/null
  rm -rf "$context"
fi
echo "$CI_BASE"
