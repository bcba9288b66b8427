"""The GPU benchmarks in one run: decode, serving and training, in bfloat16 on CUDA.

Runs `benchmarks/decode.py` (batch 1, 8 and 32), `benchmarks/serving.py` and
`benchmarks/train.py` one after another, each in its own process with ``MAVIS_DEVICE=cuda`` and
``MAVIS_DTYPE=bfloat16``, prints their output and writes it, with the GPU's name and the
versions, to ``--output`` (default ``benchmarks/results/gpu-<UTC time>.txt``). Every figure is a
ratio against a baseline run in the same process, as on the CPU. Without CUDA it says so and
exits 2: nothing here falls back to the CPU.

    python benchmarks/gpu.py
    python benchmarks/gpu.py --quick          # fewer repeats
    python benchmarks/gpu.py --vllm-python /path/to/vllm-venv/bin/python   # also the vLLM plugin

With ``--vllm-python`` (a Python whose environment has the vLLM GPU build and mavis-lc), it also
runs `benchmarks/vllm_plugin.py` in bfloat16 on the packaged SmolLM2 with decode.py's two
seeded random-weight shared heads (throughput does not depend on what the heads learned): plugin
against plain vLLM at batch 1, 8 and 32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="where to write the combined output")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--vllm-python", default=None, help="also run the vLLM plugin benchmark with this Python")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs CUDA; torch.cuda.is_available() is False on this machine", file=sys.stderr)
        return 2
    repeats = ["--repeats", "2"] if args.quick else []
    runs = [
        (
            "decode",
            [HERE / "decode.py", "--device", "cuda", "--dtype", "bfloat16", "--batch", "1", "8", "32", *repeats],
        ),
        ("serving", [HERE / "serving.py", *(["--repeats", "2", "--calls", "10"] if args.quick else [])]),
        ("train", [HERE / "train.py", *repeats]),
    ]
    env = {**os.environ, "MAVIS_DEVICE": "cuda", "MAVIS_DTYPE": "bfloat16"}
    vllm_runs: list[tuple[str, list[object]]] = []
    if args.vllm_python:
        model, heads = _random_heads(HERE / "results" / "gpu-heads")
        env["MAVIS_VLLM_HEADS"] = heads
        plugin = [HERE / "vllm_plugin.py", "--model", model, "--dtype", "bfloat16", *repeats]
        vllm_runs.append(("vllm-plugin", plugin))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or HERE / "results" / f"gpu-{stamp}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"bfloat16; {stamp}\n"
    )
    sections = [header]
    failed = []
    plans = [(name, sys.executable, command) for name, command in runs]
    plans += [(name, str(args.vllm_python), command) for name, command in vllm_runs]
    for name, python, command in plans:
        print(f"== {name}: {' '.join(str(c) for c in command)}", flush=True)
        done = subprocess.run([python, *map(str, command)], env=env, capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            failed.append(name)
            print(done.stderr[-4000:], file=sys.stderr)
        sections.append(f"== {name} (exit {done.returncode})\n{done.stdout}")
    output.write_text("\n".join(sections))
    print(f"written to {output}")
    return 1 if failed else 0


def _random_heads(folder: Path) -> tuple[str, str]:
    """The packaged SmolLM2's checkpoint directory and decode.py's two seeded random shared heads
    for it, saved (comma-separated files, as MAVIS_VLLM_HEADS takes them)."""
    from decode import heads_for  # benchmarks/decode.py, beside this script

    from mavis_lc.base_model import load_base_model, packaged_smollm2_dir

    folder.mkdir(parents=True, exist_ok=True)
    heads = heads_for(load_base_model(device="cpu", dtype="float32"), 2)
    return str(packaged_smollm2_dir()), ",".join(str(h.save(folder / f"{h.objective}.safetensors")) for h in heads)


if __name__ == "__main__":
    raise SystemExit(main())
