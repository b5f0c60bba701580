"""The engine interface: every engine implements `Engine`, and no module reaches into another.

The instances of the two local engines on the tiny checkpoint are checked in
``tests/integration_tests/test_engine_interface.py``; here, without a model, each engine class
is checked against the Protocol's members and signatures.
"""

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from typing_extensions import get_protocol_members

import langchain_synthia
from langchain_synthia._engine_interface import Engine
from langchain_synthia._fast_engine import FastEngine
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._remote import RemoteEngine, RemoteSettings
from langchain_synthia._transformers_engine import TransformersEngine

ENGINES = [TransformersEngine, FastEngine, RemoteEngine]

METHODS = ["encode", "submit", "open", "aopen", "check"]
ATTRIBUTES = ["kind", "name", "batches_locally"]

LANGCHAIN_HOOKS = {"_identifying_params", "_resolve_model_profile", "_convert_input"}
"""Underscored members that LangChain defines and the faces override (its API, not ours)."""

STANDARD_LIBRARY = {"_replace", "_asdict", "_fields"}
"""A named tuple's public members, underscored to stay clear of field names."""


def test_the_protocol_names_what_the_faces_use() -> None:
    assert get_protocol_members(Engine) == {*METHODS, *ATTRIBUTES}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda cls: cls.__name__)
def test_each_engine_class_has_every_method_with_the_protocols_parameters(engine: type) -> None:
    for name in METHODS:
        wanted = list(inspect.signature(getattr(Engine, name)).parameters)
        assert list(inspect.signature(getattr(engine, name)).parameters) == wanted, name
    assert isinstance(engine.kind, str)
    assert isinstance(engine.batches_locally, bool)


def test_the_kinds_differ_and_only_the_remote_engine_leaves_batching_to_its_server() -> None:
    assert [engine.kind for engine in ENGINES] == ["transformers", "fast", "remote"]
    assert [engine.batches_locally for engine in ENGINES] == [True, True, False]
    assert issubclass(TransformersEngine, LocalEngine)
    assert issubclass(FastEngine, LocalEngine)


def test_a_remote_engine_is_an_engine() -> None:
    engine = RemoteEngine(RemoteSettings("http://x/v1", "m"))
    assert isinstance(engine, Engine)
    assert engine.name == "m"


def test_a_transformers_engine_is_an_engine() -> None:
    model = SimpleNamespace(device="cpu", forward=lambda input_ids, past_key_values=None: None)
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=None)
    engine = TransformersEngine(model, tokenizer, name="stand-in")
    assert isinstance(engine, Engine)
    assert (engine.name, engine.eos_id, engine.pad_id) == ("stand-in", 2, 0)
    engine.check()  # a loaded local engine has nothing to check


def test_an_object_missing_a_member_is_not_an_engine() -> None:
    engine = RemoteEngine(RemoteSettings("http://x/v1", "m"))
    assert isinstance(engine, Engine)
    partial = SimpleNamespace(**{n: getattr(engine, n) for n in [*METHODS, *ATTRIBUTES]})
    assert isinstance(partial, Engine)
    for missing in [*METHODS, *ATTRIBUTES]:
        del_one = SimpleNamespace(**{n: getattr(engine, n) for n in vars(partial) if n != missing})
        assert not isinstance(del_one, Engine), missing


# -- no module reaches into another's private members ------------------------------------------

PACKAGE = Path(langchain_synthia.__file__).parent


def _package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _private_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """``x._name`` where ``x`` is not ``self``, ``cls`` or ``super()`` (dunders are fine)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


def _defined_private_names() -> set[str]:
    """Every underscored function, method, class, variable and attribute the package defines."""
    names: set[str] = set()
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)  # not another library's (gptqmodel's log folder)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_no_module_reads_another_objects_private_members() -> None:
    """``stream._put``, ``engine._row``, ``self._engine._redact``: each has a public name."""
    ours = _defined_private_names() - LANGCHAIN_HOOKS - STANDARD_LIBRARY
    assert {"_decode", "_left_padded", "_serve"} <= ours  # the scan sees the engines
    offences = []
    for path in _package_modules():
        for line, text in _private_reads(ast.parse(path.read_text())):
            if text.rpartition(".")[2] in ours:
                offences.append(f"{path.relative_to(PACKAGE)}:{line}: {text}")
    assert offences == []


def _is_module(package: str, name: str) -> bool:
    """Whether ``from package import name`` imports a module (``_kernels``), not a member."""
    folder = PACKAGE.parent.joinpath(*package.split("."), name)
    return folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file()


def test_no_module_imports_another_modules_private_names() -> None:
    offences = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "langchain_synthia"
            ):
                offences += [
                    f"{path.relative_to(PACKAGE)}:{node.lineno}: {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                    and not alias.name.startswith("__")
                    and not _is_module(node.module or "", alias.name)
                ]
    assert offences == []


def test_the_scan_finds_a_private_read() -> None:
    """Guards the scan above: it reports what the old engine module did."""
    code = "def f(stream: Any, engine: Any) -> None:\n    stream._put(None)\n    engine._row(1)\n"
    reads = _private_reads(ast.parse(code))
    assert [text for _, text in reads] == ["stream._put", "engine._row"]
    assert _private_reads(ast.parse("self._x; cls._y; super()._z; a.__len__")) == []
