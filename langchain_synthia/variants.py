"""The six GPTQ branches of TheBloke/Synthia-7B-v1.3-GPTQ, as the model card lists them."""

import re
from dataclasses import dataclass

DEFAULT_REPO = "TheBloke/Synthia-7B-v1.3-GPTQ"
"""The Hub repository that holds the quantised model."""

DEFAULT_BRANCH = "main"

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


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
