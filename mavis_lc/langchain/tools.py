"""Tool calling for `ChatMavis`: rendering tools and tool turns, the grammar of a call, parsing.

A tool call is written as a JSON object between tags, one block per call (the format of the
Hermes / Qwen chat templates):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Tools are shown to the model through the tokenizer's chat template when it takes ``tools``;
otherwise as a system-turn block (`tool_system_block`) placed before the conversation's own
system message, with earlier AI tool calls rendered as such blocks and tool results as
``<tool_response>`` user turns, so nothing of the history is dropped.

`tool_grammar` is what enforces ``tool_choice``: ``"any"`` / ``"required"`` / ``True`` (a call
of any tool; several with ``parallel_tool_calls``), a tool's name or an OpenAI-style ``{"type":
"function", "function": {"name": ...}}`` (calls of that tool), ``"auto"`` (either a text answer,
which may not start with ``<`` or a blank, or calls; once the output starts a call, the call is
enforced) and ``"none"`` (no tools shown, text only). Arguments follow each tool's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool

from mavis_lc.decoding.grammar import Grammar
from mavis_lc.errors import ConfigurationError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)
TOOL_CHOICES = ("auto", "none", "any", "required")


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style tool dicts (``{"type": "function", "function": {...}}``) for LangChain tools,
    pydantic models, TypedDicts, functions or tool dicts.

    Raises:
        ConfigurationError: a tool cannot be converted.
    """
    formatted: list[dict[str, Any]] = []
    for tool in tools:
        try:
            formatted.append(convert_to_openai_tool(tool))
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot use {tool!r} as a tool: {exc}") from exc
    return formatted


def chosen_tools(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> tuple[str, list[Mapping[str, Any]]]:
    """The mode (``auto``, ``none`` or ``required``) and the tools a call may use under ``tool_choice``.

    Raises:
        ConfigurationError: an unknown choice, or a tool name not among ``tools``.
    """
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None or tool_choice == "auto":
        return "auto", list(tools)
    if tool_choice == "none" or tool_choice is False:
        return "none", []
    if tool_choice in ("any", "required") or tool_choice is True:
        return "required", list(tools)
    name = tool_choice
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(name, str) and name in names:
        return "required", [t for t in tools if t["function"]["name"] == name]
    raise ConfigurationError(
        f"tool_choice {tool_choice!r} is not allowed; allowed: {', '.join(TOOL_CHOICES)}, True, a tool name "
        f"({', '.join(names) or 'no tools bound'}) or {{'type': 'function', 'function': {{'name': ...}}}}"
    )


RESPONSE_FORMAT_TYPES = ("json_schema", "json_object", "text")
_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema an answer must follow under an OpenAI-style ``response_format``; None for
    ``{"type": "text"}`` or None (free text).

    Takes ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}`` (what
    LangChain agents bind for a provider strategy), ``{"type": "json_object"}`` (any JSON object),
    ``{"type": "text"}``, or a pydantic model / TypedDict / JSON schema dict given directly.
    The schema's top-level object allows no keys it does not name (`closed_schema`).

    Raises:
        ConfigurationError: a value of none of those forms, naming what is allowed.
    """
    if response_format is None:
        return None
    allowed = (
        f"allowed: {{'type': t}} with t one of {', '.join(RESPONSE_FORMAT_TYPES)} (json_schema with "
        "{'json_schema': {'name': ..., 'schema': {...}}}), or a pydantic model, TypedDict or JSON schema"
    )
    if (
        isinstance(response_format, Mapping)
        and "type" in response_format
        and response_format["type"]
        in (
            *RESPONSE_FORMAT_TYPES,
            "json",
        )
    ):
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind in ("json_object", "json"):
            return {"type": "object"}
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ConfigurationError(
                f"response_format of type json_schema needs json_schema.schema (a JSON schema dict); "
                f"got {response_format!r}"
            )
        return closed_schema(schema)
    if isinstance(response_format, Mapping):
        if response_format.get("type") not in _JSON_TYPES:
            raise ConfigurationError(f"response_format {response_format!r} is not allowed; {allowed}")
        return closed_schema(response_format)  # a JSON schema given directly
    if not isinstance(response_format, type):
        raise ConfigurationError(f"response_format {response_format!r} is not allowed; {allowed}")
    try:
        return closed_schema(convert_to_json_schema(response_format))
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"response_format {response_format!r} is not allowed ({exc}); {allowed}") from exc


def tool_grammar(
    mode: str,
    tools: Sequence[Mapping[str, Any]],
    *,
    parallel: bool = False,
    answer_schema: Mapping[str, Any] | None = None,
) -> Grammar | None:
    """The grammar of an answer under ``mode`` (`chosen_tools`) with ``tools``; None: unconstrained.

    One call per answer unless ``parallel``. Arguments follow each tool's parameter schema; an
    object schema that does not say whether other keys are allowed allows none (as OpenAI's
    strict mode), so a call carries the tool's parameters and nothing else. With
    ``answer_schema`` (a ``response_format``), an answer that calls no tool is one JSON value
    of that schema instead of free text; ``required`` calls stay calls.
    """
    if mode == "none" or not tools:
        return Grammar.json_schema(answer_schema) if answer_schema is not None else None
    calls = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "arguments": closed_schema(t["function"].get("parameters") or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ],
        "x-guidance": {"whitespace_flexible": False},
    }
    rules = [
        "calls: call+" if parallel else "calls: call",
        f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}" "\\n"?',
        f"body: %json {json.dumps(calls)}",  # properties in order: the name first
    ]
    if mode == "required":
        return Grammar.lark("\n".join(["start: calls", *rules]))
    if answer_schema is not None:
        answer = {**answer_schema, "x-guidance": {"whitespace_flexible": False, **answer_schema.get("x-guidance", {})}}
        return Grammar.lark("\n".join(["start: answer | calls", f"answer: %json {json.dumps(answer)}", *rules]))
    return Grammar.lark("\n".join(["start: TEXT | calls", "TEXT: /[^<\\s][\\s\\S]*/", *rules]))


def closed_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with ``additionalProperties: false`` where it is an object schema that does not
    say whether other keys are allowed."""
    out = dict(schema)
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def tool_system_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-turn text that shows ``tools`` to a model whose chat template takes none."""
    listing = "\n".join(json.dumps(t["function"], sort_keys=True) for t in tools)
    return (
        "You can call functions. Their signatures, one JSON object per line:\n"
        f"{listing}\n"
        "To call one, answer with a JSON object holding its name and arguments between tags:\n"
        f'{CALL_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n{CALL_CLOSE}\n'
        "Otherwise answer in plain text."
    )


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` argument."""
    return "tools" in str(getattr(tokenizer, "chat_template", "") or "")


def render_messages(
    messages: Sequence[BaseMessage], tools: Sequence[Mapping[str, Any]], *, native: bool
) -> list[dict[str, Any]]:
    """Chat-template dicts for ``messages``: AI tool calls and tool results are kept.

    ``native``: the template takes tools itself (tool calls and tool turns in its own fields);
    otherwise tools go into a system block and tool turns become tagged text.
    """
    chat: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, AIMessage) and message.tool_calls:
            if native:
                calls = [
                    {"type": "function", "id": c.get("id"), "function": {"name": c["name"], "arguments": c["args"]}}
                    for c in message.tool_calls
                ]
                chat.append({"role": "assistant", "content": message.text, "tool_calls": calls})
            else:
                blocks = [
                    f"{CALL_OPEN}\n{json.dumps({'name': c['name'], 'arguments': c['args']})}\n{CALL_CLOSE}"
                    for c in message.tool_calls
                ]
                chat.append({"role": "assistant", "content": "\n".join(filter(None, [message.text, *blocks]))})
        elif isinstance(message, ToolMessage):
            if native:
                chat.append({"role": "tool", "content": message.text, "tool_call_id": message.tool_call_id})
            else:
                chat.append({"role": "user", "content": f"<tool_response>\n{message.text}\n</tool_response>"})
        else:
            chat.append({"role": _role(message), "content": message.text})
    if tools and not native:
        block = tool_system_block(tools)
        if chat and chat[0]["role"] == "system":
            chat[0] = {**chat[0], "content": f"{chat[0]['content']}\n\n{block}"}
        else:
            chat.insert(0, {"role": "system", "content": block})
    return chat


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]]
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split an answer into its text and its tool calls; a call that does not parse, names an
    unknown tool or has non-object arguments goes into the invalid calls with the reason."""
    names = {t["function"]["name"] for t in tools}
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for match in _CALL_BLOCK.finditer(text):
        raw = match.group(1)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        try:  # a call cut short after its JSON (max_tokens inside the closing tag) still counts
            data, end = json.JSONDecoder().raw_decode(raw)
        except json.JSONDecodeError as exc:
            invalid.append(invalid_tool_call(name=None, args=raw, id=call_id, error=f"not JSON: {exc}"))
            continue
        rest = raw[end:].strip()
        if rest and not CALL_CLOSE.startswith(rest):
            invalid.append(invalid_tool_call(name=None, args=raw, id=call_id, error=f"text after the call: {rest!r}"))
            continue
        raw_name = data.get("name") if isinstance(data, dict) else None
        name = raw_name if isinstance(raw_name, str) else None
        args = data.get("arguments", data.get("parameters")) if isinstance(data, dict) else None
        if name is None or name not in names:
            error = f"unknown tool {raw_name!r}; bound: {', '.join(sorted(names))}"
            invalid.append(invalid_tool_call(name=name, args=raw, id=call_id, error=error))
        elif not isinstance(args, dict):
            invalid.append(invalid_tool_call(name=name, args=raw, id=call_id, error="arguments must be a JSON object"))
        else:
            calls.append(tool_call(name=name, args=args, id=call_id))
    content = _CALL_BLOCK.sub("", text).strip() if (calls or invalid) else text
    return content, calls, invalid


def _role(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        return message.role
    if isinstance(message, ToolMessage):
        return "tool"
    return {"human": "user", "ai": "assistant", "system": "system"}.get(message.type, message.type)
