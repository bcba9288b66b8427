"""The paper-faithful value model: a small causal LM of its own, sharing the base tokenizer.

The backbone is the base model's first N decoder layers and its final norm, copied and then
fine-tuned; it reads the base's token embeddings (borrowed, frozen, never saved), so it shares
the tokenizer by construction. It keeps its own KV cache while decoding (`begin` / `advance`)
and scores the k candidate next tokens in one of two modes:

- ``q_head``: the shared-backbone Q head on the small LM's hidden state h'(s),
  ``Q(s, a) = <W h'(s) + c, E_a> + b_a + v(s)``, free per candidate;
- ``scalar``: the reference's scalar head on the state *after* the candidate,
  ``Q(s, a) = V(s ⊕ a) = <w, h'(s ⊕ a)> + b``, all k candidates in one forward of k tokens that
  each attend to the prefix and to themselves only (a 4-D mask), the cache cropped afterwards.

Its incremental forwards are `mavis_lc.value_models.stacks.KVBatch`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import AutoModel

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ConfigurationError
from mavis_lc.value_models.base import ValueHeadConfig, ValueModel, frozen, prompt_positions
from mavis_lc.value_models.shared_head import SharedBackboneQHead
from mavis_lc.value_models.stacks import KVBatch, config_from_dict, embedding_matrix, layer_stack_config

SEPARATE_BACKBONE = "separate_backbone"
VALUE_MODES = ("q_head", "scalar")


class SeparateBackboneValueModel(ValueModel):
    """A value model with its own small causal LM (the base's first N layers, fine-tuned).

    ``config.options`` holds ``n_layers``, ``mode`` (one of `VALUE_MODES`) and
    ``model_config`` (the small LM's transformers config as a dict).
    """

    def __init__(self, config: ValueHeadConfig, token_embeddings: torch.Tensor) -> None:
        super().__init__()
        mode = config.options.get("mode")
        if mode not in VALUE_MODES:
            raise ConfigurationError(
                f"separate-backbone mode {mode!r} is not allowed; allowed: {', '.join(VALUE_MODES)}"
            )
        self.config = config
        self.mode: str = mode
        self.backbone = AutoModel.from_config(config_from_dict(config.options["model_config"]))
        self.backbone.embed_tokens = nn.Identity()  # embeddings come from the base, see `_embed`
        self._embeddings = token_embeddings.detach()
        if mode == "q_head":
            self.q_head: SharedBackboneQHead | None = SharedBackboneQHead(config, token_embeddings)
            self.value: nn.Linear | None = None
        else:
            self.q_head = None
            self.value = nn.Linear(config.hidden_size, 1)
            nn.init.zeros_(self.value.weight)
            nn.init.zeros_(self.value.bias)
        self._state: KVBatch | None = None

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        weight = self._embeddings.to(self.backbone.norm.weight.device)
        return weight[token_ids].to(self.backbone.norm.weight.dtype)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, taps: torch.Tensor | None = None) -> None:
        self._state = KVBatch(self.backbone, self._embed)
        self._state.prefill(input_ids, attention_mask)

    def advance(
        self, token_ids: torch.Tensor, active: torch.Tensor | None = None, taps: torch.Tensor | None = None
    ) -> None:
        """Append ``token_ids`` (B,); rows where ``active`` (B,) is False sit this step out."""
        self._require_state().feed(token_ids, active)

    def select_rows(self, indices: torch.Tensor) -> None:
        """Keep (and repeat) rows ``indices`` (R,) of the decoding batch, as `KVBatch.select`."""
        self._require_state().select(indices)

    def q_values(
        self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q for candidates (B, k) from this model's own state; ``hidden`` and ``prompt_hidden`` are not used."""
        state = self._require_state()
        if self.q_head is not None:
            return self.q_head.q_values(state.hidden, candidate_ids)  # (B, k)
        assert self.value is not None
        return self.value(state.candidate_hidden(candidate_ids)).squeeze(-1)  # (B, k)

    def sequence_q(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Training forward: Q(s_t, y_t) for every next token of left-padded sequences.

        Args:
            input_ids, attention_mask: (B, L).
        Returns:
            (B, L-1): entry t is Q(prefix ``input_ids[:, :t+1]``, action ``input_ids[:, t+1]``).
        """
        position_ids = prompt_positions(attention_mask)
        h = self.backbone(
            inputs_embeds=self._embed(input_ids), attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, L, d)
        batch, length, d = h.shape
        if self.q_head is not None:
            states = h[:, :-1].reshape(-1, d)  # (B*(L-1), d)
            actions = input_ids[:, 1:].reshape(-1, 1)  # (B*(L-1), 1)
            return self.q_head.q_values(states, actions).reshape(batch, length - 1)
        assert self.value is not None
        return self.value(h[:, 1:]).squeeze(-1)  # (B, L-1): V(s ⊕ a) at a's position

    def _require_state(self) -> KVBatch:
        if self._state is None:
            raise RuntimeError("begin() must be called before decoding with a separate-backbone value model")
        return self._state


def new_separate_backbone(
    base: BaseModel, objective: str, *, n_layers: int = 2, mode: str = "q_head", **config: Any
) -> SeparateBackboneValueModel:
    """A separate-backbone value model initialised from ``base``'s first ``n_layers`` layers and final norm.

    The heads start at zero, so a fresh model has Q = 0 everywhere.

    Raises:
        ConfigurationError: ``n_layers`` outside [1, base layers], or an unknown ``mode``.
    """
    base_config = base.model.config
    total = int(base_config.num_hidden_layers)
    if not 1 <= n_layers <= total:
        raise ConfigurationError(f"separate-backbone n_layers must be in [1, {total}], got {n_layers!r}")
    small_config = layer_stack_config(base_config, 0, n_layers)
    options = {**config.pop("options", {}), "n_layers": n_layers, "mode": mode, "model_config": small_config.to_dict()}
    cfg = ValueHeadConfig.for_base(base, objective, architecture=SEPARATE_BACKBONE, options=options, **config)
    model = SeparateBackboneValueModel(cfg, embedding_matrix(base))
    source: Any = base.model.base_model
    with torch.no_grad():
        for mine, theirs in zip(model.backbone.layers, source.layers, strict=False):
            mine.load_state_dict(theirs.state_dict())
        model.backbone.norm.load_state_dict(source.norm.state_dict())
    return model.to(device=base.device, dtype=torch.float32)  # trainable: fp32 whatever the base's dtype


def load_separate_backbone(
    config: ValueHeadConfig, tensors: dict[str, torch.Tensor], base: BaseModel
) -> SeparateBackboneValueModel:
    """Rebuild a saved separate-backbone value model on ``base`` (frozen, eval mode).

    Raises:
        ModelLoadError: the tensors do not match the architecture in ``config``.
    """
    return cast(
        SeparateBackboneValueModel, frozen(SeparateBackboneValueModel(config, embedding_matrix(base)), tensors, base)
    )
