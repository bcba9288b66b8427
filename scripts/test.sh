#!/usr/bin/env bash
# Sets up mavis-lc with its test extras, checks the services, lints, and runs every test
# (unit tests on tiny models, integration tests on SmolLM2, Redis, PostgreSQL and workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/services.sh
ruff check .
ruff format --check mavis_lc worker tests benchmarks examples
mypy
MAVIS_REQUIRE_SERVICES=1 python -m pytest -q "$@"  # a missing service fails, never skips
