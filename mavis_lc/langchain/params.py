"""Parameters and call plumbing shared by `MavisLLM` and `ChatMavis`: the fields, how a call's
weights and decoding parameters are merged from the call, the run's config and the object,
per-row batch parameters, head resolution (once per object) and token usage.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, cast

from langchain_core.callbacks import (
    BaseCallbackManager,
)
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import LangSmithParams
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mavis_lc import decoding
from mavis_lc.base_model import LoadOptions, load_base_model
from mavis_lc.decoding.engine import HeadSource, MavisEngine, engine_for, heads_info, is_head_file, resolve_heads
from mavis_lc.decoding.grammar import Grammar
from mavis_lc.errors import ConfigurationError, DecodingParameterError
from mavis_lc.settings import get_settings

CALL_PARAMS = (
    "weights", "preset", "beta", "top_k", "temperature", "max_tokens", "min_tokens", "seed", "do_sample", "grammar",
)  # fmt: skip
"""Parameters a single call may override (as keyword arguments of invoke, batch, stream...)."""
ROW_PARAMS = ("weights", "seed")
"""Call parameters that ``batch`` accepts per input: a list aligned with the inputs."""


_LOAD_FIELDS = ("revision", "device_map", "attn_implementation", "quantization_config", "trust_remote_code")
_RESOLVING_FIELDS = frozenset(
    {"base_model", "heads", "preset", "database_url", "device", "dtype", "allow_other_base", *_LOAD_FIELDS}
)


@dataclass
class _Slot:
    """A mutable holder, so that an object and its copies share one resolution."""

    value: _Resolution | None = None


@dataclass
class _Resolution:
    """An object's resolved heads (as its engine) and presets, and when they were resolved."""

    engine: MavisEngine
    presets: dict[str, tuple[dict[str, float], list[str]]]
    at: float
    sources: list[HeadSource] = field(default_factory=list)
    """The heads as this object resolved them (its specs, versions): the engine may be shared
    with another object that named the same files differently."""


def _read_preset(registry: Any, name: str) -> tuple[dict[str, float], list[str]]:
    """A preset's weights and a head spec per objective (its pinned one, else the latest)."""
    from mavis_lc.registry import parse_spec

    preset = registry.get_preset(name)
    pinned = {parse_spec(spec).objective: spec for spec in preset.pinned_specs}
    objectives = sorted(set(preset.weights) | set(pinned))
    return dict(preset.weights), [pinned.get(objective, objective) for objective in objectives]


class _MavisParams(BaseModel):
    """Fields shared by `MavisLLM` and `ChatMavis`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    base_model: str | None = None
    """Base model: ``smollm2-135m-instruct`` (packaged), a local HF directory or a hub id (``MAVIS_BASE_MODEL``)."""
    heads: list[str] = Field(default_factory=list)
    """Value heads: registry specs (``positivity``, ``positivity@3``, ``positivity@prod``) or .safetensors paths."""
    weights: dict[str, float] = Field(default_factory=dict)
    """Objective weights; default: the preset's, else 1/M for each of the M heads."""
    preset: str | None = None
    """Name of a registry preset giving weights (and possibly pinned head versions)."""
    beta: float = 1.0
    """Guidance strength; 0 is plain top-k sampling of the base model."""
    top_k: int = 20
    """Candidate next tokens scored per step."""
    temperature: float = 1.0
    """Base-model temperature."""
    max_tokens: int = 256
    """Most new tokens per response."""
    min_tokens: int = 0
    """Fewest new tokens per response (EOS is banned before)."""
    do_sample: bool = True
    """Sample (True) or take the most likely tilted token (False)."""
    seed: int | None = None
    """Seed of each row's sampler. None (default): fresh samples on every call. An int: the same
    prompt, weights and seed give the same text, alone or in any batch. In ``batch`` a list of
    seeds aligned with the inputs gives each row its own (n samples of a prompt)."""
    stop: list[str] | None = None
    """Default stop strings; the output is cut just before the first one."""
    grammar: Grammar | dict[str, Any] | None = None
    """A grammar every output must match (`mavis_lc.decoding.grammar.Grammar`, or ``{"type": "json_schema" |
    "regex" | "lark", "value": ...}``), applied to the base logits before the top-k; None: free text."""
    device: str | None = None
    """``auto``, ``cpu``, ``cuda``...; default ``MAVIS_DEVICE``."""
    dtype: str | None = None
    """``auto``, ``float32``, ``bfloat16``, ``float16``; default ``MAVIS_DTYPE``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a base model given as a hub id."""
    device_map: str | None = None
    """transformers' ``device_map`` (``auto``, ``balanced``, a device); default: ``device``. The
    weights load straight onto it."""
    attn_implementation: str | None = None
    """``eager``, ``sdpa``, ``flash_attention_2``...; default transformers' choice."""
    quantization_config: dict[str, Any] | None = None
    """A transformers quantization config as a dict (e.g. ``{"quant_method": "bitsandbytes",
    "load_in_4bit": True}``); needs that package and usually a GPU."""
    trust_remote_code: bool | None = None
    """Run model code shipped with the base model; default ``MAVIS_TRUST_REMOTE_CODE`` (off)."""
    database_url: str | None = None
    """Registry database for specs and presets; default ``MAVIS_DATABASE_URL``."""
    allow_other_base: bool = False
    """Load heads trained on other base weights with the same tokenizer (a deliberate transfer);
    by default such a head is refused with `IncompatibleHeadError`."""
    resolve_ttl: float | None = None
    """Seconds after which registry specs and the preset are resolved again; None: only on `refresh`."""

    _resolved: _Slot = PrivateAttr(default_factory=lambda: _Slot())
    """This object's resolution, shared with the copies LangChain makes of it (`model_copy`)."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return super().invoke(input, config, **_from_config(config, kwargs))  # type: ignore[misc]

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await super().ainvoke(input, config, **_from_config(config, kwargs))  # type: ignore[misc]

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        yield from super().stream(input, config, **_from_config(config, kwargs))  # type: ignore[misc]

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in super().astream(input, config, **_from_config(config, kwargs)):  # type: ignore[misc]
            yield chunk

    def get_token_ids(self, text: str) -> list[int]:
        """The base tokenizer's ids of ``text`` (no special tokens added); loads the engine."""
        return list(self.engine().base.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _identity(self) -> dict[str, Any]:
        """Every field that changes the output (as given, unresolved)."""
        return {name: getattr(self, name) for name in ("base_model", "heads", "stop", *CALL_PARAMS)}

    def _resolved_identity(self) -> dict[str, Any]:
        """What a decode actually uses: each head's objective, version and sha256, the base
        model's identity and the default weights (a preset's, resolved). The LLM cache key holds
        these, so an alias move, a preset change or another base is never served from the cache."""
        resolution = self._resolution()
        engine = resolution.engine
        return {
            "resolved_heads": [(s.objective, s.version, s.sha256) for s in resolution.sources],
            "resolved_base": [
                engine.base.model_id,
                engine.base.fingerprint,
                engine.base.weights_fingerprint,
                str(engine.base.dtype),
            ],
            "default_weights": sorted(self._default_weights(engine, self.preset).items()),
        }

    def _preset(self, name: str) -> tuple[dict[str, float], list[str]]:
        """A registry preset's weights, and a head spec per objective (its pinned one, else the
        latest), as resolved with this object's engine (a preset first named in a call is read
        once, then kept with the resolution)."""
        resolution = self._resolution()
        if name not in resolution.presets:
            from mavis_lc.registry import Registry

            registry = Registry(self.database_url)
            try:
                resolution.presets[name] = _read_preset(registry, name)
            finally:
                registry.close()
        return resolution.presets[name]

    def engine(self) -> MavisEngine:
        """The shared engine for this object's base model and heads, resolved and loaded on first
        use: registry specs and the preset are read then (one registry connection, closed after),
        and again only after `refresh` or once ``resolve_ttl`` seconds have passed. A decode
        makes no database query."""
        return self._resolution().engine

    async def aengine(self) -> MavisEngine:
        """As `engine`, resolving and loading (when due) in an executor thread, off the event loop."""
        if not self._fresh():
            await asyncio.get_running_loop().run_in_executor(None, self._resolution)
        return self.engine()

    def _fresh(self) -> bool:
        current = self._resolved.value
        ttl = self.resolve_ttl
        return current is not None and (ttl is None or time.monotonic() - current.at < ttl)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """As pydantic's, sharing this object's resolution (never deep-copying its engine) unless
        the update changes what resolves: the base, the heads, the preset, the registry, the
        device or dtype, or the weights of an object whose heads are named by its weights."""
        copy = super().model_copy(update=update, deep=deep)
        changes = {k for k, v in (update or {}).items() if v != getattr(self, k, None)}
        names_heads = not copy.heads and not copy.preset
        reset = bool(changes & _RESOLVING_FIELDS) or ("weights" in changes and names_heads)
        copy._resolved = _Slot() if reset else self._resolved
        return copy

    def refresh(self) -> Self:
        """Forget the resolved heads and preset: the next call resolves them again (say, after an
        alias moved). Returns this object."""
        self._resolved.value = None
        return self

    def _resolution(self) -> _Resolution:
        current = self._resolved.value
        if current is not None and self._fresh():
            return current
        from mavis_lc.registry import Registry

        registry = None
        needs_registry = bool(self.preset) or any(not is_head_file(spec) for spec in self.heads or self.weights)
        if needs_registry:
            registry = Registry(self.database_url)
        try:
            presets: dict[str, tuple[dict[str, float], list[str]]] = {}
            if self.heads:
                specs = list(self.heads)
            elif self.preset:
                presets[self.preset] = _read_preset(registry, self.preset)
                specs = presets[self.preset][1]
            else:
                specs = sorted(self.weights)
            base = load_base_model(self.base_model, **self._load_kwargs()) if registry else None
            sources = resolve_heads(
                specs, self.database_url, registry=registry, base=base, allow_other_base=self.allow_other_base
            )
        finally:
            if registry is not None:
                registry.close()
        engine = engine_for(self.base_model, sources, allow_other_base=self.allow_other_base, **self._load_kwargs())
        resolution = self._resolved.value = _Resolution(
            engine=engine, presets=presets, at=time.monotonic(), sources=list(sources)
        )
        return resolution

    def _load_kwargs(self) -> dict[str, Any]:
        """How this object's base model loads: device, dtype, `LoadOptions`, remote code."""
        options = LoadOptions.of(
            revision=self.revision,
            device_map=self.device_map,
            attn_implementation=self.attn_implementation,
            quantization_config=self.quantization_config,
        )
        return {
            "device": self.device,
            "dtype": self.dtype,
            "options": options,
            "trust_remote_code": self.trust_remote_code,
        }

    def _default_weights(self, engine: MavisEngine, preset: str | None) -> dict[str, float]:
        if self.weights:
            return dict(self.weights)
        if preset:
            return self._preset(preset)[0]
        return {name: 1.0 / len(engine.objectives) for name in engine.objectives}

    def _call_options(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(CALL_PARAMS))
        if unknown:
            raise DecodingParameterError(
                f"unknown call parameter(s) {', '.join(unknown)}; allowed: {', '.join(CALL_PARAMS)}"
            )
        return {name: kwargs.get(name, getattr(self, name)) for name in CALL_PARAMS} | {
            "stop": stop if stop is not None else self.stop
        }

    def _decode(
        self, prompts: Sequence[str], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[MavisEngine, decoding.DecodeConfig, list[dict[str, float]], list[int] | None, list[Any] | None]:
        """Everything a decode needs: the engine, the config, one weight mapping per prompt,
        per-row seeds when the call gave a list of them, and per-row grammars (None: none)."""
        opts = self._call_options(stop, kwargs)
        grammar = Grammar.coerce(opts["grammar"])
        grammars: list[Any] | None = [grammar] * len(prompts) if grammar is not None else None
        seed = opts["seed"]
        seeds: list[int] | None = None
        if isinstance(seed, Sequence):
            seeds = [_row_seed(s) for s in seed]
            if len(seeds) != len(prompts):
                raise ConfigurationError(
                    f"got {len(seeds)} seeds for {len(prompts)} inputs; per-row seeds need one each"
                )
            seed = 0
        engine = self.engine()
        call_weights = kwargs.get("weights")
        preset = opts["preset"] if "preset" in kwargs else self.preset
        if call_weights is None:
            default = (
                self._preset(preset)[0] if "preset" in kwargs and preset else self._default_weights(engine, preset)
            )
            rows: list[dict[str, float]] = [default] * len(prompts)
        elif isinstance(call_weights, Mapping):
            rows = [dict(call_weights)] * len(prompts)
        else:
            rows = [dict(w) for w in call_weights]
            if len(rows) != len(prompts):
                raise ConfigurationError(
                    f"got {len(rows)} weight mappings for {len(prompts)} inputs; per-row weights need one per input"
                )
        config = decoding.DecodeConfig(
            max_new_tokens=opts["max_tokens"],
            min_new_tokens=opts["min_tokens"],
            top_k=opts["top_k"],
            temperature=opts["temperature"],
            beta=opts["beta"],
            do_sample=opts["do_sample"],
            seed=seed,
            stop=tuple(opts["stop"] or ()),
        )
        return engine, config, rows, seeds, grammars

    def _metadata(self, engine: MavisEngine, generation: decoding.Generation) -> dict[str, Any]:
        resolved = self._resolved.value
        sources = resolved.sources if resolved is not None and resolved.engine is engine else engine.sources
        return {**generation.info(), "model_name": engine.base.model_id, "heads": heads_info(sources)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)  # type: ignore[misc]
        params["ls_model_name"] = kwargs.get("model", self._model_name())
        return cast(LangSmithParams, params)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        if self._cache_active(getattr(self, "cache", None)):  # the cache key: resolve (and load) before the lookup
            return {**self._identity(), **self._resolved_identity()}
        return self._identity()

    def _model_name(self) -> str:
        return self.base_model or get_settings().base_model

    def _cache_active(self, cache: Any) -> bool:
        return cache is not False and (cache is not None or get_llm_cache() is not None)


CONFIG_KEY = "mavis"
"""The key of ``configurable`` under which a run's mavis call parameters go:
``config={"configurable": {"mavis": {"weights": {...}, "beta": 4}}}``."""


def _from_config(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call parameters given in ``config["configurable"]["mavis"]`` (how chains and graphs pass
    them to every step), below the call's own keyword arguments.

    The config is completed with `ensure_config`, so a graph node that calls ``model.invoke(x)``
    without passing its config still gets the run's. Flat keys (``configurable={"weights":
    ...}``) are still read where there is no ``"mavis"`` key, with a `DeprecationWarning`:
    another model's ``temperature`` or ``seed`` in the same run would leak into this one's.

    Raises:
        ConfigurationError: ``configurable["mavis"]`` is not a mapping of call parameters.
    """
    configurable = ensure_config(config).get("configurable") or {}
    namespaced = configurable.get(CONFIG_KEY) or {}
    if not isinstance(namespaced, Mapping) or sorted(set(namespaced) - set(CALL_PARAMS)):
        raise ConfigurationError(
            f"configurable[{CONFIG_KEY!r}] must map call parameters ({', '.join(CALL_PARAMS)}) to values, "
            f"got {namespaced!r}"
        )
    flat = {k: v for k, v in configurable.items() if k in CALL_PARAMS} if CONFIG_KEY not in configurable else {}
    if flat:
        warnings.warn(
            f"call parameters directly under configurable ({', '.join(sorted(flat))}) are deprecated: put them "
            f"under configurable[{CONFIG_KEY!r}], where no other model's parameters can reach them",
            DeprecationWarning,
            stacklevel=3,
        )
    return {**flat, **namespaced, **kwargs}


def _batch_kwargs(configs: list[RunnableConfig], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge per-input ``configurable`` call parameters into batch kwargs.

    Weights and seeds may differ per input (they become per-row lists); other parameters must agree.

    Raises:
        ConfigurationError: a parameter other than weights and seed differs between inputs, or
            weights or seeds were given for some inputs but not all.
    """
    per_input = [_from_config(c, {}) for c in configs]
    merged = dict(kwargs)
    for name in CALL_PARAMS:
        if name in kwargs or not any(name in p for p in per_input):
            continue
        values = [p.get(name) for p in per_input]
        if name == "weights":
            if any(v is None for v in values):
                raise ConfigurationError("configurable weights were given for some inputs of a batch but not all")
            merged["weights"] = [dict(cast(Mapping[str, float], v)) for v in values]
        elif any(v != values[0] for v in values):
            if name != "seed":
                raise ConfigurationError(
                    f"only {' and '.join(ROW_PARAMS)} may differ per input of a batch; {name} got {values!r}"
                )
            if not all(name in p for p in per_input):
                raise ConfigurationError("configurable seeds were given for some inputs of a batch but not all")
            merged["seed"] = values
        else:
            merged[name] = values[0]
    return merged


def _row_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"a per-row seed must be an int, got {value!r}")
    return value


def _per_row(kwargs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The row parameters of a call given as lists aligned with the inputs."""
    return {
        name: list(kwargs[name])
        for name in ROW_PARAMS
        if isinstance(kwargs.get(name), Sequence) and not isinstance(kwargs[name], str | Mapping)
    }


def _row_slice(kwargs: Mapping[str, Any], rows: Mapping[str, list[Any]], start: int, end: int) -> dict[str, Any]:
    return {**kwargs, **{name: values[start:end] for name, values in rows.items()}}


def _check_rows(rows: Mapping[str, list[Any]], n: int) -> None:
    for name, values in rows.items():
        if len(values) != n:
            raise ConfigurationError(f"got {len(values)} {name} entries for {n} inputs; per-row {name} need one each")


def _per_prompt(callbacks: Any) -> bool:
    """Whether ``generate`` got one callbacks entry per prompt (as `BaseLLM.batch` passes them)."""
    return (
        isinstance(callbacks, list)
        and bool(callbacks)
        and (callbacks[0] is None or isinstance(callbacks[0], (list, BaseCallbackManager)))
    )


def _message_usage(g: decoding.Generation) -> Any:
    return {
        "input_tokens": g.prompt_tokens,
        "output_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    }


def _usage(generations: Sequence[decoding.Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
