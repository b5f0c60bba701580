"""Every parameter of ChatSynthia and SynthiaLLM has a row in its page's parameter tables.

The pages are docs/chat-model.md and docs/llm.md: each field that langchain-synthia declares
(LangChain's standard fields are documented by LangChain) must be the first cell of a table row
under the page's "## Parameters" heading, and no row may name a parameter that does not exist.
"""

import re
from pathlib import Path

import pytest

import langchain_synthia
from langchain_synthia import ChatSynthia, SynthiaLLM
from langchain_synthia._params import _CALL_OPTIONS

DOCS = Path(__file__).resolve().parents[2] / "docs"
_ROW = re.compile(r"^\|\s*`(?P<name>\w+)`\s*\|(?P<rest>.*)\|\s*$")


def own_fields(cls: type) -> list[str]:
    """The pydantic fields declared in langchain_synthia's classes (not LangChain's)."""
    fields = []
    for name in cls.model_fields:
        owner = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        if owner.__module__.startswith("langchain_synthia"):
            fields.append(name)
    return fields


def parameter_rows(page: str) -> dict[str, list[str]]:
    """Table rows of the page's "## Parameters" section: first-cell name -> the other cells."""
    text = (DOCS / page).read_text()
    section = text.split("\n## Parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if match := _ROW.match(line):
            rows[match["name"]] = [cell.strip() for cell in match["rest"].split("|")]
    return rows


@pytest.mark.parametrize(("cls", "page"), [(ChatSynthia, "chat-model.md"), (SynthiaLLM, "llm.md")])
def test_every_field_has_a_row_and_every_row_a_field(cls: type, page: str) -> None:
    rows = parameter_rows(page)
    fields = own_fields(cls)
    assert {"model", "temperature", "max_batch_size"} <= set(fields)
    missing = [name for name in fields if name not in rows]
    assert not missing, f"docs/{page} has no parameter row for {missing}"
    unknown = [name for name in rows if name not in cls.model_fields]
    assert not unknown, f"docs/{page} documents parameters that do not exist: {unknown}"


def test_llm_page_says_which_parameters_a_call_may_set() -> None:
    rows = parameter_rows("llm.md")
    per_call = {*_CALL_OPTIONS, "stop"}
    for name, cells in rows.items():
        assert cells[-1].startswith("yes" if name in per_call else "no"), name


@pytest.mark.parametrize("page", ["chat-model.md", "llm.md"])
def test_environment_defaults_are_documented(page: str) -> None:
    rows = parameter_rows(page)
    for name, variable in [
        ("model", "SYNTHIA_MODEL"),
        ("revision", "SYNTHIA_REVISION"),
        ("device", "SYNTHIA_DEVICE"),
    ]:
        assert variable in " ".join(rows[name]), f"docs/{page}: {name} row lacks ${variable}"


def test_api_page_documents_every_public_name() -> None:
    api = (DOCS / "api.md").read_text()
    for name in langchain_synthia.__all__:
        # autodoc, or (for a name whose import loads torch) a hand-written directive
        directive = rf"^\.\. (auto\w+|py:exception):: langchain_synthia\.{name}$"
        assert re.search(directive, api, re.M), name
