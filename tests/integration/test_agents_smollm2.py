"""Agents on the packaged SmolLM2, offline: a create_agent loop, structured output on varied prompts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from mavis_lc import ChatMavis

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Invent a character for a children's book.",
    "Describe a famous scientist.",
    "Who could be the captain of a ship?",
    "Make up a neighbour.",
    "Tell me about a chef.",
    "Describe a pilot.",
    "Who is a good teacher?",
    "Invent a football player.",
    "Describe an artist you like.",
    "Make up a detective.",
    "Describe a farmer.",
    "Invent a musician.",
    "Who runs the bakery down the street?",
    "Describe a nurse.",
    "Make up an explorer.",
    "Invent a poet.",
    "Describe a librarian.",
    "Who is the mayor of a small town?",
    "Invent an astronaut.",
    "Describe a gardener.",
]


class Person(BaseModel):
    """A person."""

    name: str = Field(description="first and last name")
    age: int = Field(ge=0, le=120)
    job: str


def test_create_agent_runs_a_full_tool_loop() -> None:
    seen: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        seen.append(city)
        return "sunny, 21 C"

    @wrap_model_call
    def call_a_tool_first(request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "any"))

    agent = create_agent(ChatMavis(max_tokens=64), tools=[get_weather], middleware=[call_a_tool_first])
    state = agent.invoke(
        {"messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
        config={"configurable": {"mavis": {"seed": 1}}, "recursion_limit": 6},
    )
    messages = state["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
    call = messages[1].tool_calls[0]
    assert call["name"] == "get_weather" and seen == [call["args"]["city"]]
    assert messages[2].tool_call_id == call["id"] and messages[2].content == "sunny, 21 C"
    assert not messages[3].tool_calls and messages[3].content


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_is_valid_on_twenty_varied_prompts(method: str) -> None:
    chat = ChatMavis(max_tokens=96, temperature=0.7)
    configs: list[Any] = [{"configurable": {"mavis": {"seed": seed}}} for seed in range(len(QUESTIONS))]
    results = chat.with_structured_output(Person, method=method, include_raw=True).batch(QUESTIONS, configs)
    errors = [
        (q, r["parsing_error"], r["raw"].content)
        for q, r in zip(QUESTIONS, results, strict=True)
        if r["parsed"] is None
    ]
    assert not errors
    assert all(isinstance(r["parsed"], Person) and 0 <= r["parsed"].age <= 120 for r in results)


@pytest.mark.parametrize("with_tools", [False, True])
def test_create_agent_with_a_response_format_ends_in_a_valid_structured_response(with_tools: bool) -> None:
    """LangChain's documented way to get a typed answer out of an agent: the provider strategy
    binds OpenAI's ``response_format``; with a tool, the model may call it first."""
    called: list[str] = []

    @tool
    def lookup_profession(name: str) -> str:
        """The profession of a person, by name."""
        called.append(name)
        return "baker"

    @wrap_model_call
    def call_then_answer(request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        # Left to decide, SmolLM2-135M calls the tool again and again: one call, then the answer.
        # Under a response_format the agent binds model_settings (not request.tool_choice).
        choice = "none" if any(isinstance(m, ToolMessage) for m in request.messages) else "any"
        return handler(request.override(model_settings={"tool_choice": choice}))

    agent = create_agent(
        ChatMavis(max_tokens=96, temperature=0.7),
        tools=[lookup_profession] if with_tools else [],
        response_format=Person,
        middleware=[call_then_answer] if with_tools else [],
    )
    for seed in range(3):
        state = agent.invoke(
            {"messages": [{"role": "user", "content": QUESTIONS[seed]}]},
            config={"configurable": {"mavis": {"seed": seed}}, "recursion_limit": 8},
        )
        person = state["structured_response"]
        assert isinstance(person, Person) and 0 <= person.age <= 120
        assert Person.model_validate_json(state["messages"][-1].content) == person
        if with_tools:
            assert isinstance(state["messages"][2], ToolMessage) and state["messages"][2].content == "baker"
    assert len(called) == (3 if with_tools else 0)
