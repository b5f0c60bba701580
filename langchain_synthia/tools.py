"""Tool calling in Synthia's format: how tools are shown, how calls are written and read back.

Synthia has no tool-calling format of its own, so langchain-synthia defines one that fits its
``SYSTEM:``/``USER:``/``ASSISTANT:`` turns (docs/agents.md):

- the tools are listed at the end of the ``SYSTEM:`` turn, one JSON object per tool;
- the assistant calls a tool by answering with one line per call,
  ``<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>``;
- each result comes back in the next ``USER:`` turn as
  ``<tool_result name="get_weather" id="call_...">...</tool_result>``.

The calls are not left to chance: generation follows a grammar built from the tools' JSON
schemas (`tool_grammar`), so every call names a bound tool and its arguments validate.
"""

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.messages import ToolMessage
from langchain_core.messages.tool import (
    InvalidToolCall,
    ToolCallChunk,
    invalid_tool_call,
    tool_call_chunk,
)

from langchain_synthia._grammar import GrammarError, json_rule, lark_grammar

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

ToolChoice = Literal["auto", "any", "none"] | str
"""``"auto"`` (text or calls), ``"any"`` (at least one call), ``"none"``, or a tool's name."""


def convert_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Tools (Pydantic classes, functions, LangChain tools, OpenAI dicts) as OpenAI functions.

    Raises:
        ValueError: If a tool cannot be converted, its parameters are not a JSON schema of an
            object, or two different tools share a name (the same tool given twice is kept once).
    """
    from langchain_core.utils.function_calling import convert_to_openai_tool

    converted: list[dict[str, Any]] = []
    for tool in tools:
        try:
            spec = convert_to_openai_tool(tool)
        except Exception as error:
            msg = f"Cannot use {tool!r} as a tool: {error}"
            raise ValueError(msg) from error
        function = spec.get("function") if spec.get("type") == "function" else None
        if not function or not function.get("name"):
            msg = f"Only function tools are supported; got {spec!r}."
            raise ValueError(msg)
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            msg = (
                f"Tool {function['name']!r}: its parameters must be a JSON schema of an object, "
                f"got {parameters!r}."
            )
            raise ValueError(msg)
        converted.append(
            {
                "type": "function",
                "function": {
                    "name": function["name"],
                    "description": function.get("description", ""),
                    "parameters": parameters,
                },
            }
        )
    unique: dict[str, dict[str, Any]] = {}
    for tool in converted:
        name = tool["function"]["name"]
        first = unique.setdefault(name, tool)
        if _shape(first["function"]["parameters"]) != _shape(tool["function"]["parameters"]):
            msg = f"Two different tools are named {name!r}: tool names must be unique."
            raise ValueError(msg)
    return list(unique.values())


def _shape(schema: Any) -> Any:
    """A schema without its titles and descriptions (the same tool given twice compares equal)."""
    if isinstance(schema, dict):
        return {k: _shape(v) for k, v in schema.items() if k not in ("title", "description")}
    if isinstance(schema, list):
        return [_shape(item) for item in schema]
    return schema


def normalize_tool_choice(choice: Any, tools: Sequence[dict[str, Any]]) -> ToolChoice:
    """One of ``"auto"``, ``"any"``, ``"none"`` or a bound tool's name.

    Accepts LangChain's spellings: ``None``/``"auto"``, ``"any"``/``"required"``/``True``,
    ``"none"``/``False``, a name, or ``{"type": "function", "function": {"name": ...}}``.

    Raises:
        ValueError: For a tool name that is not bound, or a value that is not a tool choice.
    """
    names = [tool["function"]["name"] for tool in tools]
    if choice is None or choice == "auto":
        return "auto"
    if choice is True or choice in ("any", "required"):
        chosen: str = "any"
    elif choice is False or choice == "none":
        return "none"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        chosen = str(choice["function"].get("name"))
    elif isinstance(choice, dict) and choice.get("type") == "tool" and "name" in choice:
        chosen = str(choice["name"])
    elif isinstance(choice, str):
        chosen = choice
    else:
        msg = (
            f"tool_choice={choice!r} is not a tool choice: use 'auto', 'any' (or 'required'), "
            "'none', or the name of a bound tool."
        )
        raise ValueError(msg)
    if not names:
        msg = f"tool_choice={choice!r} needs tools: bind some with bind_tools(tools, ...)."
        raise ValueError(msg)
    if chosen != "any" and chosen not in names:
        msg = f"tool_choice={choice!r} names no bound tool; the tools are: {', '.join(names)}."
        raise ValueError(msg)
    return chosen


def tools_prompt(tools: Sequence[dict[str, Any]], choice: ToolChoice) -> str:
    """The tools section appended to the ``SYSTEM:`` turn (empty for ``"none"``)."""
    if choice == "none" or not tools:
        return ""
    lines = [
        "You can use tools. To call a tool, answer with this line and nothing else:",
        f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments>}}}}{TOOL_CALL_CLOSE}',
        "Each result comes back to you in a <tool_result> block; then answer the user.",
    ]
    if choice == "any":
        lines.append("Call a tool now.")
    elif choice != "auto":
        lines.append(f"Call the tool {choice} now.")
    lines.append("Tools:")
    for tool in tools:
        function = tool["function"]
        lines.append(_json_text(function))
    return "\n".join(lines)


def tool_grammar(
    tools: Sequence[dict[str, Any]],
    choice: ToolChoice,
    *,
    parallel: bool = False,
    answer_schema: dict[str, Any] | None = None,
) -> str | None:
    """The grammar an answer follows under `choice` (``None``: unconstrained text).

    ``"auto"``: free text (not starting with ``<``) or a call; ``"any"``: a call of any tool;
    a name: a call of that tool. With `parallel`, one or more calls (one per line). Each call's
    arguments follow its tool's JSON schema. With `answer_schema` (under ``"auto"`` only), an
    answer without a call is one JSON value under that schema instead of free text.

    Raises:
        GrammarError: If a tool's schema cannot be enforced (the message names the tool).
    """
    if choice == "none" or not tools:
        return None
    chosen = [t for t in tools if choice in ("auto", "any") or t["function"]["name"] == choice]
    rules = []
    for index, tool in enumerate(chosen):
        function = tool["function"]
        properties = {"name": {"const": function["name"]}, "arguments": function["parameters"]}
        schema = {"type": "object", "properties": properties, "required": ["name", "arguments"]}
        rules.append(f"call{index}: {json_rule(schema)}")
    calls = " | ".join(f"call{index}" for index in range(len(chosen)))
    answer = "(calls | TEXT)?" if choice == "auto" else "calls"
    text = r"TEXT: /[^<\s][\s\S]*/"
    if answer_schema is not None and choice == "auto":
        answer, text = "(calls | json_answer)", f"json_answer: {json_rule(answer_schema)}"
    lark = "\n".join(
        [
            f'start: " "? {answer}',
            r'calls: call ("\n" call)*' if parallel else "calls: call",
            f'call: "{TOOL_CALL_OPEN}" ({calls}) "{TOOL_CALL_CLOSE}"',
            text,
            *rules,
        ]
    )
    try:
        return lark_grammar(lark)
    except GrammarError as error:
        names = ", ".join(t["function"]["name"] for t in chosen)
        msg = f"The tools' schemas ({names}) cannot be enforced: {error}"
        raise GrammarError(msg) from None


def render_tool_call(name: str, arguments: Any) -> str:
    """One call as the model writes it: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``.

    The JSON is written as `json.dumps` writes it, as the tools' format in the prompt shows it.
    """
    body = (
        f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
        f"{arguments if isinstance(arguments, str) else _json_text(arguments)}}}"
    )
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def render_tool_result(message: ToolMessage, text: str) -> str:
    """A tool's result as the model reads it in the next ``USER:`` turn.

    The block is ``<tool_result name="..." id="..." status="error">``, the text on the lines
    after it, then ``</tool_result>``. Nothing in the message can end the block early or add
    another: in `text` every ``<tool_result``/``</tool_result`` tag is made inert
    (`langchain_synthia.prompts.neutralize_tool_result_tags`: its ``<`` becomes U+FF1C, the
    text is otherwise kept), and the name and id are written as XML attribute values (``&``,
    ``<``, ``>``, ``"`` and ``'`` as entities, and every control, format, line-break or space
    character other than the plain space as ``&#x..;``), so each stays inside its quotes on
    the tag's line and reads back exactly.
    """
    import html
    import unicodedata

    from langchain_synthia.prompts import neutralize_tool_result_tags

    def attribute(value: str) -> str:
        return "".join(
            f"&#x{ord(char):x};" if char != " " and unicodedata.category(char)[0] in "CZ" else char
            for char in html.escape(value)
        )

    name = f' name="{attribute(message.name)}"' if message.name else ""
    status = ' status="error"' if message.status == "error" else ""
    body = neutralize_tool_result_tags(text)
    return (
        f'<tool_result{name} id="{attribute(message.tool_call_id)}"{status}>\n{body}\n'
        "</tool_result>"
    )


class ToolCallReader:
    """Turns the streamed text of an answer into content and whole tool calls.

    An answer that begins with ``<tool_call>`` is a list of calls (the grammar guarantees their
    form); each is handed out as one tool-call chunk as soon as its JSON and its
    ``</tool_call>`` are complete (a ``</tool_call>`` inside a JSON string does not end a
    call). Anything else is content, streamed as it comes.

    A call that is not complete when the answer ends (cut off by ``max_tokens``), and a forced
    call that never started, are never returned as calls: `finish` lists them in `unfinished`
    as invalid tool calls, with the arguments written so far and the reason.
    """

    def __init__(self, *, forced: bool = False) -> None:
        """Read one answer; `forced`: the tool choice forces a call, so the answer must hold one."""
        self._forced = forced
        self._mode: Literal["undecided", "text", "calls"] = "undecided"
        self._buffer = ""
        self._index = 0
        self.unfinished: list[InvalidToolCall] = []
        """The calls the answer left unfinished, once `finish` has run."""

    def feed(self, text: str) -> tuple[str, list[ToolCallChunk]]:
        """Take the next piece of text; return the content and the calls it completes."""
        if self._mode == "text":
            return text, []
        self._buffer += text
        if self._mode == "undecided":
            start = self._buffer.lstrip()
            if start.startswith(TOOL_CALL_OPEN):
                self._mode = "calls"
            elif not start or TOOL_CALL_OPEN.startswith(start):
                return "", []
            else:
                self._mode = "text"
                content, self._buffer = self._buffer, ""
                return content, []
        return "", self._complete_calls()

    def finish(self, finish_reason: str | None) -> tuple[str, list[ToolCallChunk]]:
        """End the answer: the content left over, and the unfinished call as a chunk.

        The chunk's ``args`` are the call's raw text from ``<tool_call>`` on, which LangChain
        reads as an invalid call when it merges a stream's chunks; `unfinished` holds the same
        call with its partial arguments and the reason it is invalid.
        """
        rest, self._buffer = self._buffer, ""
        written = rest.strip()
        if self._mode == "text" or not (written or (self._forced and self._index == 0)):
            return (rest if written else ""), []
        opened = written.startswith(TOOL_CALL_OPEN)
        body = written[len(TOOL_CALL_OPEN) :].lstrip(" ") if opened else ""
        name, arguments = _partial_call(body)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        what = f"The call of {name}" if name else "The tool call"
        error = (
            f"{what} was cut off at max_tokens before it was complete; raise max_tokens."
            if finish_reason == "length"
            else f"{what} ended before it was complete (finish reason {finish_reason!r})."
        )
        self.unfinished.append(
            invalid_tool_call(name=name, args=arguments, id=call_id, error=error)
        )
        chunk = tool_call_chunk(
            name=name, args=TOOL_CALL_OPEN + body, id=call_id, index=self._index
        )
        self._index += 1
        return "", [chunk]

    def _complete_calls(self) -> list[ToolCallChunk]:
        chunks = []
        while True:
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start < 0 or TOOL_CALL_CLOSE not in self._buffer[start:]:
                return chunks
            at = start + len(TOOL_CALL_OPEN)
            at += len(self._buffer[at:]) - len(self._buffer[at:].lstrip(" "))
            try:  # the grammar may put a space before the call's JSON
                call, end = _JSON.raw_decode(self._buffer, at)
            except json.JSONDecodeError:  # not complete yet (a </tool_call> inside a string)
                return chunks
            if not self._buffer.startswith(TOOL_CALL_CLOSE, end):
                return chunks
            self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE) :]
            chunks.append(
                tool_call_chunk(
                    name=call["name"],
                    args=_json_text(call.get("arguments", {})),
                    id=f"call_{uuid.uuid4().hex[:24]}",
                    index=self._index,
                )
            )
            self._index += 1


_JSON = json.JSONDecoder()
_NAME = re.compile(r'\{ ?"name" ?: ?("(?:[^"\\]|\\.)*")( ?, ?"arguments" ?: ?)?')
"""The start of a call's JSON as the grammar writes it: its name, then its arguments (one
space at most between JSON tokens, `langchain_synthia._grammar.JSON_SPACE`)."""


def _partial_call(body: str) -> tuple[str | None, str]:
    """The name and the arguments' text of an unfinished call's JSON (`body`)."""
    found = _NAME.match(body)
    if found is None:
        return None, ""
    name = json.loads(found[1])
    arguments = body[found.end() :] if found[2] else ""
    try:  # whole arguments, the call's own closing cut off: only the arguments' JSON
        _, end = _JSON.raw_decode(arguments)
    except json.JSONDecodeError:
        return name, arguments
    return name, arguments[:end]


def _json_text(value: Any) -> str:
    """`value` as JSON the way the prompt shows it and the model mostly writes it."""
    return json.dumps(value, ensure_ascii=False)
