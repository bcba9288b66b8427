"""Concurrent callers of one engine share batched decodes.

A `BatchScheduler` owns one `MavisDecoder` and one decoding thread. Callers (threads, or
coroutines on any event loop) submit requests; each request is validated in the caller's own
thread (weights, decoding parameters, grammars, seeds drawn when none is given), so a bad
request fails alone and never reaches a batch. Requests that arrive while a batch decodes wait
in a bounded queue and are merged into the next batch: one batch holds requests with the same
``beta``, ``top_k``, ``temperature`` and ``do_sample`` (the parameters of the step itself),
up to ``max_batch_size`` rows, in arrival order; everything else stays per row (weights, seed,
stop strings, max/min new tokens, grammar), so with a fixed seed a request's output is the
same whether it ran alone or merged (the decoder's per-row guarantee). One request of more
rows than ``max_batch_size`` (a ``batch`` call of many inputs) decodes in consecutive batches
of at most that many rows, streamed to its caller as one.

Each request gets its own stream of `StreamStep`s holding only its rows. A consumer that stops
reading (a closed stream, a cancelled task) cancels its request: it no longer receives steps
and, once every request of a batch is finished or cancelled, the batch stops.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mavis_lc.decoding.decoder import DecodeConfig, Generation, MavisDecoder, RowOptions, StreamStep, _weight_rows
from mavis_lc.decoding.grammar import Grammar, RowConstraint
from mavis_lc.errors import EngineBusyError
from mavis_lc.weights import Weights, weight_matrix

_END = object()
"""Sent after a request's last step."""


class _Sink:
    """Where a request's steps go: a thread-safe queue, or an asyncio queue on its loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.aqueue: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None

    def put(self, item: Any) -> bool:
        """Deliver ``item``; False when the consumer's event loop is gone."""
        if self.loop is None:
            self.sync.put(item)
            return True
        assert self.aqueue is not None
        try:
            self.loop.call_soon_threadsafe(self.aqueue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            return False
        return True


@dataclass
class _Request:
    prompts: list[str]
    weights: list[dict[str, float]]
    seeds: list[int]
    constraints: list[RowConstraint | None]
    options: list[RowOptions]
    config: DecodeConfig
    sink: _Sink
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    remaining: int = 0
    """Rows not yet finished."""

    @property
    def key(self) -> tuple[float, int, float, bool]:
        return batch_key(self.config)


def batch_key(config: DecodeConfig) -> tuple[float, int, float, bool]:
    """The parameters requests must share to decode in one batch."""
    return (config.beta, config.top_k, config.temperature, config.do_sample)


@dataclass
class SchedulerStats:
    """Counters of one scheduler, for tests and benchmarks."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    largest_batch: int = 0
    """Most rows decoded together."""
    merged_batches: int = 0
    """Batches that held more than one request."""
    submitted_at: list[float] = field(default_factory=list)
    """`time.monotonic` of the latest submissions (at most 64), to see how requests arrive."""

    def count_batch(self, rows: int, requests: int) -> None:
        """One batch of ``rows`` rows from ``requests`` requests starts decoding."""
        self.batches += 1
        self.rows += rows
        self.largest_batch = max(self.largest_batch, rows)
        self.merged_batches += requests > 1


_SCHEDULERS: weakref.WeakSet[BatchScheduler] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Let every decoding thread finish its batch and exit before the interpreter does (a thread
    killed inside a torch call at exit aborts the process)."""
    for scheduler in list(_SCHEDULERS):
        scheduler.close(timeout=5.0)


class BatchScheduler:
    """Merges concurrent requests to one decoder into shared batches (see the module doc)."""

    def __init__(
        self,
        decoder: MavisDecoder,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        batch_wait_s: float = 0.0,
        idle_s: float = 5.0,
    ) -> None:
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.idle_s = idle_s
        """The decoding thread exits after this long without work (and starts again on demand)."""
        self.stats = SchedulerStats()
        self._closing = False
        self._reset()
        _SCHEDULERS.add(self)

    def close(self, timeout: float | None = None) -> None:
        """Stop the decoding thread once the queue is empty (waiting up to ``timeout`` seconds);
        a later request starts it again."""
        with self._lock():
            self._closing = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._closing = False

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._thread: threading.Thread | None = None

    # -- the caller's side ------------------------------------------------------------------

    def stream(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
        row_options: Sequence[RowOptions] | None = None,
    ) -> Iterator[StreamStep]:
        """Decode ``prompts`` (as `MavisDecoder.stream`), sharing batches with other callers.
        Validation errors are raised here, before anything is queued."""
        request = self.submit(prompts, weights, config, seeds, grammars, row_options)
        return self._iterate(request)

    def _iterate(self, request: _Request) -> Iterator[StreamStep]:
        try:
            while True:
                item = request.sink.sync.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()

    async def astream(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
        row_options: Sequence[RowOptions] | None = None,
    ) -> AsyncIterator[StreamStep]:
        """As `stream`, awaiting each step on the running event loop (no executor thread)."""
        request = self.submit(prompts, weights, config, seeds, grammars, row_options, loop=asyncio.get_running_loop())
        assert request.sink.aqueue is not None
        try:
            while True:
                item = await request.sink.aqueue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()

    def generate(self, *args: Any, **kwargs: Any) -> list[Generation]:
        """Decode to the end (arguments as `stream`); one `Generation` per prompt, in order."""
        return _collect(self.stream(*args, **kwargs))

    async def agenerate(self, *args: Any, **kwargs: Any) -> list[Generation]:
        """As `generate`, awaited."""
        steps = [step async for step in self.astream(*args, **kwargs)]
        return _collect(iter(steps))

    def submit(
        self,
        prompts: Sequence[str],
        weights: Weights | Sequence[Weights] | None,
        config: DecodeConfig,
        seeds: Sequence[int] | None = None,
        grammars: Sequence[Grammar | None] | None = None,
        row_options: Sequence[RowOptions] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> _Request:
        """Validate a request and queue it.

        Raises:
            DecodingParameterError, InvalidWeightError, UnknownObjectiveError, GrammarError:
                the request's own arguments are bad.
            EngineBusyError: ``max_queue`` requests are already waiting.
        """
        decoder = self.decoder
        batch = len(prompts)
        rows = _weight_rows(weights, batch)
        weight_matrix(rows, decoder.objectives)  # validates every row
        row_seeds = decoder.row_seeds(config, seeds, batch)
        row_cfgs = decoder.row_configs(config, row_options, batch)
        lengths = decoder.base.tokenizer(list(prompts))["input_ids"] if batch else []
        for row_cfg, ids in zip(row_cfgs, lengths, strict=True):
            decoder.check(row_cfg, len(ids))
        constraints = decoder.constraints(grammars, batch)
        request = _Request(
            prompts=list(prompts),
            weights=rows,
            seeds=row_seeds,
            constraints=constraints,
            # Every row carries its own request's limits and stops, resolved here: a batch runs
            # under its first request's config, whose fields would fill any left unset.
            options=[RowOptions(c.max_new_tokens, c.min_new_tokens, c.stop) for c in row_cfgs],
            config=config,
            sink=_Sink(loop),
            remaining=batch,
        )
        if batch == 0:
            request.sink.put(_END)
            return request
        with self._lock():
            if len(self._queue) >= self.max_queue:
                raise EngineBusyError(
                    f"the engine's queue is full: {len(self._queue)} requests are waiting (max_queue="
                    f"{self.max_queue}, MAVIS_MAX_QUEUE); retry later or raise the limit"
                )
            self._queue.append(request)
            self.stats.requests += 1
            self.stats.submitted_at = [*self.stats.submitted_at[-63:], time.monotonic()]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mavis-batch-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return request

    def _lock(self) -> threading.Condition:
        if self._pid != os.getpid():  # a forked child (a prefork worker): the parent's thread is not here
            self._reset()
        return self._cond

    # -- the decoding thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._decode(batch)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled.is_set():
                    self._queue.popleft().sink.put(_END)
                if self._queue:
                    break
                if self._closing or (not self._cond.wait(timeout=self.idle_s) and not self._queue):
                    self._thread = None
                    return None
            first = self._queue.popleft()
            key = first.key
            if self.batch_wait_s > 0:
                # Counted from the first request's arrival: one that already waited through a
                # batch starts at once with whatever else is queued.
                deadline = first.submitted + self.batch_wait_s
                while self._rows_like(key) + len(first.prompts) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
            batch, rows = [first], len(first.prompts)
            for request in list(self._queue):
                if request.key == key and rows + len(request.prompts) <= self.max_batch_size:
                    self._queue.remove(request)
                    if request.cancelled.is_set():
                        request.sink.put(_END)
                        continue
                    batch.append(request)
                    rows += len(request.prompts)
            return batch

    def _rows_like(self, key: tuple[float, int, float, bool]) -> int:
        return sum(len(r.prompts) for r in self._queue if r.key == key)

    def _decode(self, batch: list[_Request]) -> None:
        if len(batch) == 1 and len(batch[0].prompts) > self.max_batch_size:
            self._decode_in_chunks(batch[0])
            return
        spans: list[tuple[int, int]] = []
        start = 0
        for request in batch:
            spans.append((start, start + len(request.prompts)))
            start += len(request.prompts)
        self.stats.count_batch(start, len(batch))
        open_requests = set(range(len(batch)))
        try:
            steps = self.decoder.stream(
                [p for r in batch for p in r.prompts],
                [w for r in batch for w in r.weights],
                batch[0].config,
                seeds=[s for r in batch for s in r.seeds],
                grammars=[c for r in batch for c in r.constraints],
                row_options=[o for r in batch for o in r.options],
            )
            try:
                for step in steps:
                    for i in list(open_requests):
                        request, (lo, hi) = batch[i], spans[i]
                        if request.cancelled.is_set():
                            open_requests.discard(i)
                            request.sink.put(_END)
                            continue
                        finished = step.finished[lo:hi]
                        deltas = step.deltas[lo:hi]
                        news = any(deltas) or any(f is not None for f in finished)
                        if news and not request.sink.put(StreamStep(deltas=deltas, finished=finished)):
                            request.cancelled.set()
                        request.remaining -= sum(f is not None for f in finished)
                        if request.remaining == 0:
                            open_requests.discard(i)
                            request.sink.put(_END)
                    if not open_requests:
                        break
            finally:
                steps.close()  # type: ignore[attr-defined]
        except Exception as exc:  # delivered to every request still waiting; the thread goes on
            for i in open_requests:
                batch[i].sink.put(exc)
            open_requests.clear()
        finally:
            for i in open_requests:  # never leave a caller waiting
                batch[i].sink.put(_END)

    def _decode_in_chunks(self, request: _Request) -> None:
        """A request of more rows than ``max_batch_size`` (one ``batch`` call of many inputs):
        its rows decode in consecutive batches of at most that many, so memory stays bounded as
        for merged requests; the caller sees one stream of all its rows (each row's output is
        the same in any batch)."""
        width, size = len(request.prompts), self.max_batch_size
        try:
            for lo in range(0, width, size):
                hi = min(width, lo + size)
                if request.cancelled.is_set():
                    break
                self.stats.count_batch(hi - lo, 1)
                steps = self.decoder.stream(
                    request.prompts[lo:hi],
                    request.weights[lo:hi],
                    request.config,
                    seeds=request.seeds[lo:hi],
                    grammars=request.constraints[lo:hi],
                    row_options=request.options[lo:hi],
                )
                try:
                    for step in steps:
                        if request.cancelled.is_set():
                            break
                        news = any(step.deltas) or any(f is not None for f in step.finished)
                        if news and not request.sink.put(_widen(step, lo, width)):
                            request.cancelled.set()
                            break
                        request.remaining -= sum(f is not None for f in step.finished)
                finally:
                    steps.close()  # type: ignore[attr-defined]
        except Exception as exc:  # delivered to the caller; the thread goes on
            request.sink.put(exc)
            return
        request.sink.put(_END)


def _widen(step: StreamStep, lo: int, width: int) -> StreamStep:
    """``step`` of rows [lo, lo + len(step.deltas)) as a step of all ``width`` rows of its request."""
    hi = lo + len(step.deltas)
    deltas: list[str] = [""] * width
    finished: list[Generation | None] = [None] * width
    deltas[lo:hi] = step.deltas
    finished[lo:hi] = step.finished
    return StreamStep(deltas=deltas, finished=finished)


def _collect(steps: Iterator[StreamStep]) -> list[Generation]:
    results: dict[int, Generation] = {}
    for step in steps:
        for b, finished in enumerate(step.finished):
            if finished is not None:
                results[b] = finished
    return [results[b] for b in sorted(results)]
