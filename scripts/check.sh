#!/usr/bin/env bash
# Static checks CI runs before the tests: ruff (style and bugs), mypy (types) and import-linter
# (the rooms' import contracts in .importlinter). mypy and import-linter read packages from
# disk, and our package is assembled by setuptools' package-dir mapping, so both run over a
# link tree under build/ that lays the folders out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/linktree
rm -rf "$tree" && mkdir -p "$tree/cdimf"
for entry in cdimf/*; do ln -s "$PWD/$entry" "$tree/cdimf/"; done
for pair in common:common aggregator:aggregator domain_node:domain_node protos:protos configs:configs data:data; do
  ln -s "$PWD/${pair#*:}" "$tree/cdimf/${pair%%:*}"
done
ruff check .
(cd "$tree" && mypy --config-file ../../pyproject.toml -p cdimf)
(cd "$tree" && PYTHONPATH=. lint-imports ../../.importlinter)
