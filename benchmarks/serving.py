"""Per-call serving overhead: heads named by registry specs against the same heads as files.

Registers two random-weight shared heads for SmolLM2 in a throwaway registry (SQLite, local
store), then times one-token `MavisLLM.invoke` calls of two objects, one naming the heads as
``objective@alias`` and one as the resolved .safetensors files, alternately in one process
(medians), and counts the registry database's queries during the timed calls (SQLAlchemy
cursor events). Objects resolve their specs once, on first use, so both should cost the same.

    python benchmarks/serving.py
    python benchmarks/serving.py --calls 40 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="one-token calls per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median reported)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mavis-serving-"))
    os.environ["MAVIS_HOME"] = str(home)  # a registry and store of its own, before mavis_lc reads settings

    import torch
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from mavis_lc import MavisLLM
    from mavis_lc.base_model import load_base_model
    from mavis_lc.registry import Registry
    from mavis_lc.value_model import new_shared_head

    queries: list[str] = []
    event.listen(Engine, "before_cursor_execute", lambda *a: queries.append(str(a[2])))  # every engine's statements
    base = load_base_model()
    registry = Registry()
    files = []
    for seed, objective in enumerate(("positivity", "conciseness")):
        head = new_shared_head(base, objective)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        info = registry.register_version(
            objective, head.to_bytes(), base_model_id=base.model_id, tokenizer_fingerprint=base.fingerprint,
            architecture={"architecture": head.config.architecture}, iteration=0, training_params={}, metrics={},
            normalization={"mean": 0.0, "std": 1.0},
        )  # fmt: skip
        registry.set_alias(objective, "prod", info.version)
        files.append(str(registry.fetch_artifact(info)))
    registry.close()
    specs = MavisLLM(heads=["positivity@prod", "conciseness@prod"], max_tokens=1, seed=0)
    paths = MavisLLM(heads=files, max_tokens=1, seed=0)
    for llm in (specs, paths):  # first use: resolve and load
        llm.invoke("Hello")
    prompts = [f"Question {i}: how are you?" for i in range(args.calls)]

    def run(llm: MavisLLM) -> float:
        start = time.perf_counter()
        for prompt in prompts:
            llm.invoke(prompt)
        return (time.perf_counter() - start) / len(prompts)

    times: dict[str, list[float]] = {"specs": [], "files": []}
    before = len(queries)
    for _ in range(args.repeats):  # alternate, so machine noise hits both alike
        times["specs"].append(run(specs))
        times["files"].append(run(paths))
    per_call_queries = (len(queries) - before) / (args.repeats * args.calls)
    spec_ms, file_ms = (statistics.median(times[k]) * 1e3 for k in ("specs", "files"))
    print(f"SmolLM2, two shared heads, one-token calls, {args.calls} calls x {args.repeats} runs (medians)")
    print(f"registry specs {spec_ms:.2f} ms/call, files {file_ms:.2f} ms/call: specs / files {spec_ms / file_ms:.3f}")
    print(f"registry queries per call after the first: {per_call_queries:.2f}")


if __name__ == "__main__":
    main()
