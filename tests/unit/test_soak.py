"""A bounded soak of the in-process serving path: rounds of mixed concurrent chat calls with
cancelled streams and bad inputs; nothing is lost, every bad call fails alone with a typed
error, and the thread count and RSS stay flat across rounds."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from mavis_lc import ChatMavis
from mavis_lc.errors import ConfigurationError, DecodingParameterError, MavisError, UnknownObjectiveError
from tests.tiny import save_random_heads

QUESTIONS = ["I love sunny days", "Tell me about cats.", "This is awful", "The quick brown fox", "Numbers: 0 1 2"]
BAD: list[tuple[dict[str, Any], type[MavisError]]] = [
    ({"weights": {"humour": 1.0}}, UnknownObjectiveError),
    ({"max_tokens": 0}, DecodingParameterError),
    ({"response_format": {"type": "xml"}}, ConfigurationError),
    ({"top_k": -3}, DecodingParameterError),
]


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_rounds_of_mixed_calls_lose_nothing_and_leak_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAVIS_MAX_BATCH_SIZE", "8")
    from mavis_lc.settings import get_settings

    get_settings.cache_clear()
    heads = save_random_heads(tiny_model_dir, ["positivity", "conciseness"], tmp_path, seed=5)
    short = ChatMavis(base_model=str(tiny_model_dir), heads=heads, max_tokens=6, beta=2.0)
    long = ChatMavis(base_model=str(tiny_model_dir), heads=heads, max_tokens=16, min_tokens=8, beta=2.0)
    rng = random.Random(0)
    threads, rss = [], []

    async def one_round(n: int) -> tuple[int, int, int]:
        async def good(i: int) -> None:
            model = long if i % 2 else short
            weights = {"positivity": rng.random(), "conciseness": rng.random()}
            message = await model.ainvoke(rng.choice(QUESTIONS), weights=weights, seed=1000 * n + i)
            assert message.response_metadata["finish_reason"] in ("stop", "length")
            limit = 16 if i % 2 else 6
            assert message.response_metadata["completion_tokens"] <= limit

        async def cancelled(i: int) -> None:
            seen = 0
            async for _ in long.astream(rng.choice(QUESTIONS), seed=i):
                seen += 1
                if seen >= 2:
                    break

        async def bad(i: int) -> None:
            kwargs, error = BAD[i % len(BAD)]
            with pytest.raises(error):
                await short.ainvoke(rng.choice(QUESTIONS), **kwargs)

        calls = [good(i) for i in range(12)] + [cancelled(i) for i in range(4)] + [bad(i) for i in range(4)]
        rng.shuffle(calls)
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures
        return 12, 4, 4

    for n in range(4):
        assert asyncio.run(one_round(n)) == (12, 4, 4)
        gc.collect()
        threads.append(threading.active_count())
        rss.append(_rss_kib())
    get_settings.cache_clear()
    print(f"soak: 4 rounds x 20 calls; threads after each round {threads}; RSS KiB {rss}")
    # No thread per call and no growth per round after the first, which starts the engine's
    # scheduler and noise workers (threads other tests left behind may end meanwhile, never start).
    assert all(b <= a for a, b in itertools.pairwise(threads)), threads
    assert rss[-1] - rss[1] < 32 * 1024, rss  # KiB
