"""The same head's reward gain through vLLM (the mavis_lc.vllm plugin) and through ChatMavis.

    python benchmarks/vllm_gain.py --head positivity@1 [--prompts benchmarks/data/everyday_questions.txt]
        [--n-prompts 50] [--seeds 2] [--tokens 48] [--beta 4] [--vllm-python .venv-vllm/bin/python]

For every question and seed, four answers: weight 0 and weight 1 on the head's objective, each
through mavis-lc's own engine (`ChatMavis`, packaged SmolLM2, float32) and through a vLLM-CPU
engine with the plugin (same checkpoint, float32, the head named by MAVIS_VLLM_HEADS). Weight 0
is plain top-k sampling in both. The gain is the mean over questions of (weight 1 − weight 0),
per engine, in the base SD of that engine's weight-0 rewards, with 95% cluster-bootstrap
intervals over questions (2,000 resamples), and the difference of the two gains paired over the
same resampled questions. Both engines sample with their own random streams (vLLM's per-request
seed is not mavis-lc's row noise), so the answers differ token for token and the comparison is
of distributions. Degenerate answers (`mavis_lc.degeneracy`) are counted per row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", required=True, help="a head spec (registry) or file: a shared head")
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "data" / "everyday_questions.txt"))
    parser.add_argument("--n-prompts", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--beta", type=float, default=4.0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--output", default=None, help="write rows and figures as JSON here")
    args = parser.parse_args()

    from mavis_lc import bootstrap
    from mavis_lc.base_model import load_base_model, packaged_smollm2_dir
    from mavis_lc.decoding.engine import resolve_heads
    from mavis_lc.degeneracy import is_degenerate
    from mavis_lc.langchain import ChatMavis
    from mavis_lc.objectives import get_objective

    base = load_base_model()
    source = resolve_heads([args.head], base=base)[0]
    objective = get_objective(source.objective)
    questions = [q.strip() for q in Path(args.prompts).read_text(encoding="utf-8").splitlines() if q.strip()]
    questions = questions[: args.n_prompts]
    rows = [(q, s) for q in range(len(questions)) for s in range(args.seeds)]
    texts = [
        str(
            base.tokenizer.apply_chat_template(
                [{"role": "user", "content": questions[q]}], tokenize=False, add_generation_prompt=True
            )
        )
        for q in range(len(questions))
    ]

    answers: dict[tuple[str, float], list[str]] = {}
    chat = ChatMavis(
        heads=[str(source.path)], beta=args.beta, top_k=args.top_k, max_tokens=args.tokens, temperature=1.0
    )
    started = time.perf_counter()
    for weight in (0.0, 1.0):
        bound = chat.bind(weights={source.objective: weight})
        replies = [bound.invoke(questions[q], seed=1000 * s + q) for q, s in rows]
        answers[("mavis-lc", weight)] = [str(r.content) for r in replies]
    mavis_seconds = time.perf_counter() - started

    requests = [
        {
            "prompt": texts[q],
            "params": {
                "max_tokens": args.tokens,
                "temperature": 1.0,
                "seed": 1000 * s + q,
                "extra_args": {
                    "mavis_weights": f"{source.objective}={weight!r}",
                    "mavis_beta": args.beta,
                    "mavis_top_k": args.top_k,
                },
            },
        }
        for weight in (0.0, 1.0)
        for q, s in rows
    ]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        output = Path(tmp) / "out.json"
        model = str(packaged_smollm2_dir())
        spec.write_text(
            json.dumps(
                {
                    "model": model,
                    "plugin": True,
                    "heads": str(source.path),
                    "requests": requests,
                    "output": str(output),
                    # vLLM-CPU 0.32 fails a seeded request whose prefill is chunked (its CPU
                    # generator has no offset to rewind): one step takes every prompt whole
                    "max_num_batched_tokens": 32768,
                }
            )
        )
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "HF_HUB_OFFLINE": "1",
        }
        started = time.perf_counter()
        subprocess.run([args.vllm_python, "-m", "mavis_lc.vllm.driver", str(spec)], check=True, env=env)
        vllm_seconds = time.perf_counter() - started
        results = json.loads(output.read_text())
    n = len(rows)
    answers[("vllm", 0.0)] = [r["text"] for r in results[:n]]
    answers[("vllm", 1.0)] = [r["text"] for r in results[n:]]

    prompt_of = [q for q, _ in rows]
    user_prompts = [questions[q] for q, _ in rows]
    rewards = {key: np.asarray(objective.score(user_prompts, texts_)) for key, texts_ in answers.items()}
    draws = bootstrap.resample_prompts(len(questions))
    figures = {}
    gains = {}
    for engine in ("mavis-lc", "vllm"):
        sd = float(rewards[(engine, 0.0)].std(ddof=1)) or 1.0
        diff = (rewards[(engine, 1.0)] - rewards[(engine, 0.0)]) / sd
        per_prompt = bootstrap.prompt_means(diff, prompt_of, len(questions))
        gains[engine] = per_prompt
        low, high = bootstrap.interval(per_prompt[draws].mean(axis=1))
        figures[engine] = {
            "gain": float(per_prompt.mean()),
            "low": low,
            "high": high,
            "base_sd": sd,
            "base_mean": float(rewards[(engine, 0.0)].mean()),
            "steered_mean": float(rewards[(engine, 1.0)].mean()),
            "degenerate_base": float(np.mean([is_degenerate(t) for t in answers[(engine, 0.0)]])),
            "degenerate_steered": float(np.mean([is_degenerate(t) for t in answers[(engine, 1.0)]])),
        }
    delta = gains["vllm"] - gains["mavis-lc"]
    d_low, d_high = bootstrap.interval(delta[draws].mean(axis=1))
    print(
        f"head {args.head} ({source.objective}, sha256 {source.sha256[:12]}); {len(questions)} questions × "
        f"{args.seeds} seeds; {args.tokens} tokens, beta {args.beta}, top-k {args.top_k}, float32"
    )
    print(f"answers: mavis-lc {mavis_seconds:.0f} s, vLLM-CPU {vllm_seconds:.0f} s (engine start included)")
    print(f"| engine | base {source.objective} | steered | gain (base SD) [95% CI] | degenerate base / steered |")
    print("|---|---|---|---|---|")
    for engine, f in figures.items():
        print(
            f"| {engine} | {f['base_mean']:.3f} | {f['steered_mean']:.3f} | {f['gain']:+.2f} "
            f"[{f['low']:+.2f}, {f['high']:+.2f}] | {f['degenerate_base']:.1%} / {f['degenerate_steered']:.1%} |"
        )
    print(f"vLLM − mavis-lc gain: {float(delta.mean()):+.2f} [{d_low:+.2f}, {d_high:+.2f}] (paired over questions)")
    for engine in ("mavis-lc", "vllm"):
        print(f"\n{engine}, weight 1, first answers:")
        for text in answers[(engine, 1.0)][:3]:
            print(f"  - {text[:160]!r}")
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {
                    "figures": figures,
                    "difference": [float(delta.mean()), d_low, d_high],
                    "answers": {f"{e}-{w}": a for (e, w), a in answers.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
