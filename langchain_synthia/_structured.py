"""What a chat call's answer must look like (text, tool calls or JSON), and structured output.

`plan_answer` turns a call's ``tools``/``tool_choice``/``response_format`` options into an
`AnswerPlan`: the text added to the system turn, the grammar generation follows, and how the
streamed text is read back. `structured_output` builds ``with_structured_output``'s runnable.
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import Generation
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from langchain_synthia._grammar import json_schema_grammar
from langchain_synthia.tools import TOOL_CALL_OPEN, ToolCallReader, tool_grammar, tools_prompt

METHODS = ("json_schema", "function_calling", "json_mode")


@dataclass(frozen=True)
class AnswerPlan:
    """How one call's answer is prompted for, constrained and read."""

    prompt: str = ""
    """Text that ends the ``SYSTEM:`` turn (the tools, or the JSON to answer with)."""
    grammar: str | None = None
    """The grammar generation follows (``None``: free text)."""
    tools: bool = False
    """The answer may hold tool calls (read them with `reader`)."""
    structured: bool = False
    """The whole answer is constrained: the grammar alone decides where it ends, and no stop
    (neither the ``USER:`` turn nor the caller's) may cut it."""
    constrained_opening: str | None = None
    """The text that opens the constrained part of an answer that may also be free text
    (``tool_choice="auto"``): stops cut the free text only."""

    def reader(self) -> ToolCallReader | None:
        """A fresh reader of tool calls for one answer, when calls may come."""
        return ToolCallReader(forced=self.structured) if self.tools else None


def plan_answer(
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | None = None,
    response_format: dict[str, Any] | None = None,
    parallel_tool_calls: bool = False,
) -> AnswerPlan:
    """The plan for a call's options (tools already converted by `bind_tools`).

    With both tools and a response format (an agent's provider-side structured output), an
    answer is tool calls or, once the model answers the user, one JSON value of the format.

    Raises:
        ValueError: For a response format that is not
            ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or
            ``{"type": "json_object"}``, or one with tools and a `tool_choice` that forces a
            call; `GrammarError` for a schema it cannot enforce.
    """
    if tools and response_format is not None and tool_choice != "none":
        if tool_choice not in (None, "auto"):
            msg = (
                f"tool_choice={tool_choice!r} forces a tool call, so the answer cannot be the "
                "response_format's JSON: use tool_choice='auto' with a response_format."
            )
            raise ValueError(msg)
        instruction = _json_plan(response_format).prompt
        key = json.dumps(tools)
        answer = json.dumps(_answer_schema(response_format))
        return AnswerPlan(
            prompt=f"{tools_prompt(tools, 'auto')}\nTo answer the user instead: {instruction}",
            grammar=_tool_grammar(key, "auto", bool(parallel_tool_calls), answer),
            tools=True,
            structured=True,
        )
    if tools:
        choice = tool_choice or "auto"
        if choice == "none":
            return AnswerPlan() if response_format is None else _json_plan(response_format)
        key = json.dumps(tools)
        return AnswerPlan(
            prompt=tools_prompt(tools, choice),
            grammar=_tool_grammar(key, choice, bool(parallel_tool_calls)),
            tools=True,
            structured=choice != "auto",
            constrained_opening=TOOL_CALL_OPEN if choice == "auto" else None,
        )
    if tool_choice not in (None, "auto", "none"):
        msg = f"tool_choice={tool_choice!r} needs tools: bind some with bind_tools(tools, ...)."
        raise ValueError(msg)
    if response_format is None:
        return AnswerPlan()
    return _json_plan(response_format)


def _json_plan(response_format: Any) -> AnswerPlan:
    """The plan of an answer that is one JSON value of `response_format`."""
    schema = _answer_schema(response_format)
    if response_format["type"] == "json_object":
        return AnswerPlan(
            prompt="Answer with a single JSON object and nothing else.",
            grammar=_json_grammar('{"type": "object"}'),
            structured=True,
        )
    text = json.dumps(schema, ensure_ascii=False)
    return AnswerPlan(
        prompt=f"Answer with a single JSON value that follows this JSON schema, and nothing "
        f"else:\n{json.dumps(schema, ensure_ascii=False)}",
        grammar=_json_grammar(text),
        structured=True,
    )


def _answer_schema(response_format: Any) -> dict[str, Any]:
    """The JSON schema a `response_format` holds an answer to."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    schema = (response_format.get("json_schema") or {}).get("schema") if kind else None
    if kind != "json_schema" or not isinstance(schema, dict):
        msg = (
            f"response_format={response_format!r} is not supported: use "
            '{"type": "json_schema", "json_schema": {"schema": {...}}} or {"type": "json_object"}.'
        )
        raise ValueError(msg)
    return schema


@lru_cache(maxsize=256)
def _tool_grammar(
    tools_json: str, choice: str, parallel: bool, answer_json: str | None = None
) -> str | None:
    answer = None if answer_json is None else json.loads(answer_json)
    return tool_grammar(json.loads(tools_json), choice, parallel=parallel, answer_schema=answer)


@lru_cache(maxsize=256)
def _json_grammar(schema_json: str) -> str:
    return json_schema_grammar(json.loads(schema_json))


def structured_output(
    model: Any, schema: Any, *, method: str, include_raw: bool, strict: bool | None
) -> Runnable:
    """``with_structured_output`` of `model` (see `ChatSynthia.with_structured_output`)."""
    if method not in METHODS:
        msg = f"method={method!r} is not supported: use one of {', '.join(METHODS)}."
        raise ValueError(msg)
    if schema is None and method != "json_mode":
        msg = f"method={method!r} needs a schema (a Pydantic class, TypedDict or JSON schema)."
        raise ValueError(msg)
    pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    trace = {"kwargs": {"method": method, "strict": strict}}
    parser: Runnable
    if method == "function_calling":
        tool = convert_to_openai_tool(schema)
        name = tool["function"]["name"]
        llm = model.bind_tools(
            [schema], tool_choice=name, ls_structured_output_format={**trace, "schema": tool}
        )
        parser = (
            _PydanticToolsAnswer(tools=[schema], first_tool_only=True)
            if pydantic
            else _JsonToolsAnswer(key_name=name, first_tool_only=True)
        )
    else:
        if method == "json_schema":
            json_schema = _json_schema_of(schema)
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": json_schema.get("title", "answer"), "schema": json_schema},
            }
            plan_answer(response_format=response_format)  # fails now on a schema it can't enforce
        else:
            json_schema = None if schema is None else _json_schema_of(schema)
            response_format = {"type": "json_object"}
        llm = model.bind(
            response_format=response_format,
            ls_structured_output_format={**trace, "schema": json_schema},
        )
        parser = _PydanticAnswer(pydantic_object=schema) if pydantic else _JsonAnswer()
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")


def _json_schema_of(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict) and "function" in schema:  # an OpenAI tool
        return schema["function"].get("parameters", {})
    if isinstance(schema, dict):  # a JSON schema (a title is not required)
        return schema
    try:
        return convert_to_json_schema(schema)
    except Exception as error:
        msg = f"Cannot turn {schema!r} into a JSON schema: {error}"
        raise ValueError(msg) from error


def _check_whole(result: list[Generation], *, tool_call: bool = False) -> None:
    """Refuse a finished answer that is not whole.

    Refused: an answer cut off at ``max_tokens`` (its JSON never closed), JSON that does not
    parse as it stands, or (`tool_call`) an answer without one complete call.

    A stream's answer is checked once its last chunk (the one with the finish reason) is in.
    """
    message = getattr(result[0], "message", None) if result else None
    metadata = getattr(message, "response_metadata", None) or {}
    finish = metadata.get("finish_reason")
    content = str(getattr(message, "content", ""))
    if finish == "length":
        msg = (
            "The structured answer was cut off at max_tokens before its JSON was complete; "
            "raise max_tokens (the answer is in the raw message)."
        )
        raise OutputParserException(msg, llm_output=content)
    if finish is None:  # a stream's answer so far
        return
    if tool_call:
        invalid = getattr(message, "invalid_tool_calls", None)
        if invalid or not getattr(message, "tool_calls", None):
            reason = invalid[0].get("error") if invalid else None
            msg = f"The structured answer holds no complete tool call: {reason or 'none came'}"
            raise OutputParserException(msg, llm_output=content)
        return
    try:
        json.loads(content)
    except ValueError as error:
        msg = f"The structured answer is not whole JSON ({error}); it is in the raw message."
        raise OutputParserException(msg, llm_output=content) from None


class _JsonAnswer(JsonOutputParser):
    """JSON of a whole answer (partial objects while streaming); a cut-off answer raises."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _check_whole(result)
        return super().parse_result(result, partial=partial)


class _PydanticAnswer(PydanticOutputParser):
    """A Pydantic object from a whole answer; a cut-off answer raises."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _check_whole(result)
        return super().parse_result(result, partial=partial)


class _PydanticToolsAnswer(PydanticToolsParser):
    """The forced call's arguments as a Pydantic object; a cut-off call raises."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _check_whole(result, tool_call=True)
        return super().parse_result(result, partial=partial)


class _JsonToolsAnswer(JsonOutputKeyToolsParser):
    """The forced call's arguments as a dict; a cut-off call raises."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        _check_whole(result, tool_call=True)
        return super().parse_result(result, partial=partial)
