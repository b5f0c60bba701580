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


def test_programmatic_dependent_launch_only_on_hopper_or_newer(monkeypatch) -> None:
    """Our kernels get ``launch_pdl`` (and their ``PDL`` branch) on compute capability 9+."""
    from langchain_synthia import _kernels as K
    from langchain_synthia._kernels import _triton

    assert K.pdl(torch.device("cpu")) == {"PDL": False}
    capability = {0: (9, 0), 1: (8, 0)}  # an H100 or H200, then an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    _triton._hopper_or_newer.cache_clear()
    try:
        monkeypatch.delenv("SYNTHIA_PDL", raising=False)
        assert K.pdl(torch.device("cuda:0")) == {"PDL": True, "launch_pdl": True}
        assert K.pdl(torch.device("cuda:1")) == {"PDL": False}
        monkeypatch.setenv("SYNTHIA_PDL", "0")  # the way out, should a driver misbehave
        assert K.pdl(torch.device("cuda:0")) == {"PDL": False}
    finally:
        _triton._hopper_or_newer.cache_clear()
