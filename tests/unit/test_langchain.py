"""MavisLLM and ChatMavis on a tiny model: weights per call / per row, cache keys, streaming, async, LCEL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import ConfigurableField

import mavis_lc
from mavis_lc import ChatMavis, MavisLLM
from mavis_lc.decoding import MavisDecoder
from mavis_lc.errors import ConfigurationError, DecodingParameterError, InvalidWeightError, UnknownObjectiveError
from tests.tiny import save_random_heads

PROMPTS = ["Hello there", "Tell me about cats", "The quick brown fox", "I love sunny days"]


@pytest.fixture(scope="module")
def head_paths(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return save_random_heads(tiny_model_dir, ["positivity", "conciseness"], tmp_path_factory.mktemp("heads"), seed=100)


@pytest.fixture
def llm(tiny_model_dir: Path, head_paths: list[str]) -> MavisLLM:
    return MavisLLM(base_model=str(tiny_model_dir), heads=head_paths, max_tokens=12, top_k=20, beta=3.0, seed=0)


@pytest.fixture
def chat(tiny_model_dir: Path, head_paths: list[str]) -> ChatMavis:
    return ChatMavis(base_model=str(tiny_model_dir), heads=head_paths, max_tokens=12, top_k=20, beta=3.0, seed=0)


@pytest.fixture(autouse=True)
def no_global_cache() -> Any:
    set_llm_cache(None)
    yield
    set_llm_cache(None)


class Counter(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.starts = 0
        self.ends = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends += 1


def test_public_api_is_what_is_exported() -> None:
    assert set(mavis_lc.__all__) >= {"MavisLLM", "ChatMavis", "MavisDecoder", "DecodeConfig", "MavisError"}
    for name in mavis_lc.__all__:
        assert getattr(mavis_lc, name) is not None


def test_construction_is_cheap_and_loads_nothing(tiny_model_dir: Path) -> None:
    llm = MavisLLM(base_model="/does/not/exist", heads=["missing@production"])
    assert llm.beta == 1.0  # nothing was resolved or loaded


def test_per_call_weights_change_output_and_match_decoder(llm: MavisLLM) -> None:
    a = llm.invoke(PROMPTS[0], weights={"positivity": 1.0})
    b = llm.invoke(PROMPTS[0], weights={"conciseness": 1.0})
    assert a != b
    engine = llm.engine()
    direct = engine.decoder.generate([PROMPTS[0]], {"positivity": 1.0}, llm._decode([PROMPTS[0]], None, {})[1])
    assert a == direct[0].text
    assert llm.bind(weights={"positivity": 1.0}).invoke(PROMPTS[0]) == a
    assert llm.model_copy(update={"weights": {"positivity": 1.0}}).invoke(PROMPTS[0]) == a


def test_default_weights_are_equal_over_heads(llm: MavisLLM) -> None:
    assert llm.invoke(PROMPTS[1]) == llm.invoke(PROMPTS[1], weights={"positivity": 0.5, "conciseness": 0.5})


def test_batch_takes_per_row_weights_in_one_decode(llm: MavisLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}, {"positivity": 0.3, "conciseness": 0.7}, {}]
    alone = [llm.invoke(p, weights=w) for p, w in zip(PROMPTS, rows, strict=True)]
    calls: list[int] = []
    original = MavisDecoder.stream

    def counting(self: MavisDecoder, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(MavisDecoder, "stream", counting)
    assert llm.batch(PROMPTS, weights=rows) == alone
    assert calls == [4]
    assert llm.batch(PROMPTS, {"max_concurrency": 2}, weights=rows) == alone


def test_configurable_fields_reuse_the_loaded_engine(llm: MavisLLM) -> None:
    configurable = llm.configurable_fields(beta=ConfigurableField(id="strength"), weights=ConfigurableField(id="w"))
    steered = configurable.invoke(PROMPTS[0], config={"configurable": {"w": {"positivity": 1.0}}})
    unsteered = configurable.invoke(PROMPTS[0], config={"configurable": {"strength": 0.0}})
    assert steered == llm.invoke(PROMPTS[0], weights={"positivity": 1.0})
    assert unsteered == llm.invoke(PROMPTS[0], beta=0.0)
    assert llm.engine() is llm.model_copy(update={"beta": 2.0}).engine()


def test_llm_cache_never_returns_a_result_computed_with_other_weights(llm: MavisLLM) -> None:
    set_llm_cache(InMemoryCache())
    calls: list[int] = []
    original = MavisDecoder.stream

    def counting(self: MavisDecoder, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(prompts))
        return original(self, prompts, *args, **kwargs)

    MavisDecoder.stream = counting  # type: ignore[method-assign]
    try:
        a = llm.invoke(PROMPTS[0], weights={"positivity": 1.0})
        b = llm.invoke(PROMPTS[0], weights={"conciseness": 1.0})
        assert a != b
        assert llm.invoke(PROMPTS[0], weights={"positivity": 1.0}) == a
        assert llm.invoke(PROMPTS[0], beta=0.0) != a
        assert len(calls) == 3  # the repeat was served from the cache, nothing else was
        rows = [{"positivity": 1.0}, {"conciseness": 1.0}]
        assert llm.batch([PROMPTS[0], PROMPTS[0]], weights=rows) == [a, b]
        assert len(calls) == 3
    finally:
        MavisDecoder.stream = original  # type: ignore[method-assign]


def test_chat_cache_keys_on_weights(chat: ChatMavis) -> None:
    set_llm_cache(InMemoryCache())
    a = chat.invoke(PROMPTS[0], weights={"positivity": 1.0}).content
    b = chat.invoke(PROMPTS[0], weights={"conciseness": 1.0}).content
    assert a != b
    assert chat.invoke(PROMPTS[0], weights={"positivity": 1.0}).content == a
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}]
    assert [m.content for m in chat.batch([PROMPTS[0], PROMPTS[0]], weights=rows)] == [a, b]


def test_stream_fires_callbacks_and_matches_invoke(llm: MavisLLM) -> None:
    counter = Counter()
    chunks = list(llm.stream(PROMPTS[2], config={"callbacks": [counter]}, weights={"positivity": 1.0}))
    assert "".join(chunks) == llm.invoke(PROMPTS[2], weights={"positivity": 1.0})
    assert "".join(counter.tokens) == "".join(chunks)
    assert len([t for t in counter.tokens if t]) >= 2


def test_generation_info_carries_statistics_and_heads(llm: MavisLLM) -> None:
    result = llm.generate([PROMPTS[0]], weights={"positivity": 1.0})
    info = result.generations[0][0].generation_info or {}
    assert info["finish_reason"] in {"stop", "length"}
    assert info["weights"] == {"positivity": 1.0}
    assert info["completion_tokens"] >= 1 and info["prompt_tokens"] >= 1
    assert isinstance(info["kl"], float) and info["kl"] > 0
    assert isinstance(info["kl_topk"], float) and info["kl_topk"] < info["kl"]  # the top-k cut is not counted
    assert {h["objective"] for h in info["heads"]} == {"positivity", "conciseness"}
    assert all(len(h["sha256"]) == 64 for h in info["heads"])
    assert result.llm_output and result.llm_output["token_usage"]["completion_tokens"] == info["completion_tokens"]


def test_chat_messages_usage_and_metadata(chat: ChatMavis) -> None:
    message = chat.invoke([SystemMessage("Be nice."), HumanMessage("Tell me about cats")])
    assert isinstance(message, AIMessage)
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == message.response_metadata["completion_tokens"]
    assert message.usage_metadata["input_tokens"] > 10
    assert message.response_metadata["weights"] == {"positivity": 0.5, "conciseness": 0.5}


def test_chat_applies_the_chat_template(chat: ChatMavis, llm: MavisLLM) -> None:
    engine = chat.engine()
    prompt = engine.base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about cats"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.invoke("Tell me about cats").content == llm.invoke(prompt)


def test_chat_batch_is_one_decode_with_per_row_weights(chat: ChatMavis, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}, {}]
    alone = [chat.invoke(p, weights=w).content for p, w in zip(PROMPTS, rows, strict=False)]
    calls: list[int] = []
    original = MavisDecoder.stream
    monkeypatch.setattr(
        MavisDecoder, "stream", lambda self, p, *a, **k: calls.append(len(p)) or original(self, p, *a, **k)
    )
    counter = Counter()
    out = chat.batch(PROMPTS[:3], {"callbacks": [counter]}, weights=rows)
    assert [m.content for m in out] == alone
    assert calls == [3]
    assert (counter.starts, counter.ends) == (3, 3)


async def test_async_paths_match_sync(llm: MavisLLM, chat: ChatMavis) -> None:
    expected = llm.invoke(PROMPTS[0], weights={"positivity": 1.0})
    results = await asyncio.gather(*[llm.ainvoke(PROMPTS[0], weights={"positivity": 1.0}) for _ in range(4)])
    assert results == [expected] * 4
    streamed = [c async for c in llm.astream(PROMPTS[0], weights={"positivity": 1.0})]
    assert "".join(streamed) == expected
    assert await llm.abatch(PROMPTS[:2]) == llm.batch(PROMPTS[:2])
    chat_expected = chat.invoke(PROMPTS[1]).content
    assert [m.content for m in await chat.abatch([PROMPTS[1], PROMPTS[1]])] == [chat_expected] * 2
    chunks = [c async for c in chat.astream(PROMPTS[1])]
    assert "".join(str(c.content) for c in chunks) == chat_expected
    assert sum(1 for c in chunks if c.usage_metadata) == 1


@pytest.mark.parametrize("mode", ["llm", "chat"])
async def test_lcel_chains(mode: str, llm: MavisLLM, chat: ChatMavis) -> None:
    if mode == "llm":
        chain = PromptTemplate.from_template("Write about {topic}.") | llm | StrOutputParser()
    else:
        chain = ChatPromptTemplate.from_messages([("human", "Write about {topic}.")]) | chat | StrOutputParser()
    inputs = [{"topic": "cats"}, {"topic": "rain"}]
    first = chain.invoke(inputs[0])
    assert isinstance(first, str) and first
    assert "".join(chain.stream(inputs[0])) == first
    assert "".join([c async for c in chain.astream(inputs[0])]) == first
    assert chain.batch(inputs)[0] == first
    assert (await chain.abatch(inputs))[0] == first
    events = [e async for e in chain.astream_events(inputs[0], version="v2")]
    kinds = {e["event"] for e in events}
    assert {"on_chain_start", "on_chain_end"} <= kinds
    assert kinds & {"on_llm_stream", "on_chat_model_stream"}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"weights": {"humor": 1.0}}, UnknownObjectiveError),
        ({"weights": {"positivity": -1.0}}, InvalidWeightError),
        ({"weights": {"positivity": float("nan")}}, InvalidWeightError),
        ({"top_k": 0}, DecodingParameterError),
        ({"temperature": -0.5}, DecodingParameterError),
        ({"max_tokens": 0}, DecodingParameterError),
        ({"max_tokens": 100_000}, DecodingParameterError),
        ({"frobnicate": 1}, DecodingParameterError),
    ],
)
def test_bad_call_parameters_are_typed_errors(llm: MavisLLM, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        llm.invoke(PROMPTS[0], **kwargs)


@pytest.mark.parametrize("mode", ["llm", "chat"])
async def test_chains_pass_weights_per_input_through_configurable(
    mode: str, llm: MavisLLM, chat: ChatMavis, monkeypatch: pytest.MonkeyPatch
) -> None:
    model: Any = llm if mode == "llm" else chat
    prompt: Any = (
        PromptTemplate.from_template("{topic}")
        if mode == "llm"
        else ChatPromptTemplate.from_messages([("human", "{topic}")])
    )
    chain = prompt | model | StrOutputParser()
    rows = [{"positivity": 1.0}, {"conciseness": 1.0}, {"positivity": 0.2, "conciseness": 0.8}]
    inputs = [{"topic": t} for t in PROMPTS[:3]]
    expected = [
        chain.invoke(x, config={"configurable": {"mavis": {"weights": w}}}) for x, w in zip(inputs, rows, strict=True)
    ]
    direct = [(prompt | model.bind(weights=w) | StrOutputParser()).invoke(x) for x, w in zip(inputs, rows, strict=True)]
    assert expected == direct
    assert len(set(expected)) == 3
    calls: list[int] = []
    original = MavisDecoder.stream
    monkeypatch.setattr(
        MavisDecoder, "stream", lambda self, p, *a, **k: calls.append(len(p)) or original(self, p, *a, **k)
    )
    configs: Any = [{"configurable": {"mavis": {"weights": w}}} for w in rows]
    assert chain.batch(inputs, configs) == expected
    assert await chain.abatch(inputs, configs) == expected
    assert calls == [3, 3]
    streamed = "".join(chain.stream(inputs[1], config={"configurable": {"mavis": {"weights": rows[1]}}}))
    assert streamed == expected[1]
    with pytest.raises(ConfigurationError, match="only weights and seed may differ"):
        chain.batch(
            inputs[:2], [{"configurable": {"mavis": {"beta": 1.0}}}, {"configurable": {"mavis": {"beta": 2.0}}}]
        )


@pytest.mark.parametrize("mode", ["llm", "chat"])
def test_batch_takes_per_row_seeds_for_n_samples_of_a_prompt(
    mode: str, llm: MavisLLM, chat: ChatMavis, monkeypatch: pytest.MonkeyPatch
) -> None:
    model: Any = llm if mode == "llm" else chat

    def text(x: Any) -> str:
        return x if isinstance(x, str) else str(x.content)

    seeds = [0, 1, 2, 3]
    alone = [text(model.invoke(PROMPTS[0], seed=s, weights={"positivity": 1.0})) for s in seeds]
    assert len(set(alone)) > 1  # different seeds sample different continuations
    calls: list[int] = []
    original = MavisDecoder.stream
    monkeypatch.setattr(
        MavisDecoder, "stream", lambda self, p, *a, **k: calls.append(len(p)) or original(self, p, *a, **k)
    )
    batch = model.batch([PROMPTS[0]] * 4, seed=seeds, weights={"positivity": 1.0})
    assert [text(x) for x in batch] == alone
    configs: Any = [{"configurable": {"mavis": {"seed": s, "weights": {"positivity": 1.0}}}} for s in seeds]
    assert [text(x) for x in model.batch([PROMPTS[0]] * 4, configs)] == alone
    assert calls == [4, 4]
    with pytest.raises(ConfigurationError, match="3 seed"):
        model.batch([PROMPTS[0]] * 4, seed=[0, 1, 2])
    with pytest.raises(ConfigurationError, match="per-row seed must be an int"):
        model.batch([PROMPTS[0]] * 2, seed=[0, "one"])


def test_cache_keys_on_per_row_seeds(llm: MavisLLM) -> None:
    set_llm_cache(InMemoryCache())
    a, b = (llm.invoke(PROMPTS[0], seed=s) for s in (5, 6))
    assert a != b
    assert llm.batch([PROMPTS[0], PROMPTS[0]], seed=[6, 5]) == [b, a]
