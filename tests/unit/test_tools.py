"""Tool calling and structured output in ChatMavis on the tiny model: grammar-enforced calls,
tool_choice, history rendering, parsing, streaming chunks, per-call parameters inside graphs."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from mavis_lc import ChatMavis
from mavis_lc.decoding.grammar import GrammarCompiler, GrammarError
from mavis_lc.errors import ConfigurationError
from mavis_lc.langchain.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    format_tools,
    parse_tool_calls,
    render_messages,
    response_format_schema,
    tool_grammar,
)
from tests.tiny import save_random_heads


class get_weather(BaseModel):
    """Weather forecast for a city."""

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=9)


class add(BaseModel):
    """Add two integers."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


@tool
def lookup(query: str) -> str:
    """Look something up."""
    return query


class Person(BaseModel):
    """Someone."""

    name: str = Field(max_length=5)
    age: int = Field(ge=0, le=120)


class Pet(TypedDict):
    """A pet."""

    legs: int
    tame: bool


@pytest.fixture
def chat(tiny_model_dir: Path) -> ChatMavis:
    return ChatMavis(base_model=str(tiny_model_dir), max_tokens=120, top_k=20, beta=0.0, seed=0)


@pytest.mark.parametrize(
    "choice", ["any", "required", True, "get_weather", {"type": "function", "function": {"name": "add"}}]
)
def test_forced_tool_choices_always_give_a_valid_call(chat: ChatMavis, choice: Any) -> None:
    bound = chat.bind_tools([get_weather, add], tool_choice=choice)
    for seed in range(3):
        message = bound.invoke("What is the weather in Paris?", seed=seed)
        assert isinstance(message, AIMessage) and len(message.tool_calls) == 1 and not message.invalid_tool_calls
        call = message.tool_calls[0]
        expected = {"get_weather": {"city": str, "days": int}, "add": {"a": int, "b": int}}
        if isinstance(choice, str) and choice in expected:
            assert call["name"] == choice
        if isinstance(choice, dict):
            assert call["name"] == "add"
        assert {k: type(v) for k, v in call["args"].items()} == expected[call["name"]]
        assert call["id"].startswith("call_") and message.response_metadata["finish_reason"] == "tool_calls"
        assert message.response_metadata["constrained"] is True


def test_auto_and_none(chat: ChatMavis) -> None:
    free = chat.invoke("hello", seed=4)
    auto = chat.bind_tools([get_weather]).invoke("hello", seed=4)
    none = chat.bind_tools([get_weather], tool_choice="none").invoke("hello", seed=4)
    assert none.content == free.content and not none.tool_calls  # no tools shown, no grammar
    assert auto.tool_calls or not auto.content.startswith("<")  # text may not start a broken call
    with pytest.raises(ConfigurationError, match="tool_choice 'weather' is not allowed"):
        chat.bind_tools([get_weather], tool_choice="weather")


def test_parallel_calls_only_when_asked() -> None:
    tools = format_tools([get_weather, add, lookup])  # pydantic models and a LangChain tool
    assert [t["function"]["name"] for t in tools] == ["get_weather", "add", "lookup"]
    single = tool_grammar("required", tools)
    parallel = tool_grammar("required", tools, parallel=True)
    assert single is not None and parallel is not None
    assert "calls: call\n" in single.source and "calls: call+" in parallel.source
    assert '"additionalProperties": false' in single.source  # only the tool's own parameters


def test_history_renders_calls_and_results_and_tools_in_the_system_turn() -> None:
    tools = format_tools([get_weather])
    call = {"name": "get_weather", "args": {"city": "Oslo", "days": 2}, "id": "call_1", "type": "tool_call"}
    history = [
        SystemMessage("Be brief."),
        HumanMessage("Weather in Oslo?"),
        AIMessage(content="", tool_calls=[call]),
        ToolMessage("rain", tool_call_id="call_1"),
    ]
    chat = render_messages(history, tools, native=False)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in chat[0]["content"]
    assert json.loads(chat[2]["content"].removeprefix(CALL_OPEN).removesuffix(CALL_CLOSE)) == {
        "name": "get_weather",
        "arguments": {"city": "Oslo", "days": 2},
    }
    assert chat[3]["content"] == "<tool_response>\nrain\n</tool_response>"
    native = render_messages(history, tools, native=True)
    assert native[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}
    assert native[3] == {"role": "tool", "content": "rain", "tool_call_id": "call_1"}


def test_parsing_sorts_valid_and_invalid_calls() -> None:
    tools = format_tools([get_weather])
    text = (
        'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>'
        '<tool_call>\n{"name": "fly", "arguments": {}}\n</tool_call><tool_call>\n{"name": "get_weather", "argu'
    )
    content, calls, invalid = parse_tool_calls(text, tools)
    assert content == "Sure."
    assert [c["args"] for c in calls] == [{"city": "Rome", "days": 1}]
    assert [i["name"] for i in invalid] == [None, None] or [i["error"][:12] for i in invalid]
    assert "unknown tool 'fly'" in invalid[0]["error"] and "not JSON" in invalid[1]["error"]
    assert parse_tool_calls("plain answer", tools) == ("plain answer", [], [])


def test_streaming_a_call_ends_in_tool_call_chunks(chat: ChatMavis) -> None:
    bound = chat.bind_tools([get_weather], tool_choice="any")
    chunks = list(bound.stream("Weather in Paris?", seed=2))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert isinstance(merged, AIMessageChunk)
    invoked = bound.invoke("Weather in Paris?", seed=2)
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    assert merged.tool_call_chunks and merged.tool_call_chunks[0]["index"] == 0


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_always_parses(chat: ChatMavis, method: str) -> None:
    runnable = chat.with_structured_output(Person, method=method)
    for seed in range(3):
        person = runnable.invoke("Invent a person.", seed=seed)
        assert isinstance(person, Person) and 0 <= person.age <= 120 and len(person.name) <= 5
    pet = chat.with_structured_output(Pet, method=method).invoke("A pet?")
    assert set(pet) == {"legs", "tame"} and isinstance(pet["legs"], int) and isinstance(pet["tame"], bool)
    raw = chat.with_structured_output(Person, method=method, include_raw=True).invoke("Invent a person.")
    assert isinstance(raw["raw"], AIMessage) and isinstance(raw["parsed"], Person) and raw["parsing_error"] is None


def test_json_mode_gives_an_object_and_bad_methods_are_refused(chat: ChatMavis) -> None:
    out = chat.with_structured_output(None, method="json_mode").invoke("Any JSON.")
    assert isinstance(out, dict)
    with pytest.raises(ConfigurationError, match="method 'xml' is not allowed"):
        chat.with_structured_output(Person, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="needs a schema"):
        chat.with_structured_output(None)


def test_a_graph_node_gets_the_runs_mavis_parameters_without_passing_its_config(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    heads = save_random_heads(tiny_model_dir, ["positivity"], tmp_path, seed=3)
    chat = ChatMavis(base_model=str(tiny_model_dir), heads=heads, max_tokens=10, beta=3.0, seed=0)
    node = RunnableLambda(lambda x: chat.invoke(x).content)  # a node that drops its config
    steered = node.invoke("hello", config={"configurable": {"mavis": {"weights": {"positivity": 1.0}}}})
    plain = node.invoke("hello", config={"configurable": {"mavis": {"weights": {"positivity": 0.0}}}})
    direct = chat.invoke("hello", weights={"positivity": 1.0}).content
    assert steered == direct and plain != steered
    # Another model's flat "temperature" in the same run does not reach a namespaced run.
    other = node.invoke(
        "hello", config={"configurable": {"temperature": 0.0, "mavis": {"weights": {"positivity": 1.0}}}}
    )
    assert other == steered
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flat = node.invoke("hello", config={"configurable": {"weights": {"positivity": 1.0}}})
    assert flat == steered and any(issubclass(w.category, DeprecationWarning) for w in caught)
    with pytest.raises(ConfigurationError, match=r"configurable\['mavis'\] must map call parameters"):
        chat.invoke("hello", config={"configurable": {"mavis": {"wieghts": {}}}})


def test_a_tool_loop_on_langgraph_runs_the_call_and_answers_from_its_result(chat: ChatMavis) -> None:
    from langchain.agents import create_agent

    calls: list[dict[str, Any]] = []

    class City(BaseModel):
        city: str = Field(max_length=8)

    @tool(args_schema=City)
    def weather(city: str) -> str:
        """Weather of a city."""
        calls.append({"city": city})
        return "sunny"

    first = chat.bind_tools([weather], tool_choice="any").invoke("Weather in Paris?", seed=1)
    results = [weather.invoke(first.tool_calls[0])]  # a ToolCall in, a ToolMessage out
    assert calls == [first.tool_calls[0]["args"]] and results[0].tool_call_id == first.tool_calls[0]["id"]
    answer = chat.bind_tools([weather], tool_choice="none").invoke(
        [HumanMessage("Weather in Paris?"), first, *results], seed=1
    )
    assert isinstance(answer, AIMessage) and not answer.tool_calls and answer.content
    # create_agent binds the tools itself and runs the loop until a text answer.
    agent = create_agent(chat, tools=[weather])
    state = agent.invoke({"messages": [{"role": "user", "content": "Weather in Paris?"}]}, {"recursion_limit": 6})
    assert isinstance(state["messages"][-1], AIMessage)


def test_token_counts_and_profile_come_from_the_base(chat: ChatMavis, tiny_model_dir: Path) -> None:
    tokenizer = chat.engine().base.tokenizer
    assert chat.get_token_ids("hello there") == tokenizer("hello there", add_special_tokens=False)["input_ids"]
    assert chat.get_num_tokens("hello there") == len(chat.get_token_ids("hello there"))
    messages = [HumanMessage("hello there")]
    plain = chat.get_num_tokens_from_messages(messages)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert plain == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert chat.get_num_tokens_from_messages(messages, tools=[get_weather]) > plain + 20  # the tool block
    profile = ChatMavis(base_model=str(tiny_model_dir)).profile
    assert profile is not None and profile["max_input_tokens"] == 1024  # the tiny model's config
    assert profile["tool_calling"] and profile["structured_output"] and not profile["image_inputs"]
    assert ChatMavis().profile["max_input_tokens"] == 8192  # packaged SmolLM2, nothing loaded


def test_a_template_that_takes_tools_renders_them_itself(chat: ChatMavis) -> None:
    engine = chat.engine()
    tokenizer = engine.base.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m.get('tool_calls') %} CALLS:{{ m['tool_calls'][0]['function']['name'] }}{% endif %}\n{% endfor %}"
    )
    try:
        call = {"name": "get_weather", "args": {"city": "Oslo", "days": 2}, "id": "c1", "type": "tool_call"}
        history = [HumanMessage("Weather?"), AIMessage("", tool_calls=[call]), ToolMessage("rain", tool_call_id="c1")]
        prompt = chat._format(engine, history, format_tools([get_weather]))
    finally:
        tokenizer.chat_template = original
    assert prompt.startswith("TOOLS:get_weather;")
    assert "assistant:  CALLS:get_weather" in prompt and "tool: rain" in prompt
    assert "<tool_call>" not in prompt and "You can call functions" not in prompt


# -- OpenAI-style response_format (what create_agent's provider strategy binds) ------------------


def _openai_format(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema(), "strict": True},
    }


@pytest.mark.parametrize("form", ["openai", "pydantic"])
def test_response_format_gives_a_schema_answer_as_a_binding_and_a_call_parameter(chat: ChatMavis, form: str) -> None:
    response_format: Any = _openai_format(Person) if form == "openai" else Person
    bound = chat.bind(response_format=response_format)
    for seed in range(3):
        answer = bound.invoke("Invent a person.", seed=seed)
        person = Person.model_validate_json(answer.content)
        assert len(person.name) <= 5 and answer.response_metadata["constrained"] is True
    called = chat.invoke("Invent a person.", seed=0, response_format=response_format)
    assert called.content == bound.invoke("Invent a person.", seed=0).content
    objects = chat.invoke("Any JSON.", seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(objects.content), dict)
    text = chat.invoke("hello", seed=4, response_format={"type": "text"}, strict=True)
    assert text.content == chat.invoke("hello", seed=4).content and text.response_metadata["constrained"] is False


def test_response_format_with_tools_answers_with_a_call_or_the_schema(chat: ChatMavis) -> None:
    bound = chat.bind_tools([get_weather], response_format=_openai_format(Person), strict=True)
    for seed in range(4):
        message = bound.invoke("Invent a person, or check the weather.", seed=seed)
        if message.tool_calls:
            assert message.tool_calls[0]["name"] == "get_weather" and not message.invalid_tool_calls
        else:
            Person.model_validate_json(message.content)
    forced = chat.bind_tools([get_weather], tool_choice="any", response_format=Person)
    assert forced.invoke("Weather?", seed=0).tool_calls  # required calls stay calls
    # The grammar takes a call or the schema's answer, and nothing else.
    grammar = tool_grammar("auto", format_tools([get_weather]), answer_schema=response_format_schema(Person))
    assert grammar is not None
    base = chat.engine().base
    compiler = GrammarCompiler(base.tokenizer, base.vocab_size, base.eos_token_ids)
    call = f'{CALL_OPEN}\n{{"name":"get_weather","arguments":{{"city":"Rome","days":2}}}}\n{CALL_CLOSE}'
    for text, accepted in [
        ('{"name":"Ann","age":30}', True),
        (call, True),
        ('{"name":"Ann","age":30,"job":"x"}', False),
        ("Ann is 30.", False),
    ]:
        constraint = compiler.constraint(grammar)
        try:
            for token in base.tokenizer(text, add_special_tokens=False)["input_ids"]:
                constraint.consume(token)
        except GrammarError:
            assert not accepted, text
            continue
        assert constraint.accepting == accepted, text


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"type": "xml"}, r"response_format \{'type': 'xml'\} is not allowed; allowed: .*json_schema, json_object"),
        ({"type": "json_schema"}, "needs json_schema.schema"),
        ("json", "response_format 'json' is not allowed"),
    ],
)
def test_a_bad_response_format_is_refused_naming_the_forms_allowed(chat: ChatMavis, bad: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        chat.bind_tools([get_weather], response_format=bad)
    with pytest.raises(ConfigurationError, match=match):
        chat.invoke("hello", response_format=bad)
    with pytest.raises(ConfigurationError, match="strict must be a bool"):
        chat.invoke("hello", strict="yes")


def test_a_grammar_and_a_response_format_in_one_call_are_refused(chat: ChatMavis) -> None:
    with pytest.raises(ConfigurationError, match="both a grammar and tools or a response_format"):
        chat.invoke("hello", response_format=Person, grammar={"type": "regex", "value": "a+"})


@pytest.mark.parametrize("with_tools", [False, True])
def test_create_agent_with_a_response_format_ends_in_a_structured_response(chat: ChatMavis, with_tools: bool) -> None:
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
    from langchain.agents.structured_output import ProviderStrategy

    class City(BaseModel):
        city: str = Field(max_length=8)

    @tool(args_schema=City)
    def weather(city: str) -> str:
        """Weather of a city."""
        return "sunny"

    @wrap_model_call
    def answer_after_a_result(request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        # The random tiny model would call tools until its context is full: after one result,
        # answer (the provider strategy passes model_settings to bind_tools).
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(model_settings={"tool_choice": "none"}) if answered else request)

    agent = create_agent(
        chat, tools=[weather] if with_tools else [], response_format=Person, middleware=[answer_after_a_result]
    )
    for seed in range(2):
        state = agent.invoke(
            {"messages": [{"role": "user", "content": "Invent a person."}]},
            {"recursion_limit": 12, "configurable": {"mavis": {"seed": seed}}},
        )
        assert isinstance(state["structured_response"], Person)
        assert Person.model_validate_json(state["messages"][-1].content) == state["structured_response"]
    # The agent chose the provider strategy (a response_format binding), not a tool of the schema.
    explicit = create_agent(chat, tools=[], response_format=ProviderStrategy(Person))
    state = explicit.invoke({"messages": [{"role": "user", "content": "Invent a person."}]})
    assert isinstance(state["structured_response"], Person) and not state["messages"][-1].tool_calls
