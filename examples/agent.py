"""An agent on the packaged SmolLM2 with LangChain's create_agent, steered while it calls tools.

    pip install "mavis-lc[agents]"      # adds langchain (create_agent) and langgraph
    python examples/agent.py            # call a tool, read its result, answer
    python examples/agent.py --free     # the model decides whether to call (tool_choice "auto")
    python examples/agent.py --head positivity@latest --weight 1.0   # steered (a trained head)
    python examples/agent.py --structured   # ends in a typed structured_response (response_format)

ChatMavis enforces each call with a grammar (valid JSON, a bound tool's name, arguments that
follow its schema), so even a 135M-parameter model calls tools without malformed output; what
it calls and with which values is still the model's own. Left to decide, SmolLM2-135M mostly
answers in text, so by default a small middleware sets tool_choice per model call: "any" until
a tool has answered, then "none" (a text answer from the tool's result). With --structured the
agent gets ``response_format=WeatherReport``: ChatMavis declares structured output, so the agent
binds OpenAI's ``response_format`` (its provider strategy) and the last answer is a JSON object
of that schema, parsed into ``state["structured_response"]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from mavis_lc import ChatMavis


@tool
def get_weather(city: str) -> str:
    """The current weather of a city."""
    return {"paris": "sunny, 21 C", "oslo": "rain, 9 C"}.get(city.strip().lower(), "cloudy, 15 C")


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class WeatherReport(BaseModel):
    """What the agent reports."""

    city: str
    conditions: str = Field(description="e.g. sunny, rain")
    temperature_c: int = Field(ge=-60, le=60)


@wrap_model_call
def call_a_tool_first(request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
    """tool_choice "any" until a tool has answered, then "none"."""
    choice = "none" if any(isinstance(m, ToolMessage) for m in request.messages) else "any"
    # With a response_format the agent binds model_settings, not request.tool_choice.
    settings = {**request.model_settings, "tool_choice": choice} if request.response_format else request.model_settings
    return handler(request.override(tool_choice=choice, model_settings=settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="What is the weather in Paris?")
    parser.add_argument("--head", action="append", default=[], help="value head spec or path (repeatable)")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of every head")
    parser.add_argument("--free", action="store_true", help="let the model decide whether to call a tool")
    parser.add_argument("--structured", action="store_true", help="end in a WeatherReport (response_format)")
    args = parser.parse_args()
    model = ChatMavis(heads=args.head, max_tokens=96, temperature=0.7, beta=4.0 if args.head else 0.0)
    tools = [get_weather, add]
    weights = {spec.split("@")[0]: args.weight for spec in args.head}
    config: RunnableConfig = {"configurable": {"mavis": {"weights": weights}}, "recursion_limit": 8}
    middleware = [] if args.free else [call_a_tool_first]
    agent = create_agent(
        model,
        tools=tools,
        system_prompt="Use the tools when they help.",
        middleware=middleware,
        response_format=WeatherReport if args.structured else None,
    )
    state = agent.invoke({"messages": [{"role": "user", "content": args.question}]}, config=config)
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        shown = f"calls {[(c['name'], c['args']) for c in calls]}" if calls else message.text
        print(f"{message.type:>6}: {shown}")
    if args.structured:
        print(f"structured_response: {state['structured_response']!r}")


if __name__ == "__main__":
    main()
