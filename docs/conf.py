"""Sphinx configuration: Markdown pages (MyST), the furo theme, autodoc for the API page.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``. Importing
`langchain_synthia` is light by design (no torch, no model), so autodoc never loads a model.
"""

import os
import re
import sys
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util.typing import stringify_annotation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langchain_core.language_models import LanguageModelInput  # noqa: E402

from langchain_synthia import ChatSynthia, SynthiaLLM, __version__  # noqa: E402

project = "langchain-synthia"
author = "langchain-synthia developers"
copyright = "langchain-synthia developers"
release = __version__
version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# `page.md#section` links resolve to headings down to level 4.
myst_heading_anchors = 4
myst_enable_extensions = ["deflist"]

html_theme = "furo"
html_title = f"langchain-synthia {__version__}"
pygments_style = "default"

# autodoc: members in source order, type hints in the signature, pydantic internals left out.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [
    ("Setup", "example"),
    ("Instantiate", "example"),
    ("Invoke", "example"),
    ("Stream", "example"),
    ("Async", "example"),
    ("Tool calling", "example"),
    ("Structured output", "example"),
    ("Token usage", "example"),
    ("Response metadata", "example"),
]

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")


def _fences_to_rst(
    app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]
) -> None:
    """Turn the Markdown code fences of docstrings (LangChain's style) into reST code blocks.

    Autodoc reads docstrings as reST; without this a ```python fence would be shown as text.
    """
    out: list[str] = []
    fence_indent: str | None = None
    for line in lines:
        match = _FENCE.match(line)
        if fence_indent is None and match:
            fence_indent = match["indent"]
            lang = {"txt": "text", "": "text"}.get(match["lang"], match["lang"])
            out += [f"{fence_indent}.. code-block:: {lang}", ""]
        elif fence_indent is not None and match and match["indent"] == fence_indent:
            fence_indent = None
            out.append("")
        elif fence_indent is not None:
            out.append(f"{fence_indent}   {line[len(fence_indent) :]}" if line.strip() else "")
        else:
            out.append(line)
    lines[:] = out


def _own_fields(cls: type) -> list[str]:
    """The pydantic fields that langchain-synthia declares (not LangChain's standard ones)."""
    owners = {
        name: next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        for name in cls.model_fields
    }
    return [n for n, k in owners.items() if k.__module__.startswith("langchain_synthia")]


def _default_of(field: Any) -> str:
    if field.default_factory is None:
        return f"``{field.default!r}``"
    env = re.search(r"SYNTHIA_\w+", field.description or "")
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SYNTHIA_")}
    try:
        default = field.default_factory()
    finally:
        os.environ.update(saved)
    return f"``${env[0]}`` or ``{default!r}``" if env else f"``{default!r}``"


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _type_of(field: Any) -> str:
    text = stringify_annotation(field.annotation, "smart").replace("~typing.", "")
    bounds = [
        f"{_BOUNDS[key]} {getattr(m, key)}"
        for m in field.metadata
        for key in _BOUNDS
        if getattr(m, key, None) is not None
    ]
    return f"``{text}``" + (f" ({', '.join(bounds)})" if bounds else "")


def _fields_table(
    app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]
) -> None:
    """Append a table of a model class's parameters (its pydantic fields), in field order."""
    if what != "class" or obj not in (ChatSynthia, SynthiaLLM):
        return
    from langchain_synthia._params import _CALL_OPTIONS

    lines += [
        "",
        ".. list-table:: Parameters",
        "   :header-rows: 1",
        "   :widths: 18 20 20 8 34",
        "",
    ]
    lines += ["   * - Name", "     - Type", "     - Default", "     - Per call", "     - Meaning"]
    for field_name in _own_fields(obj):  # type: ignore[arg-type]
        field = obj.model_fields[field_name]  # type: ignore[attr-defined]
        per_call = "yes" if field_name in (*_CALL_OPTIONS, "stop") else "no"
        meaning = " ".join((field.description or "").split())
        lines += [f"   * - ``{field_name}``", f"     - {_type_of(field)}"]
        lines += [f"     - {_default_of(field)}", f"     - {per_call}", f"     - {meaning}"]
    lines += [
        "",
        "LangChain's standard fields (``callbacks``, ``tags``, ``metadata``, ``cache``, ...) are "
        "accepted too.",
    ]


def _data_docstring(
    app: Sphinx, what: str, name: str, obj: object, options: dict, lines: list[str]
) -> None:
    """Re-exported constants: the docstring written under their definition, not their type's."""
    if what != "data" or not name.startswith("langchain_synthia."):
        return
    from sphinx.pycode import ModuleAnalyzer

    attr = name.rsplit(".", 1)[1]
    for module in ("prompts", "variants", "_version"):
        docs = ModuleAnalyzer.for_module(f"langchain_synthia.{module}").find_attr_docs()
        if ("", attr) in docs:
            lines[:] = list(docs[("", attr)])
            return
    lines[:] = []


_INPUT = [
    stringify_annotation(LanguageModelInput, mode)
    for mode in ("smart", "fully-qualified-except-typing")
]


def _short_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: dict,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """Write LangChain's ``LanguageModelInput`` by its name, not as its ten-line expansion."""

    def short(text: str | None) -> str | None:
        for expanded in _INPUT:
            text = None if text is None else text.replace(expanded, "LanguageModelInput")
        return text

    return short(signature), short(return_annotation)


def setup(app: Sphinx) -> None:
    """Convert docstring fences before napoleon reads the sections; add the generated parts."""
    app.connect("autodoc-process-docstring", _fences_to_rst, priority=400)
    app.connect("autodoc-process-docstring", _fields_table)
    app.connect("autodoc-process-docstring", _data_docstring)
    app.connect("autodoc-process-signature", _short_signature)
