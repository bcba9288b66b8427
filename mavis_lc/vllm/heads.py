"""Value heads for a vLLM server: what a head needs of its base, read from the checkpoint files.

vLLM loads the base itself (fused, sharded, paged), so the heads are not checked against a
loaded `BaseModel` but against the checkpoint directory vLLM serves: its tokenizer (the
tokenizer fingerprint), its parameters as the transformers model names them (the weights
fingerprint, read tensor by tensor from the safetensors files before vLLM fuses anything) and
its input embeddings (the shared head scores candidates through them). The architecture is
built on the meta device for the parameter names alone, so nothing the size of the model is
allocated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mavis_lc.base_model import tokenizer_fingerprint, weights_digest
from mavis_lc.errors import ConfigurationError, ModelLoadError
from mavis_lc.value_models import (
    SHARED_Q_HEAD,
    SharedBackboneQHead,
    check_compatible,
    load_shared_head,
    read_head_config,
)

HEADS_ENV = "MAVIS_VLLM_HEADS"
"""The environment variable that names the server's heads: comma-separated head specs (files or
registry specs such as ``positivity@production``), read by every vLLM process (front end and
workers inherit the server's environment)."""


@dataclass(frozen=True)
class CheckpointBase:
    """What `check_compatible` and a shared head need of a base, read from its checkpoint."""

    model_id: str
    fingerprint: str
    """The tokenizer fingerprint (`mavis_lc.base_model.tokenizer_fingerprint`)."""
    weights_fingerprint: str
    hidden_size: int
    vocab_size: int
    token_embeddings: torch.Tensor = field(repr=False)
    """The input embedding matrix E (V, d), float32."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _checkpoint_tensors(directory: Path) -> dict[str, Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no .safetensors files: the heads need the base's checkpoint")
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[key] = path
    return where


def _read(where: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(where[name]), framework="pt") as handle:
        return handle.get_tensor(name)


def checkpoint_base(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> CheckpointBase:
    """Read `CheckpointBase` from a local transformers checkpoint directory (safetensors).

    Raises:
        ModelLoadError: not a local directory, no safetensors files, or a parameter the
            architecture names missing from them.
    """
    directory = Path(model_dir).expanduser()
    if not directory.is_dir():
        raise ModelLoadError(
            f"MAVIS heads need the base as a local checkpoint directory; {str(model_dir)!r} is not one "
            "(download it first and serve that directory)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_base_model sets it: part of the fingerprint
    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = dict(skeleton.named_parameters())
    embedding = skeleton.get_input_embeddings().weight
    embedding_name = next(name for name, p in names.items() if p is embedding)
    where = _checkpoint_tensors(directory)
    missing = sorted(set(names) - set(where))
    if missing:
        raise ModelLoadError(
            f"{directory}: parameters {missing[:3]} (of {len(missing)}) are not in its safetensors files "
            "under the names transformers gives them, so the weights fingerprint cannot be checked"
        )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(names):
            yield name, _read(where, name)

    embeddings = _read(where, embedding_name).float()
    return CheckpointBase(
        model_id=directory.name,
        fingerprint=tokenizer_fingerprint(tokenizer),
        weights_fingerprint=weights_digest(tensors()),
        hidden_size=int(embeddings.shape[1]),
        vocab_size=int(skeleton.get_output_embeddings().weight.shape[0]),
        token_embeddings=embeddings,
    )


def head_specs(value: str | Sequence[str] | None = None) -> list[str]:
    """The configured head specs: ``value`` (a comma-separated string or a list), else the
    ``MAVIS_VLLM_HEADS`` environment variable; empty when neither is set."""
    raw = os.environ.get(HEADS_ENV, "") if value is None else value
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    return [p.strip() for p in parts if p.strip()]


def spec_objective(spec: str) -> str:
    """The objective a head spec serves, without loading the head: a file's recorded objective,
    or a registry spec's name before ``@``."""
    path = Path(spec).expanduser()
    if path.suffix == ".safetensors" or path.is_file():
        config, _ = read_head_config(path)
        return config.objective
    return spec.split("@", 1)[0]


def load_heads(specs: Sequence[str], base: CheckpointBase) -> list[SharedBackboneQHead]:
    """Load shared-backbone heads for ``base`` (files or registry specs), checked like any head.

    Raises:
        ConfigurationError: no specs, two heads for one objective, or a head that is not a plain
            shared head (side branches and prompt-pooled queries need state vLLM does not keep).
        IncompatibleHeadError: a head trained against another tokenizer or other base weights.
        ModelLoadError: an unreadable head.
    """
    from mavis_lc.decoding.engine import resolve_heads

    if not specs:
        raise ConfigurationError(f"no MAVIS heads configured: set {HEADS_ENV} to comma-separated head specs")
    sources = resolve_heads(list(specs), base=base)  # type: ignore[arg-type]  # the fields resolution reads
    heads: list[SharedBackboneQHead] = []
    for source in sources:
        config, tensors = read_head_config(source.path)
        check_compatible(config, base)  # type: ignore[arg-type]
        if config.architecture != SHARED_Q_HEAD:
            raise ConfigurationError(
                f"head {source.spec!r} is a {config.architecture}: the vLLM plugin runs shared heads "
                f"({SHARED_Q_HEAD}) only (a side branch needs its own KV cache)"
            )
        if config.options.get("prompt_query"):
            raise ConfigurationError(
                f"head {source.spec!r} reads a prompt-pooled query, which the vLLM plugin cannot compute "
                "(prefix caching skips prompt states); train it without --prompt-query"
            )
        heads.append(load_shared_head(config, tensors, base))  # type: ignore[arg-type]
    objectives = [h.objective for h in heads]
    if len(set(objectives)) != len(objectives):
        raise ConfigurationError(f"two heads for one objective in {list(specs)}: objectives {objectives}")
    return heads


def describe(heads: Sequence[SharedBackboneQHead]) -> str:
    """One log line: the objectives and their heads' iterations."""
    return json.dumps({h.objective: {"iteration": h.config.iteration} for h in heads})


__all__ = [
    "HEADS_ENV",
    "CheckpointBase",
    "checkpoint_base",
    "describe",
    "head_specs",
    "load_heads",
    "spec_objective",
]
