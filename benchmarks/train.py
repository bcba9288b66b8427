"""Training throughput: tree rollouts against plain batched `generate`, and a whole training run.

Rollouts: `sample_trees` (iteration 0, pi_ref) on --rollout-prompts prompts, against plain
transformers `generate` with top-k sampling from the same base at the same batch size (the
rollouts' mean rows per forward) and the same token count (EOS banned, so every row generates
exactly its share). Timings alternate the two in one process and report medians, so machine
noise hits both alike; the printed ratio is what to read.

With --full, `train_objective` then trains the positivity objective on the first --n-prompts
prompts of --prompts for 2 iterations (fresh work and rollout-cache folders, nothing resumed)
and prints the wall time of every stage, the total, and every iteration's metrics.

    python benchmarks/train.py                                   # built-in prompts, default trees
    python benchmarks/train.py --n-layers 3 --repeats 2          # quicker, smaller trees
    python benchmarks/train.py --prompts ../shared/data/hh-rlhf-harmless-base/test.jsonl.gz \\
        --full --n-prompts 256                                   # the issue's training run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.quickstart import shipped_prompts
from mavis_lc.training import TrainingConfig, format_prompts, load_prompts, sample_trees, train_objective

QUESTIONS = shipped_prompts("train")[:8]
"""The prompts every run uses unless given others: the first quickstart training prompts."""


def run_rollouts(base: BaseModel, prompts: list[str], config: TrainingConfig) -> tuple[float, int, int]:
    """Sample the trees once: (tokens/s, tokens, base forwards)."""
    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1

    hook = base.model.get_output_embeddings().register_forward_hook(count)
    try:
        start = time.perf_counter()
        rollouts = sample_trees(base, prompts, config)
        _sync(base)
        elapsed = time.perf_counter() - start
    finally:
        hook.remove()
    tokens = int(rollouts.tokens.numel())
    return tokens / elapsed, tokens, forwards


def run_plain(base: BaseModel, prompts: list[str], tokens: int, top_k: int) -> float:
    """Plain top-k sampling with `generate`, ``tokens`` new tokens per row: wall seconds."""
    enc = base.tokenizer(prompts, padding=True, return_tensors="pt").to(base.device)
    generate: Any = base.model.generate
    torch.manual_seed(0)
    start = time.perf_counter()
    out = generate(
        **enc, do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens
    )
    _sync(base)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    return elapsed


def _sync(base: BaseModel) -> None:
    if base.device.type == "cuda":
        torch.cuda.synchronize()


def compare_rollouts(base: BaseModel, prompts: list[str], config: TrainingConfig, repeats: int) -> None:
    """Print rollout and plain-generate tokens/s (medians of alternated runs) and their ratio."""
    _, tokens, forwards = run_rollouts(base, prompts, config)  # warm-up, and the shape of the work
    batch = max(1, round(tokens / forwards))
    per_row = max(1, round(tokens / batch))
    plain_prompts = (prompts * (batch // len(prompts) + 1))[:batch]
    run_plain(base, plain_prompts, 4, config.top_k)  # warm-up
    print(
        f"rollouts: {len(prompts)} prompts, {tokens} tokens in {forwards} forwards ({tokens / forwards:.1f} rows "
        f"each); plain generate: batch {batch}, {per_row} tokens/row; median of {repeats}"
    )
    rollout, plain, decode_only = [], [], []
    for _ in range(repeats):
        rollout.append(run_rollouts(base, prompts, config)[0])
        whole = run_plain(base, plain_prompts, per_row, config.top_k)
        first = run_plain(base, plain_prompts, 1, config.top_k)  # prefill and one token
        plain.append(batch * per_row / whole)
        decode_only.append(batch * (per_row - 1) / max(whole - first, 1e-9))
    r, p, d = statistics.median(rollout), statistics.median(plain), statistics.median(decode_only)
    print(f"rollouts                        {r:8.1f} tok/s")
    print(f"plain generate                  {p:8.1f} tok/s   rollouts/plain {r / p:.3f}")
    # generate prefills a row per sequence, the rollouts one per prompt: without its prefill
    # the baseline is at its strongest (the rollouts keep theirs).
    print(f"plain generate, prefill removed {d:8.1f} tok/s   rollouts/plain {r / d:.3f}")


def full_run(base: BaseModel, config: TrainingConfig) -> None:
    """Train for 2 iterations in fresh folders; print per-stage wall times and metrics."""
    marks: list[tuple[str, float]] = []  # (stage label, time of its latest report)

    def progress(stage: str, iteration: int, step: int, total: int, metrics: dict[str, float]) -> None:
        label = f"iteration {iteration} {stage}"
        if marks and marks[-1][0] == label:
            marks[-1] = (label, time.perf_counter())
        else:
            marks.append((label, time.perf_counter()))

    with tempfile.TemporaryDirectory() as folder:
        run_config = replace(config, rollout_cache_dir=str(Path(folder) / "rollouts"))
        start = time.perf_counter()
        result = train_objective(run_config, progress=progress, workdir=Path(folder) / "work")
        total = time.perf_counter() - start
    previous = start
    for label, end in marks:
        print(f"{label:<24} {end - previous:8.1f} s")
        previous = end
    print(f"{'total':<24} {total:8.1f} s  ({total / 60:.1f} min)")
    for it in result.iterations:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(it.metrics.items()))
        print(f"iteration {it.iteration}: {shown}")


def main() -> None:
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="base model (default: packaged SmolLM2)")
    parser.add_argument(
        "--prompts", default=None, help="prompt file (HH-RLHF jsonl.gz, jsonl or text); default built-in"
    )
    parser.add_argument("--rollout-prompts", type=int, default=8, help="prompts of the rollout comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--full", action="store_true", help="also run train_objective (positivity, 2 iterations)")
    parser.add_argument("--n-prompts", type=int, default=256, help="training prompts of the --full run")
    parser.add_argument("--k-root", type=int, default=defaults.k_root, help="branches from the root of each tree")
    parser.add_argument("--k-children", type=int, default=defaults.k_children, help="children of every later node")
    parser.add_argument("--n-layers", type=int, default=defaults.n_layers, help="segment layers of a tree")
    parser.add_argument("--t-max-tokens", type=int, default=defaults.t_max_tokens, help="token budget of one tree")
    parser.add_argument(
        "--prompts-per-batch",
        type=int,
        default=defaults.rollout_prompts_per_batch,
        help="trees sampled together (rollout_prompts_per_batch)",
    )
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="candidates per step")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda")
    args = parser.parse_args()
    if args.full and args.prompts is None:
        parser.error("--full needs --prompts PATH (the training prompts)")

    base = load_base_model(args.base_model, device=args.device)
    config = TrainingConfig(
        objective="positivity",
        base_model=args.base_model,
        prompts=args.prompts,
        max_prompts=args.n_prompts,
        n_iterations=2,
        k_root=args.k_root,
        k_children=args.k_children,
        n_layers=args.n_layers,
        t_max_tokens=args.t_max_tokens,
        rollout_prompts_per_batch=args.prompts_per_batch,
        top_k=args.top_k,
        device=args.device,
    )
    n = args.rollout_prompts
    raw = load_prompts(args.prompts, n) if args.prompts else (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    print(
        f"base {base.model_id} on {base.device} ({base.dtype}), {torch.get_num_threads()} threads; trees: "
        f"k_root {config.k_root}, k_children {config.k_children}, {config.n_layers} layers, "
        f"t_max {config.t_max_tokens}, {config.rollout_prompts_per_batch} prompts per batch, top_k {config.top_k}"
    )
    compare_rollouts(base, format_prompts(base.tokenizer, raw), config, args.repeats)
    if args.full:
        full_run(base, config)


if __name__ == "__main__":
    main()
