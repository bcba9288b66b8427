"""The shared-backbone Q head: it reads the frozen base model's final hidden state h(s) and
scores candidates through the base's own token embeddings:

    Q(s, a) = <W h(s) + U p + u * p + c, E_a> + b_a + v(s),      v(s) = <w_v, h(s)> + b_v

``p`` is the prompt-pooled query (``options["prompt_query"]``, off by default): the mean of the
base's final hidden states over the user turn's tokens (``options["query_pool"] = "user"``,
`mavis_lc.query_span`; heads saved before it pool every prompt token, ``"all"``), computed once
at prefill, so a head can score how a candidate relates to the prompt as such (relevance), not
only through the last state. ``u`` (d) is a per-dimension scale of p, a vector that learns at the
vector rate where the d x d ``U`` learns at the matrix rate: with tied embeddings (SmolLM2)
``<u * p, E_a>`` is a weighted similarity between the candidate and what the user wrote. Without
the option neither term is present.

``v(s)`` is a per-state baseline: it does not change the tilt (softmax over candidates is
invariant to it) but lets regression on Monte Carlo targets separate "how good is this state"
from "how much better is this token". All parameters start at zero, so a fresh head has Q = 0
everywhere and MAVIS decoding with it is exactly base sampling.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ConfigurationError, IncompatibleHeadError
from mavis_lc.value_models.base import SHARED_Q_HEAD, ValueHeadConfig, ValueModel, frozen

__all__ = ["SHARED_Q_HEAD", "SharedBackboneQHead", "load_shared_head", "new_shared_head"]


class SharedBackboneQHead(ValueModel):
    """Q head on the frozen base model's final hidden state, scoring with its token embeddings."""

    def __init__(self, config: ValueHeadConfig, token_embeddings: torch.Tensor) -> None:
        super().__init__()
        if token_embeddings.shape != (config.vocab_size, config.hidden_size):
            raise IncompatibleHeadError(
                f"head for {config.objective!r} expects embeddings of shape "
                f"({config.vocab_size}, {config.hidden_size}), got {tuple(token_embeddings.shape)}"
            )
        self.config = config
        d = config.hidden_size
        self.proj = nn.Linear(d, d)  # W, c
        self.token_bias = nn.Parameter(torch.zeros(config.vocab_size))  # b_a
        self.state_value = nn.Linear(d, 1)  # w_v, b_v
        self.prompt_proj = nn.Linear(d, d, bias=False) if self.prompt_query else None  # U
        self.prompt_scale = nn.Parameter(torch.zeros(d)) if self.query_pool == "user" else None  # u
        for p in self.parameters():
            nn.init.zeros_(p)
        # The base's embeddings are borrowed, frozen, and never saved with the head.
        self._embeddings = token_embeddings.detach()

    @property
    def prompt_query(self) -> bool:
        """Whether Q reads the prompt-pooled query ``U p``."""
        return bool(self.config.options.get("prompt_query", False))

    @property
    def query_pool(self) -> str | None:
        if not self.prompt_query:
            return None
        return str(self.config.options.get("query_pool", "all"))

    def q_values(
        self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = hidden.to(self.proj.weight.dtype)  # (B, d)
        query = self.proj(h)  # (B, d)
        if self.prompt_proj is not None:
            if prompt_hidden is None:
                raise IncompatibleHeadError(
                    f"head for {self.objective!r} reads the prompt-pooled query: pass prompt_hidden (B, d)"
                )
            p = prompt_hidden.to(h.dtype)  # (B, d)
            query = query + self.prompt_proj(p)  # (B, d)
            if self.prompt_scale is not None:
                query = query + self.prompt_scale * p  # (B, d)
        cand_emb = self._embeddings[candidate_ids].to(h.dtype)  # (B, k, d)
        q = torch.einsum("bd,bkd->bk", query, cand_emb)  # (B, k)
        return q + self.token_bias[candidate_ids] + self.state_value(h)  # (B, k)


def new_shared_head(base: BaseModel, objective: str, **config: Any) -> SharedBackboneQHead:
    """A zero-initialised shared-backbone head for ``objective`` on ``base``; one that reads the
    prompt query pools it over the user turn's tokens unless ``options["query_pool"]`` says otherwise."""
    options = dict(config.pop("options", None) or {})
    if options.get("prompt_query") and "query_pool" not in options:
        options["query_pool"] = "user"
    if options.get("query_pool", "user") not in ("user", "all"):
        raise ConfigurationError(f"query_pool must be 'user' or 'all', got {options['query_pool']!r}")
    config["options"] = options
    head = SharedBackboneQHead(ValueHeadConfig.for_base(base, objective, **config), base.token_embeddings)
    return head.to(base.device)


def load_shared_head(config: ValueHeadConfig, tensors: dict[str, torch.Tensor], base: BaseModel) -> SharedBackboneQHead:
    """Rebuild a saved shared-backbone head on ``base`` (frozen, eval mode).

    Raises:
        ModelLoadError: the tensors do not match the architecture in ``config``.
    """
    return cast(SharedBackboneQHead, frozen(SharedBackboneQHead(config, base.token_embeddings), tensors, base))
