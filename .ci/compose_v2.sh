#!/usr/bin/env bash
# CI only: install the real Compose v2 CLI plugin (what users run as `docker compose`) into the
# Docker config folder given as $1. Debian bookworm packages only docker-compose 1.29, so this
# takes Debian trixie's docker-compose package (Compose v2, a static Go binary; Depends: libc6)
# from the mirror the machine's apt already uses, through a private apt configuration that leaves
# the machine's sources and packages untouched, and unpacks only the plugin binary. The .deb is
# kept in /var/cache/cdimf-ci so a second run on the same machine fetches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=.ci/debian_mirror.sh
. .ci/debian_mirror.sh
plugins="$1/cli-plugins"
cache=/var/cache/cdimf-ci
mkdir -p "$plugins" "$cache"

deb=$(ls "$cache"/docker-compose_2.*_amd64.deb 2>/dev/null | tail -1 || true)
if [ -z "$deb" ]; then
  apt_dir=$(mktemp -d)
  trap 'rm -rf "$apt_dir"' EXIT
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) trixie main" > "$apt_dir/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq >&2
  version=$(apt-cache "${opts[@]}" policy docker-compose | awk '/Candidate:/ {print $2}')
  case "$version" in 2.*) ;; *) echo "trixie's docker-compose is '$version', not Compose v2" >&2; exit 1 ;; esac
  (cd "$apt_dir" && apt-get "${opts[@]}" download -qq "docker-compose=$version" >&2)
  mv "$apt_dir"/docker-compose_*.deb "$cache/"
  deb=$(ls "$cache"/docker-compose_2.*_amd64.deb | tail -1)
fi
unpacked=$(mktemp -d)
dpkg-deb -x "$deb" "$unpacked"
install -m 755 "$unpacked/usr/libexec/docker/cli-plugins/docker-compose" "$plugins/docker-compose"
rm -rf "$unpacked"
DOCKER_CONFIG="$1" docker compose version --short
