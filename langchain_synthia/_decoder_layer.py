"""One decoder layer's weights and linear back-ends, with act order folded away at load.

`DecoderLayer` reads a layer of a GPTQ checkpoint (Mistral or Llama): its two norms and its
four linear shapes (q/k/v fused, o, gate/up fused, down), each a `_linear` back-end chosen at
load. `FastMistral` runs the layers; this module only prepares their weights.
"""

from typing import Any

import torch

from langchain_synthia._gptq import pack_gptq, permute_columns, sort_rows
from langchain_synthia._linear import (
    FusedLinear,
    Linear,
    MarlinLinear,
    ReferenceLinear,
    TritonLinear,
)

_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")


class InputOrder:
    """An act-order layer's input order, folded into whatever writes that input."""

    def __init__(self, perm: torch.Tensor, norm: torch.Tensor | None = None) -> None:
        self.gather = perm.long()
        """Input column of each sorted row (what the layer reads: ``x[:, gather]``)."""
        self.gather32 = self.gather.to(torch.int32)
        self.scatter = torch.argsort(self.gather).to(torch.int32)
        """Sorted position of each input column (where attention writes o_proj's input)."""
        self.norm = None if norm is None else norm[self.gather].contiguous()
        """The weight of the norm that writes this input, in this order."""


class DecoderLayer:
    """One decoder layer's weights, with every act-order permutation folded away.

    GPTQ act order scatters each group's rows, so gptqmodel's kernels gather the input with the
    layer's ``g_idx`` order on every call (a kernel launch per layer and step, costly at batch
    1). Here the rows are sorted once at load (`sort_rows`) and the inputs arrive
    sorted: the norms before q/k/v and gate/up write their output in that order, gate/up
    write their output columns in down's order (`permute_columns`), and o_proj's input is
    gathered once (attention's output has no cheaper place to do it).
    """

    def __init__(
        self, tensors: Any, prefix: str, bits: int, group: int, kernel: str,
        dense: bool = False, kernels: bool = True,
    ) -> None:  # fmt: skip
        """Read layer `prefix` and choose its linear back-ends.

        Marlin for ``kernel="gptq_marlin"``, else our Triton kernels, or with `kernels` False
        the plain-torch references.
        """

        def gptq(name: str) -> dict[str, torch.Tensor]:
            return {
                part: tensors[f"{prefix}.{name}.{part}"]
                for part in ("qweight", "qzeros", "scales", "g_idx")
            }

        def sort(
            parts: list[dict[str, torch.Tensor]], norm: torch.Tensor | None = None
        ) -> tuple[list, InputOrder | None]:
            if any(not torch.equal(p["g_idx"], parts[0]["g_idx"]) for p in parts):
                return parts, None  # layers of their own, each gathering its input
            parts, perm = sort_rows(parts, bits, group)
            return parts, None if perm is None else InputOrder(perm, norm)

        self.input_norm = tensors[f"{prefix}.input_layernorm.weight"]
        self.post_norm = tensors[f"{prefix}.post_attention_layernorm.weight"]

        def pack(parts: list[dict[str, torch.Tensor]], bits: int, group: int) -> Linear:
            if kernel == "gptq_marlin":
                return MarlinLinear(parts, bits, group, dense=dense)
            packed = pack_gptq(parts, bits, group)
            return TritonLinear(packed) if kernels else ReferenceLinear(packed)

        (down,), down_order = sort([gptq("mlp.down_proj")])
        gate_up = [gptq(f"mlp.{n}") for n in _MLP]
        if down_order is not None:
            gate_up = [permute_columns(p, down_order.gather, bits) for p in gate_up]
        qkv, self.qkv_order = sort([gptq(f"self_attn.{n}") for n in _ATTN], self.input_norm)
        (o,), self.o_order = sort([gptq("self_attn.o_proj")])
        gate_up, self.gate_up_order = sort(gate_up, self.post_norm)
        self.qkv = fused_linear(qkv, bits, group, pack)
        self.o = pack([o], bits, group)
        self.gate_up = fused_linear(gate_up, bits, group, pack)
        self.down = pack([down], bits, group)

    def linears(self) -> dict[str, Linear]:
        """The layer's four linear back-ends by shape name."""
        return {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down}


def fused_linear(parts: list[dict[str, torch.Tensor]], bits: int, group: int, pack: Any) -> Linear:
    """One packed layer when the parts share their act-order permutation, else side by side."""
    if all(torch.equal(part["g_idx"], parts[0]["g_idx"]) for part in parts):
        return pack(parts, bits, group)
    return FusedLinear([pack([part], bits, group) for part in parts])
