"""Shared test setup: a hermetic environment, each test's tier marker, and the tiny checkpoint.

Each folder is a tier, marked by `pytest_collection_modifyitems` (``pytest -m <tier>``):
``unit`` (tests/unit_tests), ``integration`` (tests/integration_tests), ``kernels``
(tests/kernel_tests) and ``docs`` (tests/test_docs.py). Test modules mark ``gpu`` and
``real_model`` themselves.
"""

import os

import pytest

# Never reach the Hub from tests; quantising on a small CPU needs these (see testing.py).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
# Triton runs on a CPU only through its interpreter, which it reads as it defines each kernel
# (its own library's at import): on for a CPU run before anything imports Triton. A GPU run
# (SYNTHIA_TEST_DEVICE=cuda) compiles; tests/kernel_tests/ then skips the interpreted checks.
if os.environ.get("SYNTHIA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# after the environment above
from tests.helpers import DEVICE, tiny_model_path

TIERS = {
    "unit_tests": "unit",
    "integration_tests": "integration",
    "kernel_tests": "kernels",
    "test_docs.py": "docs",
}
"""The tier marker of each entry of tests/."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier; skip ``gpu`` tests asked to run on a missing GPU."""
    root = config.rootpath / "tests"
    no_gpu = None
    if DEVICE.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            no_gpu = pytest.mark.skip(reason=f"SYNTHIA_TEST_DEVICE={DEVICE}: no CUDA device")
    for item in items:
        tier = TIERS.get(item.path.relative_to(root).parts[0])
        if tier:
            item.add_marker(tier)
        if no_gpu and item.get_closest_marker("gpu"):
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return tiny_model_path()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches the transformers engine starts during the test, in order."""
    from langchain_synthia._transformers_engine import TransformersEngine

    started: list[int] = []
    original = TransformersEngine.start

    def spy(self: TransformersEngine, rows: list) -> None:
        started.append(len(rows))
        original(self, rows)

    monkeypatch.setattr(TransformersEngine, "start", spy)
    return started
