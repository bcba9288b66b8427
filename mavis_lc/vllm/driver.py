"""One batch of requests through a vLLM engine, with or without the MAVIS plugin, for the plugin's
tests and benchmarks; run with the Python of a vLLM environment that has mavis-lc installed:

    .venv-vllm/bin/python -m mavis_lc.vllm.driver SPEC.json

SPEC: {"model": dir, "plugin": bool, "heads": "a.safetensors,b.safetensors", "output": file,
       "requests": [{"prompt": str, "params": {SamplingParams keyword arguments}}],
       optional "dtype" (float32), "enforce_eager" (true), "max_model_len" (1024),
       "max_num_batched_tokens" (vLLM's default)}
Each result: {"token_ids": [...], "text": str, "logprobs": [{token id: logprob} per step] | null}.
"""

from __future__ import annotations

import json
import math
import os
import sys


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if spec.get("plugin"):
        os.environ["MAVIS_VLLM_HEADS"] = spec["heads"]
    from vllm import LLM, SamplingParams

    extra = (
        {
            "hf_overrides": {"architectures": ["MavisLlamaForCausalLM"]},
            "logits_processors": ["mavis_lc.vllm.plugin:MavisLogitsProcessor"],
        }
        if spec.get("plugin")
        else {}
    )
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        enforce_eager=bool(spec.get("enforce_eager", True)),
        max_model_len=int(spec.get("max_model_len", 1024)),
        logprobs_mode="processed_logprobs",
        seed=0,
        **({"max_num_batched_tokens": int(spec["max_num_batched_tokens"])} if "max_num_batched_tokens" in spec else {}),
        **extra,
    )
    params = [SamplingParams(**r["params"]) for r in spec["requests"]]
    outputs = llm.generate([r["prompt"] for r in spec["requests"]], params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [
                {str(t): (lp.logprob if math.isfinite(lp.logprob) else None) for t, lp in step.items()}
                for step in completion.logprobs
            ]
        results.append(
            {
                "prompt_token_ids": list(out.prompt_token_ids or []),
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "logprobs": logprobs,
            }
        )
    with open(spec["output"], "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
