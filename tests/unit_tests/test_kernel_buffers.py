"""Host-side buffers of the fast engine's kernels (no GPU needed)."""

import threading

import torch

from langchain_synthia._kernels import scratch_buffer


def test_dequantisation_scratch_is_per_thread_and_grows_once() -> None:
    """Two engines prefill from two threads: each thread dequantises into its own buffer."""
    cpu = torch.device("cpu")
    first = scratch_buffer(cpu, 100)
    assert first.dtype == torch.float16
    assert first.numel() == 100
    assert scratch_buffer(cpu, 50).data_ptr() == first.data_ptr()  # reused, not reallocated
    grown = scratch_buffer(cpu, 200)
    assert grown.numel() == 200
    assert scratch_buffer(cpu, 100).data_ptr() == grown.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch_buffer(cpu, 100).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != grown.data_ptr()
