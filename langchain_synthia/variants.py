"""The six GPTQ branches of TheBloke/Synthia-7B-v1.3-GPTQ, as the model card lists them."""

import re
from dataclasses import dataclass

DEFAULT_REPO = "TheBloke/Synthia-7B-v1.3-GPTQ"
"""The Hub repository that holds the quantised model."""

DEFAULT_BRANCH = "main"

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")

_KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
"""Mistral-7B's KV cache per token: 32 layers, keys and values, 8 heads of 128, fp16."""
_WORKING_GIB = 0.35
"""Activations, logits and kernel workspaces at batch 1, from the measured peak."""


@dataclass(frozen=True)
class SynthiaVariant:
    """One quantisation of Synthia-7B-v1.3: a branch of the GPTQ repository."""

    branch: str
    bits: int
    group_size: int | None
    """GPTQ group size; ``None`` means one group per column ("None" in the card, -1 on disk)."""
    act_order: bool
    damp_percent: float
    size_gb: float
    """Download size in GB (10^9 bytes), from the model card."""
    description: str

    def gpu_memory_gib(self, context_window: int = 4096, max_batch_size: int = 1) -> float:
        """GPU memory the fast engine needs for this branch, in GiB (2^30 bytes), estimated.

        The weights (about the download size), a KV cache for `max_batch_size` requests of a
        whole `context_window` each (128 KiB per token) and working memory: what serving that
        many full-length requests at once takes. The CUDA context (a few hundred MiB) comes on
        top. The engine itself sizes its KV cache from ``gpu_memory_utilization``
        (docs/loading.md).
        """
        kv_cache = context_window * max_batch_size * _KV_BYTES_PER_TOKEN
        return (self.size_gb * 1e9 + kv_cache) / 2**30 + _WORKING_GIB


VARIANTS: dict[str, SynthiaVariant] = {
    v.branch: v
    for v in (
        SynthiaVariant(
            "main", 4, 128, True, 0.1, 4.16,
            "4-bit, group size 128, act order: the default, and the smallest branch.",
        ),
        SynthiaVariant(
            "gptq-4bit-64g-actorder_True", 4, 64, True, 0.1, 4.29,
            "4-bit, group size 64, act order: a little more accurate than main.",
        ),
        SynthiaVariant(
            "gptq-4bit-32g-actorder_True", 4, 32, True, 0.1, 4.57,
            "4-bit, group size 32, act order: the most accurate 4-bit branch.",
        ),
        SynthiaVariant(
            "gptq-8bit--1g-actorder_True", 8, None, True, 0.1, 7.52,
            "8-bit, no group size, act order: the leanest 8-bit branch.",
        ),
        SynthiaVariant(
            "gptq-8bit-128g-actorder_True", 8, 128, True, 0.1, 7.68,
            "8-bit, group size 128, act order.",
        ),
        SynthiaVariant(
            "gptq-8bit-32g-actorder_True", 8, 32, True, 0.1, 8.17,
            "8-bit, group size 32, act order: the most accurate branch.",
        ),
    )
}  # fmt: skip
"""The branches, keyed by name, in the card's order of size."""


def get_variant(branch: str) -> SynthiaVariant:
    """Return the variant of `branch`.

    Raises:
        ValueError: If `branch` is not one of the six branches; the message lists them.
    """
    try:
        return VARIANTS[branch]
    except KeyError:
        msg = (
            f"Unknown branch {branch!r} of {DEFAULT_REPO}. Choose one of: "
            + ", ".join(VARIANTS)
            + " (or pin a 40-character commit hash)."
        )
        raise ValueError(msg) from None


def check_revision(repo_id: str, revision: str) -> None:
    """Reject a revision of the Synthia repository that is neither a known branch nor a commit.

    Other repositories may have any branches, so their revisions pass through to the Hub.
    """
    if repo_id == DEFAULT_REPO and not _COMMIT_HASH.fullmatch(revision):
        get_variant(revision)
