#!/usr/bin/env bash
# CI's container tier, set-up half: a real Docker engine, the real Compose v2 plugin (`docker
# compose`, what users run) and Debian's docker-compose 1.29 (the file must stay valid there too),
# and the local base image (no registry is reachable). Prints the environment the tier's tests
# need, as `export` lines for .ci/run to eval.
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

# `docker compose`: the real Compose v2 plugin, in a private Docker config folder
config="$PWD/.ci-docker-config"
compose_version=$(bash .ci/compose_v2.sh "$config")
case "$compose_version" in 2.*) ;; *) echo "docker compose is '$compose_version', not Compose v2" >&2; exit 1 ;; esac
echo "docker compose $compose_version, docker-compose $(docker-compose version --short)" >&2
echo "export DOCKER_CONFIG='$config' CDIMF_BASE_IMAGE='$base' CDIMF_REQUIRE_DOCKER=1"
