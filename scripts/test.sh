#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check mithrilfs tests scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
