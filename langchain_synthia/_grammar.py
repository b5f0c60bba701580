"""Constrained decoding: grammars that decide which tokens a row may take next.

A request may carry a grammar in llguidance's format (a JSON schema or a Lark grammar that
embeds JSON schemas). The engine then gives that row a `Constraint`: before each token is
sampled, the constraint's mask removes every token that would break the grammar, and each
sampled token advances it. The output therefore always parses; it ends when the grammar is
complete (only EOS is allowed) or at ``max_tokens`` (finish reason ``"length"``).

Why llguidance (docs/agents.md has the figures): it has no Python dependencies (one abi3
wheel), computes a 32,000-token mask in microseconds in Rust, compiles a JSON schema without a
per-vocabulary preprocessing pass, and its Lark front end lets a tool call and free text share
one grammar (``tool_choice="auto"``). xgrammar was as fast per token here but pulls in
apache-tvm-ffi, triton and transformers as hard requirements.
"""

import json
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_INSTALL = 'pip install "langchain-synthia"  (constrained decoding needs llguidance)'


class GrammarError(ValueError):
    """A schema or grammar that constrained decoding cannot express."""


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as error:  # pragma: no cover - a dependency of the package
        msg = f"Constrained decoding needs llguidance, which is not installed: {_INSTALL}"
        raise ImportError(msg) from error
    return llguidance


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """An answer that is one JSON value valid under `schema` (after an optional space).

    Raises:
        GrammarError: If `schema` is not a JSON schema llguidance can enforce (with its reason).
    """
    return lark_grammar(f'start: " "? {json_rule(schema)}')


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark rule body matching one JSON value under `schema` (for `lark_grammar`).

    Objects that do not say otherwise are closed (``additionalProperties: false``): the model
    may not invent keys. Integers that do not say otherwise lie within ``±INTEGER_BOUND``
    (`_bounded`), so a model cannot write digits without end. Between two JSON tokens there
    may be one space (`JSON_SPACE`) and no other whitespace: a model writes JSON the way it
    mostly read it (``{"city": "Paris"}``, as `json.dumps` writes it) or compact, and cannot
    stall in endless spaces or newlines.
    """
    if not isinstance(schema, dict):
        msg = f"A JSON schema must be a dict, got {type(schema).__name__}: {schema!r}."
        raise GrammarError(msg)
    spacing = {"whitespace_flexible": True, "whitespace_pattern": f"{JSON_SPACE}?"}
    closed = {**_closed(schema), "x-guidance": spacing}
    return f"%json {json.dumps(closed, ensure_ascii=False)}"


JSON_SPACE = " "
"""The whitespace a grammar allows between two JSON tokens, at most once: one space. A small
model copies a value from the prompt into JSON it writes with spaces far more surely than into
compact JSON (docs/agents.md has the figures)."""


INTEGER_BOUND = 10**18
"""The largest magnitude of an integer whose schema gives no bound, a power of ten: every
integer of up to 18 digits, and 10**18 itself, all within a signed 64-bit integer (what
JSON-schema ``integer`` maps to in most tools' languages). llguidance reads bounds as 64-bit
floats, which state 10**18 exactly but not 2**63 - 1."""

_VALUES = frozenset({"const", "enum", "default", "examples"})
"""Schema keywords whose values are JSON values, not schemas (left as they are)."""


_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
"""Schema keywords whose values map names to schemas."""


def _closed(schema: Any) -> Any:
    """`schema` closed and bounded.

    Every object that leaves ``additionalProperties`` unsaid gets ``false``, and every integer
    is `_bounded`; values (``const``, ``enum``, ...) are left as they are.
    """
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _closed_value(key, value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return _bounded(out)


def _closed_value(key: str, value: Any) -> Any:
    """The value of `key` in a schema, its schemas `_closed`."""
    if key in _VALUES:
        return value
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return {name: _closed(item) for name, item in value.items()}
    return _closed(value)


def _bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """An integer schema with the bounds it leaves unsaid set to ``±INTEGER_BOUND``.

    A bound the schema gives is kept; the other side is set only when the given one lies
    within ``±INTEGER_BOUND`` (``minimum: 0`` gets ``maximum: 10**18``; ``minimum: 10**20``
    stays unbounded above, as the schema asks for larger numbers). A schema that also allows
    ``number`` is left as it is: bounds on a number forbid its exponent (``6.02e23``).
    """
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" not in kinds or "number" in kinds:
        return schema
    low = _given_bound(schema, "minimum", "exclusiveMinimum")
    high = _given_bound(schema, "maximum", "exclusiveMaximum")
    out = dict(schema)
    if low is None and (high is None or high >= -INTEGER_BOUND):
        out["minimum"] = -INTEGER_BOUND
    if high is None and (low is None or low <= INTEGER_BOUND):
        out["maximum"] = INTEGER_BOUND
    return out


def _given_bound(schema: dict[str, Any], inclusive: str, exclusive: str) -> float | None:
    values = [
        schema[key] for key in (inclusive, exclusive) if isinstance(schema.get(key), int | float)
    ]
    return values[0] if values else None


def lark_grammar(lark: str) -> str:
    """Compile-check a Lark grammar (JSON schemas embedded with ``%json``); return the grammar.

    Raises:
        GrammarError: With llguidance's reason, if the grammar or a schema in it is unsupported.
    """
    llguidance = _llguidance()
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        msg = f"Constrained decoding cannot enforce this schema or grammar: {error}"
        raise GrammarError(msg)
    return grammar


class Constraint:
    """One row's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, grammar: str, tokenizer: Any) -> None:
        """Start `grammar` for a row decoded with the engine's `tokenizer`."""
        self._matcher = _llguidance().LLMatcher(_ll_tokenizer(tokenizer), grammar)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def fill(self, bitmask: "torch.Tensor", row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, 32 tokens each)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def advance(self, token_id: int) -> None:
        """Take a sampled token (always one the mask allowed)."""
        if not self._matcher.consume_token(token_id):
            msg = f"token {token_id} broke the grammar: {self._matcher.get_error()}"
            raise RuntimeError(msg)

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow (the answer is whole)."""
        return self._matcher.is_stopped()


_tokenizers: dict[int, Any] = {}
_lock = threading.Lock()


def _ll_tokenizer(tokenizer: Any) -> Any:
    """The llguidance view of a transformers tokenizer (built once per tokenizer: it is slow)."""
    with _lock:
        found = _tokenizers.get(id(tokenizer))
        if found is None or found[0] is not tokenizer:
            found = (tokenizer, _llguidance().hf.from_tokenizer(tokenizer))
            _tokenizers[id(tokenizer)] = found
        return found[1]


def bitmask_words(vocab_size: int) -> int:
    """int32 words of a bitmask that covers `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: "torch.Tensor", vocab_size: int) -> "torch.Tensor":
    """The boolean ``[rows, vocab_size]`` mask of an int32 bitmask ``[rows, words]``."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1).bool()
    if bits.shape[1] < vocab_size:  # logits wider than the tokenizer: the padding is never valid
        bits = torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]))
    return bits[:, :vocab_size]
