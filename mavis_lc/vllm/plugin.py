"""The vLLM side of the plugin: model classes that keep the hidden states, and the logits processor.

Imported only inside vLLM's processes (it imports vLLM). See `mavis_lc.vllm` for how to serve.

- ``Mavis<Family>ForCausalLM`` subclasses vLLM's own class for the family and keeps the final,
  post-norm hidden states its ``compute_logits`` receives (exactly the rows vLLM samples next,
  in the order of the logits rows) in `_CAPTURED`, keyed by the engine's ``VllmConfig``, which
  the worker's logits processors receive too; nothing else changes.
- `MavisLogitsProcessor` reads each request's ``mavis_*`` extra args (`mavis_lc.vllm.args`),
  refuses bad ones in its validation hook (vLLM answers HTTP 400), and for the steered rows
  takes the top-k of the logits it is given (grammar masks, ``min_tokens`` and logit biases are
  applied before it), scores the candidates with the shared heads on the kept hidden states,
  and writes ``logits + T * beta * sum_m w_m Q_m`` on them and ``-inf`` elsewhere: vLLM divides
  by the request's temperature T afterwards, so the request samples from
  ``pi_ref^k(a) exp(beta * sum_m w_m Q_m(s, a))``, as `mavis_lc.decoding.mavis_step` does.
  A greedy request (T = 0) reads the tilt at T = 1, as mavis-lc's decoder does. Rows without
  MAVIS arguments are left untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from mavis_lc.vllm import MODEL_CLASSES
from mavis_lc.vllm.args import MavisArgumentError, Steering, parse_steering
from mavis_lc.vllm.heads import HEADS_ENV, checkpoint_base, describe, head_specs, load_heads, spec_objective

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

_LOG = logging.getLogger("vllm.mavis_lc")  # under vLLM's logger, so its handlers print it

_CAPTURED: dict[int, torch.Tensor] = {}
"""id(VllmConfig) -> the hidden states (N, d) of the last ``compute_logits`` call in this process."""
_MODELS: set[int] = set()
"""id(VllmConfig) of every engine whose model is a Mavis class, in this process."""


class _KeepsHiddenStates:
    """Mixin for vLLM model classes: record ``compute_logits``'s input for the logits processor."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)  # type: ignore[call-arg]
        self._mavis_key = id(vllm_config)
        _MODELS.add(self._mavis_key)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        _CAPTURED[self._mavis_key] = hidden_states
        return super().compute_logits(hidden_states)  # type: ignore[misc, no-any-return]


class MavisLlamaForCausalLM(_KeepsHiddenStates, LlamaForCausalLM):  # type: ignore[misc]
    """vLLM's Llama (SmolLM2, Llama 2/3, ...) keeping its final hidden states for MAVIS."""


class MavisMistralForCausalLM(_KeepsHiddenStates, MistralForCausalLM):  # type: ignore[misc]
    """vLLM's Mistral keeping its final hidden states for MAVIS."""


class MavisQwen2ForCausalLM(_KeepsHiddenStates, Qwen2ForCausalLM):  # type: ignore[misc]
    """vLLM's Qwen2 keeping its final hidden states for MAVIS."""


class MavisQwen3ForCausalLM(_KeepsHiddenStates, Qwen3ForCausalLM):  # type: ignore[misc]
    """vLLM's Qwen3 keeping its final hidden states for MAVIS."""


_objectives_lock = threading.Lock()
_objectives: dict[tuple[str, ...], list[str]] = {}


def served_objectives() -> list[str]:
    """The objectives of the configured heads (``MAVIS_VLLM_HEADS``), read once per process."""
    specs = tuple(head_specs())
    with _objectives_lock:
        if specs not in _objectives:
            _objectives[specs] = [spec_objective(s) for s in specs]
        return _objectives[specs]


class MavisLogitsProcessor(LogitsProcessor):
    """MAVIS steering as a vLLM (V1) logits processor; see the module docstring."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a request's bad MAVIS arguments before it is admitted (vLLM: HTTP 400)."""
        steering = parse_steering(sampling_params.extra_args, served_objectives())
        if steering is None:
            return
        vllm_k = sampling_params.top_k
        if vllm_k is not None and 0 < vllm_k < steering.top_k:
            raise MavisArgumentError(
                f"top_k {vllm_k} is below mavis_top_k {steering.top_k}: leave top_k unset (MAVIS takes the top "
                "mavis_top_k candidates itself) or set it >= mavis_top_k"
            )

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._key = id(vllm_config)
        self.device = device
        model_config = vllm_config.model_config
        architectures = list(getattr(model_config.hf_config, "architectures", None) or [])
        if not any(a in MODEL_CLASSES for a in architectures):
            raise MavisArgumentError(
                f"the MAVIS logits processor needs a Mavis model class, got architectures {architectures}: start "
                f'vLLM with --hf-overrides \'{{"architectures": ["MavisLlamaForCausalLM"]}}\' (one of '
                f"{sorted(MODEL_CLASSES)})"
            )
        specs = head_specs()
        if not specs:
            raise MavisArgumentError(f"no MAVIS heads configured: set {HEADS_ENV} to comma-separated head specs")
        tokenizer = getattr(model_config, "tokenizer", None)
        base = checkpoint_base(model_config.model, tokenizer if tokenizer != model_config.model else None)
        # the heads score through the embeddings they are given: on the worker's device
        base = dataclasses.replace(base, token_embeddings=base.token_embeddings.to(device), device=device)
        self.heads = load_heads(specs, base)  # on base.device: the worker's
        self.objectives = [h.objective for h in self.heads]
        _LOG.info("MAVIS heads loaded on %s: %s", device, describe(self.heads))
        self._rows: dict[int, tuple[Steering, float, torch.Tensor]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # the tilt changes which token is most probable, greedy requests included

    def _row_state(
        self, params: SamplingParams, _prompt: list[int] | None, _output: list[int]
    ) -> tuple[Steering, float, torch.Tensor] | None:
        steering = parse_steering(params.extra_args, self.objectives)
        if steering is None:
            return None
        temperature = float(params.temperature) if params.temperature and params.temperature > 0 else 1.0
        weights = torch.tensor([steering.weights.get(o, 0.0) for o in self.objectives], dtype=torch.float32)
        return steering, temperature, weights.to(self.device)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._row_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        if self._key not in _MODELS:
            raise RuntimeError("MAVIS: the served model is not a Mavis model class (see --hf-overrides)")
        hidden = _CAPTURED.get(self._key)
        if hidden is None or hidden.shape[0] != logits.shape[0]:
            raise RuntimeError(
                f"MAVIS: kept hidden states {None if hidden is None else tuple(hidden.shape)} do not match "
                f"the logits {tuple(logits.shape)}"
            )
        by_k: dict[int, list[int]] = {}
        for row, (steering, _, _) in self._rows.items():
            by_k.setdefault(steering.top_k, []).append(row)
        for k, rows in by_k.items():
            self._tilt(logits, hidden, rows, k)
        return logits

    def _tilt(self, logits: torch.Tensor, hidden: torch.Tensor, rows: list[int], k: int) -> None:
        """Tilt ``rows`` of ``logits`` (N, V) in place over their top-``k``."""
        index = torch.tensor(rows, device=logits.device)  # (R,)
        states = [self._rows[r] for r in rows]
        temperature = torch.tensor([s[1] for s in states], device=logits.device)  # (R,)
        beta = torch.tensor([s[0].beta for s in states], device=logits.device)  # (R,)
        weights = torch.stack([s[2] for s in states])  # (R, M)
        sub = logits[index].float()  # (R, V)
        top, candidates = sub.topk(min(k, sub.shape[-1]), dim=-1)  # (R, k) each
        h = hidden[index].float()  # (R, d)
        with torch.inference_mode():
            q = torch.stack([head.q_values(h, candidates).float() for head in self.heads], dim=-1)  # (R, k, M)
        tilt = beta[:, None] * (q * weights[:, None, :]).sum(-1)  # (R, k)
        out = torch.full_like(sub, float("-inf"))  # (R, V)
        out.scatter_(1, candidates, top + temperature[:, None] * tilt)
        logits[index] = out.to(logits.dtype)
