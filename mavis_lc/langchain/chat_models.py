"""`ChatMavis`: a LangChain chat model steered by MAVIS value heads (via the chat template),
with tool calling and structured output under grammars."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    LLMResult,
)
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel

from mavis_lc import decoding
from mavis_lc.base_model import PACKAGED_CONTEXT
from mavis_lc.decoding.engine import MavisEngine
from mavis_lc.decoding.grammar import Grammar
from mavis_lc.errors import ConfigurationError
from mavis_lc.langchain.params import (
    _batch_kwargs,
    _check_rows,
    _MavisParams,
    _message_usage,
    _per_row,
)
from mavis_lc.langchain.tools import (
    chosen_tools,
    closed_schema,
    format_tools,
    parse_tool_calls,
    render_messages,
    response_format_schema,
    template_takes_tools,
    tool_grammar,
)
from mavis_lc.settings import PACKAGED_BASE_MODEL

_TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "strict", "ls_structured_output_format")
"""Call parameters of tool calling and structured output, as LangChain binds them (`ChatMavis._tool_setup`)."""


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
        the tools the answer may call (`mavis_lc.langchain.tools.chosen_tools`)."""
        rest = {k: v for k, v in kwargs.items() if k not in _TOOL_KEYS}
        strict = kwargs.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ConfigurationError(f"strict must be a bool or None, got {strict!r}")
        tools = format_tools(kwargs.get("tools") or [])
        mode, usable = chosen_tools(tools, kwargs.get("tool_choice")) if tools else ("none", [])
        answer_schema = response_format_schema(kwargs.get("response_format"))
        grammar = tool_grammar(
            mode, usable, parallel=bool(kwargs.get("parallel_tool_calls")), answer_schema=answer_schema
        )
        if grammar is not None:
            if rest.get("grammar") is not None:
                raise ConfigurationError(
                    "a call cannot take both a grammar and tools or a response_format: theirs is the call's grammar"
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
        response_format: dict[str, Any] | type | None = None,
        strict: bool | None = None,
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

        ``response_format`` (OpenAI's form, as LangChain agents bind it for a structured
        response: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
        ``{"type": "json_object"}``, or a pydantic model): an answer that calls no tool is one
        JSON value of that schema, grammar-enforced (`response_format_schema`). ``strict`` is
        accepted for compatibility: calls and answers are always schema-exact here.

        Raises:
            ConfigurationError: a tool that cannot be converted, a ``tool_choice`` not allowed, or
                a ``response_format`` of none of the allowed forms.
        """
        formatted = format_tools(tools)
        chosen_tools(formatted, tool_choice)  # refuse a bad choice now, not at the first call
        response_format_schema(response_format)
        if response_format is not None:
            kwargs["response_format"] = response_format
        if strict is not None:
            kwargs["strict"] = strict
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
