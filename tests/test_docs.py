"""The docs: the site builds without a warning, every example runs, every ``synthia`` line parses.

The Python blocks of README.md, docs/*.md and the public docstrings run on the tiny checkpoint
on the CPU: ``SYNTHIA_MODEL`` and ``SYNTHIA_DEVICE`` give `ChatSynthia` and `SynthiaLLM` their
defaults, so the examples run as a user would write them, and the runner keeps every generation
short (see `tests._doc_blocks`). A block right below ``<!-- skip: reason -->`` is only compiled;
use it for code that needs a GPU, a download or the real model's answers, and say so.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

import langchain_synthia
from tests import _doc_blocks as docs
from tests.helpers import DEVICE

SOURCES = [docs.source_name(page) for page in docs.PAGES] + docs.docstring_sources()
RUNNABLE = [source for source in SOURCES if docs.python_blocks(source)]


def test_docs_site_builds_without_warnings(tmp_path) -> None:
    if sys.version_info < (3, 11):
        pytest.skip("Sphinx 9 needs Python 3.11 or newer")
    for module in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(module)
    build = (
        "import sys\n"
        "from sphinx.cmd.build import build_main\n"
        "status = build_main(sys.argv[1:])\n"
        "heavy = [m for m in ('torch', 'transformers', 'gptqmodel') if m in sys.modules]\n"
        "print('heavy modules:', heavy)\n"
        "sys.exit(status)\n"
    )
    out = tmp_path / "html"
    args = ["-W", "--keep-going", "-q", "-E", "-b", "html", str(docs.ROOT / "docs"), str(out)]
    done = subprocess.run(
        [sys.executable, "-c", build, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # autodoc imported the package and rendered it without loading a model
    assert "heavy modules: []" in done.stdout
    api = (out / "api.html").read_text()
    for name in langchain_synthia.__all__:
        assert f'id="langchain_synthia.{name}"' in api, name
    assert "Per call" in api  # the generated parameter tables
    assert '<code class="docutils literal notranslate"><span class="pre">max_batch_size' in api


def test_skip_markers_give_a_reason_and_stand_above_a_block() -> None:
    problems = [problem for source in SOURCES for problem in docs.skip_marker_problems(source)]
    assert not problems, "\n".join(problems)


def test_every_python_example_compiles() -> None:
    for source in SOURCES:
        for block in docs.python_blocks(source):
            compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert len(RUNNABLE) >= 12


@pytest.fixture(scope="module")
def example_runs(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run every source's Python blocks once, in one process (the model loads once)."""
    workdir = tmp_path_factory.mktemp("docs-examples")  # files the examples write land here
    out = workdir / "runs.json"
    env = {
        **os.environ,
        "SYNTHIA_MODEL": tiny_model,
        "SYNTHIA_DEVICE": DEVICE,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(docs.ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("SYNTHIA_REVISION", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests._doc_blocks", str(out), *RUNNABLE],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = json.loads(out.read_text()) if out.exists() else {}
    return {"results": results, "log": done.stderr[-6000:], "returncode": done.returncode}


@pytest.mark.parametrize("source", RUNNABLE)
def test_python_examples_run(source: str, example_runs: dict) -> None:
    result = example_runs["results"].get(source)
    assert result is not None, f"the run stopped before {source}:\n{example_runs['log']}"
    assert result["error"] is None, result["error"]
    assert result["ran"] + result["compiled"] == len(docs.python_blocks(source))


def test_synthia_command_lines_parse() -> None:
    checked = 0
    problems = []
    for source in SOURCES:
        for block in docs.blocks(source):
            for args in docs.synthia_commands(block):
                checked += 1
                if (error := docs.cli_parse_error(args)) is not None:
                    problems.append(f"{block.where}: synthia {' '.join(args)}: {error}")
    assert not problems, "\n".join(problems)
    assert checked >= 5
