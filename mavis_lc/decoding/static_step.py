"""The base model's decode forward over a static KV cache, compiled with `torch.compile`.

`MavisDecoder(compile=True)` decodes through a `StaticDecodeStep`: the prompt is prefilled
eagerly (its length varies: dynamic shapes only there), into a transformers `StaticCache` whose
length is the batch's longest prompt plus its longest answer, rounded up to a multiple of
``bucket``; every following step feeds one token per row at a fixed shape, (B, 1) tokens and a
(B, L) attention mask, so the compiled step is reused across steps and across calls with the
same batch size and length bucket. Compiling costs a one-time price per process and shape (tens
of seconds on CPU for a 135M model), which `StaticDecodeStep.compile_seconds` records and a log
line reports.

Where compilation is not available (`torch.compile` unsupported on this platform or Python, no C
compiler for inductor on CPU, or a compile error), the step logs the reason once and runs the
same forward eagerly on the same static cache, so a decode never fails for want of a compiler.

Layer inputs that side-branch value models read are taken from the backbone's per-layer hidden
states in the compiled step (``hidden_states[i]`` is layer i's input), not from hooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from transformers import StaticCache

from mavis_lc.base_model import with_cache

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = 128
"""Cache lengths are rounded up to a multiple of this, so nearby lengths share a compiled step."""


def compile_unavailable_reason() -> str | None:
    """Why `torch.compile` cannot run here, or None when it can be tried."""
    try:
        import torch._dynamo as dynamo
    except Exception as exc:  # pragma: no cover - torch builds without dynamo
        return f"torch._dynamo does not import: {exc}"
    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python or platform"
    return None


class StaticDecodeStep:
    """One base model's static-cache decode, compiled once per (batch size, cache length) shape.

    Shared by every decode of a `MavisDecoder`; a decode calls `start` (prefill) and then `step`
    once per generated token. Not re-entrant: one decode at a time per object (the decoder holds
    a lock around its use).
    """

    def __init__(
        self,
        backbone: nn.Module,
        model_config: Any,
        tap_layers: Collection[int] = (),
        *,
        compile: bool = True,
        bucket: int = DEFAULT_BUCKET,
        max_length: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.model_config = model_config
        self.tap_layers = sorted(set(tap_layers))
        self.bucket = bucket
        self.max_length = max_length
        self.compile_seconds: dict[tuple[int, int], float] = {}
        """Seconds the first step of each (batch, cache length) shape took to compile and run."""
        self.fallback_reason: str | None = None if compile else "compile=False"
        """Why the step runs eagerly (None: compiled)."""
        if compile:
            self.fallback_reason = compile_unavailable_reason()
            if self.fallback_reason is not None:
                logger.warning("decode step runs eagerly: %s", self.fallback_reason)
        self._cache_keyword = next(iter(with_cache(backbone, None)))  # looked up once, outside the graph
        self._compiled: Any = None
        if self.fallback_reason is None:
            self._compiled = torch.compile(self._forward, dynamic=False, fullgraph=False)
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._cache: StaticCache | None = None
        self._mask: torch.Tensor | None = None
        self._length = 0

    @property
    def compiled(self) -> bool:
        return self.fallback_reason is None

    def cache_length(self, prompt_length: int, max_new_tokens: int) -> int:
        """The static cache's length for a batch: prompt plus answer, rounded up to the bucket
        (but never past the model's context)."""
        need = prompt_length + max_new_tokens
        length = -(-need // self.bucket) * self.bucket
        return max(need, min(length, self.max_length)) if self.max_length else length

    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        max_new_tokens: int,
        taps: Any,
    ) -> torch.Tensor:
        """Prefill the prompt (eagerly) into a fresh static cache; the prompt's final states (B, P, d).

        ``taps`` is an entered `LayerTap` (or a no-op one) that captures the prefill's layer inputs."""
        batch, prompt = input_ids.shape
        length = self.cache_length(prompt, max_new_tokens)
        key = (batch, length)
        cache = self._caches.get(key)
        if cache is None:
            cache = StaticCache(config=self.model_config, max_cache_len=length)
            self._caches = {key: cache}  # one shape's cache kept: memory stays one cache's worth
        else:
            cache.reset()
        self._cache = cache
        self._mask = attention_mask.new_zeros(batch, length)
        self._mask[:, :prompt] = attention_mask
        self._length = prompt
        with taps:
            states = self.backbone(
                input_ids=input_ids,
                attention_mask=self._mask,
                position_ids=position_ids,
                cache_position=torch.arange(prompt, device=input_ids.device),
                **with_cache(self.backbone, cache),
                use_cache=True,
            ).last_hidden_state
        return states

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Feed one token per row, (B,), at ``positions`` (B,): the new final states (B, d) and
        each tap layer's input, (B, 1, d)."""
        if self._cache is None or self._mask is None:
            raise RuntimeError("start() must be called before step()")
        if self._length >= self._mask.shape[1]:
            raise RuntimeError(f"the static cache of {self._mask.shape[1]} positions is full")
        self._mask[:, self._length] = 1
        cache_position = torch.tensor([self._length], device=tokens.device)
        self._length += 1
        args = (tokens[:, None], self._mask, positions[:, None], cache_position, self._cache)
        if self._compiled is not None:
            key = (int(tokens.shape[0]), int(self._mask.shape[1]))
            first = key not in self.compile_seconds
            started = time.perf_counter()
            try:
                out = self._compiled(*args)
            except Exception as exc:  # inductor without a C compiler, an unsupported op, ...
                self.fallback_reason = f"torch.compile failed ({type(exc).__name__}: {exc})"
                logger.warning("decode step runs eagerly from now on: %s", self.fallback_reason)
                self._compiled = None
                return self._forward(*args)
            if first:
                self.compile_seconds[key] = time.perf_counter() - started
                logger.info(
                    "compiled the decode step for batch %d, cache length %d in %.1f s",
                    key[0],
                    key[1],
                    self.compile_seconds[key],
                )
            return out
        return self._forward(*args)

    def _forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache_position: torch.Tensor,
        cache: StaticCache,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        out = self.backbone(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            cache_position=cache_position,
            **{self._cache_keyword: cache},
            use_cache=True,
            output_hidden_states=bool(self.tap_layers),
        )
        taps = {i: out.hidden_states[i] for i in self.tap_layers} if self.tap_layers else {}
        return out.last_hidden_state[:, -1], taps
