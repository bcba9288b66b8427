"""The GPU benchmarks in one run: decode, serving and training, in bfloat16 on CUDA.

Runs `benchmarks/decode.py` (batch 1, 8 and 32), `benchmarks/serving.py` and
`benchmarks/train.py` one after another, each in its own process with ``MAVIS_DEVICE=cuda`` and
``MAVIS_DTYPE=bfloat16``, prints their output and writes it, with the GPU's name and the
versions, to ``--output`` (default ``benchmarks/results/gpu-<UTC time>.txt``). Every figure is a
ratio against a baseline run in the same process, as on the CPU. Without CUDA it says so and
exits 2: nothing here falls back to the CPU.

    python benchmarks/gpu.py
    python benchmarks/gpu.py --quick          # fewer repeats
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
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or HERE / "results" / f"gpu-{stamp}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"bfloat16; {stamp}\n"
    )
    sections = [header]
    failed = []
    for name, command in runs:
        print(f"== {name}: {' '.join(str(c) for c in command)}", flush=True)
        done = subprocess.run([sys.executable, *map(str, command)], env=env, capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            failed.append(name)
            print(done.stderr[-4000:], file=sys.stderr)
        sections.append(f"== {name} (exit {done.returncode})\n{done.stdout}")
    output.write_text("\n".join(sections))
    print(f"written to {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
