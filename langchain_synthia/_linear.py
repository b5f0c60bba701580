"""The fast engine's GPTQ linear layers: one back-end object per layer, chosen at load.

Every back-end is a callable ``linear(x, out=None, gated=False)`` for ``x @ W`` (with `gated`,
of ``silu(gate) * up`` of a fused gate/up output `x`):

* `ReferenceLinear`: plain torch on the weight dequantised once (the CPU path, and what the
  kernels are checked against);
* `TritonLinear`: our Triton GPTQ kernel (`_kernels.gptq_linear`), accumulating in fp32;
* `MarlinLinear`: gptqmodel's Marlin kernel, optionally with a dense copy that cuBLAS
  multiplies for prefills of many rows;
* `GemvLinear`: our batch-1 GEMV for one row, around one of the above for more;
* `FusedLinear`: several layers that read the same input and write side by side.

`race_gemv` is the load-time step that times our GEMV against each layer shape's own kernel
and wraps the layers where the GEMV wins.
"""

from typing import Any, Protocol

import torch

from langchain_synthia import _kernels as K
from langchain_synthia._gptq import PackedLinear, group_order, pack_gptq

DENSE_ROWS = 256
"""Rows from which a Marlin layer with a dense copy multiplies through cuBLAS instead."""


class Linear(Protocol):
    """A linear layer's back-end."""

    in_features: int
    out_features: int
    accumulates: bool
    """Whether the product is added into a given fp32 `out` (else it is returned as it is)."""

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, gated: bool = False
    ) -> torch.Tensor:
        """``x @ W``: into `out` (zeroed by the caller) when it `accumulates`."""
        ...

    def weight_bytes(self) -> int:
        """Bytes a one-row product reads from the weights."""
        ...


def _zeroed(x: torch.Tensor, width: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None:
        return out
    return torch.zeros((x.shape[0], width), dtype=torch.float32, device=x.device)


def _source(x: torch.Tensor, gated: bool) -> torch.Tensor:
    return K.gated_product(x) if gated else x.half()


def _packed_bytes(packed: PackedLinear) -> int:
    perm = 0 if packed.perm is None else packed.perm.numel() * 4
    return packed.qweight.numel() * 4 + packed.scales.numel() * 2 + packed.zeros.numel() * 2 + perm


class ReferenceLinear:
    """Plain torch on the weight dequantised once, accumulated in fp32 (the CPU path)."""

    accumulates = True

    def __init__(self, packed: PackedLinear) -> None:
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.weight = packed.dequantize().float()

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, gated: bool = False
    ) -> torch.Tensor:
        out = _zeroed(x, self.out_features, out)
        out += _source(x, gated).float() @ self.weight
        return out

    def weight_bytes(self) -> int:
        return _packed_bytes(self.packed)


class TritonLinear:
    """Our Triton GPTQ kernel (tensor cores for several rows), accumulated in fp32."""

    accumulates = True

    def __init__(self, packed: PackedLinear) -> None:
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, gated: bool = False
    ) -> torch.Tensor:
        out = _zeroed(x, self.out_features, out)
        K.gptq_linear(x, self.packed, out, gated=gated)
        return out

    def weight_bytes(self) -> int:
        return _packed_bytes(self.packed)


class MarlinLinear:
    """gptqmodel's Marlin kernel (JIT-built with nvcc on first use); its fp16 product as is.

    With `dense`, the layer also keeps its weights in our packed layout (`pack_gptq`): a
    prefill of `DENSE_ROWS` rows or more dequantises them for cuBLAS, which runs Hopper's
    tensor cores where Marlin cannot (one more copy of the quantised weights in GPU memory),
    and a batch-1 decode step may run our GEMV on them (`race_gemv`).
    """

    accumulates = False

    def __init__(
        self, parts: list[dict[str, torch.Tensor]], bits: int, group: int, dense: bool = False
    ) -> None:
        self.dense = pack_gptq(parts, bits, group) if dense else None
        from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear as GptqModelMarlin
        from gptqmodel.utils.backend import BACKEND

        device = parts[0]["qweight"].device
        self.in_features = parts[0]["qweight"].shape[0] * (32 // bits)
        self.out_features = sum(int(p["scales"].shape[1]) for p in parts)
        act_order = group_order(parts, bits, group) is not None  # rows not yet sorted by group
        module = GptqModelMarlin(
            bits=bits, group_size=group, desc_act=act_order, sym=True,
            in_features=self.in_features, out_features=self.out_features, bias=False,
            backend=BACKEND.GPTQ_MARLIN,
        ).to(device)  # fmt: skip
        module.qweight.data = torch.cat([p["qweight"] for p in parts], dim=1).contiguous()
        module.qzeros.data = torch.cat([p["qzeros"] for p in parts], dim=1).contiguous()
        module.scales.data = torch.cat([p["scales"] for p in parts], dim=1).half().contiguous()
        if act_order:
            module.g_idx.data = parts[0]["g_idx"].to(torch.int32).contiguous()
        module.post_init()
        self.module = module

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, gated: bool = False
    ) -> torch.Tensor:
        source = _source(x, gated)
        if self.dense is not None and x.shape[0] >= DENSE_ROWS:
            return K.dense_matmul(source, self.dense)
        return self.module(source)

    def weight_bytes(self) -> int:
        return self.module.qweight.numel() * 4 + self.module.scales.numel() * 2


class GemvLinear:
    """Our batch-1 GEMV for one row into a given `out`; `inner` for anything else."""

    accumulates = True

    def __init__(self, inner: Linear, weights: PackedLinear) -> None:
        self.inner, self.weights = inner, weights
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, gated: bool = False
    ) -> torch.Tensor:
        if out is not None and x.shape[0] == 1:
            return K.gemv(_source(x, gated), self.weights, out)
        return self.inner(x, out, gated=gated)

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes()


class FusedLinear:
    """Layers that read one input and write side by side (q/k/v, gate/up).

    Used when their act-order permutations differ, so they cannot be packed as one.
    """

    accumulates = True

    def __init__(self, parts: list[Linear]) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, gated: bool = False
    ) -> torch.Tensor:
        out = _zeroed(x, self.out_features, out)
        column = 0
        for part in self.parts:
            target = out[:, column : column + part.out_features]
            if part.accumulates:
                part(x, target, gated=gated)
            else:
                target += part(x, gated=gated)
            column += part.out_features
        return out

    def weight_bytes(self) -> int:
        return sum(part.weight_bytes() for part in self.parts)


def gemv_weights(linear: Linear) -> PackedLinear | None:
    """The packed weights our batch-1 GEMV would read for `linear` (None: it cannot)."""
    if isinstance(linear, (TritonLinear, ReferenceLinear)):
        return linear.packed
    if isinstance(linear, MarlinLinear):
        return linear.dense
    return None


RACES: dict[tuple, tuple[float, float]] = {}
"""`race_gemv`'s results in this process: (our GEMV, the kernel's own) µs a layer, per shape."""


def race_gemv(per_shape: dict[str, list[Linear]], device: torch.device, kernel: str) -> dict:
    """Time our GEMV against each layer shape's own kernel, one row; keep the faster.

    `per_shape` maps a shape's name to its layers' back-ends (one per decoder layer). Timed on
    this GPU as a decode step meets them: one call per layer in a CUDA graph, so each call
    reads its weights from memory, not from the L2 cache that repeating one layer would warm.
    Returns, per shape raced, (ours, own) µs and the back-ends to use: `GemvLinear` around
    each layer where ours is faster, the layers as they were elsewhere.

    A shape is raced once per process, device and kernel (`RACES`): every model loaded later
    makes the same choice, so two engines on one checkpoint give the same tokens.
    """
    results: dict[str, tuple[tuple[float, float], list[Linear]]] = {}
    for name, linears in per_shape.items():
        weights = [gemv_weights(linear) for linear in linears]
        if not all(w is not None and K.gemv_fits(w) for w in weights):
            continue
        first = weights[0]
        key = (device, kernel, first.in_features, first.out_features, first.group_size,
               len(linears))  # fmt: skip
        # the first result stored wins, also when two threads load models at once
        race = RACES.get(key) or RACES.setdefault(key, _race_one(linears, weights, device))
        wins = race[0] < race[1]
        chosen = [
            GemvLinear(linear, w) if wins else linear
            for linear, w in zip(linears, weights, strict=True)
        ]
        results[name] = (race, chosen)
    return results


def _race_one(linears: list[Linear], weights: list[Any], device: torch.device) -> tuple:
    """(our GEMV, the kernel's own) µs a layer for one row, a call a layer in a CUDA graph."""
    x = torch.randn(1, linears[0].in_features, dtype=torch.float16, device=device)
    out = torch.zeros(1, linears[0].out_features, dtype=torch.float32, device=device)

    def ours() -> None:
        for w in weights:
            K.gemv(x, w, out)

    def own() -> None:
        for linear in linears:
            linear(x, out)

    layers = len(linears)
    return round(graph_us(ours, calls=1) / layers, 2), round(graph_us(own, calls=1) / layers, 2)


def graph_us(fn: Any, calls: int = 20, replays: int = 20) -> float:
    """Microseconds a call of `fn` takes on the GPU.

    `calls` calls in one CUDA graph, replayed `replays` times: the median replay per call (the
    first, uncaptured calls compile and autotune).
    """
    for _ in range(3):
        fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]
