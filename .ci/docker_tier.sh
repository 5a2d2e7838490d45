#!/usr/bin/env bash
# CI's container tier, set-up half: a real Docker engine with docker-compose 1.29, the local base
# image (no registry is reachable) and the CI-only `docker compose` shim. Prints the environment
# the tier's tests need, as `export` lines for .ci/run to eval.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
if ! docker info >/dev/null 2>&1; then
  (dockerd > /tmp/cdimf-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: $(tail -5 /tmp/cdimf-dockerd.log)" >&2; exit 1; }
fi

base=$(bash .ci/docker_base.sh)

# `docker compose` -> docker-compose 1.29, in a private Docker config folder (CI only)
config="$PWD/.ci-docker-config"
mkdir -p "$config/cli-plugins"
cp .ci/compose_shim.sh "$config/cli-plugins/docker-compose"
chmod +x "$config/cli-plugins/docker-compose"
if ! DOCKER_CONFIG="$config" docker compose version >/dev/null 2>&1; then
  echo "the docker compose shim does not answer" >&2; exit 1
fi
echo "export DOCKER_CONFIG='$config' CDIMF_BASE_IMAGE='$base' CDIMF_REQUIRE_DOCKER=1"
