"""Merged requests keep their own options: two `ChatMavis` objects on one engine, one with
``max_tokens=20`` and one with ``max_tokens=96, min_tokens=60``, fire concurrent ``ainvoke``s
(about half from each, a seed per call) for ``--rounds`` rounds on the packaged SmolLM2.

Counts the long object's answers that came back with ``finish_reason == "length"`` at 20
tokens or fewer (another request's limit), and checks ``--solo`` of the long answers per round
against the same call alone (same seed: token for token).

    python benchmarks/merged_options.py
    python benchmarks/merged_options.py --rounds 3 --requests 40 --solo 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent requests")
    parser.add_argument("--requests", type=int, default=40, help="concurrent requests per round")
    parser.add_argument("--solo", type=int, default=4, help="long answers per round checked against a solo call")
    args = parser.parse_args()
    os.environ.setdefault("MAVIS_HOME", tempfile.mkdtemp(prefix="mavis-merged-"))
    os.environ.setdefault("MAVIS_MAX_BATCH_SIZE", "32")

    from mavis_lc import ChatMavis

    short = ChatMavis(max_tokens=20, beta=1.0)
    long = ChatMavis(max_tokens=96, min_tokens=60, beta=1.0)
    questions = [
        "Tell me about your favourite season.",
        "How do I make a cup of tea?",
        "Describe a walk in the park.",
        "What should I cook tonight?",
        "Why is the sky blue?",
    ]
    rng = random.Random(0)
    truncated = long_total = solo_checked = solo_equal = 0
    started = time.perf_counter()
    for round_ in range(args.rounds):
        calls = [(rng.random() < 0.5, rng.choice(questions), 1000 * round_ + i) for i in range(args.requests)]

        async def fire(calls: list[tuple[bool, str, int]] = calls) -> list[object]:
            return await asyncio.gather(*((long if is_long else short).ainvoke(q, seed=s) for is_long, q, s in calls))

        answers = asyncio.run(fire())
        longs = [(c, a) for c, a in zip(calls, answers, strict=True) if c[0]]
        cut = [
            a
            for _, a in longs
            if a.response_metadata["finish_reason"] == "length" and a.response_metadata["completion_tokens"] <= 20
        ]
        for (_, question, seed), answer in longs[: args.solo]:
            alone = long.invoke(question, seed=seed)
            solo_checked += 1
            solo_equal += alone.content == answer.content
        truncated += len(cut)
        long_total += len(longs)
        print(f"round {round_ + 1}: {len(cut)} of {len(longs)} long requests cut at <= 20 tokens")
    print(
        f"total: {truncated} of {long_total} long requests cut at <= 20 tokens; "
        f"{solo_equal} of {solo_checked} checked long answers equal their solo call "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
