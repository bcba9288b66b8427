"""LangChain models: `MavisLLM` (text completion) and `ChatMavis` (chat, via the chat template).

Construction is cheap and loads nothing; the base model and value heads are loaded on first
use into a process-level cache (`mavis_lc.engine`), so copies made by ``bind``,
``configurable_fields`` or ``with_config`` share them.

Weights come, in order of precedence, from the call (``invoke(p, weights={...})``, or in
``batch`` a list of mappings aligned with the inputs), the ``weights`` field, the ``preset``
field (a preset in the registry), and otherwise each loaded head weighs 1/M. They multiply Q
as given (see `mavis_lc.weights`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, Self, cast

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackManager,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import ensure_config, get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mavis_lc import decoding
from mavis_lc.base_model import PACKAGED_CONTEXT, LoadOptions, load_base_model
from mavis_lc.engine import HeadSource, MavisEngine, engine_for, heads_info, is_head_file, resolve_heads
from mavis_lc.errors import ConfigurationError, DecodingParameterError
from mavis_lc.grammar import Grammar
from mavis_lc.settings import PACKAGED_BASE_MODEL, get_settings
from mavis_lc.tools import (
    chosen_tools,
    closed_schema,
    format_tools,
    parse_tool_calls,
    render_messages,
    template_takes_tools,
    tool_grammar,
)

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
    """A grammar every output must match (`mavis_lc.grammar.Grammar`, or ``{"type": "json_schema" |
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


class MavisLLM(_MavisParams, BaseLLM):
    """A text-completion LLM steered by MAVIS value heads.

    Example:
        llm = MavisLLM(heads=["positivity@production", "conciseness@production"])
        llm.invoke("Write a haiku about rain.", weights={"positivity": 0.8, "conciseness": 0.2})
        llm.batch(["a", "b"], weights=[{"positivity": 1.0}, {"conciseness": 1.0}])
    """

    @property
    def _llm_type(self) -> str:
        return "mavis"

    def generate(  # type: ignore[override]
        self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any
    ) -> LLMResult:
        """As `BaseLLM.generate`; per-call parameters are folded into the LLM cache key."""
        call = {k: kwargs.pop(k) for k in CALL_PARAMS if k in kwargs}
        if not call or not self._cache_active(self.cache):
            return super().generate(prompts, stop, callbacks, **kwargs, **call)
        rows = _per_row(call)
        if not rows:
            return self.model_copy(update=call).generate(prompts, stop, callbacks, **kwargs)
        # Per-row weights or seeds under a cache: each prompt is cached under its own.
        _check_rows(rows, len(prompts))
        per_prompt = _per_prompt(callbacks)
        listed = ("tags", "metadata", "run_name")
        results = [
            self.model_copy(update={**call, **{name: values[i] for name, values in rows.items()}}).generate(
                [p],
                stop,
                callbacks[i] if per_prompt else callbacks,
                **{k: v[i] if per_prompt and k in listed and isinstance(v, list) else v for k, v in kwargs.items()},
            )
            for i, p in enumerate(prompts)
        ]
        return LLMResult(generations=[g for r in results for g in r.generations])

    def batch(  # type: ignore[override]
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """As `BaseLLM.batch` (one batched decode); ``weights`` and ``seed`` lists are split with the inputs."""
        configs = get_config_list(config, len(inputs))
        kwargs = _batch_kwargs(configs, kwargs)
        rows = _per_row(kwargs)
        chunk = configs[0].get("max_concurrency") if configs else None
        if chunk is None or not rows:
            return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)
        _check_rows(rows, len(inputs))
        configs = [{**c, "max_concurrency": None} for c in configs]
        outputs: list[str] = []
        for i in range(0, len(inputs), chunk):
            outputs += super().batch(
                inputs[i : i + chunk],
                configs[i : i + chunk],
                return_exceptions=return_exceptions,
                **_row_slice(kwargs, rows, i, i + chunk),
            )
        return outputs

    async def abatch(  # type: ignore[override]
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """As `BaseLLM.abatch`, with per-input ``configurable`` weights merged into one decode."""
        configs = get_config_list(config, len(inputs))
        return await super().abatch(
            inputs, configs, return_exceptions=return_exceptions, **_batch_kwargs(configs, kwargs)
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, config, rows, seeds, grammars = self._decode(prompts, stop, kwargs)
        return self._llm_result(engine, engine.generate(prompts, rows, config, seeds=seeds, grammars=grammars))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """As `_generate`, awaited: concurrent calls share the engine's batched decodes."""
        await self.aengine()
        engine, config, rows, seeds, grammars = self._decode(prompts, stop, kwargs)
        return self._llm_result(engine, await engine.agenerate(prompts, rows, config, seeds=seeds, grammars=grammars))

    def _llm_result(self, engine: MavisEngine, generations: Sequence[decoding.Generation]) -> LLMResult:
        return LLMResult(
            generations=[[Generation(text=g.text, generation_info=self._metadata(engine, g))] for g in generations],
            llm_output={"model_name": engine.base.model_id, "token_usage": _usage(generations)},
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine, config, rows, seeds, grammars = self._decode([prompt], stop, kwargs)
        for step in engine.stream([prompt], rows, config, seeds=seeds, grammars=grammars):
            chunk = self._chunk(engine, step)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        await self.aengine()
        engine, config, rows, seeds, grammars = self._decode([prompt], stop, kwargs)
        async for step in engine.astream([prompt], rows, config, seeds=seeds, grammars=grammars):
            chunk = self._chunk(engine, step)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _chunk(self, engine: MavisEngine, step: decoding.StreamStep) -> GenerationChunk | None:
        finished = step.finished[0]
        info = self._metadata(engine, finished) if finished is not None else None
        if not step.deltas[0] and info is None:
            return None
        return GenerationChunk(text=step.deltas[0], generation_info=info)


class ChatMavis(_MavisParams, BaseChatModel):
    """A chat model steered by MAVIS value heads; messages go through the tokenizer's chat template.

    Example:
        chat = ChatMavis(heads=["positivity", "conciseness"], weights={"positivity": 0.5, "conciseness": 0.5})
        chat.invoke("Describe your weekend.", weights={"positivity": 1.0})
    """

    @property
    def _llm_type(self) -> str:
        return "mavis-chat"

    def _resolve_model_profile(self) -> ModelProfile | None:
        """What agent middleware reads, known without loading the model: the context (from the
        base's config.json for a local directory, 8192 for the packaged SmolLM2) and features."""
        context = _context_length(self._model_name())
        profile = ModelProfile(
            name=self._model_name(),
            open_weights=True,
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            pdf_inputs=False,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
            temperature=True,
        )
        if context is not None:
            profile["max_input_tokens"] = context
        return profile

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool] | None = None,
    ) -> int:
        """Tokens of the prompt the model reads for ``messages`` (chat template applied, with
        ``tools`` rendered as a call would render them)."""
        engine = self.engine()
        prompt = self._format(engine, messages, format_tools(tools or []))
        return len(engine.base.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _format(
        self, engine: MavisEngine, messages: Sequence[BaseMessage], tools: Sequence[Mapping[str, Any]] = ()
    ) -> str:
        tokenizer = engine.base.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigurationError(
                f"base model {engine.base.model_id!r} has no chat template; use MavisLLM for plain prompts"
            )
        native = template_takes_tools(tokenizer)
        chat = render_messages(messages, tools, native=native)
        extra: dict[str, Any] = {"tools": [dict(t) for t in tools]} if native and tools else {}
        return cast(str, tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **extra))

    def _tool_setup(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str, list[Mapping[str, Any]]]:
        """Split a call's kwargs into decoding kwargs (a tool grammar folded in), the tool mode and
        the tools the answer may call (`mavis_lc.tools.chosen_tools`)."""
        tool_keys = ("tools", "tool_choice", "parallel_tool_calls", "ls_structured_output_format")
        rest = {k: v for k, v in kwargs.items() if k not in tool_keys}
        tools = format_tools(kwargs.get("tools") or [])
        mode, usable = chosen_tools(tools, kwargs.get("tool_choice")) if tools else ("none", [])
        grammar = tool_grammar(mode, usable, parallel=bool(kwargs.get("parallel_tool_calls")))
        if grammar is not None:
            if rest.get("grammar") is not None:
                raise ConfigurationError(
                    "a call cannot take both tools and a grammar: the tools' grammar is the call's"
                )
            rest["grammar"] = grammar
        return rest, mode, usable

    def _message(
        self, engine: MavisEngine, g: decoding.Generation, mode: str, tools: Sequence[Mapping[str, Any]]
    ) -> AIMessage:
        meta = self._metadata(engine, g)
        if mode == "none":
            return AIMessage(content=g.text, usage_metadata=_message_usage(g), response_metadata=meta)
        content, calls, invalid = parse_tool_calls(g.text, tools)
        return AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_message_usage(g),
            response_metadata={**meta, "finish_reason": "tool_calls" if calls else meta["finish_reason"]},
        )

    def _chat_request(
        self, batch: Sequence[Sequence[BaseMessage]], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> _ChatRequest:
        engine = self.engine()
        decode_kwargs, mode, tools = self._tool_setup(kwargs)
        shown = tools if mode != "none" else []
        prompts = [self._format(engine, m, shown) for m in batch]
        engine, config, rows, seeds, grammars = self._decode(prompts, stop, decode_kwargs)
        return _ChatRequest(engine, prompts, config, rows, seeds, grammars, mode, tools)

    def _chat_results(self, request: _ChatRequest, generations: Sequence[decoding.Generation]) -> list[ChatGeneration]:
        engine = request.engine
        return [
            ChatGeneration(
                message=self._message(engine, g, request.mode, request.tools), generation_info=self._metadata(engine, g)
            )
            for g in generations
        ]

    def _chat_generations(
        self, batch: Sequence[Sequence[BaseMessage]], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> list[ChatGeneration]:
        r = self._chat_request(batch, stop, kwargs)
        return self._chat_results(r, r.engine.generate(r.prompts, r.rows, r.config, seeds=r.seeds, grammars=r.grammars))

    async def _achat_generations(
        self, batch: Sequence[Sequence[BaseMessage]], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> list[ChatGeneration]:
        """As `_chat_generations`, awaited: concurrent calls share the engine's batched decodes."""
        await self.aengine()
        r = self._chat_request(batch, stop, kwargs)
        generations = await r.engine.agenerate(r.prompts, r.rows, r.config, seeds=r.seeds, grammars=r.grammars)
        return self._chat_results(r, generations)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=self._chat_generations([messages], stop, kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=await self._achat_generations([messages], stop, kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Text streams as it is decoded; an answer that starts a tool call is held back and
        ends in one chunk of ``tool_call_chunks`` (and any text around the calls)."""
        r = self._chat_request([messages], stop, kwargs)
        chunker = _ChatChunker(self, r)
        for step in r.engine.stream(r.prompts, r.rows, r.config, seeds=r.seeds, grammars=r.grammars):
            for chunk in chunker.feed(step):
                if run_manager and chunk.generation_info is None:  # a text delta
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """As `_stream`, awaited: concurrent streams share the engine's batched decodes."""
        await self.aengine()
        r = self._chat_request([messages], stop, kwargs)
        chunker = _ChatChunker(self, r)
        async for step in r.engine.astream(r.prompts, r.rows, r.config, seeds=r.seeds, grammars=r.grammars):
            for chunk in chunker.feed(step):
                if run_manager and chunk.generation_info is None:  # a text delta
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools the model may call (LangChain tools, pydantic models, TypedDicts, functions
        or OpenAI tool dicts).

        ``tool_choice``: None or ``"auto"`` (the model answers in text or calls tools),
        ``"none"`` (text only), ``"any"`` / ``"required"`` / True (at least one call), a tool's
        name or ``{"type": "function", "function": {"name": ...}}`` (calls of that tool). Calls
        are grammar-enforced: a call is always well-formed JSON naming a bound tool with
        arguments that follow its schema. The answer's calls are in ``AIMessage.tool_calls``;
        one call per answer unless ``parallel_tool_calls``.

        Raises:
            ConfigurationError: a tool that cannot be converted, or a ``tool_choice`` not allowed.
        """
        formatted = format_tools(tools)
        chosen_tools(formatted, tool_choice)  # refuse a bad choice now, not at the first call
        return self.bind(tools=formatted, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable whose output follows ``schema`` (a pydantic model, a TypedDict, a JSON schema
        or an OpenAI tool dict): a pydantic instance for a pydantic model, else a dict.

        ``method``: ``json_schema`` (the answer is a JSON object the schema's grammar enforces),
        ``function_calling`` (a forced call of a tool made of the schema) or ``json_mode`` (any
        JSON object; ``schema`` may be None, the prompt should say what to write). With
        ``include_raw`` the output is ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
        ``strict`` is accepted for compatibility: every method here is grammar-enforced.

        Raises:
            ConfigurationError: an unknown method or extra keyword arguments.
        """
        if kwargs:
            raise ConfigurationError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if schema is None and method != "json_mode":
            raise ConfigurationError(f"method {method!r} needs a schema; only json_mode takes none")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic v2 or v1
        parser: Runnable[Any, Any]
        if method == "function_calling":
            tool = format_tools([schema])[0]
            name = tool["function"]["name"]
            llm: Runnable[Any, Any] = self.bind_tools(
                [tool], tool_choice=name, ls_structured_output_format={"kwargs": {"method": method}, "schema": tool}
            )
            if is_pydantic:
                parser = PydanticToolsParser(tools=[cast(type[BaseModel], schema)], first_tool_only=True)
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            traced = convert_to_json_schema(cast(Any, schema)) if schema is not None else None  # what tracing shows
            json_schema: dict[str, Any] = {"type": "object"}
            if method == "json_schema" and traced is not None:
                json_schema = closed_schema(traced)  # the schema's keys and no others
            llm = self.bind(
                grammar=Grammar.json_schema(json_schema),
                ls_structured_output_format={"kwargs": {"method": method}, "schema": traced},
            )
            parser = (
                PydanticOutputParser(pydantic_object=cast(type[BaseModel], schema))
                if is_pydantic and method == "json_schema"
                else RunnableLambda(_parse_json_answer)
            )
        else:
            raise ConfigurationError(
                f"method {method!r} is not allowed; allowed: json_schema, function_calling, json_mode"
            )
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    def batch(  # type: ignore[override]
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Decode every input in one batched loop; ``weights`` may be a list aligned with ``inputs``."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        kwargs = _batch_kwargs(configs, kwargs)
        if self._cache_active(self.cache) or configs[0].get("max_concurrency") is not None:
            return self._batch_one_by_one(inputs, configs, return_exceptions, kwargs)
        stop = kwargs.pop("stop", None)
        batch = [self._convert_input(x).to_messages() for x in inputs]
        managers = [
            CallbackManager.configure(*self._callback_sources(c)).on_chat_model_start(
                self._serialized, [m], **self._start_options(c, stop, len(inputs))
            )[0]
            for c, m in zip(configs, batch, strict=True)
        ]
        try:
            generations = self._chat_generations(batch, stop, kwargs)
        except Exception as exc:
            for manager in managers:
                manager.on_llm_error(exc)
            if return_exceptions:
                return cast(list[BaseMessage], [exc for _ in inputs])
            raise
        for manager, generation in zip(managers, generations, strict=True):
            manager.on_llm_end(LLMResult(generations=[[generation]]))
        return [g.message for g in generations]

    async def abatch(  # type: ignore[override]
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """As `batch`, with async callbacks; the decode is awaited (shared with concurrent callers)."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        kwargs = _batch_kwargs(configs, kwargs)
        loop = asyncio.get_running_loop()
        if self._cache_active(self.cache) or configs[0].get("max_concurrency") is not None:
            call = partial(self._batch_one_by_one, inputs, configs, return_exceptions, kwargs)
            return await loop.run_in_executor(None, call)
        stop = kwargs.pop("stop", None)
        batch = [self._convert_input(x).to_messages() for x in inputs]
        managers = [
            (
                await AsyncCallbackManager.configure(*self._callback_sources(c)).on_chat_model_start(
                    self._serialized, [m], **self._start_options(c, stop, len(inputs))
                )
            )[0]
            for c, m in zip(configs, batch, strict=True)
        ]
        try:
            generations = await self._achat_generations(batch, stop, kwargs)
        except Exception as exc:
            for manager in managers:
                await manager.on_llm_error(exc)
            if return_exceptions:
                return cast(list[BaseMessage], [exc for _ in inputs])
            raise
        for manager, generation in zip(managers, generations, strict=True):
            await manager.on_llm_end(LLMResult(generations=[[generation]]))
        return [g.message for g in generations]

    def _callback_sources(self, config: RunnableConfig) -> tuple[Any, ...]:
        """``CallbackManager.configure`` arguments of one input: its config's callbacks, tags and
        metadata next to this model's."""
        return (
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            config.get("metadata"),
            self.metadata,
        )

    def _start_options(self, config: RunnableConfig, stop: list[str] | None, batch_size: int) -> dict[str, Any]:
        """Keyword arguments of ``on_chat_model_start`` for one input of a batch."""
        return {
            "invocation_params": self._identity(),
            "options": {"stop": stop},
            "name": config.get("run_name"),
            "run_id": config.get("run_id"),
            "batch_size": batch_size,
        }

    def _batch_one_by_one(
        self,
        inputs: list[LanguageModelInput],
        configs: list[RunnableConfig],
        return_exceptions: bool,
        kwargs: dict[str, Any],
    ) -> list[BaseMessage]:
        """Per-input invokes, so a cache keys every input on its own weights and seed."""
        rows = _per_row(kwargs)
        _check_rows(rows, len(inputs))
        outputs: list[Any] = []
        for i, (x, c) in enumerate(zip(inputs, configs, strict=True)):
            call = {**kwargs, **{name: values[i] for name, values in rows.items()}}
            try:
                outputs.append(self.invoke(x, {**c, "max_concurrency": None}, **call))
            except Exception as exc:
                if not return_exceptions:
                    raise
                outputs.append(exc)
        return outputs


@functools.lru_cache(maxsize=64)
def _context_length(model: str) -> int | None:
    """The context of a base model from its config.json without loading it (None if unknown)."""
    if model == PACKAGED_BASE_MODEL:
        return PACKAGED_CONTEXT
    config = Path(model) / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


@dataclass
class _ChatRequest:
    """A chat call made ready to decode: its prompts, decoding arguments and tool mode."""

    engine: MavisEngine
    prompts: list[str]
    config: decoding.DecodeConfig
    rows: list[dict[str, float]]
    seeds: list[int] | None
    grammars: list[Any] | None
    mode: str
    tools: list[Mapping[str, Any]]


class _ChatChunker:
    """Turns a one-row decode's steps into chat chunks: text deltas as they come (held back once
    an answer starts a tool call), then one last chunk with the tool calls, usage and metadata."""

    def __init__(self, model: ChatMavis, request: _ChatRequest) -> None:
        self.model = model
        self.request = request
        self.text = ""
        self.calling = request.mode == "required"

    def feed(self, step: decoding.StreamStep) -> list[ChatGenerationChunk]:
        out: list[ChatGenerationChunk] = []
        mode, tools, engine = self.request.mode, self.request.tools, self.request.engine
        delta = step.deltas[0]
        if delta:
            if mode == "auto" and not self.text and delta.lstrip().startswith("<"):
                self.calling = True
            self.text += delta
            if not self.calling:
                out.append(ChatGenerationChunk(message=AIMessageChunk(content=delta)))
        finished = step.finished[0]
        if finished is not None:
            meta = self.model._metadata(engine, finished)
            message = self.model._message(engine, finished, mode, tools) if self.calling else None
            calls = message.tool_calls if message else []
            chunks = [
                tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
                for i, c in enumerate(calls)
            ]
            chunks += [
                tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=len(calls) + i)
                for i, c in enumerate(message.invalid_tool_calls if message else [])
            ]
            out.append(
                ChatGenerationChunk(
                    message=AIMessageChunk(
                        content=message.content if message else "",
                        tool_call_chunks=chunks,
                        usage_metadata=_message_usage(finished),
                        response_metadata=message.response_metadata if message else meta,
                        chunk_position="last",
                    ),
                    generation_info=meta,
                )
            )
        return out


def _parse_json_answer(message: BaseMessage) -> Any:
    """The JSON value of an answer; one cut short (max_tokens) raises rather than parse partly.

    Raises:
        OutputParserException: the answer is not one complete JSON value.
    """
    try:
        return json.loads(message.text)
    except json.JSONDecodeError as exc:
        reason = message.response_metadata.get("finish_reason")
        raise OutputParserException(
            f"answer is not complete JSON ({exc}; finish_reason {reason})", llm_output=message.text
        ) from exc


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
