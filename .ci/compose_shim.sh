#!/bin/sh
# CI only: a Docker CLI plugin that maps `docker compose ...` onto docker-compose 1.29, so that
# README's `docker compose` commands run verbatim on a machine where only Debian's docker-compose
# (no Compose v2 plugin) can be installed. .ci/run installs it under a private DOCKER_CONFIG.
if [ "$1" = "docker-cli-plugin-metadata" ]; then
  echo '{"SchemaVersion":"0.1.0","Vendor":"cdimf CI","Version":"1.29-shim","ShortDescription":"docker-compose 1.29 as docker compose (CI only)"}'
  exit 0
fi
shift   # the CLI passes the plugin's own name ("compose") first
exec docker-compose "$@"
