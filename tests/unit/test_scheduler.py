"""The per-engine batch scheduler: concurrent requests merged into shared batches, each output
equal to its solo decode with the same seed; bounded queue; cancellation; async callers."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mavis_lc import ChatMavis, EngineBusyError, MavisLLM
from mavis_lc.base_model import BaseModel, load_base_model
from mavis_lc.decoding import DecodeConfig, Generation, MavisDecoder, RowOptions, StreamStep
from mavis_lc.decoding.grammar import Grammar
from mavis_lc.decoding.scheduler import BatchScheduler, _collect
from mavis_lc.errors import DecodingParameterError, UnknownObjectiveError
from mavis_lc.value_models import load_value_model
from tests.tiny import save_random_heads

PROMPTS = ["I love sunny days", "Tell me about cats.", "This is awful", "The quick brown fox", "Numbers: 0 1 2"]
WEIGHTS = [{"positivity": 1.0}, {"conciseness": 1.0}, {"positivity": 0.3, "conciseness": 0.7}, {}, {"positivity": 2.0}]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def head_paths(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return save_random_heads(tiny_model_dir, ["positivity", "conciseness"], tmp_path_factory.mktemp("heads"), seed=7)


@pytest.fixture(scope="module")
def decoder(base: BaseModel, head_paths: list[str]) -> MavisDecoder:
    return MavisDecoder(base, [load_value_model(p, base) for p in head_paths])


CFG = DecodeConfig(max_new_tokens=14, top_k=20, beta=3.0, seed=None)


def solo(decoder: MavisDecoder, i: int, **options: Any) -> list[int]:
    return decoder.generate([PROMPTS[i]], WEIGHTS[i], CFG, seeds=[100 + i], row_options=[RowOptions(**options)])[
        0
    ].token_ids


def test_rows_with_their_own_lengths_and_stops_match_each_alone(decoder: MavisDecoder) -> None:
    options = [
        RowOptions(max_new_tokens=3),
        RowOptions(stop=(" ",)),
        RowOptions(min_new_tokens=10, max_new_tokens=12),
        RowOptions(),
        RowOptions(max_new_tokens=1),
    ]
    batched = decoder.generate(PROMPTS, WEIGHTS, CFG, seeds=[100 + i for i in range(5)], row_options=options)
    for i, generation in enumerate(batched):
        alone = decoder.generate([PROMPTS[i]], WEIGHTS[i], CFG, seeds=[100 + i], row_options=[options[i]])[0]
        assert generation.token_ids == alone.token_ids
        assert generation.text == alone.text
        assert generation.finish_reason == alone.finish_reason
    assert batched[0].completion_tokens <= 3 and batched[4].completion_tokens == 1
    assert batched[2].completion_tokens >= 10


def test_concurrent_requests_merge_into_one_batch_and_equal_their_solo_decodes(decoder: MavisDecoder) -> None:
    # A generous wait for a full batch makes the merge certain: the batch starts once 5 rows wait.
    scheduler = BatchScheduler(decoder, max_batch_size=5, batch_wait_s=5.0)
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = scheduler.generate([PROMPTS[i]], WEIGHTS[i], CFG, seeds=[100 + i])[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert scheduler.stats.batches == 1 and scheduler.stats.largest_batch == 5
    assert [results[i] for i in range(5)] == [solo(decoder, i) for i in range(5)]


def test_requests_with_other_step_parameters_go_to_other_batches(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder, max_batch_size=4, batch_wait_s=0.5)
    hot = DecodeConfig(max_new_tokens=6, top_k=20, beta=0.5, seed=1)
    out: list[Any] = []
    threads = [
        threading.Thread(target=lambda c=c: out.append(scheduler.generate(PROMPTS[:2], WEIGHTS[:2], c)))
        for c in (CFG, hot)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert scheduler.stats.batches == 2 and scheduler.stats.merged_batches == 0


def test_a_bad_request_fails_alone_before_it_is_queued(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder)
    with pytest.raises(UnknownObjectiveError, match="humour"):
        scheduler.generate([PROMPTS[0]], {"humour": 1.0}, CFG)
    with pytest.raises(DecodingParameterError, match="max_new_tokens"):
        scheduler.generate([PROMPTS[0]], {}, CFG, row_options=[RowOptions(max_new_tokens=0)])
    assert scheduler.stats.requests == 0
    assert scheduler.generate([PROMPTS[0]], WEIGHTS[0], CFG, seeds=[100])[0].token_ids == solo(decoder, 0)


class Gate:
    """Wraps a decoder's stream so that every batch waits until the gate opens."""

    def __init__(self, decoder: MavisDecoder) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.decoder = decoder
        self.original = decoder.stream

    def __enter__(self) -> Gate:
        def gated(*args: Any, **kwargs: Any) -> Iterator[StreamStep]:
            self.entered.set()
            self.open.wait(timeout=30)
            yield from self.original(*args, **kwargs)

        self.decoder.stream = gated  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.open.set()
        del self.decoder.stream


def test_a_full_queue_refuses_with_a_typed_error_and_loses_nothing(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder, max_queue=1)
    with Gate(decoder) as gate:
        first = scheduler.stream([PROMPTS[0]], WEIGHTS[0], CFG, seeds=[100])
        assert gate.entered.wait(timeout=30)  # the first batch is decoding (held at the gate)
        second = scheduler.stream([PROMPTS[1]], WEIGHTS[1], CFG, seeds=[101])  # waits in the queue
        with pytest.raises(EngineBusyError, match="max_queue=1"):
            scheduler.stream([PROMPTS[2]], WEIGHTS[2], CFG, seeds=[102])
        gate.open.set()
        texts = [next(g for s in stream for g in s.finished if g is not None).token_ids for stream in (first, second)]
    assert texts == [solo(decoder, 0), solo(decoder, 1)]


def test_a_consumer_that_stops_reading_cancels_only_its_own_request(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder, max_batch_size=2, batch_wait_s=5.0)
    long = DecodeConfig(max_new_tokens=200, top_k=20, beta=3.0, seed=None, stop=())
    steps: list[int] = []
    original = decoder.stream

    def counted(*args: Any, **kwargs: Any) -> Iterator[StreamStep]:
        for step in original(*args, **kwargs):
            steps.append(len(step.deltas))
            yield step

    decoder.stream = counted  # type: ignore[method-assign]
    try:
        cancelled = scheduler.stream([PROMPTS[3]], {}, long, seeds=[1])
        kept = scheduler.stream(
            [PROMPTS[0]], WEIGHTS[0], long, seeds=[100], row_options=[RowOptions(max_new_tokens=14)]
        )
        next(cancelled)
        cancelled.close()  # type: ignore[attr-defined]
        generation = next(g for s in kept for g in s.finished if g is not None)
    finally:
        del decoder.stream
    assert generation.token_ids == solo(decoder, 0)
    # The batch (both rows) ended with the request still read, not after 200 steps of the other.
    assert scheduler.stats.batches == 1 and set(steps) == {2}
    assert len(steps) <= 14


def test_an_error_while_decoding_reaches_every_request_of_the_batch(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder, max_batch_size=2, batch_wait_s=5.0)

    def broken(*args: Any, **kwargs: Any) -> Iterator[StreamStep]:
        raise RuntimeError("out of memory")
        yield  # pragma: no cover

    decoder.stream = broken  # type: ignore[method-assign]
    try:
        streams = [scheduler.stream([p], {}, CFG) for p in PROMPTS[:2]]
        for stream in streams:
            with pytest.raises(RuntimeError, match="out of memory"):
                list(stream)
    finally:
        del decoder.stream
    assert scheduler.generate([PROMPTS[0]], WEIGHTS[0], CFG, seeds=[100])[0].token_ids == solo(decoder, 0)


def test_constrained_and_free_rows_merge(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder, max_batch_size=2, batch_wait_s=5.0)
    grammar = Grammar.regex("(yes|no)")
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=lambda: out.update(g=scheduler.generate([PROMPTS[0]], {}, CFG, [5], [grammar])[0])),
        threading.Thread(target=lambda: out.update(f=scheduler.generate([PROMPTS[1]], WEIGHTS[1], CFG, [101])[0])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert scheduler.stats.merged_batches == 1
    assert out["g"].text in ("yes", "no") and out["g"].grammar_complete
    assert out["f"].token_ids == solo(decoder, 1)


async def test_async_callers_share_batches_without_executor_threads(decoder: MavisDecoder) -> None:
    scheduler = BatchScheduler(decoder, max_batch_size=5, batch_wait_s=5.0)
    before = threading.active_count()

    async def call(i: int) -> list[int]:
        return (await scheduler.agenerate([PROMPTS[i]], WEIGHTS[i], CFG, seeds=[100 + i]))[0].token_ids

    results = await asyncio.gather(*(call(i) for i in range(5)))
    assert scheduler.stats.batches == 1 and scheduler.stats.largest_batch == 5
    assert threading.active_count() <= before + 1  # the scheduler's own thread, no pool
    assert list(results) == [solo(decoder, i) for i in range(5)]


async def test_langchain_async_calls_merge_and_stream(
    tiny_model_dir: Path, head_paths: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAVIS_BATCH_WAIT_MS", "1000")
    monkeypatch.setenv("MAVIS_MAX_BATCH_SIZE", "4")
    from mavis_lc.settings import get_settings

    get_settings.cache_clear()
    try:
        chat = ChatMavis(base_model=str(tiny_model_dir), heads=head_paths, max_tokens=10, beta=3.0, seed=3)
        llm = MavisLLM(base_model=str(tiny_model_dir), heads=head_paths, max_tokens=10, beta=3.0, seed=3)
        solo_chat = [chat.invoke(PROMPTS[i], weights=WEIGHTS[i]).content for i in range(2)]
        solo_llm = [llm.invoke(PROMPTS[i], weights=WEIGHTS[i]) for i in range(2)]
        engine = chat.engine()
        assert engine is llm.engine()
        batches = engine.scheduler.stats.batches

        async def streamed(i: int) -> str:
            return "".join([str(c.content) async for c in chat.astream(PROMPTS[i], weights=WEIGHTS[i])])

        got = await asyncio.gather(
            chat.ainvoke(PROMPTS[0], weights=WEIGHTS[0]),
            streamed(1),
            llm.ainvoke(PROMPTS[0], weights=WEIGHTS[0]),
            llm.ainvoke(PROMPTS[1], weights=WEIGHTS[1]),
        )
        assert [got[0].content, got[1]] == solo_chat
        assert list(got[2:]) == solo_llm
        assert engine.scheduler.stats.batches == batches + 1  # all four in one decode
    finally:
        get_settings.cache_clear()


# -- randomised mixes: every completed request equals its solo decode ---------------------------

_OBJECTS = [  # what several LangChain objects on one engine would send: one config each
    DecodeConfig(max_new_tokens=4, top_k=20, beta=3.0, seed=None),
    DecodeConfig(max_new_tokens=16, min_new_tokens=12, top_k=20, beta=3.0, seed=None),
    DecodeConfig(max_new_tokens=10, top_k=20, beta=3.0, seed=None, stop=("e",)),
    DecodeConfig(max_new_tokens=9, top_k=8, beta=1.0, seed=None),
]
_GRAMMARS = [None, None, None, Grammar.regex("(yes|no|maybe)"), Grammar.json_schema({"type": "object"})]


@dataclass
class _Mixed:
    """One request of a randomised mix and how its caller reads it."""

    prompts: list[str]
    weights: list[dict[str, float]]
    config: DecodeConfig
    seeds: list[int]
    grammars: list[Grammar | None] | None
    row_options: list[RowOptions] | None
    how: str
    """``sync``, ``async``, ``stream-cancel`` or ``astream-cancel``."""
    cancel_after: int = 0


def _random_request(rng: random.Random, n: int) -> _Mixed:
    rows = rng.choice([1, 1, 1, 2])
    picks = [rng.randrange(len(PROMPTS)) for _ in range(rows)]
    grammars = [rng.choice(_GRAMMARS) for _ in range(rows)]
    row_options = None
    if rng.random() < 0.3:
        limit = rng.choice([None, 2, 7])
        row_options = [
            RowOptions(
                max_new_tokens=limit, min_new_tokens=None if limit is None else 0, stop=rng.choice([None, (" ",)])
            )
        ] * rows
    return _Mixed(
        prompts=[PROMPTS[p] for p in picks],
        weights=[WEIGHTS[p] for p in picks],
        config=rng.choice(_OBJECTS),
        seeds=[1000 * n + r for r in range(rows)],
        grammars=grammars if any(grammars) else None,
        row_options=row_options,
        how=rng.choice(["sync", "sync", "async", "async", "stream-cancel", "astream-cancel"]),
        cancel_after=rng.randrange(1, 4),
    )


def _solo(decoder: MavisDecoder, r: _Mixed) -> list[Generation]:
    return decoder.generate(
        r.prompts, r.weights, r.config, seeds=r.seeds, grammars=r.grammars, row_options=r.row_options
    )


@pytest.mark.parametrize("round_seed", [11, 12, 13])
def test_randomised_mixes_of_requests_each_equal_their_solo_decode(decoder: MavisDecoder, round_seed: int) -> None:
    """14 requests a round from four configs (lengths, min lengths, stops, step parameters),
    grammars, per-row options, weights and seeds, sync and async callers, some streams cancelled
    part-way; held at a gate until all are queued, so they merge."""
    rng = random.Random(round_seed)
    requests = [_random_request(rng, n) for n in range(14)]
    scheduler = BatchScheduler(decoder, max_batch_size=8)
    done: dict[int, list[Generation]] = {}
    errors: list[BaseException] = []

    def run_sync(i: int, r: _Mixed) -> None:
        try:
            stream = scheduler.stream(r.prompts, r.weights, r.config, r.seeds, r.grammars, r.row_options)
            if r.how == "sync":
                done[i] = _collect(stream)
            else:
                for _ in zip(range(r.cancel_after), stream, strict=False):
                    pass
                stream.close()  # type: ignore[attr-defined]
        except BaseException as exc:
            errors.append(exc)

    async def run_async(items: list[tuple[int, _Mixed]]) -> None:
        async def one(i: int, r: _Mixed) -> None:
            stream = scheduler.astream(r.prompts, r.weights, r.config, r.seeds, r.grammars, r.row_options)
            if r.how == "async":
                done[i] = _collect(iter([s async for s in stream]))
                return
            seen = 0
            async for _ in stream:
                seen += 1
                if seen >= r.cancel_after:
                    break
            await stream.aclose()  # type: ignore[attr-defined]

        for outcome in await asyncio.gather(*(one(i, r) for i, r in items), return_exceptions=True):
            if isinstance(outcome, BaseException):
                errors.append(outcome)

    with Gate(decoder) as gate:
        threads = [
            threading.Thread(target=run_sync, args=(i, r))
            for i, r in enumerate(requests)
            if r.how in ("sync", "stream-cancel")
        ]
        asynchronous = [(i, r) for i, r in enumerate(requests) if r.how in ("async", "astream-cancel")]
        threads.append(threading.Thread(target=lambda: asyncio.run(run_async(asynchronous))))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.stats.requests < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.stats.requests == len(requests)
        gate.open.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    assert scheduler.stats.merged_batches >= 1
    completed = [i for i, r in enumerate(requests) if r.how in ("sync", "async")]
    assert sorted(done) == completed
    for i in completed:
        solo_generations = _solo(decoder, requests[i])
        got = done[i]
        assert [g.token_ids for g in got] == [g.token_ids for g in solo_generations], i
        assert [g.text for g in got] == [g.text for g in solo_generations], i
        assert [g.finish_reason for g in got] == [g.finish_reason for g in solo_generations], i
        for g, r in zip(got, _resolved(requests[i]), strict=True):
            assert g.completion_tokens <= r.max_new_tokens
            if g.finish_reason == "stop" and g.stop_sequence is None and not g.constrained:  # EOS
                assert g.completion_tokens >= r.min_new_tokens


def _resolved(r: _Mixed) -> list[DecodeConfig]:
    options = r.row_options or [RowOptions()] * len(r.prompts)
    return [o.resolve(r.config) for o in options]


def test_a_request_larger_than_the_batch_bound_decodes_in_bounded_chunks(decoder: MavisDecoder) -> None:
    """One call of 11 rows under a bound of 4: three batches of at most 4 rows, the same outputs
    as one decode of all 11, and one stream of all rows to the caller."""
    prompts = [PROMPTS[i % 5] for i in range(11)]
    weights = [WEIGHTS[i % 5] for i in range(11)]
    seeds = [300 + i for i in range(11)]
    options = [RowOptions(max_new_tokens=3 + i % 4) for i in range(11)]
    scheduler = BatchScheduler(decoder, max_batch_size=4, batch_wait_s=0.0)
    chunked = scheduler.generate(prompts, weights, CFG, seeds=seeds, row_options=options)
    whole = decoder.generate(prompts, weights, CFG, seeds=seeds, row_options=options)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in whole]
    assert [g.text for g in chunked] == [g.text for g in whole]
    assert scheduler.stats.batches == 3 and scheduler.stats.largest_batch == 4 and scheduler.stats.rows == 11
    streamed: dict[int, str] = {}
    for step in scheduler.stream(prompts, weights, CFG, seeds=seeds, row_options=options):
        assert len(step.deltas) == len(step.finished) == 11
        for row, delta in enumerate(step.deltas):
            streamed[row] = streamed.get(row, "") + delta
    assert [streamed.get(row, "") for row in range(11)] == [g.text for g in whole]
