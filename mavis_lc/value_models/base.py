"""The value-model interface the decoder calls, and the artifact format every kind shares.

A value model Q_m(s, a) scores the k candidate next tokens of every decoding state in a batch:
``q_values(hidden, candidate_ids) -> (B, k)``. Three kinds implement `ValueModel`:
`mavis_lc.value_models.shared_head` (a head on the base's final hidden state),
`mavis_lc.value_models.side_branch` (trainable copies of the base's last layers) and
`mavis_lc.value_models.separate_backbone` (a small causal LM of its own);
`mavis_lc.value_models.loading.load_value_model` reads any of them.

Artifacts are one safetensors file whose single metadata key ``mavis_config`` holds the
`ValueHeadConfig` as JSON. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from mavis_lc.base_model import BaseModel
from mavis_lc.errors import IncompatibleHeadError, ModelLoadError

SHARED_Q_HEAD = "shared_q_head"
CONFIG_KEY = "mavis_config"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ValueHeadConfig:
    """Everything needed to rebuild a value model and check it fits a base model."""

    objective: str
    """Objective name the head was trained for."""
    base_model_id: str
    """Base model the head was trained against."""
    tokenizer_fingerprint: str
    """`tokenizer_fingerprint` of the base tokenizer; loading against another is refused."""
    hidden_size: int
    """Base hidden size d."""
    vocab_size: int
    """Base vocabulary size V."""
    architecture: str = SHARED_Q_HEAD
    """Value-model architecture."""
    reward_mean: float = 0.0
    """Mean of iteration-0 leaf rewards; Q is in units of (reward - mean) / std."""
    reward_std: float = 1.0
    """Standard deviation of iteration-0 leaf rewards."""
    iteration: int = 0
    """Soft policy-improvement iteration that produced the head."""
    options: dict[str, Any] = field(default_factory=dict)
    """Architecture-specific options."""
    base_weights_fingerprint: str = ""
    """`BaseModel.weights_fingerprint` of the base the head was trained on ("" in heads written
    before it was recorded, which are checked by tokenizer only)."""
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_base(cls, base: BaseModel, objective: str, **fields: Any) -> ValueHeadConfig:
        """The config of a value model for ``objective`` on ``base`` (its id, tokenizer and sizes)."""
        return cls(
            objective=objective,
            base_model_id=base.model_id,
            tokenizer_fingerprint=base.fingerprint,
            hidden_size=base.hidden_size,
            vocab_size=base.vocab_size,
            base_weights_fingerprint=base.weights_fingerprint,
            **fields,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ValueHeadConfig:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(
                f"value head format_version {data.get('format_version')!r} is not supported "
                f"(this mavis-lc reads {FORMAT_VERSION})"
            )
        return cls(**data)


class ValueModel(nn.Module):
    """Interface of a per-objective value model used by the decoder.

    The decoder runs the base's prefill, then calls `begin` once with the (left-padded)
    prompts; at every step it calls `q_values`, and after the base has read the chosen tokens,
    `advance` with them. Value models with their own backbone keep their own KV cache in
    `begin` / `advance` (and `select_rows` when a tree rollout fans a row out); the
    shared-backbone head needs none of them.

    A value model whose `tap_layer` is not None reads the base's hidden states at the input of
    that decoder layer: the caller passes them as ``taps``, (B, P, d) over the prompts to
    `begin` and (B, d) for the new tokens to `advance` (`mavis_lc.value_models.stacks.LayerTap`).
    """

    config: ValueHeadConfig
    tap_layer: int | None = None

    @property
    def objective(self) -> str:
        return self.config.objective

    @property
    def query_pool(self) -> str | None:
        """Which prompt-pooled query `q_values` reads: ``"user"`` (the mean over the user turn's
        tokens, `mavis_lc.query_span`), ``"all"`` (over every prompt token: heads saved before the
        user pool existed), or None (no prompt query)."""
        return None

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, taps: torch.Tensor | None = None) -> None:
        """Start decoding a batch: ``input_ids`` and ``attention_mask`` are (B, P)."""

    def advance(
        self, token_ids: torch.Tensor, active: torch.Tensor | None = None, taps: torch.Tensor | None = None
    ) -> None:
        """Append the chosen tokens, (B,), to every sequence of the batch (rows where ``active``
        is False sit the step out)."""

    def select_rows(self, indices: torch.Tensor) -> None:
        """Keep (and repeat) rows ``indices`` (R,) of the decoding batch."""

    def q_values(
        self, hidden: torch.Tensor, candidate_ids: torch.Tensor, prompt_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q(s, a) for candidates ``candidate_ids`` (B, k) given base hidden states (B, d) -> (B, k).

        ``prompt_hidden`` (B, d) is the mean base final hidden state over each row's prompt
        tokens (`prompt_mean`); value models without a prompt query ignore it.
        """
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the head as one safetensors file (config in its metadata); returns the path."""
        target = Path(path)
        target.write_bytes(self.to_bytes())
        return target

    def to_bytes(self) -> bytes:
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        return bytes(save_safetensors_bytes(tensors, metadata={CONFIG_KEY: self.config.to_json()}))


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, (B, P): 0 at each row's first real token, padding at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def prompt_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The prompt-pooled query p: the mean of ``hidden`` (B, P, d) over the tokens that
    ``attention_mask`` (B, P) marks (every real token, or a user-token mask), in float32 -> (B, d)."""
    weights = attention_mask.to(torch.float32)[..., None]  # (B, P, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def read_head_config(source: str | Path | bytes) -> tuple[ValueHeadConfig, dict[str, torch.Tensor]]:
    """Parse a head artifact (path or bytes) into its config and tensors, without a base model."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read value head {source!s}: {exc}") from exc
    try:
        tensors = load_safetensors_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"value head {_describe(source)} is not a valid safetensors file: {exc}") from exc
    meta = header.get("__metadata__") or {}
    if CONFIG_KEY not in meta:
        raise ModelLoadError(f"value head {_describe(source)} has no {CONFIG_KEY!r} metadata")
    try:
        config = ValueHeadConfig.from_json(meta[CONFIG_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"value head {_describe(source)} has a malformed config: {exc}") from exc
    return config, tensors


def check_compatible(config: ValueHeadConfig, base: BaseModel, *, allow_other_base: bool = False) -> None:
    """Refuse a head trained against another tokenizer (or vocabulary/hidden size), or against
    other base weights (unless ``allow_other_base``: a deliberate transfer to a sibling model).

    Raises:
        IncompatibleHeadError: naming both fingerprints or sizes.
    """
    if config.tokenizer_fingerprint != base.fingerprint:
        raise IncompatibleHeadError(
            f"value head for {config.objective!r} was trained against tokenizer "
            f"{config.tokenizer_fingerprint[:12]} (base {config.base_model_id!r}); the loaded base "
            f"{base.model_id!r} has tokenizer {base.fingerprint[:12]}"
        )
    recorded = config.base_weights_fingerprint
    if recorded and not allow_other_base and recorded != base.weights_fingerprint:
        raise IncompatibleHeadError(
            f"value head for {config.objective!r} was trained on base weights {recorded[:12]} "
            f"({config.base_model_id!r}); the loaded base {base.model_id!r} has weights "
            f"{base.weights_fingerprint[:12]} (same tokenizer, other weights). Retrain the head for "
            "this base, or pass allow_other_base=True to transfer it deliberately"
        )
    if (config.hidden_size, config.vocab_size) != (base.hidden_size, base.vocab_size):
        raise IncompatibleHeadError(
            f"value head for {config.objective!r} expects hidden size {config.hidden_size} and vocabulary "
            f"{config.vocab_size}; base {base.model_id!r} has {base.hidden_size} and {base.vocab_size}"
        )


def frozen(model: ValueModel, tensors: dict[str, torch.Tensor], base: BaseModel) -> ValueModel:
    """``model`` with ``tensors`` loaded, frozen, in eval mode on ``base``'s device, in float32.

    Raises:
        ModelLoadError: the tensors do not match the model's architecture.
    """
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelLoadError(f"value model for {model.objective!r} has unexpected tensors: {exc}") from exc
    model.requires_grad_(False)
    return model.to(device=base.device, dtype=torch.float32).eval()


def _describe(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
