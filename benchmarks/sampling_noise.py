"""Per-row sampling noise: a whole vocabulary's Exp(1) draw per row through torch (`row_noise`,
then a gather at the candidates) against `RowNoise`, which reads the same numbers at the
candidates only. Both give each row exactly what `torch.multinomial` would draw from its seed
(the script checks that they agree before timing); alternating runs in one process, medians.

    python benchmarks/sampling_noise.py                    # SmolLM2's vocabulary, batch 1 and 8, top-k 20
    python benchmarks/sampling_noise.py --vocab 128256 --batch 1 8 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mavis_lc.decoding.noise import RowNoise, fast_path_unavailable_reason, row_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's by default)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows per step")
    parser.add_argument("--top-k", type=int, default=20, help="candidates per row")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    args = parser.parse_args()
    reason = fast_path_unavailable_reason()
    print(
        f"vocabulary {args.vocab}, top-k {args.top_k}, {torch.get_num_threads()} threads; "
        f"RowNoise fast path: {'on' if reason is None else 'off (' + reason + ')'}"
    )
    for batch in args.batch:
        like = torch.empty(batch, args.vocab)
        candidates = torch.randint(0, args.vocab, (batch, args.top_k), generator=torch.Generator().manual_seed(0))
        seeds = list(range(batch))
        streams = RowNoise.from_seeds(seeds)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        for _ in range(3):  # the same numbers, step after step
            assert torch.equal(streams.at(candidates, like), row_noise(like, generators).gather(1, candidates))
        times: dict[str, list[float]] = {"torch": [], "RowNoise": []}
        with torch.inference_mode():
            for _ in range(args.repeats):
                started = time.perf_counter()
                for _ in range(args.steps):
                    row_noise(like, generators).gather(1, candidates)
                times["torch"].append((time.perf_counter() - started) / args.steps)
                started = time.perf_counter()
                for _ in range(args.steps):
                    streams.at(candidates, like)
                times["RowNoise"].append((time.perf_counter() - started) / args.steps)
        slow, fast = (statistics.median(times[k]) * 1e3 for k in ("torch", "RowNoise"))
        print(
            f"batch {batch:>3}: whole-vocabulary draw {slow:.3f} ms/step   RowNoise {fast:.3f} ms/step   "
            f"RowNoise/torch {fast / slow:.3f}"
        )


if __name__ == "__main__":
    main()
