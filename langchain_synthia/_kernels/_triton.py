"""Triton where it is installed, and what the decode-step kernels of every family share.

`triton` and `tl` are ``None`` without Triton (the CPU path needs neither). `pdl` gives a
decode-step kernel's launch options on a device, and `after_previous` is the wait each of
those kernels makes before it touches what the kernels before it write.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

try:  # Triton comes with CUDA builds of PyTorch; the CPU path does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether Triton kernels can run here."""
    return triton is not None


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> dict[str, bool]:
    """Launch options of our decode-step kernels on `device` (each kernel's ``PDL`` constant).

    On Hopper and newer GPUs they use programmatic dependent launch: a kernel may start while
    the one before it drains; it lets the next one start (``gdc_launch_dependents``), then
    waits for the one before's results (``gdc_wait``) before it reads or writes anything they
    may touch (`after_previous`). In a captured decode step this overlaps each kernel's
    launch, and the GEMVs' weight loads, with the end of the kernels before, which shortens a
    batch-1 step (docs/benchmarks.md). ``SYNTHIA_PDL=0`` turns it off.
    """
    if device.type != "cuda" or os.environ.get("SYNTHIA_PDL") == "0":
        return {"PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _hopper_or_newer(index) else {"PDL": False}


if triton is not None:

    @triton.jit
    def after_previous(PDL: tl.constexpr):
        """What each decode-step kernel does before it touches what the kernels before write.

        With `PDL` (`pdl`): let the kernel after start, then wait until the kernel before has
        finished and its writes are visible. The kernel after waits in turn before it touches
        anything the kernels before may write, and that wait covers this kernel's own, so it
        may launch at once. Before this, kernels read only what no kernel of the step writes:
        the GEMVs' weights (so the next GEMV's loads overlap the end of this kernel and of the
        one before), the norms' weights and orders, and at batch 1 the attention's older keys.
        """
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()


def short_bench(kernel_call: Callable[[], Any], quantiles: tuple[float, ...]) -> Any:
    """How our autotuned kernels time a candidate configuration: 5 ms of warm-up, 20 ms of runs.

    Triton's default (25 ms and 100 ms) would make the first load on a fresh machine wait
    several times longer for tunings whose winners such short runs already tell apart.
    """
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)
