"""GPTQ repacking (`langchain_synthia._gptq`, plain torch) against the format's definition."""

import pytest
import torch

from langchain_synthia._gptq import (
    pack_gptq,
    pack_rows,
    pack_words,
    permute_columns,
    sort_rows,
    unpack_rows,
    unpack_words,
    word_slots,
)
from tests.helpers import dequantize_reference, group_index, random_gptq

SEED = 0
"""The seed of the random layers."""


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_rows_and_unpack_rows_are_inverse(bits: int) -> None:
    pack = 32 // bits
    words = torch.randint(-(2**31), 2**31, (64 // pack, 48), dtype=torch.int64).to(torch.int32)
    codes = unpack_rows(words, bits)
    assert codes.shape == (64, 48)
    assert torch.equal(pack_rows(codes, bits), words)
    # row k sits in bits [bits * (k % pack), bits * (k % pack + 1)) of word k // pack
    k = torch.arange(64)
    expected = (words.to(torch.int64)[k // pack] >> (bits * (k % pack))[:, None]) & (2**bits - 1)
    assert torch.equal(codes.to(torch.int64), expected)
    random_codes = torch.randint(0, 2**bits, (64, 48), dtype=torch.uint8)
    assert torch.equal(unpack_rows(pack_rows(random_codes, bits), bits), random_codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_words_puts_even_rows_low_and_odd_rows_high(bits: int) -> None:
    """`PackedLinear`'s order: row ``2j`` of a word in slot ``j``, row ``2j + 1`` in slot
    ``j + pack / 2``; 4-bit: nibbles j and j+4 (one fp16x2 in the GEMV) are rows 2j, 2j+1."""
    pack = 32 // bits
    codes = torch.randint(0, 2**bits, (64, 48), dtype=torch.uint8)
    words = pack_words(codes, bits)
    assert torch.equal(unpack_words(words, bits), codes)
    slots = torch.tensor(word_slots(bits))
    assert sorted(slots.tolist()) == list(range(pack))
    k = torch.arange(64)
    stored = (words.to(torch.int64)[k // pack] >> (bits * slots[k % pack])[:, None]) & (2**bits - 1)
    assert torch.equal(stored, codes.to(torch.int64))
    if bits == 4:
        assert word_slots(4) == [0, 4, 1, 5, 2, 6, 3, 7]
        row = torch.arange(8, dtype=torch.uint8)[:, None]
        assert pack_words(row, 4).item() & 0xFFFFFFFF == 0x75316420


def _assert_dequantized(weight: torch.Tensor, layer: dict[str, torch.Tensor], bits: int) -> None:
    """fp16 rounding of ``W`` and of ``zero * scale`` is the only difference allowed."""
    expected = dequantize_reference(layer, bits)
    scales = layer["scales"][layer["g_idx"].long()].float()
    bound = 2.0**-11 * (expected.abs() + 2**bits * scales) + 1e-7
    assert weight.dtype == torch.float16
    assert weight.shape == expected.shape
    assert bool(((weight.float() - expected).abs() <= bound).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("act_order", [True, False])
def test_dequantize_follows_the_gptq_definition(bits: int, group: int, act_order: bool) -> None:
    generator = torch.Generator().manual_seed(SEED)
    layer = random_gptq(256, 96, bits, group, generator=generator, act_order=act_order)
    packed = pack_gptq([layer], bits, group)
    assert packed.group_size == (256 if group == -1 else group)
    assert (packed.in_features, packed.out_features, packed.splits) == (256, 96, ())
    _assert_dequantized(packed.dequantize(), layer, bits)


def test_fused_dequantize_is_the_layers_side_by_side() -> None:
    generator = torch.Generator().manual_seed(SEED)
    g_idx = group_index(256, 32, act_order=True, generator=generator)
    layers = [random_gptq(256, n, 4, 32, generator=generator, g_idx=g_idx) for n in (64, 32, 32)]
    packed = pack_gptq(layers, 4, 32)
    assert packed.splits == (64, 32, 32)
    weight = packed.dequantize()
    for layer, part in zip(layers, weight.split(list(packed.splits), dim=1), strict=True):
        _assert_dequantized(part, layer, 4)


def test_pack_gptq_refuses_layouts_it_cannot_read() -> None:
    generator = torch.Generator().manual_seed(0)
    a = random_gptq(256, 64, 4, 32, generator=generator)
    b = random_gptq(256, 64, 4, 32, generator=generator)  # its own act-order permutation
    with pytest.raises(ValueError, match="share their act-order row permutation"):
        pack_gptq([a, b], 4, 32)
    with pytest.raises(ValueError, match="does not form groups of 64 rows"):
        pack_gptq([a], 4, 64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, -1])
def test_sorted_rows_compute_the_layer_from_the_input_in_their_order(bits: int, group: int) -> None:
    """`sort_rows`: plain groups, and ``x[:, perm] @ W'`` is exactly ``x @ W``."""
    generator = torch.Generator().manual_seed(SEED)
    g_idx = group_index(256, group, act_order=True, generator=generator)
    layers = [random_gptq(256, n, bits, group, generator=generator, g_idx=g_idx) for n in (64, 32)]
    sorted_layers, perm = sort_rows(layers, bits, group)
    if group == -1:  # one group: any row order is already "sorted"
        assert perm is None
        assert sorted_layers == layers
        return
    assert perm is not None
    assert sorted(perm.tolist()) == list(range(256))
    for layer, done in zip(layers, sorted_layers, strict=True):
        assert torch.equal(done["g_idx"].long(), torch.arange(256) // group)
        assert torch.equal(done["scales"], layer["scales"])
        weight = dequantize_reference(layer, bits)
        assert torch.equal(dequantize_reference(done, bits), weight[perm])
    other = random_gptq(256, 32, bits, group, generator=generator)  # its own row order
    with pytest.raises(ValueError, match="share their act-order row permutation"):
        sort_rows([layers[0], other], bits, group)


@pytest.mark.parametrize("bits", [4, 8])
def test_permuted_columns_are_the_outputs_in_that_order(bits: int) -> None:
    """`permute_columns`: output ``n`` is the original output ``order[n]`` (zero points too)."""
    generator = torch.Generator().manual_seed(SEED)
    layer = random_gptq(256, 96, bits, 32, generator=generator)
    order = torch.randperm(96, generator=generator)
    done = permute_columns(layer, order, bits)
    weight = dequantize_reference(layer, bits)
    assert torch.equal(dequantize_reference(done, bits), weight[:, order])
    assert torch.equal(done["g_idx"], layer["g_idx"])
