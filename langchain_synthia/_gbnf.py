r"""Our grammars in llama.cpp's GBNF, for remote mode against llama.cpp's server.

The faces build grammars in llguidance's Lark dialect (`langchain_synthia._grammar`,
`langchain_synthia.tools.tool_grammar`): a few rules of string literals, rule names, ``|``,
``( )``, ``?``, ``*``, one free-text terminal, and JSON schemas embedded with ``%json``. This
module translates exactly that subset. JSON schemas become JSON with at most one space between
two tokens and no other whitespace (``json-space``, as locally), with: objects (declared
properties in order, the required ones mandatory; closed unless ``additionalProperties``
allows more), strings (``minLength``/``maxLength``),
``enum``/``const``, integers, numbers, booleans, null, arrays (``minItems``/``maxItems``),
``anyOf``/``oneOf``, single-element ``allOf``, local ``$ref``\\s and type lists. Integers lie
within ``±INTEGER_BOUND`` (10**18), as locally for an integer whose schema gives no bound;
numbers have JSON's unbounded syntax, as locally. A schema's own numeric bounds and string
patterns/formats are not enforced by the GBNF (a documented difference from local mode, where
llguidance enforces them).
"""

import json
import re
from typing import Any

from langchain_synthia._grammar import INTEGER_BOUND, JSON_SPACE, GrammarError

_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|%json\s+.*$|/(?:[^/\\]|\\.)+/|[A-Za-z_]\w*|[|()?*+])')

_FREE_TEXT = {r"/[^<\s][\s\S]*/": r"[^<\x20\t\r\n] [^\x00]*"}
"""Regex terminals we emit, in GBNF: free text that does not start with ``<`` or a space."""

_BASICS = {
    "json-string": r'"\"" json-char* "\""',
    "json-char": r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    # INTEGER_BOUND is a power of ten: every integer of fewer digits, and the bound itself
    "json-integer": f'"-"? ("0" | [1-9] [0-9]{{0,{len(str(INTEGER_BOUND)) - 2}}} | '
    f'"{INTEGER_BOUND}")',
    "json-number": r'"-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [-+]? [0-9]+)?',
    "json-boolean": r'"true" | "false"',
    "json-null": r'"null"',
    "json-value": r"json-object | json-array | json-string | json-number | json-boolean | "
    r"json-null",
    "json-object": r'"{" json-space (json-pair (json-space "," json-space json-pair)* '
    r'json-space)? "}"',
    "json-pair": r'json-string json-space ":" json-space json-value',
    "json-array": r'"[" json-space (json-value (json-space "," json-space json-value)* '
    r'json-space)? "]"',
    "json-space": f"{json.dumps(JSON_SPACE)}?",
}


def lark_to_gbnf(lark: str) -> str:
    """Translate one of our Lark grammars to GBNF (its ``start`` rule becomes ``root``).

    Raises:
        GrammarError: For Lark the translation does not cover (it names the construct).
    """
    out = _Builder()
    for line in lark.strip().splitlines():
        name, _, body = line.partition(":")
        if not body or not re.fullmatch(r"[A-Za-z_]\w*", name.strip()):
            msg = f"Cannot translate the Lark line {line!r} to GBNF."
            raise GrammarError(msg)
        out.rules[_name(name.strip())] = _body(body, out)
    return out.text()


def json_schema_to_gbnf(schema: dict[str, Any]) -> str:
    """A GBNF grammar whose root is one JSON value valid under `schema`."""
    out = _Builder()
    out.rules["root"] = out.schema(schema, "value", schema)
    return out.text()


def _name(lark_name: str) -> str:
    return "root" if lark_name == "start" else lark_name.replace("_", "-")


def _body(body: str, out: "_Builder") -> str:
    parts, at = [], 0
    body = body.strip()
    while at < len(body):
        match = _TOKEN.match(body, at)
        if match is None:
            msg = f"Cannot translate {body[at:]!r} (in a Lark rule) to GBNF."
            raise GrammarError(msg)
        token, at = match.group(1), match.end()
        if token.startswith("%json"):
            schema = json.loads(token[5:].strip())
            parts.append(out.schema(schema, f"json{len(out.rules)}", schema))
        elif token.startswith("/"):
            if token not in _FREE_TEXT:
                msg = f"Cannot translate the regex {token} to GBNF."
                raise GrammarError(msg)
            parts.append(f"({_FREE_TEXT[token]})")
        elif token[0].isalpha() or token[0] == "_":
            parts.append(_name(token))
        elif token in "?*+)" and parts:
            parts[-1] += token
        else:
            parts.append(token)
        if len(parts) > 1 and parts[-2] == "(":
            parts[-2:] = ["(" + parts[-1]]
    return " ".join(parts)


class _Builder:
    """GBNF rules, named, in order; JSON schemas add rules of their own."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._basics = False
        self._refs: dict[str, str] = {}

    def text(self) -> str:
        rules = dict(self.rules)
        if self._basics:
            rules |= _BASICS
        return "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"

    def basic(self, name: str) -> str:
        self._basics = True
        return name

    def add(self, prefix: str, body: str) -> str:
        name = f"{prefix}-{len(self.rules)}"
        self.rules[name] = body
        return name

    def schema(self, schema: Any, prefix: str, root: dict[str, Any]) -> str:
        """A rule (or basic rule name) matching one JSON value under `schema`."""
        if schema is True or schema == {}:
            return self.basic("json-value")
        if not isinstance(schema, dict):
            msg = f"Cannot translate the schema {schema!r} to GBNF."
            raise GrammarError(msg)
        if "$ref" in schema:  # one rule per definition, so recursive models terminate
            ref = schema["$ref"]
            if ref not in self._refs:
                self._refs[ref] = self.add(prefix, "")
                self.rules[self._refs[ref]] = self.schema(_resolve(ref, root), prefix, root)
            return self._refs[ref]
        if "const" in schema:
            return self.add(prefix, _literal(schema["const"]))
        if "enum" in schema:
            return self.add(prefix, " | ".join(_literal(v) for v in schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [self.schema(s, prefix, root) for s in schema[key]]
                return self.add(prefix, " | ".join(options))
        if "allOf" in schema:
            if len(schema["allOf"]) != 1:
                msg = "allOf with several schemas cannot be translated to GBNF."
                raise GrammarError(msg)
            return self.schema(schema["allOf"][0], prefix, root)
        kind = schema.get("type")
        if isinstance(kind, list):
            options = [self.schema({**schema, "type": k}, prefix, root) for k in kind]
            return self.add(prefix, " | ".join(options))
        if kind == "object" or (kind is None and "properties" in schema):
            return self._object(schema, prefix, root)
        if kind == "array":
            return self._array(schema, prefix, root)
        if kind == "string":
            return self._string(schema, prefix)
        simple = {"integer": "json-integer", "number": "json-number", "boolean": "json-boolean"}
        if kind in simple:
            return self.basic(simple[kind])
        if kind == "null":
            return self.basic("json-null")
        if kind is None:
            return self.basic("json-value")
        msg = f"Cannot translate the JSON schema type {kind!r} to GBNF."
        raise GrammarError(msg)

    def _string(self, schema: dict[str, Any], prefix: str) -> str:
        low, high = schema.get("minLength"), schema.get("maxLength")
        if low is None and high is None:
            return self.basic("json-string")
        self.basic("json-char")
        bounds = f"{low or 0},{'' if high is None else high}"
        return self.add(prefix, '"\\"" json-char{' + bounds + '} "\\""')

    def _array(self, schema: dict[str, Any], prefix: str, root: dict[str, Any]) -> str:
        item = self.schema(schema.get("items", {}), prefix, root)
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        space = self.basic("json-space")
        if high is not None and int(high) == 0:
            return self.add(prefix, f'"[" {space} "]"')
        more_low = max(low - 1, 0)
        more_high = "" if high is None else int(high) - 1
        items = f'{item} ({space} "," {space} {item}){{{more_low},{more_high}}}'
        if low:
            return self.add(prefix, f'"[" {space} {items} {space} "]"')
        return self.add(prefix, f'"[" {space} ({items} {space})? "]"')

    def _object(self, schema: dict[str, Any], prefix: str, root: dict[str, Any]) -> str:
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties", False)
        if not properties and extra is not False:
            return self.basic("json-object")
        required = [k for k in properties if k in set(schema.get("required", ()))]
        optional = [k for k in properties if k not in required]
        space = self.basic("json-space")
        comma = f'{space} "," {space}'
        pairs = {
            key: f'{_literal(key)} {space} ":" {space} {self.schema(value, prefix, root)}'
            for key, value in properties.items()
        }
        head = f" {comma} ".join(pairs[k] for k in required)
        tail = " ".join(f"({comma} {pairs[k]})?" for k in optional)
        if required:
            body = f'"{{" {space} {head} {tail} {space} "}}"'.replace("  ", " ")
            return self.add(prefix, body)
        if not optional:
            return self.add(prefix, f'"{{" {space} "}}"')
        firsts = []  # no required key: the first key present has no comma before it
        for index, key in enumerate(optional):
            rest = " ".join(f"({comma} {pairs[k]})?" for k in optional[index + 1 :])
            firsts.append(f"{pairs[key]} {rest}".strip())
        choice = self.add(prefix, " | ".join(f"({first})" for first in firsts))
        return self.add(prefix, f'"{{" {space} ({choice} {space})? "}}"')


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    if not ref.startswith("#/"):
        msg = f"Only local $refs can be translated to GBNF, not {ref!r}."
        raise GrammarError(msg)
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _literal(value: Any) -> str:
    """A GBNF string literal of `value`'s compact JSON text."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(text, ensure_ascii=False)
