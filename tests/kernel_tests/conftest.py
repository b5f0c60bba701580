"""The kernel tier: the fast engine's Triton kernels on the CPU, through Triton's interpreter.

tests/conftest.py switches the interpreter on for a CPU run (``TRITON_INTERPRET=1``, before
Triton is imported). Tests that launch kernels use `interpreted_kernels`, and draw their inputs
from a fixed seed (`gen`): a failure reproduces with ``pytest tests/kernel_tests -k <name>``.
"""

import os

import pytest
import torch

SEED = 0
"""The seed of every kernel test's inputs."""


@pytest.fixture
def interpreted_kernels() -> None:
    """Skip unless Triton is installed and runs its interpreter (a CPU run)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel checks run on Triton's interpreter: a CPU run")


@pytest.fixture
def gen() -> torch.Generator:
    """The test's random inputs, the same on every run."""
    return torch.Generator().manual_seed(SEED)
