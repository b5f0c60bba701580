"""What a bug report needs: versions, the device, the engine and kernel a load would pick, paths."""

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

from langchain_synthia._version import __version__

PACKAGES = (
    "langchain-core",
    "torch",
    "transformers",
    "optimum",
    "gptqmodel",
    "triton",
    "llguidance",
    "huggingface-hub",
    "safetensors",
)
"""The packages whose versions decide how the model loads and runs."""

ENVIRONMENT = (
    "SYNTHIA_MODEL",
    "SYNTHIA_REVISION",
    "SYNTHIA_DEVICE",
    "SYNTHIA_VERBOSE",
    "SYNTHIA_CHAT_LOG",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
    "GPTQMODEL_TORCH_EXTENSIONS_DIR",
)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpus() -> list[dict[str, Any]]:
    """The CUDA devices torch sees, with name, memory and compute capability (empty if none)."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        found.append({
            "index": index,
            "name": torch.cuda.get_device_name(index),
            "memory_gib": round(total / 2**30, 1),
            "free_gib": round(free / 2**30, 1),
            "capability": f"{major}.{minor}",
        })  # fmt: skip
    return found


def report() -> dict[str, Any]:
    """Everything ``synthia info`` shows, as a JSON-ready dict."""
    from huggingface_hub import constants

    from langchain_synthia._loading import (
        KERNELS_BY_DEVICE,
        default_fast_kernel,
        kernel_build_cache,
        resolve_engine,
    )
    from langchain_synthia.testing import demo_checkpoint_folder

    devices = gpus()
    device = "cuda" if devices else "cpu"
    engine = resolve_engine("auto", device)
    if engine == "fast":
        kernel = default_fast_kernel(device)
    else:
        kernel = " / ".join(f"{k} ({bits}-bit)" for bits, k in KERNELS_BY_DEVICE[device].items())
    torch_cuda = None
    if _version("torch"):
        import torch

        torch_cuda = torch.version.cuda
    return {
        "langchain-synthia": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch_cuda,
        "gpus": devices,
        "device": device,
        "engine": engine,
        "kernel": kernel,
        "paths": {
            "huggingface_cache": str(Path(constants.HF_HUB_CACHE)),
            "kernel_build_cache": str(kernel_build_cache()),
            "demo_checkpoint": str(demo_checkpoint_folder()),
        },
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
    }
