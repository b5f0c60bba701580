"""GPTQ weights as TheBloke's checkpoints store them, repacked for the fast engine's kernels.

A GPTQ (v1, AutoGPTQ) linear layer of ``K`` inputs and ``N`` outputs is stored as

* ``qweight`` int32 ``[K / pack, N]``: ``pack = 32 / bits`` codes per word, row ``k`` in bits
  ``bits * (k % pack)`` of word ``k // pack``;
* ``qzeros`` int32 ``[groups, N / pack]``: zero points packed the same way along ``N``, stored
  minus one;
* ``scales`` fp16 ``[groups, N]``; ``g_idx`` int32 ``[K]``: the group of each input row.

``W[k, n] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])``. With act order, rows of
one group are scattered; we sort the rows by group once at load (``perm``), so that every group
is a run of ``group_size`` consecutive rows, and the input is read as ``x[perm]``.
Layers that read the same input with the same ``perm`` (q/k/v, gate/up) are fused along ``N``.
Within a word the rows are reordered too (`pack_words`): even rows in the low half, odd rows in
the high half, so that the batch-1 GEMV's fp16x2 pairs of codes meet pairs of adjacent inputs.

`sort_rows` and `permute_columns` rewrite a checkpoint's tensors so that the network itself
produces its inputs in sorted order (the fast model folds each ``perm`` into the norm before
the layer, or into the output columns of the layer before), and the kernels need no act-order
gather at all.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedLinear:
    """One (possibly fused) GPTQ linear layer, rows sorted by group, ready for the kernels."""

    qweight: torch.Tensor
    """int32 ``[K / pack, N]``: rows in ``perm`` order, packed by `pack_words`."""
    scales: torch.Tensor
    """fp16 ``[groups, N]``."""
    zeros: torch.Tensor
    """fp16 ``[groups, N]``: zero points (small integers, exact in fp16);
    ``W = (code - zero) * scale``."""
    perm: torch.Tensor | None
    """int32 ``[K]``: input row of each sorted row; ``None`` when rows are already in order."""
    bits: int
    group_size: int
    """Rows per group (``K`` when the checkpoint has one group per column)."""
    in_features: int
    out_features: int
    splits: tuple[int, ...] = ()
    """Output widths of the fused layers, in order (empty for a single layer)."""
    gemv: bool = False
    """Whether a one-row product goes through the batch-1 GEMV (`FastMistral`'s race sets it)."""

    def dequantize(self) -> torch.Tensor:
        """The fp16 weight ``[K, N]`` in *original* row order (the reference for the kernels)."""
        codes = unpack_words(self.qweight, self.bits).to(torch.float32)
        groups = torch.arange(self.in_features, device=codes.device) // self.group_size
        weight = (codes - self.zeros[groups].float()) * self.scales[groups].float()
        if self.perm is not None:
            restored = torch.empty_like(weight)
            restored[self.perm.long()] = weight
            weight = restored
        return weight.to(torch.float16)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[K / pack, N]`` -> uint8 codes ``[K, N]``."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0] * pack, packed.shape[1]).to(torch.uint8)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[K, N]`` -> int32 ``[K / pack, N]`` (inverse of `unpack_rows`)."""
    pack = 32 // bits
    grouped = codes.to(torch.int32).reshape(codes.shape[0] // pack, pack, codes.shape[1])
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int32)
    return (grouped << shifts[None, :, None]).sum(dim=1, dtype=torch.int32)


def word_slots(bits: int) -> list[int]:
    """The slot of each of a word's rows in `pack_words`'s order.

    Row ``i`` sits in slot ``i // 2 + (pack / 2) * (i % 2)``: even rows in the low half, odd
    rows in the high half. Slots ``j`` and ``j + pack / 2`` (4-bit: nibbles j and j+4, one
    LOP3 apart in the GEMV's fp16x2 dequantisation) then hold rows ``2j`` and ``2j + 1``,
    whose inputs are one aligned 32-bit load of fp16 pairs.
    """
    half = 32 // bits // 2
    return [i // 2 + half * (i % 2) for i in range(2 * half)]


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[K, N]`` -> int32 ``[K / pack, N]``, rows in `word_slots` order."""
    pack = 32 // bits
    slots = word_slots(bits)
    rows = [slots.index(slot) for slot in range(pack)]  # the row each slot holds
    by_slot = codes.reshape(codes.shape[0] // pack, pack, codes.shape[1])[:, rows]
    return pack_rows(by_slot.reshape(codes.shape), bits)


def unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[K / pack, N]`` from `pack_words` -> uint8 codes ``[K, N]``."""
    pack = 32 // bits
    by_slot = unpack_rows(packed, bits).reshape(packed.shape[0], pack, packed.shape[1])
    return by_slot[:, word_slots(bits)].reshape(packed.shape[0] * pack, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[G, N / pack]`` -> int32 ``[G, N]`` (zero points packed along ``N``)."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    values = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], packed.shape[1] * pack)


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[G, N]`` -> int32 ``[G, N / pack]`` (inverse of `unpack_columns`)."""
    pack = 32 // bits
    grouped = values.to(torch.int32).reshape(values.shape[0], values.shape[1] // pack, pack)
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int32)
    return (grouped << shifts[None, None, :]).sum(dim=-1, dtype=torch.int32)


def sort_rows(
    tensors: Sequence[dict[str, torch.Tensor]], bits: int, group_size: int
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
    """The same layers with their input rows sorted by group, and the order that did it.

    Every returned layer computes ``x[:, perm] @ W'`` = ``x @ W``, with plain (not act-order)
    groups; ``perm`` is ``None`` when the rows were already in order.

    Raises:
        ValueError: If the layers disagree on ``g_idx``, or a group is not exactly
            ``group_size`` rows (not a GPTQ act-order layout).
    """
    perm = group_order(tensors, bits, group_size)
    if perm is None:
        return list(tensors), None
    size = group_rows(tensors[0], bits, group_size)
    rows = torch.arange(perm.numel(), device=perm.device) // size
    out = []
    for layer in tensors:
        codes = unpack_rows(layer["qweight"], bits)[perm]
        out.append({**layer, "qweight": pack_rows(codes, bits), "g_idx": rows.to(torch.int32)})
    return out, perm


def permute_columns(
    layer: dict[str, torch.Tensor], order: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """The layer whose output ``n`` is the original output ``order[n]``."""
    order = order.to(layer["qweight"].device)
    zeros = pack_columns(unpack_columns(layer["qzeros"], bits)[:, order], bits)
    return {
        **layer,
        "qweight": layer["qweight"][:, order].contiguous(),
        "scales": layer["scales"][:, order].contiguous(),
        "qzeros": zeros,
    }


def group_rows(layer: dict[str, torch.Tensor], bits: int, group_size: int) -> int:
    """Rows per group of `layer` (all its input rows when `group_size` is -1 or 0)."""
    in_features = layer["qweight"].shape[0] * (32 // bits)
    return in_features if group_size in (-1, 0) else group_size


def group_order(
    tensors: Sequence[dict[str, torch.Tensor]], bits: int, group_size: int
) -> torch.Tensor | None:
    """The row order that makes every group a run of rows (``None``: already so)."""
    size = group_rows(tensors[0], bits, group_size)
    g_idx = tensors[0]["g_idx"].to(torch.int64)
    for other in tensors[1:]:
        if not torch.equal(other["g_idx"].to(torch.int64), g_idx):
            msg = "Layers to fuse must share their act-order row permutation (g_idx)."
            raise ValueError(msg)
    perm = torch.argsort(g_idx, stable=True)
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // size
    if not torch.equal(g_idx[perm], expected):
        msg = f"g_idx does not form groups of {size} rows: not a GPTQ layout this engine reads."
        raise ValueError(msg)
    return None if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)) else perm


def pack_gptq(
    tensors: Sequence[dict[str, torch.Tensor]], bits: int, group_size: int
) -> PackedLinear:
    """Repack one or more GPTQ layers that share their input into one `PackedLinear`.

    Args:
        tensors: For each layer, its ``qweight``, ``qzeros``, ``scales`` and ``g_idx``.
        bits: 4 or 8.
        group_size: The checkpoint's group size (-1 for one group per column).

    Raises:
        ValueError: If fused layers disagree on the row order, or a group is not exactly
            ``group_size`` rows (not a GPTQ act-order layout).
    """
    in_features = tensors[0]["qweight"].shape[0] * (32 // bits)
    size = group_rows(tensors[0], bits, group_size)
    perm = group_order(tensors, bits, group_size)
    qweights, scales, zeros = [], [], []
    for layer in tensors:
        codes = unpack_rows(layer["qweight"], bits)
        if perm is not None:
            codes = codes[perm]
        qweights.append(pack_words(codes, bits))
        scale = layer["scales"].to(torch.float16)
        zero = unpack_columns(layer["qzeros"], bits) + 1  # v1 checkpoints store zero - 1
        scales.append(scale)
        zeros.append(zero.to(torch.float16))
    widths = tuple(int(s.shape[1]) for s in scales)
    return PackedLinear(
        qweight=torch.cat(qweights, dim=1).contiguous(),
        scales=torch.cat(scales, dim=1).contiguous(),
        zeros=torch.cat(zeros, dim=1).contiguous(),
        perm=None if perm is None else perm.to(torch.int32).contiguous(),
        bits=bits,
        group_size=size,
        in_features=in_features,
        out_features=sum(widths),
        splits=widths if len(widths) > 1 else (),
    )
