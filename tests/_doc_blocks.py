"""The code blocks of the docs: found, run source by source, and their ``synthia`` lines parsed.

A source is a Markdown page (README.md, docs/*.md) or the docstring of a public name
(``docstring:langchain_synthia.ChatSynthia``). `tests/test_docs.py` runs
``python -m tests._doc_blocks OUT.json SOURCE ...`` in a subprocess: each source's ```python
blocks run in order, in one namespace of their own, with top-level ``await`` allowed (as in
Jupyter or ``python -m asyncio``); a block whose previous line is ``<!-- skip: reason -->`` is
only compiled. The first failing block ends its source.
"""

import ast
import asyncio
import contextlib
import faulthandler
import importlib
import inspect
import io
import json
import os
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCSTRING = "docstring:"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*skip:(?P<reason>.*?)-->\s*$")
_SKIP_START = re.compile(r"^\s*<!--\s*skip\b")
SHELL_LANGS = ("bash", "sh", "shell", "console", "text", "")

BLOCK_SECONDS = 120
"""A block that runs longer than this has hung: the run stops with every thread's traceback."""


@dataclass(frozen=True)
class Block:
    """One fenced code block."""

    source: str
    """The page's path from the repository root, or ``docstring:<dotted name>``."""
    line: int
    """Line of the opening fence (1-based; in a docstring, counted from its first line)."""
    lang: str
    code: str
    skip: str | None
    """The reason of a ``<!-- skip: reason -->`` marker on the line before; None without one."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def source_name(page: Path) -> str:
    return str(page.resolve().relative_to(ROOT))


def docstring_sources() -> list[str]:
    """The public classes and functions whose docstrings hold a ```python example."""
    import langchain_synthia

    sources = []
    for name in langchain_synthia.__all__:
        obj = getattr(langchain_synthia, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and "```python" in (obj.__doc__ or ""):
            sources.append(f"{DOCSTRING}langchain_synthia.{name}")
    return sources


def text_of(source: str) -> str:
    if source.startswith(DOCSTRING):
        module, name = source.removeprefix(DOCSTRING).rsplit(".", 1)
        return inspect.cleandoc(getattr(importlib.import_module(module), name).__doc__)
    return (ROOT / source).read_text()


def blocks(source: str) -> list[Block]:
    """The fenced code blocks of `source`, in order (MyST directives such as ```{toctree} too)."""
    lines = text_of(source).splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        closing = re.compile(rf" *{re.escape(fence[0])}{{{len(fence)},}} *")
        end = index + 1
        while end < len(lines) and not closing.fullmatch(lines[end]):
            end += 1
        body = [
            line[indent:] if not line[:indent].strip() else line for line in lines[index + 1 : end]
        ]
        marker = _SKIP.match(lines[index - 1]) if index > 0 else None
        info = match["info"].strip()
        found.append(
            Block(
                source=source,
                line=index + 1,
                lang=info.split()[0] if info else "",
                code="\n".join(body) + "\n",
                skip=marker["reason"].strip() if marker else None,
            )
        )
        index = end + 1
    return found


def python_blocks(source: str) -> list[Block]:
    return [block for block in blocks(source) if block.lang in ("python", "py")]


def skip_marker_problems(source: str) -> list[str]:
    """Skip markers that are malformed, give no reason, or do not stand right above a block."""
    lines = text_of(source).splitlines()
    problems = []
    for number, line in enumerate(lines, 1):
        if not _SKIP_START.match(line):
            continue
        marker = _SKIP.match(line)
        if marker is None or not marker["reason"].strip():
            problems.append(f"{source}:{number}: write it as <!-- skip: the reason -->")
        elif number >= len(lines) or not _FENCE.match(lines[number]):
            problems.append(f"{source}:{number}: a skip marker must stand right above a code block")
    return problems


# -- shell lines that run the synthia command ----------------------------------------------------


def synthia_commands(block: Block) -> list[list[str]]:
    """The argument lists of the ``synthia ...`` commands in a shell or text block."""
    if block.lang not in SHELL_LANGS:
        return []
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        try:
            lexer = shlex.shlex(line.strip().removeprefix("$ "), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
        except ValueError:  # not shell (an error message, a prompt): nothing to check
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in (";", "&&", "||", "|", "&"):
                command.append(word)
                continue
            while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                command.pop(0)  # VAR=value synthia ...
            if command[:1] == ["synthia"]:
                commands.append(command[1:])
            elif command[:3] == ["python", "-m", "langchain_synthia"]:
                commands.append(command[3:])
            command = []
    return commands


def cli_parse_error(args: list[str]) -> str | None:
    """Why ``synthia ARGS`` does not parse (None when it does). Nothing runs."""
    import click

    from langchain_synthia.cli import main

    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            main.make_context("synthia", list(args)) as ctx,
        ):
            protected = (
                ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
            )
            rest = [*protected, *ctx.args]
            if rest:
                name, command, rest = main.resolve_command(ctx, rest)
                assert command is not None, name
                command.make_context(name, rest, parent=ctx).close()
    except click.exceptions.Exit as done:  # --help, --version
        return None if done.exit_code == 0 else f"exit code {done.exit_code}"
    except click.ClickException as error:
        return error.format_message()
    return None


# -- running a source's Python blocks -------------------------------------------------------------


def _cap_new_tokens(cap: int, grammar_cap: int) -> None:
    """Keep generations short: the docs' examples ask for up to 512 tokens of random text.

    Answers under a grammar (tool calls, structured output) get more room, `grammar_cap`: a
    grammar ends them by itself, and one cut short would fail for the wrong reason.
    """
    from langchain_synthia import _params

    request = _params.SynthiaParams._request

    def capped(self, prompt: str, options: dict):
        most = cap if options.get("grammar") is None else grammar_cap
        return request(self, prompt, {**options, "max_tokens": min(options["max_tokens"], most)})

    _params.SynthiaParams._request = capped


def run_source(source: str) -> dict:
    """Run the source's Python blocks in one namespace; stop at the first that fails."""
    namespace: dict = {"__name__": "__main__"}
    result: dict = {"ran": 0, "compiled": 0, "error": None, "seconds": {}}
    for block in python_blocks(source):
        output = io.StringIO()
        try:
            flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            code = compile(block.code, block.where, "exec", flags=flags)
            if block.skip is not None:
                result["compiled"] += 1
                continue
            faulthandler.dump_traceback_later(BLOCK_SECONDS, exit=True)
            started = time.perf_counter()
            with contextlib.redirect_stdout(output):
                awaitable = eval(code, namespace)  # the docs' own examples
                if inspect.iscoroutine(awaitable):
                    asyncio.run(awaitable)
            result["seconds"][block.where] = round(time.perf_counter() - started, 2)
            result["ran"] += 1
        except BaseException:  # SystemExit and friends are failures too
            result["error"] = (
                f"{block.where} failed:\n{traceback.format_exc(limit=-8)}\n"
                f"Its output ended with:\n{output.getvalue()[-1500:]}"
            )
            break
        finally:
            faulthandler.cancel_dump_traceback_later()
    return result


def main(argv: list[str]) -> None:
    out, *sources = argv
    _cap_new_tokens(
        int(os.environ.get("DOCS_MAX_NEW_TOKENS", "32")),
        int(os.environ.get("DOCS_MAX_GRAMMAR_TOKENS", "160")),
    )
    results = {}
    for source in sources:
        results[source] = run_source(source)
        Path(out).write_text(json.dumps(results, indent=1))  # what ran so far, should one hang


if __name__ == "__main__":
    main(sys.argv[1:])
