"""`MavisLLM`: a LangChain text-completion model steered by MAVIS value heads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.outputs import (
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list

from mavis_lc import decoding
from mavis_lc.decoding.engine import MavisEngine
from mavis_lc.langchain.params import (
    CALL_PARAMS,
    _batch_kwargs,
    _check_rows,
    _MavisParams,
    _per_prompt,
    _per_row,
    _row_slice,
    _usage,
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
