"""`gptq_linear`, `gemv` and `silu_mul` against their torch references and the GPTQ definition.

Inputs are column slices of wider buffers, as the model's are: nothing outside them changes.
"""

import pytest
import torch

from langchain_synthia import _kernels as K
from langchain_synthia._gptq import pack_gptq
from langchain_synthia._kernels import decode_gemv
from tests.helpers import dequantize_reference, group_index, random_gptq, rel

pytestmark = pytest.mark.usefixtures("interpreted_kernels")

FP16_REL = 2e-3
"""‖kernel - reference‖ / ‖reference‖ for fp16 inputs (fp32 accumulation: ~5e-4 measured)."""

K_IN, N_OUT = 512, 200
"""Linear shapes: K spans several 128-row blocks (split-K), N is not a multiple of the tile."""

PAD = 8
"""Columns either side of an input or output slice."""


def padded(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed ``[rows, width]`` column slice of a wider buffer (as the model's are)."""
    return torch.zeros(rows, width + 2 * PAD, dtype=dtype)[:, PAD : PAD + width]


def outside(out: torch.Tensor) -> float:
    """The largest value written outside the slice `out` of its buffer."""
    wide = out._base
    return float(torch.cat([wide[:, :PAD], wide[:, PAD + out.shape[1] :]], dim=1).abs().max())


LINEAR_CASES = (
    [(bits, group, m, True) for bits in (4, 8) for group in (32, 64, 128, -1) for m in (1, 3, 20)]
    + [(4, 128, m, False) for m in (1, 4, 5, 40, 100)]
    + [(8, 32, 100, True), (4, -1, 100, True)]
)
"""(bits, group size, activation rows, act order): rows <= 4 take the rows kernel, up to 64 the
tiles kernel, more the dequantise-then-matmul path."""


def _linear_id(case: tuple) -> str:
    bits, group, m, act_order = case
    return f"{bits}bit-g{group}-m{m}-{'act' if act_order else 'ordered'}"


@pytest.mark.parametrize(
    ("bits", "group", "m", "act_order"), LINEAR_CASES, ids=map(_linear_id, LINEAR_CASES)
)
def test_gptq_linear_matches_the_reference(
    bits: int, group: int, m: int, act_order: bool, gen: torch.Generator
) -> None:
    """Bits 4/8, group sizes 32/64/128/one group, act order, 1 to 100 rows (all three paths)."""
    layer = random_gptq(K_IN, N_OUT, bits, group, generator=gen, act_order=act_order)
    packed = pack_gptq([layer], bits, group)
    x = padded(m, K_IN, torch.float16)
    x.copy_(torch.randn(m, K_IN, generator=gen))
    out = padded(m, N_OUT, torch.float32)
    K.gptq_linear(x, packed, out)
    assert rel(out, K.gptq_linear_reference(x, packed)) < FP16_REL
    assert rel(out, x.float() @ dequantize_reference(layer, bits)) < FP16_REL
    assert outside(out) == 0
    assert (packed.perm is not None) == (act_order and group != -1)


@pytest.mark.parametrize("group", [32, 64, 128, 256, -1])
def test_batch1_gemv_matches_the_reference(group: int, gen: torch.Generator) -> None:
    """The fp32 path of `gemv`, several steps a program and one (no step ahead: what the
    autotuner picks for small layers). The interpreter cannot run its fp16x2 PTX: the bench
    checks that one on a GPU, against Marlin and transformers."""
    n = 512  # a multiple of the GEMV's column tile
    layer = random_gptq(K_IN, n, 4, group, generator=gen, act_order=False)
    packed = pack_gptq([layer], 4, group)
    x = torch.randn(1, K_IN, generator=gen).half()
    out = padded(1, n, torch.float32)
    K.gemv(x, packed, out)
    step = min(packed.group_size, 128)
    single = torch.zeros(1, n)
    decode_gemv._gemv_kernel.fn[(n // 256, K_IN // step)](
        x, packed.qweight, packed.scales, packed.zeros, single, K_IN, n, GROUP=packed.group_size,
        WORDS=step // 8, HALF2=False, ASM=decode_gemv._WORDS_DOT, BLOCK_N=256, SPLIT=K_IN // step,
        PDL=False,
    )  # fmt: skip
    reference = K.gptq_linear_reference(x, packed)
    assert K.gemv_fits(packed)
    assert rel(out, reference) < FP16_REL
    assert rel(out, x.float() @ dequantize_reference(layer, 4)) < FP16_REL
    assert rel(single, reference) < FP16_REL
    assert outside(out) == 0


GATED_CASES = [(bits, m) for bits in (4, 8) for m in (1, 3, 20)] + [(4, 100)]
"""(bits, activation rows)."""


@pytest.mark.parametrize(("bits", "m"), GATED_CASES)
def test_gated_gptq_linear_applies_silu_gate_times_up(
    bits: int, m: int, gen: torch.Generator
) -> None:
    layer = random_gptq(K_IN, N_OUT, bits, 32, generator=gen)
    packed = pack_gptq([layer], bits, 32)
    gate_up = padded(m, 2 * K_IN, torch.float32)  # the fused gate/up output, fp32
    gate_up.copy_(torch.randn(m, 2 * K_IN, generator=gen) * 2)
    out = padded(m, N_OUT, torch.float32)
    K.gptq_linear(gate_up, packed, out, gated=True)
    gate, up = gate_up[:, :K_IN].half(), gate_up[:, K_IN:].half()
    act = (torch.nn.functional.silu(gate.float()).half() * up).float()
    assert rel(out, K.gptq_linear_reference(act, packed)) < FP16_REL
    assert rel(out, act.half().float() @ dequantize_reference(layer, bits)) < FP16_REL
    product = K.silu_mul(gate_up)  # the product alone (Marlin's input), fp16
    assert list(product.shape) == [m, K_IN]
    assert rel(product, act) < 1e-3  # fp16 rounding of the same two steps


@pytest.mark.parametrize("m", [1, 3, 20, 100])
def test_fused_layers_equal_each_layer_alone(m: int, gen: torch.Generator) -> None:
    g_idx = group_index(K_IN, 64, act_order=True, generator=gen)
    widths = (N_OUT, 64, 96)
    layers = [random_gptq(K_IN, w, 4, 64, generator=gen, g_idx=g_idx) for w in widths]
    packed = pack_gptq(layers, 4, 64)
    assert list(packed.splits) == list(widths)
    assert packed.out_features == sum(widths)
    x = torch.randn(m, K_IN, generator=gen).half()
    out = torch.zeros(m, sum(widths))
    K.gptq_linear(x, packed, out)
    for layer, part in zip(layers, out.split(list(widths), dim=1), strict=True):
        assert rel(part, x.float() @ dequantize_reference(layer, 4)) < FP16_REL
