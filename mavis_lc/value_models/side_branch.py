"""The side branch: a value model that reads the prompt and the candidate in context at about 1x decode cost.

The branch is a trainable copy of the base's last L decoder layers and its final norm, fed by
the base's own hidden states at the input of layer N-L (read by a forward hook, `LayerTap`,
so the base forward is unchanged and nothing is computed twice). It keeps its own KV cache for
its L layers while decoding, and its output h'(s) goes into a shared-backbone Q head,

    Q(s, a) = <W h'(s) + U p + c, E_a> + b_a + v(s),

with the base's token embeddings E and, with ``options["prompt_query"]``, the prompt-pooled
query p. The copied layers make h'(s) equal the base's final hidden state h(s) at step 0, so a
fresh branch warm-started from a fitted shared head scores exactly as that head does, and
training can only move away from it where the validation metrics say it helps. Its attention
layers see every earlier position of the prompt and the response: unlike the shared head, the
features it scores with are trained for the objective.

Cost: L of the base's N layers per step (and per prompt token at prefill), plus the head.

Training (`mavis_lc.training.fit.fit_side_branch`) runs the branch over the layer-(N-L) states
the rollouts stored (``TreeRollouts.tap``), one packed sequence per tree with a tree attention
mask, so the base model is never run again. Trainable parameters are float32 on every device.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import AutoModel

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import ConfigurationError, IncompatibleHeadError
from mavis_lc.value_models.base import ValueHeadConfig, ValueModel, frozen
from mavis_lc.value_models.shared_head import SharedBackboneQHead
from mavis_lc.value_models.stacks import KVBatch, config_from_dict, layer_stack_config

SIDE_BRANCH = "side_branch"


class BranchState(Protocol):
    """A side branch's decode state: its KV cache over B rows and its final state at each row's
    last token (`KVBatch`, or the compiled decode's static-cache state)."""

    hidden: torch.Tensor  # (B, d)

    def prefill(self, taps: torch.Tensor, attention_mask: torch.Tensor, /) -> None: ...

    def feed(self, taps: torch.Tensor, active: torch.Tensor | None = None, /) -> None: ...

    def select(self, indices: torch.Tensor, /) -> None: ...


class SideBranchValueModel(ValueModel):
    """Q head on a trainable copy of the base's last L layers, fed by the base's layer N-L states.

    ``config.options`` holds ``n_layers`` (L), ``tap_layer`` (N-L, the base layer whose input
    it reads), ``base_layers`` (N), ``model_config`` (the branch's transformers config as a
    dict) and ``prompt_query``.
    """

    def __init__(self, config: ValueHeadConfig, token_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.branch = AutoModel.from_config(config_from_dict(config.options["model_config"]))
        self.branch.embed_tokens = nn.Identity()  # its inputs are the base's layer-(N-L) states
        self.q_head = SharedBackboneQHead(config, token_embeddings)
        self._state: BranchState | None = None

    @property
    def tap_layer(self) -> int:  # type: ignore[override]
        return int(self.config.options["tap_layer"])

    @property
    def n_layers(self) -> int:
        return int(self.config.options["n_layers"])

    def features(self, taps: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The branch's output h'(s) over sequences of layer-(N-L) states ``taps`` (B, S, d);
        ``attention_mask`` is (B, S) or an additive (B, 1, S, S); ``position_ids`` (B, S) -> (B, S, d)."""
        dtype = self.q_head.proj.weight.dtype
        return self.branch(
            inputs_embeds=taps.to(dtype), attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state

    def begin(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        taps: torch.Tensor | None = None,
        state: BranchState | None = None,
    ) -> None:
        """Prefill the branch from the base's layer-(N-L) states over the prompts, ``taps`` (B, P, d).

        ``state``: where the branch's KV cache lives (default: a `KVBatch` on a dynamic cache; a
        compiled decode passes a static-cache one)."""
        self._state = state or KVBatch(self.branch, lambda states: states.to(self.q_head.proj.weight.dtype))
        self._state.prefill(self._need(taps), attention_mask)

    def advance(
        self, token_ids: torch.Tensor, active: torch.Tensor | None = None, taps: torch.Tensor | None = None
    ) -> None:
        self._require_state().feed(self._need(taps), active)

    def select_rows(self, indices: torch.Tensor) -> None:
        self._require_state().select(indices)

    @property
    def query_pool(self) -> str | None:
        return self.q_head.query_pool

    def q_values(
        self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q for candidates (B, k) from the branch's state; ``hidden`` (the base's) is not used."""
        return self.q_head.q_values(self._require_state().hidden, candidate_ids, prompt_hidden)

    def _need(self, taps: torch.Tensor | None) -> torch.Tensor:
        if taps is None:
            raise IncompatibleHeadError(
                f"side-branch head for {self.objective!r} reads the base's layer-{self.tap_layer} states: "
                "the caller must pass taps"
            )
        return taps

    def _require_state(self) -> BranchState:
        if self._state is None:
            raise RuntimeError("begin() must be called before decoding with a side-branch value model")
        return self._state


def new_side_branch(
    base: BaseModel,
    objective: str,
    *,
    n_layers: int = 2,
    head: SharedBackboneQHead | None = None,
    prompt_query: bool = False,
    **config: Any,
) -> SideBranchValueModel:
    """A side branch for ``objective`` on ``base``: copies of its last ``n_layers`` layers and final norm.

    Args:
        head: a shared-backbone head to start the branch's Q head from (its weights are
            copied; its ``prompt_query`` option is kept); default a zero head (Q = 0).

    Raises:
        ConfigurationError: ``n_layers`` outside [1, base layers], or a base without a
            ``layers`` list.
    """
    stack: Any = base.model.base_model
    total = int(base.model.config.num_hidden_layers)
    if not isinstance(getattr(stack, "layers", None), nn.ModuleList):
        raise ConfigurationError(f"base {base.model_id!r} has no decoder-layer list: a side branch cannot read it")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ConfigurationError(f"side-branch n_layers must be an integer in [1, {total}], got {n_layers!r}")
    first = total - n_layers
    small = layer_stack_config(base.model.config, first, n_layers)
    use_prompt = bool(head.prompt_query) if head is not None else bool(prompt_query)
    options = {
        **config.pop("options", {}),
        "n_layers": n_layers,
        "tap_layer": first,
        "base_layers": total,
        "model_config": small.to_dict(),
        "prompt_query": use_prompt,
        **({"query_pool": head.query_pool if head is not None else "user"} if use_prompt else {}),
    }
    cfg = ValueHeadConfig.for_base(base, objective, architecture=SIDE_BRANCH, options=options, **config)
    model = SideBranchValueModel(cfg, base.token_embeddings)
    with torch.no_grad():
        for mine, theirs in zip(model.branch.layers, stack.layers[first:], strict=True):
            mine.load_state_dict(theirs.state_dict())
        model.branch.norm.load_state_dict(stack.norm.state_dict())
        if head is not None:
            model.q_head.load_state_dict(head.state_dict())
    return model.to(device=base.device, dtype=torch.float32)  # trainable: fp32 whatever the base's dtype


def load_side_branch(
    config: ValueHeadConfig, tensors: dict[str, torch.Tensor], base: BaseModel
) -> SideBranchValueModel:
    """Rebuild a saved side branch on ``base`` (frozen, eval mode).

    Raises:
        IncompatibleHeadError: ``base`` has another number of layers than the one it was trained on.
        ModelLoadError: the tensors do not match the architecture in ``config``.
    """
    total = int(base.model.config.num_hidden_layers)
    if int(config.options.get("base_layers", -1)) != total:
        raise IncompatibleHeadError(
            f"side-branch head for {config.objective!r} was trained on a base of {config.options.get('base_layers')} "
            f"layers; base {base.model_id!r} has {total}"
        )
    return cast(SideBranchValueModel, frozen(SideBranchValueModel(config, base.token_embeddings), tensors, base))
