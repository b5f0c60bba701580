"""Which JSON values the grammars accept, locally and as translated to GBNF for remote servers.

Both grammars run in llguidance with the tiny checkpoint's tokenizer: the local one as built,
the remote one translated to GBNF (what llama.cpp's server gets) and back with llguidance's
own GBNF reader, so the two are compared on the same texts.
"""

import functools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langchain_synthia._gbnf import lark_to_gbnf
from langchain_synthia._grammar import INTEGER_BOUND, json_rule, lark_grammar

CASES = 150
"""Values each property tries per run."""

llguidance = pytest.importorskip("llguidance")


@functools.cache
def _tokenizer(path: str) -> tuple[Any, Any]:
    import llguidance.hf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, llguidance.hf.from_tokenizer(tokenizer)


@functools.cache
def _grammars(schema_json: str) -> dict[str, str]:
    """The local grammar of one JSON value under the schema, and its GBNF translation."""
    from llguidance.gbnf_to_lark import gbnf_to_lark

    local = f'start: " "? {json_rule(json.loads(schema_json))}'
    return {"local": lark_grammar(local), "remote": lark_grammar(gbnf_to_lark(lark_to_gbnf(local)))}


@pytest.fixture(params=["local", "remote"])
def accepts(request: pytest.FixtureRequest, tiny_model: str) -> Any:
    """Whether the grammar (local, or its GBNF translation) accepts a JSON text under a schema."""
    tokenizer, ll_tokenizer = _tokenizer(tiny_model)

    def accepts(schema: dict, text: str) -> bool:
        grammar = _grammars(json.dumps(schema, sort_keys=True))[request.param]
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        ids = tokenizer(text, add_special_tokens=False).input_ids  # " {" etc.: the space is allowed
        return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()

    return accepts


def _settings() -> settings:
    return settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                    HealthCheck.function_scoped_fixture])  # fmt: skip


ARGS = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

integers = st.one_of(
    st.integers(-(10**25), 10**25),
    st.integers(-(10**19), 10**19),
    st.sampled_from([0, -1, INTEGER_BOUND, -INTEGER_BOUND, INTEGER_BOUND + 1, 2**63 - 1, -(2**63)]),
)


@_settings()
@given(value=integers)
def test_an_unbounded_integer_is_accepted_exactly_within_the_bound(
    accepts: Any, value: int
) -> None:
    assert accepts(ARGS, json.dumps({"a": value}, separators=(",", ":"))) is (
        abs(value) <= INTEGER_BOUND
    )


@_settings()
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_is_accepted_as_python_writes_it(accepts: Any, value: float) -> None:
    """Numbers keep JSON's syntax (exponents included): no real answer is refused."""
    schema = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    assert accepts(schema, json.dumps({"x": value}, separators=(",", ":")))


def test_a_bound_the_schema_gives_is_the_one_enforced_locally(accepts: Any, request: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0}},
        "required": ["a"],
    }
    assert accepts(schema, '{"a":1000000000000000000}')
    assert not accepts(schema, '{"a":1000000000000000001}')
    if "local" in request.node.callspec.id:  # the GBNF enforces no schema bound (docs/agents.md)
        assert not accepts(schema, '{"a":-1}')


SPACED = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "string"}},
                   "c": {"type": "object", "properties": {}, "additionalProperties": True}},
    "required": ["a", "b"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ('{"a":1,"b":["x","y"]}', True),
        ('{"a": 1, "b": ["x", "y"]}', True),  # as json.dumps writes it
        ('{ "a" : 1 , "b" : [ "x" , "y" ] , "c" : { } }', True),
        ('{"a": 1, "b": [], "c": {"k": [1, {"z": null}]}}', True),
        ('{"a":  1,"b":[]}', False),  # two spaces
        ('{"a":\n1,"b":[]}', False),
        ('{"a":\t1,"b":[]}', False),
        ('{"a":1,"b":[ ]}', True),
        ('{"a":1,"b":[  ]}', False),
    ],
)
def test_one_space_at_most_between_json_tokens(accepts: Any, text: str, accepted: bool) -> None:
    """JSON as a model mostly read it, or compact; never a run of whitespace to stall in."""
    assert accepts(SPACED, text) is accepted
