"""A LangChain agent on the packaged SmolLM2, steered while it calls tools.

    pip install "mavis-lc[agents]"      # adds langchain (create_agent) and langgraph
    python examples/agent.py            # plain agent
    python examples/agent.py --head positivity@latest --weight 1.0   # steered (a trained head)

The agent loop is LangChain's `create_agent`: the model answers, LangGraph runs the tools it
calls and feeds their results back until the model answers in text. ChatMavis enforces each
call with a grammar (valid JSON, a bound tool's name, arguments that follow its schema), so
even a 135M-parameter model calls tools without malformed output; what it decides to call is
still the model's own.
"""

from __future__ import annotations

import argparse

from langchain.agents import create_agent
from langchain_core.tools import tool

from mavis_lc import ChatMavis


@tool
def get_weather(city: str) -> str:
    """The current weather of a city."""
    return {"paris": "sunny, 21 C", "oslo": "rain, 9 C"}.get(city.strip().lower(), "cloudy, 15 C")


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="What is the weather in Paris?")
    parser.add_argument("--head", action="append", default=[], help="value head spec or path (repeatable)")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of every head")
    args = parser.parse_args()
    model = ChatMavis(heads=args.head, max_tokens=96, temperature=0.7, beta=4.0 if args.head else 0.0)
    agent = create_agent(model, tools=[get_weather, add], system_prompt="Use the tools when they help.")
    weights = {spec.split("@")[0]: args.weight for spec in args.head}
    config = {"configurable": {"mavis": {"weights": weights}}, "recursion_limit": 8}
    state = agent.invoke({"messages": [{"role": "user", "content": args.question}]}, config=config)
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        shown = f"calls {[(c['name'], c['args']) for c in calls]}" if calls else message.text
        print(f"{message.type:>6}: {shown}")


if __name__ == "__main__":
    main()
