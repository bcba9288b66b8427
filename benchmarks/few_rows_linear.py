"""The few-rows linear kernel against `F.linear` (MKL) on a decode step's linear layers.

A base model's decoder layers, with their weights cycled from memory as in a decode step (every
layer's weights are read once per step, too many to stay in cache): each layer's seven
products (query, key, value, output; gate, up, down) at 1 to 16 rows, chained through the layers.
Shapes default to SmolLM2-135M's (576 wide, 1536 MLP, 192 key/value) and 34 layers (its 30 plus
two side branches of 2). Each size first checks the kernel's products against `F.linear`, then
times the two in alternating runs (medians); the ratio is what to read.

    python benchmarks/few_rows_linear.py
    python benchmarks/few_rows_linear.py --layers 30 --rows 1 8 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mavis_lc.decoding.few_rows import MAX_ROWS, few_rows_linear, kernel_unavailable_reason

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="key/value projection width")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    reason = kernel_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the few-rows kernel is unavailable here: {reason}")
    if max(args.rows) > MAX_ROWS:
        print(f"note: a decode step sends at most {MAX_ROWS} rows to the kernel; more are shown for reference")
    h, m, kv = args.hidden, args.mlp, args.kv
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (m, h), "up": (m, h), "down": (h, m)}
    generator = torch.Generator().manual_seed(0)
    layers = [
        {name: torch.randn(shape, generator=generator) / shape[1] ** 0.5 for name, shape in shapes.items()}
        for _ in range(args.layers)
    ]
    megabytes = sum(w.numel() * 4 for layer in layers for w in layer.values()) / 1e6

    def stack(linear: Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            for w in layers:
                q, k, v = linear(x, w["q"]), linear(x, w["k"]), linear(x, w["v"])
                x = x + linear(q + 0.1 * (k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True)), w["o"])
                x = x + linear(F.silu(linear(x, w["gate"])) * linear(x, w["up"]), w["down"])
                x = x / x.norm(dim=-1, keepdim=True) * h**0.5
            return x

        return run

    mkl, kernel = stack(F.linear), stack(few_rows_linear)
    print(
        f"{args.layers} layers ({megabytes:.0f} MB of float32 weights), {torch.get_num_threads()} threads, "
        f"medians of {args.repeats}"
    )
    with torch.inference_mode():
        for rows in args.rows:
            x = torch.randn(rows, h, generator=generator)
            for w in layers[0].values():  # each product alone (chained, float differences compound)
                probe = torch.randn(rows, w.shape[1], generator=generator)
                want = F.linear(probe, w)
                torch.testing.assert_close(
                    few_rows_linear(probe, w), want, rtol=1e-5, atol=1e-5 * float(want.abs().max())
                )
            times: dict[str, list[float]] = {"F.linear": [], "kernel": []}
            for _ in range(3):
                mkl(x), kernel(x)
            for _ in range(args.repeats):
                for name, fn in (("F.linear", mkl), ("kernel", kernel)):
                    started = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - started)
            a, b = (statistics.median(times[n]) * 1e3 for n in ("F.linear", "kernel"))
            print(
                f"rows {rows:>3}: F.linear {a:7.2f} ms ({megabytes / a:5.1f} GB/s)   kernel {b:7.2f} ms "
                f"({megabytes / b:5.1f} GB/s)   kernel / F.linear {b / a:.3f}"
            )


if __name__ == "__main__":
    main()
