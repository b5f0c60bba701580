"""The bounds the grammars add to JSON schemas: integers within ±10**18, nothing else changed."""

import json

import pytest

from langchain_synthia._gbnf import lark_to_gbnf
from langchain_synthia._grammar import INTEGER_BOUND, json_rule

BOUNDED = {"minimum": -INTEGER_BOUND, "maximum": INTEGER_BOUND}


def _enforced(schema: dict) -> dict:
    """The schema as the grammar hands it to llguidance."""
    rule = json_rule(schema)
    assert rule.startswith("%json ")
    enforced = json.loads(rule.removeprefix("%json "))
    enforced.pop("x-guidance")
    return enforced


def test_the_bound_fits_a_signed_64_bit_integer() -> None:
    assert INTEGER_BOUND == 10**18 < 2**63
    assert float(INTEGER_BOUND) == INTEGER_BOUND  # llguidance reads bounds as floats


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "integer"}, {"type": "integer", **BOUNDED}),
        ({"type": ["integer", "null"]}, {"type": ["integer", "null"], **BOUNDED}),
        ({"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 0, "maximum": 10**18}),
        ({"type": "integer", "exclusiveMaximum": 5}, {"type": "integer", "exclusiveMaximum": 5,
                                                      "minimum": -(10**18)}),
        ({"type": "integer", "minimum": 1, "maximum": 9}, {"type": "integer", "minimum": 1,
                                                           "maximum": 9}),
        ({"type": "integer", "minimum": 10**20}, {"type": "integer", "minimum": 10**20}),
        ({"type": "number"}, {"type": "number"}),
        ({"type": ["integer", "number"]}, {"type": ["integer", "number"]}),
        ({"type": "string"}, {"type": "string"}),
    ],
    ids=["integer", "nullable", "minimum-only", "exclusive-maximum-only", "both-given",
         "minimum-beyond-the-bound", "number", "integer-or-number", "string"],
)  # fmt: skip
def test_an_integer_gets_the_bounds_its_schema_leaves_unsaid(schema: dict, expected: dict) -> None:
    assert _enforced(schema) == expected


def test_integers_are_bounded_wherever_they_stand_and_values_are_kept() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "integer"},
            "type": {"type": "array", "items": {"type": "integer"}},
            "choice": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/Count"}]},
            "fixed": {"const": {"type": "integer", "properties": {}}},
            "named": {"enum": [{"type": "integer"}], "default": {"type": "integer"}},
        },
        "$defs": {"Count": {"type": "integer", "minimum": 0}},
    }
    enforced = _enforced(schema)
    properties = enforced["properties"]
    assert set(properties) == set(schema["properties"])  # no key added among the names
    assert enforced["additionalProperties"] is False
    assert properties["properties"] == {"type": "integer", **BOUNDED}
    assert properties["type"]["items"] == {"type": "integer", **BOUNDED}
    assert properties["choice"]["anyOf"][0] == {"type": "integer", **BOUNDED}
    assert enforced["$defs"]["Count"] == {"type": "integer", "minimum": 0, "maximum": 10**18}
    assert properties["fixed"] == schema["properties"]["fixed"]
    assert properties["named"] == schema["properties"]["named"]


def test_the_gbnf_translation_has_the_same_integer_bound() -> None:
    gbnf = lark_to_gbnf(f'start: " "? {json_rule({"type": "integer"})}')
    (integer,) = [line for line in gbnf.splitlines() if line.startswith("json-integer ::=")]
    assert integer == 'json-integer ::= "-"? ("0" | [1-9] [0-9]{0,17} | "1000000000000000000")'
