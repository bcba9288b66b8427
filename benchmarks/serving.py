"""Per-call serving overhead: heads named by registry specs against the same heads as files.

Registers two random-weight shared heads for SmolLM2 in a throwaway registry (SQLite, local
store), then times one-token `MavisLLM.invoke` calls of two objects, one naming the heads as
``objective@alias`` and one as the resolved .safetensors files, alternately in one process
(medians), and counts the registry database's queries during the timed calls (SQLAlchemy
cursor events). Objects resolve their specs once, on first use, so both should cost the same.

Then concurrency: ``--callers`` async callers (8), each with its own weighting and seed, send
one chat call each (``--tokens`` new tokens, at least that many: EOS is banned before) to one
`ChatMavis`, all at once (``asyncio.gather``), against the same calls awaited one after another
(the serialized path, each decoded alone), alternately, medians of ``--repeats`` runs. The
engine's scheduler merges the concurrent calls into shared batches; each concurrent answer is
checked equal to its serialized (solo) decode with the same seed.

    python benchmarks/serving.py
    python benchmarks/serving.py --calls 40 --repeats 5 --callers 8 --tokens 48
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
    parser.add_argument("--callers", type=int, default=8, help="concurrent async callers, one weighting each")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per concurrent-section call")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mavis-serving-"))
    os.environ["MAVIS_HOME"] = str(home)  # a registry and store of its own, before mavis_lc reads settings

    import torch
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from mavis_lc import MavisLLM
    from mavis_lc.base_model import load_base_model
    from mavis_lc.registry import Registry
    from mavis_lc.value_models import new_shared_head

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
    concurrency(files, args.callers, args.tokens, args.repeats)


QUESTIONS = [
    "What should I cook for dinner tonight?",
    "How do I fix a flat bicycle tyre?",
    "Tell me something about the moon.",
    "Why is the sky blue?",
    "How can I sleep better?",
    "What is a good first houseplant?",
    "How do I write a polite complaint email?",
    "Why do cats purr?",
]


def concurrency(files: list[str], callers: int, tokens: int, repeats: int) -> None:
    """Concurrent async callers sharing batches, against the serialized path."""
    import asyncio

    from mavis_lc import ChatMavis

    chat = ChatMavis(heads=files, max_tokens=tokens, min_tokens=tokens, beta=2.0)
    calls = [
        (
            QUESTIONS[i % len(QUESTIONS)],
            {"positivity": i / max(callers - 1, 1), "conciseness": 1 - i / max(callers - 1, 1)},
            1000 + i,
        )
        for i in range(callers)
    ]
    chat.invoke("Hello", max_tokens=1, min_tokens=0)  # load

    async def one(question: str, weights: dict[str, float], seed: int) -> tuple[str, int]:
        message = await chat.ainvoke(question, weights=weights, seed=seed)
        return str(message.content), int(message.usage_metadata["output_tokens"])  # type: ignore[index]

    async def serialized() -> list[tuple[str, int]]:
        return [await one(*c) for c in calls]

    async def concurrent() -> list[tuple[str, int]]:
        return list(await asyncio.gather(*(one(*c) for c in calls)))

    scheduler = chat.engine().scheduler
    times: dict[str, list[float]] = {"serialized": [], "concurrent": []}
    outputs: dict[str, list[tuple[str, int]]] = {}
    batches = rows = 0
    for _ in range(repeats):
        for name, run in (("serialized", serialized), ("concurrent", concurrent)):
            before = (scheduler.stats.batches, scheduler.stats.rows)
            start = time.perf_counter()
            outputs[name] = asyncio.run(run())
            times[name].append(time.perf_counter() - start)
            if name == "concurrent":
                batches += scheduler.stats.batches - before[0]
                rows += scheduler.stats.rows - before[1]
    produced = sum(n for _, n in outputs["serialized"])
    equal = sum(a == b for a, b in zip(outputs["serialized"], outputs["concurrent"], strict=True))
    serial_s, concurrent_s = (statistics.median(times[k]) for k in ("serialized", "concurrent"))
    print(
        f"\nSmolLM2, two shared heads, {callers} async callers with {callers} weightings, {tokens} new tokens each, "
        f"{repeats} runs (medians); ChatMavis.ainvoke"
    )
    print(f"serialized: {produced / serial_s:.1f} tokens/s ({serial_s:.2f} s)")
    print(
        f"concurrent: {produced / concurrent_s:.1f} tokens/s ({concurrent_s:.2f} s), {batches / repeats:.1f} batches "
        f"per run, {rows / max(batches, 1):.1f} rows per batch"
    )
    arrivals = scheduler.stats.submitted_at[-callers:]
    print(f"spread of the last run's {callers} submissions: {(arrivals[-1] - arrivals[0]) * 1e3:.1f} ms")
    print(f"throughput concurrent / serialized: {serial_s / concurrent_s:.2f}x")
    print(f"concurrent answers equal to their solo decode (same seed): {equal}/{callers}")


if __name__ == "__main__":
    main()
