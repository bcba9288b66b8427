"""Sampling noise: the Exp(1) draws with which `torch.multinomial` samples one token, per row.

`torch.multinomial(p, 1)` is ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn over the whole
vocabulary from the caller's generator. MAVIS samples among the top-k candidates only, so it needs
``q`` at k positions of a row; but to sample exactly what plain top-k sampling with the row's seed
samples, it must take those k values from the same stream, and leave the stream where a whole
vocabulary's draws leave it. On CPU that draw is most of a step's sampling cost (SmolLM2's 49152
tokens: about 0.9 ms per row, 7 ms of a batch-8 step on 2 cores).

`RowNoise` keeps each row's stream and evaluates only what the step reads. A CPU generator is a
Mersenne Twister (MT19937) whose ``exponential_`` turns two 32-bit words into one 53-bit uniform
``u`` and returns ``-log1p(-u)``: `RowNoise` copies the generator's state into numpy's MT19937
(the same engine, with a vectorised raw-word loop that releases the GIL), takes the
vocabulary's 2V words in one call, and transforms only the 2k at the candidates: about 0.3 ms
per row, and the same numbers bit for bit. That equivalence rests on torch's generator layout, so
it is checked against torch's own draws once per process (`fast_path_unavailable_reason`);
wherever the check fails, and on other devices, each row draws its whole vocabulary through torch
as before (`row_noise`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

logger = logging.getLogger(__name__)

_STATE_WORDS = 624  # MT19937's state: torch stores it as 624 uint64 after seed, left, seeded, next
_LEFT = slice(8, 12)  # int32: draws left before the next twist, plus one
_STATE = slice(24, 24 + 8 * _STATE_WORDS)
_LOW_53 = np.uint64((1 << 53) - 1)

_noise_pool: ThreadPoolExecutor | None = None
_noise_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _noise_pool
    with _noise_pool_lock:
        if _noise_pool is None:
            workers = max(1, torch.get_num_threads())
            _noise_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mavis-noise")
        return _noise_pool


def _per_row(rows: int, fill: Callable[[range], None]) -> None:
    """``fill(part)`` over contiguous chunks of ``rows``, one per intra-op thread where there are
    several (the draws release the GIL); a worker's exception is raised here."""
    workers = min(rows, max(1, torch.get_num_threads()))
    if workers < 2:
        fill(range(rows))
        return
    bounds = [rows * w // workers for w in range(workers + 1)]
    list(_pool().map(fill, [range(bounds[w], bounds[w + 1]) for w in range(workers)]))


def row_noise(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Exp(1) noise (B, V), row b drawn from ``generators[b]`` over the whole vocabulary, as
    `torch.multinomial` draws it for one sample; each row gets exactly the numbers its generator
    gives alone, and on CPU the rows are split among the intra-op threads."""
    noise = torch.empty_like(like)  # (B, V)
    if like.device.type != "cpu":
        for b, g in enumerate(generators):
            noise[b].exponential_(generator=g)
        return noise
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers enter it too

    def fill(part: range) -> None:
        with torch.inference_mode(inference):
            for b in part:
                noise[b].exponential_(generator=generators[b])

    _per_row(len(generators), fill)
    return noise


def _mirror(generator: torch.Generator) -> np.random.MT19937:
    """numpy's MT19937 at the state of a torch CPU generator: its next raw words are the generator's."""
    raw = generator.get_state().numpy()
    left = int(raw[_LEFT].view(np.int32)[0])
    engine = np.random.MT19937()
    key = raw[_STATE].view(np.uint64).astype(np.uint32)
    engine.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _STATE_WORDS + 1 - left}}
    return engine


def _exponential_at(engine: np.random.MT19937, vocab_size: int, index: np.ndarray) -> np.ndarray:
    """Advance ``engine`` by one vocabulary's Exp(1) draws (two words each); the draws at ``index``."""
    words = engine.random_raw(2 * vocab_size)  # (2V,) uint64 holding 32-bit words
    high, low = words[2 * index], words[2 * index + 1]
    uniform = (((high << np.uint64(32)) | low) & _LOW_53).astype(np.float64) * 2.0**-53
    return -np.log1p(-uniform)  # float64, as torch computes it before the cast to the tensor's dtype


@cache
def fast_path_unavailable_reason() -> str | None:
    """Why `RowNoise` draws through torch in this process (None: its fast path matched torch's own
    draws, values and the generator's state after them, on a probe)."""
    try:
        vocab, index = 1000, np.array([0, 1, 2, 499, 998, 999])
        for seed in (0, 2**40 + 7):
            reference, probe = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            engine = _mirror(probe)
            for _ in range(2):
                want = torch.empty(vocab).exponential_(generator=reference).numpy()[index]
                got = _exponential_at(engine, vocab, index).astype(np.float32)
                if not np.array_equal(want, got):
                    return "numpy's MT19937 does not reproduce torch's exponential_ draws in this build"
            after, mirrored = _mirror(reference).state["state"], engine.state["state"]
            if after["pos"] != mirrored["pos"] or not np.array_equal(after["key"], mirrored["key"]):
                return "numpy's MT19937 does not track torch's generator state in this build"
    except Exception as exc:  # another state layout, a numpy without MT19937.random_raw, ...
        return f"torch's generator state could not be mirrored ({type(exc).__name__}: {exc})"
    return None


class RowNoise:
    """One noise stream per row: each `at` call is one sampling step, and returns what a whole
    vocabulary's ``exponential_`` draw from the row's generator holds at the step's candidates.

    The generators are read once, at construction, and not advanced: the streams live here (one
    decode's rows).
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)
        on_cpu = all(g.device.type == "cpu" for g in self.generators)
        self.fallback_reason: str | None = fast_path_unavailable_reason() if on_cpu else "generators not on CPU"
        """Why every row draws its whole vocabulary through torch (None: the fast path)."""
        if self.fallback_reason is not None and on_cpu:
            logger.info("sampling noise drawn through torch: %s", self.fallback_reason)
        self._engines = [_mirror(g) for g in self.generators] if self.fallback_reason is None else []

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> RowNoise:
        return cls([torch.Generator(device=device).manual_seed(s) for s in seeds])

    def at(self, candidates: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Noise (B, k) at ``candidates`` (B, k), in ``like``'s dtype and on its device: ``like`` is
        the step's (B, V) logits, one row per stream, and each stream advances by V draws."""
        if candidates.shape[0] != len(self.generators) or like.shape[0] != len(self.generators):
            raise ValueError(
                f"{len(self.generators)} noise streams, but {candidates.shape[0]} rows of candidates "
                f"and {like.shape[0]} rows of logits"
            )
        if self.fallback_reason is not None:
            return row_noise(like, self.generators).gather(1, candidates)
        vocab = like.shape[-1]
        index = candidates.cpu().numpy()
        out = np.empty(index.shape, dtype=np.float64)

        def fill(part: range) -> None:
            for b in part:
                out[b] = _exponential_at(self._engines[b], vocab, index[b])

        _per_row(len(self._engines), fill)
        return torch.from_numpy(out).to(device=like.device, dtype=like.dtype)
