"""`FastMistral` (tiny checkpoint) on the Triton kernels against the same network on the
torch references: prefill on each GPTQ path, then batched decode steps.
"""

from pathlib import Path

import pytest
import torch

from langchain_synthia._fast_model import FastMistral
from tests.helpers import rel

pytestmark = pytest.mark.usefixtures("interpreted_kernels")

MODEL_REL = 1e-2
"""‖kernel - reference‖ / ‖reference‖ of a whole network's logits (fp16 rounding compounds over
layers: ~1e-3)."""


def _same_choice(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Greedy choices agree, except between near-tied tokens (random weights make ties)."""
    mine, theirs = out.argmax(-1), ref.argmax(-1)
    for row in torch.nonzero(mine != theirs).flatten().tolist():
        gap = (ref[row, theirs[row]] - ref[row, mine[row]]).abs()
        if gap > 1e-2 * ref[row].abs().max():
            return False
    return True


def check_model(tiny: str, gen: torch.Generator) -> dict:
    """The whole network on the kernels vs on the references: prefill, then batched decode.

    The prompts' lengths take each GPTQ path in prefill (matmul, rows, tiles kernels).
    """

    cpu, lengths = torch.device("cpu"), (70, 3, 9)
    models = [
        FastMistral(Path(tiny), cpu, max_batch=3, max_len=96, use_kernels=kernels)
        for kernels in (False, True)  # the references; the Triton kernels, by the interpreter
    ]
    for model in models:
        model.allocate_kv_rows()
    prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in lengths]
    prefill, decode, agree = [], [], True
    with torch.inference_mode():
        logits = [[m.prefill(slot, p) for slot, p in enumerate(prompts)] for m in models]
        for slot in range(len(prompts)):
            prefill.append(rel(logits[1][slot], logits[0][slot]))
        tokens = torch.stack([x.argmax() for x in logits[0]])
        positions = torch.tensor(lengths)
        for _ in range(3):
            ref, out = (m.decode(len(prompts), tokens, positions) for m in models)
            decode.append([rel(out[row], ref[row]) for row in range(len(prompts))])
            agree &= _same_choice(out, ref)
            tokens, positions = ref.argmax(-1), positions + 1
    return {"rel_prefill": prefill, "rel_decode_per_step_and_row": decode, "argmax_agrees": agree}


def test_network_on_the_kernels_matches_the_network_on_the_references(
    tiny_model: str, gen: torch.Generator
) -> None:
    """`FastMistral` (tiny checkpoint) with the kernels vs the references: 3 rows, 3 steps."""
    m = check_model(tiny_model, gen)
    assert len(m["rel_prefill"]) == 3
    assert all(error < MODEL_REL for error in m["rel_prefill"])
    steps = m["rel_decode_per_step_and_row"]
    assert len(steps) == 3
    assert all(error < MODEL_REL for step in steps for error in step)
    assert m["argmax_agrees"]
