"""Throughput of vLLM with the MAVIS plugin (2 heads, every request steered) against plain vLLM,
at batch 1, 8 and 32, in one process on one machine, runs alternating between the two engines.

Runs in a vLLM environment with mavis-lc installed (`bash scripts/setup_vllm.sh`):

    MAVIS_VLLM_HEADS=a.safetensors,b.safetensors \\
        .venv-vllm/bin/python benchmarks/vllm_plugin.py --model DIR [--tokens 64] [--repeats 3] [--eager]

Both engines serve the same checkpoint (float32 by default) with the same settings; the plugin's
is started with the Mavis architecture and the logits processor, and its requests carry weights
for every configured head (beta 4, top-k 20); the plain engine's requests sample top-k 20 with
the same seeds. Every row generates exactly --tokens tokens (EOS ignored). Prints a table of the
median tokens/s per batch over the repeats and the plugin / plain ratio, and the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

QUESTIONS = [
    "How do I keep my houseplants alive?",
    "What should I cook tonight?",
    "Tell me about the moon.",
    "How can I sleep better?",
    "What is a good way to learn a language?",
    "Why is the sky blue?",
    "How do I start running?",
    "What makes a good cup of coffee?",
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (safetensors + tokenizer)")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="enforce_eager on both engines (default: vLLM's default)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mavis_lc.vllm import PROCESSOR, vllm_xargs
    from mavis_lc.vllm.heads import head_specs, spec_objective

    objectives = [spec_objective(s) for s in head_specs()]
    if not objectives:
        raise SystemExit("set MAVIS_VLLM_HEADS to the heads to steer with")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batches = [int(b) for b in args.batch.split(",")]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    common = {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": 1024,
        "max_num_seqs": max(batches),
        "enforce_eager": args.eager,
        "seed": 0,
    }
    started = time.perf_counter()
    plain = LLM(**common)
    plain_load = time.perf_counter() - started
    started = time.perf_counter()
    steered = LLM(
        **common,
        hf_overrides={"architectures": ["MavisLlamaForCausalLM"]},
        logits_processors=[PROCESSOR],
    )
    steered_load = time.perf_counter() - started
    xargs = vllm_xargs({o: 1.0 / len(objectives) for o in objectives}, beta=4.0, top_k=20)

    def run(llm: LLM, batch: int, steer: bool) -> float:
        params = [
            SamplingParams(
                max_tokens=args.tokens,
                ignore_eos=True,
                temperature=1.0,
                top_k=20 if not steer else -1,
                seed=row,
                extra_args=dict(xargs) if steer else None,
            )
            for row in range(batch)
        ]
        rows = [prompts[row % len(prompts)] for row in range(batch)]
        gc.collect()
        begin = time.perf_counter()
        outputs = llm.generate(rows, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        assert all(len(o.outputs[0].token_ids) == args.tokens for o in outputs)
        return batch * args.tokens / elapsed

    for batch in batches:  # warm both engines at every size before timing
        run(plain, batch, False)
        run(steered, batch, True)
    figures: dict[int, dict[str, list[float]]] = {b: {"plain": [], "plugin": []} for b in batches}
    for _ in range(args.repeats):
        for batch in batches:
            figures[batch]["plain"].append(run(plain, batch, False))
            figures[batch]["plugin"].append(run(steered, batch, True))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.dtype}; {'eager' if args.eager else 'default (compiled)'}")
    print(f"engines loaded in {plain_load:.0f} s (plain) and {steered_load:.0f} s (plugin, {len(objectives)} heads)")
    print(f"{args.tokens} tokens per row, median of {args.repeats} alternating runs")
    print("| batch | plain vLLM tok/s | plugin tok/s | plugin / plain |")
    print("|---|---|---|---|")
    summary = {}
    for batch in batches:
        p, s = statistics.median(figures[batch]["plain"]), statistics.median(figures[batch]["plugin"])
        summary[batch] = {"plain": p, "plugin": s, "ratio": s / p, "runs": figures[batch]}
        print(f"| {batch} | {p:.1f} | {s:.1f} | {s / p:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"cpu": cpu_name(), "tokens": args.tokens, "batches": summary}, handle, indent=1)


if __name__ == "__main__":
    main()
