"""Layer stacks of the base model: hooks that read a layer's inputs, incremental forwards with
a KV cache over a batch of rows, and the transformers config of a slice of the base's layers.

`KVBatch` is the incremental-forward machinery the side branch, the separate backbone and the
tree rollouts share: a batch of left-padded sequences with a KV cache, rows that can sit out a
step (a masked "hole" that no later token attends to), and row selection (fan-out of a tree
node into children).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Collection
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache, PretrainedConfig

from mavis_lc.base_model import BaseModel, with_cache
from mavis_lc.errors import ConfigurationError, ModelLoadError
from mavis_lc.value_models.base import prompt_mean, prompt_positions

__all__ = ["KVBatch", "LayerTap", "config_from_dict", "embedding_matrix", "layer_stack_config"]


class LayerTap:
    """Capture the inputs of some decoder layers of ``backbone`` during forwards in this thread.

    A context manager: on entry it hooks ``backbone.layers[i]`` for every i in ``layers``; each
    forward of that layer made by the entering thread stores its input hidden states, (B, t, d),
    in ``states[i]`` (the last forward's); on exit the hooks are removed. Forwards made by other
    threads on the same model are not captured, so concurrent decodes on one base do not mix.
    No layers: a no-op.
    """

    def __init__(self, backbone: nn.Module, layers: Collection[int]) -> None:
        self.backbone = backbone
        self.layers = sorted(set(layers))
        self.states: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerTap:
        if not self.layers:
            return self
        stack = getattr(self.backbone, "layers", None)
        if not isinstance(stack, nn.ModuleList):
            raise ConfigurationError(
                f"{type(self.backbone).__name__} has no decoder-layer list 'layers': its layer inputs cannot be read"
            )
        owner = threading.get_ident()
        for index in self.layers:
            if not 0 <= index < len(stack):
                raise ConfigurationError(f"layer {index} is outside the base's {len(stack)} decoder layers")

            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index) -> None:
                if threading.get_ident() == owner:
                    self.states[index] = args[0] if args else kwargs["hidden_states"]

            self._handles.append(stack[index].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class KVBatch:
    """B sequences on a decoder stack with a KV cache, advanced one token per row per step.

    ``backbone`` is a transformers decoder stack (``model.base_model``: layers and final norm)
    called with ``inputs_embeds``; ``embed`` maps token ids to embeddings (for a stack fed with
    embeddings already, such as a side branch, the identity: its "token ids" are then (B, P, d)
    and (B, d) embeddings). `hidden` is the final hidden state at each row's last real token,
    (B, d).

    ``tap_layers``: decoder layers whose inputs are captured on every forward (`LayerTap`):
    `taps` holds each one's input at every row's last real token, (B, d), and `prefill_taps`
    its inputs over the prompts, (B, P, d), for value models that read them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed: Callable[[torch.Tensor], torch.Tensor],
        tap_layers: Collection[int] = (),
    ) -> None:
        self.backbone = backbone
        self.embed = embed
        self.cache = DynamicCache(config=getattr(backbone, "config", None))
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long)  # (B, L) 1 = real token
        self.next_position = torch.zeros(0, dtype=torch.long)  # (B,) position of the next real token
        self.hidden = torch.zeros(0, 0)  # (B, d)
        self.prompt_hidden = torch.zeros(0, 0)  # (B, d) mean final hidden state over each row's prompt
        self.tap_layers = sorted(set(tap_layers))
        self.taps: dict[int, torch.Tensor] = {}  # layer -> (B, d) its input at each row's last real token
        self.prefill_taps: dict[int, torch.Tensor] = {}  # layer -> (B, P, d) its inputs over the prompts

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> None:
        """Start from left-padded prompts: ``input_ids`` and ``attention_mask`` are (B, P);
        ``query_mask`` (B, P) the tokens the prompt-pooled query averages (default: every real one)."""
        position_ids = prompt_positions(attention_mask)  # (B, P)
        with LayerTap(self.backbone, self.tap_layers) as tap:
            out = self.backbone(
                inputs_embeds=self.embed(input_ids),
                attention_mask=attention_mask,
                position_ids=position_ids,
                **with_cache(self.backbone, self.cache),
                use_cache=True,
            )
        self.attention_mask = attention_mask
        self.next_position = attention_mask.sum(-1)  # (B,)
        self.hidden = out.last_hidden_state[:, -1]  # (B, d)
        pooled = attention_mask if query_mask is None else query_mask
        self.prompt_hidden = prompt_mean(out.last_hidden_state, pooled)  # (B, d)
        self.prefill_taps = dict(tap.states)
        self.taps = {layer: states[:, -1] for layer, states in tap.states.items()}

    def feed(self, token_ids: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Append ``token_ids`` (B,); rows where ``active`` (B,) is False get a masked hole instead."""
        rows = token_ids.shape[0]
        took = torch.ones(rows, dtype=torch.bool, device=token_ids.device) if active is None else active
        self.attention_mask = torch.cat([self.attention_mask, took[:, None].long()], dim=1)  # (B, L+1)
        with LayerTap(self.backbone, self.tap_layers) as tap:
            out = self.backbone(
                inputs_embeds=self.embed(token_ids[:, None]),
                attention_mask=self.attention_mask,
                position_ids=self.next_position[:, None],
                **with_cache(self.backbone, self.cache),
                use_cache=True,
            )
        self.hidden = torch.where(took[:, None], out.last_hidden_state[:, -1], self.hidden)  # (B, d)
        for layer, states in tap.states.items():
            self.taps[layer] = torch.where(took[:, None], states[:, -1], self.taps[layer])  # (B, d)
        self.next_position = self.next_position + took.long()

    def select(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (R,), in that order; a repeated index copies a row (fan-out)."""
        self.cache.batch_select_indices(indices)
        self.attention_mask = self.attention_mask[indices]
        self.next_position = self.next_position[indices]
        self.hidden = self.hidden[indices]
        self.prompt_hidden = self.prompt_hidden[indices]
        self.taps = {layer: states[indices] for layer, states in self.taps.items()}

    def candidate_hidden(self, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of every row's prefix extended by each candidate, (B, k, d); state unchanged.

        The k candidates go through one forward: each attends to its row's prefix and to itself.
        """
        batch, k = candidate_ids.shape
        embeds = self.embed(candidate_ids)  # (B, k, d)
        allowed = torch.cat(
            [
                self.attention_mask.bool()[:, None, :].expand(batch, k, -1),  # (B, k, L) the prefix
                torch.eye(k, dtype=torch.bool, device=candidate_ids.device).expand(batch, k, k),  # itself
            ],
            dim=-1,
        )  # (B, k, L+k)
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        mask.masked_fill_(~allowed, torch.finfo(embeds.dtype).min)
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=mask[:, None],  # (B, 1, k, L+k) additive
            position_ids=self.next_position[:, None].expand(batch, k),
            **with_cache(self.backbone, self.cache),
            use_cache=True,
        )
        self.cache.crop(-k)
        return out.last_hidden_state  # (B, k, d)


def layer_stack_config(base_config: PretrainedConfig, first: int, count: int) -> PretrainedConfig:
    """The transformers config of a stack of ``count`` of the base's decoder layers from index
    ``first`` on, with the final norm and no embedding table of its own (inputs are embeddings)."""
    small_config = copy.deepcopy(base_config)
    small_config.num_hidden_layers = count
    small_config.vocab_size = 1  # the embedding table is the base's, borrowed (or none)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids outside that 1-row table
        setattr(small_config, key, None)
    for key in ("layer_types",):  # per-layer lists must shrink with the layer count
        value = getattr(small_config, key, None)
        if isinstance(value, list):
            setattr(small_config, key, value[first : first + count])
    return small_config


def embedding_matrix(base: BaseModel) -> torch.Tensor:
    return cast(torch.Tensor, base.model.get_input_embeddings().weight)  # (V, d)


def config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    values = dict(data)
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"separate-backbone model config is not usable: {exc}") from exc
