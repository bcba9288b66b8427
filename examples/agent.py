"""Tool use on the packaged SmolLM2, steered while it calls tools.

    pip install "mavis-lc[agents]"      # adds langchain (create_agent) and langgraph
    python examples/agent.py            # a forced call, the tool runs, then a text answer
    python examples/agent.py --agent    # LangChain's create_agent loop (the model decides)
    python examples/agent.py --head positivity@latest --weight 1.0   # steered (a trained head)

ChatMavis enforces each call with a grammar (valid JSON, a bound tool's name, arguments that
follow its schema), so even a 135M-parameter model calls tools without malformed output; what
it calls and with which values is still the model's own. Left to decide (``--agent``, tool
choice "auto"), SmolLM2-135M mostly answers in text; the default run forces the first turn to
call a tool (tool_choice "any") and the second to answer (tool_choice "none").
"""

from __future__ import annotations

import argparse

from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
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
    parser.add_argument("--agent", action="store_true", help="run LangChain's create_agent loop instead")
    args = parser.parse_args()
    model = ChatMavis(heads=args.head, max_tokens=96, temperature=0.7, beta=4.0 if args.head else 0.0)
    tools = [get_weather, add]
    weights = {spec.split("@")[0]: args.weight for spec in args.head}
    config: RunnableConfig = {"configurable": {"mavis": {"weights": weights}}, "recursion_limit": 8}
    if args.agent:
        agent = create_agent(model, tools=tools, system_prompt="Use the tools when they help.")
        messages = agent.invoke({"messages": [{"role": "user", "content": args.question}]}, config=config)["messages"]
    else:
        messages = [HumanMessage(args.question)]
        call = model.bind_tools(tools, tool_choice="any").invoke(messages, config=config)
        by_name = {t.name: t for t in tools}
        results = [by_name[c["name"]].invoke(c) for c in call.tool_calls]  # ToolMessages
        messages += [call, *results]
        messages.append(model.bind_tools(tools, tool_choice="none").invoke(messages, config=config))
    for message in messages:
        calls = getattr(message, "tool_calls", None)
        shown = f"calls {[(c['name'], c['args']) for c in calls]}" if calls else message.text
        print(f"{message.type:>6}: {shown}")


if __name__ == "__main__":
    main()
