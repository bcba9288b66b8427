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

Two kernels differ from what transformers runs under `torch.compile` by default:

- attention of the one new token (`decode_attention`): a grouped-query model's query heads are
  folded onto its key/value heads, as transformers' eager path already does, instead of
  `repeat_kv` copying every layer's whole static cache to the query heads' count at every step
  (a cost that grew with the cache length and was about a tenth of a batch-8 step on CPU);
- the LM head on CPU in float32 (`PackedOutputHead`): from the first step of
  `PACKED_HEAD_MIN_ROWS` rows on, its weight reordered once into oneDNN's blocked layout, which
  for 4-16 rows runs about 1.5-2.5x faster than the plain GEMM over the 49152-row SmolLM2 head, at
  the price of one more copy of that weight (113 MiB for SmolLM2); for 1 to 3 rows the plain GEMM
  is as fast, so a process that decodes no more rows at once never makes the copy.

Both sum in another order than eager's, within the compiled path's documented tolerance.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mavis_lc.base_model import with_cache
from mavis_lc.decoding import packed_linear
from mavis_lc.decoding.few_rows import FewRowsLinear, kernel_unavailable_reason
from mavis_lc.decoding.packed_linear import PackedLinears, packed_copy, unpackable_reason
from mavis_lc.value_models.base import prompt_positions

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = 128
"""Cache lengths are rounded up to a multiple of this, so nearby lengths share a compiled step."""


DECODE_ATTENTION = "mavis_sdpa"
"""The attention implementation the compiled step runs under, registered with transformers: SDPA
with `decode_attention`'s single-token path; its masks are SDPA's."""


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except while compiling one query token of a grouped-query
    model: then the query's heads are folded onto the key/value heads, (B, H, 1, d) ->
    (B, H_kv, H / H_kv, d), and attend on the cache as it is, with no `repeat_kv` copy of it.

    Outside a compile every call is transformers' own `sdpa_attention_forward`, so an eager
    forward under this implementation computes exactly what it computes under ``sdpa``."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    if (
        not torch.compiler.is_compiling()
        or query.shape[2] != 1
        or groups == 1
        or attention_mask is None
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions")
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, heads // groups, groups, dim)  # (B, H_kv, G, d)
    mask = attention_mask  # (B, 1, 1, L) shared by the heads, or (B, H, 1, L)
    if mask.shape[1] != 1:
        mask = mask.reshape(mask.shape[0], heads // groups, groups, mask.shape[-1])
    out = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=float(kwargs.get("dropout", 0.0)), scale=kwargs.get("scaling")
    )  # (B, H_kv, G, d_v)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None  # (B, 1, H, d_v)


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)

_swap_lock = threading.Lock()
_swaps: dict[int, int] = {}  # id(config) -> compiled steps running under DECODE_ATTENTION


@contextlib.contextmanager
def _decode_attention(config: Any) -> Iterator[None]:
    """Run under `DECODE_ATTENTION` while any compiled step of this config runs (an SDPA model only).

    Eager forwards of the same model on other threads meanwhile compute exactly what they
    compute under ``sdpa``: outside a compile `decode_attention` is SDPA itself."""
    key = id(config)
    with _swap_lock:
        if _swaps.get(key, 0) == 0 and getattr(config, "_attn_implementation", None) != "sdpa":
            swapped = False
        else:
            swapped = True
            _swaps[key] = _swaps.get(key, 0) + 1
            config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        if swapped:
            with _swap_lock:
                _swaps[key] -= 1
                if _swaps[key] == 0:
                    del _swaps[key]
                    config._attn_implementation = "sdpa"


PACKED_HEAD_MIN_ROWS = 4
"""`PackedOutputHead` runs the head itself for fewer rows: SmolLM2's head on 2 CPU cores took
3.2 / 3.2 / 4.5 ms plain against 3.2 / 3.7 / 4.5 ms packed at 1 / 2 / 3 rows, and 7.7 against
4.3 ms at 4 rows (medians of 40 calls)."""


class PackedOutputHead:
    """A bias-free linear LM head on CPU in float32, its weight reordered once into oneDNN's
    blocked layout for small row counts, the way serving engines run it, lazily: at the first call
    of at least ``min_rows`` rows (fewer rows run the head itself, as fast without the copy). The
    head's other forms, and any platform where the reorder or its check fails, use the head
    itself (the reason is kept in `fallback_reason`)."""

    def __init__(
        self,
        head: nn.Module,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        min_rows: int = PACKED_HEAD_MIN_ROWS,
    ) -> None:
        self.head = head
        self.transform = transform
        self.min_rows = min_rows
        self._packed: torch.Tensor | None = None
        self.fallback_reason: str | None = self._unpackable(head)

    @staticmethod
    def _unpackable(head: nn.Module) -> str | None:
        if not isinstance(head, nn.Linear) or head.bias is not None:
            return "the LM head is not a bias-free nn.Linear"
        reason = unpackable_reason(head)
        return None if reason is None else f"the LM head: {reason}"

    def _pack(self) -> torch.Tensor | None:
        assert isinstance(self.head, nn.Linear)
        packed, reason = packed_copy(self.head.weight.detach(), None, 32)
        if packed is None:
            self.fallback_reason = reason
            logger.info("LM head runs unpacked: %s", self.fallback_reason)
        return packed

    @property
    def packed(self) -> bool:
        """Whether the packed copy exists (it is made at the first call of ``min_rows`` rows)."""
        return self._packed is not None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) from final states (B, d), post-processed as the model's forward does."""
        wide = hidden.shape[0] >= self.min_rows and hidden.dtype == torch.float32
        if wide and self.fallback_reason is None and self._packed is None:
            self._packed = self._pack()
        if wide and self._packed is not None:
            logits = torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self._packed, None, "none", [], "")
        else:
            logits = self.head(hidden)
        return logits if self.transform is None else self.transform(logits)


def compile_unavailable_reason() -> str | None:
    """Why `torch.compile` cannot run here, or None when it can be tried."""
    try:
        import torch._dynamo as dynamo
    except Exception as exc:  # pragma: no cover - torch builds without dynamo
        return f"torch._dynamo does not import: {exc}"
    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python or platform"
    return None


def _compile_options() -> dict[str, Any] | None:
    """No guards on the backbone's modules: the base is frozen and its modules are never replaced,
    and checking a 135M model's parameters on every step costs about 1.5 ms of a 55 ms batch-8 step
    on CPU. (Parameters updated in place are still read by the graph.)"""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {"guard_filter_fn": skip} if skip is not None else None


def _install_output_capturing(backbone: nn.Module) -> None:
    """Install transformers' hidden-state capturing hooks now, eagerly. A forward asked for
    ``output_hidden_states`` installs them at its first call, under a lock that `torch.compile`
    cannot trace: the compiled step of a decoder with side branches broke its graph there and ran
    as three compiled frames, each with its own guard checks, instead of one graph (on CPU the
    whole decode's speed did not measurably change; a CUDA graph cannot span a break). Once
    installed, the forward's check is a plain attribute read. transformers without these hooks:
    nothing to do."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # pragma: no cover - transformers without output-capturing hooks
        return
    if isinstance(backbone, PreTrainedModel):
        maybe_install_capturing_hooks(backbone)


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
        output_head: nn.Module | None = None,
        logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        embeds: bool = False,
        pack_weights: bool = False,
        few_rows: bool = True,
    ) -> None:
        """``output_head`` (and the model's ``logit_transform``): the LM head that `logits` runs,
        packed where it can be (`PackedOutputHead`). ``embeds``: the stack is fed embeddings,
        (B, P, d) at `start` and (B, d) per `step`, instead of token ids (a side branch).
        ``pack_weights``: the stack's large linear layers run on oneDNN-packed copies of their
        weights (`mavis_lc.decoding.packed_linear`), made at the first `start`: faster, and one
        more copy of those weights in memory. ``few_rows``: the step's other linear layers run the
        few-rows kernel (`mavis_lc.decoding.few_rows`) where it is available."""
        self.backbone = backbone
        self._few_rows = few_rows
        self._input_keyword = "inputs_embeds" if embeds else "input_ids"
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
        if self.tap_layers:
            _install_output_capturing(backbone)
        if self.fallback_reason is None:
            forward = self._forward_packed if pack_weights else self._forward
            self._compiled = torch.compile(forward, dynamic=False, fullgraph=False, options=_compile_options())
        self.output_head = PackedOutputHead(output_head, logit_transform) if output_head is not None else None
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._cache: StaticCache | None = None
        self._mask: torch.Tensor | None = None
        self._length = 0
        self.pack_weights = pack_weights
        self.packed: PackedLinears | None = None
        """The packed copies (``pack_weights``), once the first `start` has made them."""

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

        ``input_ids``: (B, P) token ids, or (B, P, d) embeddings for a stack built with ``embeds``.

        ``taps`` is an entered `LayerTap` (or a no-op one) that captures the prefill's layer inputs."""
        batch, prompt = input_ids.shape[:2]
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
        if self.pack_weights and self.packed is None:
            self.packed = PackedLinears(
                self.backbone, min_parameters=packed_linear.MIN_PACKED_PARAMETERS, batch_hint=batch
            )
        with taps, self._routed():
            states = self.backbone(
                **{self._input_keyword: input_ids},
                attention_mask=self._mask,
                position_ids=position_ids,
                cache_position=torch.arange(prompt, device=input_ids.device),
                **with_cache(self.backbone, cache),
                use_cache=True,
            ).last_hidden_state
        return states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) from final states (B, d), through the packed LM head."""
        if self.output_head is None:
            raise RuntimeError("StaticDecodeStep was built without an output_head")
        return self.output_head(hidden)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Feed one token per row, (B,) (or one embedding, (B, d)), at ``positions`` (B,): the new
        final states (B, d) and each tap layer's input, (B, 1, d)."""
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
                with _decode_attention(self.model_config), self._kernels():
                    out = self._compiled(*args)
            except Exception as exc:  # inductor without a C compiler, an unsupported op, ...
                self.fallback_reason = f"torch.compile failed ({type(exc).__name__}: {exc})"
                logger.warning("decode step runs eagerly from now on: %s", self.fallback_reason)
                self._compiled = None
                with self._kernels():
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
        with self._kernels():
            return self._forward(*args)

    def _kernels(self) -> contextlib.ExitStack[bool | None]:
        """Where a step's linear layers run: packed copies (``pack_weights``), and the few-rows
        kernel for the others on a float32 CPU stack where it is available."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._routed())
        if self.few_rows_reason is None:
            stack.enter_context(FewRowsLinear())
        return stack

    @functools.cached_property
    def few_rows_reason(self) -> str | None:
        """Why the step's linear layers do not run the few-rows kernel (None: they do);
        decided at the first step, which builds the kernel if need be."""
        if not self._few_rows:
            return "few_rows=False"
        weight = next(self.backbone.parameters(), None)
        if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
            return "the stack is not float32 on CPU"
        return kernel_unavailable_reason()

    def _routed(self) -> contextlib.AbstractContextManager[None]:
        return self.packed.routed() if self.packed is not None else contextlib.nullcontext()

    def _forward_packed(self, *args: Any) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`_forward` under its own code object, so that its compiled graphs (which call the packed
        layers) are cached apart from the unpacked ones: guards skip the base's modules, so a graph
        traced through one step's routed layers would otherwise serve another step's plain ones."""
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
            **{self._input_keyword: tokens},
            attention_mask=mask,
            position_ids=positions,
            cache_position=cache_position,
            **{self._cache_keyword: cache},
            use_cache=True,
            output_hidden_states=bool(self.tap_layers),
        )
        taps = {i: out.hidden_states[i] for i in self.tap_layers} if self.tap_layers else {}
        return out.last_hidden_state[:, -1], taps


class StaticBranchState:
    """A side branch's decode state on its own compiled static-cache step (`StaticDecodeStep`
    built with ``embeds=True`` over the branch's layers): the `KVBatch` interface a side branch
    decodes through (`prefill`, `feed`, `hidden`), for a decode whose rows all advance every step.

    ``max_new_tokens`` sizes the cache; ``dtype`` is the branch's (the base's states are cast to it).
    """

    def __init__(self, step: StaticDecodeStep, max_new_tokens: int, dtype: torch.dtype) -> None:
        self.step = step
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self.hidden = torch.zeros(0, 0)  # (B, d) the branch's final state at each row's last token
        self.next_position = torch.zeros(0, dtype=torch.long)  # (B,)

    def prefill(self, taps: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """``taps``: the base's layer inputs over the left-padded prompts, (B, P, d); mask (B, P)."""
        position_ids = prompt_positions(attention_mask)  # (B, P)
        states = self.step.start(
            taps.to(self.dtype), attention_mask, position_ids, self.max_new_tokens, contextlib.nullcontext()
        )  # (B, P, d)
        self.hidden = states[:, -1]
        self.next_position = attention_mask.sum(-1)  # (B,)

    def feed(self, taps: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Append one position per row: the base's layer input at the new token, (B, d)."""
        if active is not None and not bool(active.all()):
            raise ValueError("a static branch state advances every row each step (active must be all True)")
        self.hidden, _ = self.step.step(taps.to(self.dtype), self.next_position)
        self.next_position = self.next_position + 1

    def select(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static branch state keeps its rows; use a KVBatch to select or fan out rows")
