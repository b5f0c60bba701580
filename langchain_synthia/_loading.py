"""From a Hub repo id or a folder to a loaded engine: the only module that imports the stack.

The road is the one the model card describes, on the 2026 stack: the checkpoint comes through
huggingface-hub (its cache, its progress bar, ``HF_HUB_OFFLINE``), and transformers loads the
GPTQ weights through optimum and gptqmodel (auto-gptq no longer imports under transformers 5).
The GPTQ kernel is chosen explicitly per device: gptqmodel's ``auto`` choice downloads CUTLASS
on Hopper cards, and nothing may download at load time. Safetensors only; remote code never.
"""

import gc
import importlib.util
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from langchain_synthia._checkpoint import (
    CheckpointError,
    check_regular_file,
    check_tensors,
    quantization_config,
    read_headers,
    read_model_config,
)
from langchain_synthia._console import quiet_output
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._transformers_engine import TransformersEngine
from langchain_synthia.variants import DEFAULT_BRANCH, check_revision

logger = logging.getLogger(__name__)

_CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model"]
"""What is fetched from the Hub: configs, safetensors weights, the SentencePiece model."""

KERNELS_BY_DEVICE: dict[str, dict[int, str]] = {
    # gptqmodel's int4pack ATen kernel: fast on CPU, no compile step; 8-bit falls back to torch
    "cpu": {4: "gptq_torch_aten", 8: "gptq_torch"},
    # plain torch kernels: no JIT compile, no download; the fast CUDA path is a later engine
    "cuda": {4: "gptq_torch", 8: "gptq_torch"},
}
"""The GPTQ kernel used by default for each device type and bit width (override: ``kernel=``)."""


@dataclass(frozen=True)
class ModelSettings:
    """Everything that decides which model is loaded: instances with equal settings share it."""

    model: str
    revision: str = DEFAULT_BRANCH
    device: str = "auto"
    kernel: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False
    engine: str = "auto"
    """``"fast"`` (our CUDA engine), ``"transformers"``, or ``"auto"`` (fast on CUDA)."""
    max_batch_size: int = 0
    """Fast engine: requests decoded at once at most (0 for the transformers engine)."""
    context_window: int = 0
    """Fast engine: positions of a request, prompt and answer (0 for the transformers engine)."""
    prefix_caching: bool = True
    """Fast engine: share cached prompt blocks between requests."""
    gpu_memory_utilization: float = 0.0
    """Fast engine: the share of the GPU's memory it may use (0 for the transformers engine)."""
    kv_cache_tokens: int | None = None
    """Fast engine: KV positions to allocate (None: sized from `gpu_memory_utilization`)."""
    dense_prefill: bool | None = None
    """Fast engine with Marlin: keep a second weight copy for cuBLAS prefills (None: if room)."""


_engines: dict[ModelSettings, LocalEngine] = {}
_engine_locks: dict[ModelSettings, threading.Lock] = {}
_registry_lock = threading.Lock()


def get_engine(settings: ModelSettings) -> LocalEngine:
    """Return the process-wide engine for `settings`, loading it on first use (once)."""
    with _registry_lock:
        engine = _engines.get(settings)
        if engine is not None:
            return engine
        lock = _engine_locks.setdefault(settings, threading.Lock())
    with lock:
        engine = _engines.get(settings)
        if engine is None:
            engine = _load(settings)
            with _registry_lock:
                _engines[settings] = engine
        return engine


def loaded_engines() -> list[ModelSettings]:
    """The settings of every model loaded in this process."""
    with _registry_lock:
        return list(_engines)


def unload(settings: ModelSettings) -> bool:
    """Close the engine loaded for `settings` and free its memory; whether one was loaded.

    Requests still open on it end with `EngineStoppedError`; the next `get_engine` for these
    settings loads the model again. A model still loading is not affected.
    """
    with _registry_lock:
        engine = _engines.pop(settings, None)
    if engine is None:
        return False
    engine.close()
    del engine
    gc.collect()  # the engine's threads and graphs hold references in cycles
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # hand the freed blocks back to the driver (nvidia-smi)
    return True


def resolve_device(device: str) -> str:
    """Turn ``"auto"`` into ``"cuda"`` or ``"cpu"``; refuse a CUDA device that is not there."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        msg = (
            f"device={device!r} was asked for, but CUDA is not available "
            f"(torch {torch.__version__}, {build}). Install a CUDA build of PyTorch on a machine "
            "with an NVIDIA GPU, or pass device='cpu' (slow for the 7B model) or device='auto'."
        )
        raise RuntimeError(msg)
    if kind not in KERNELS_BY_DEVICE:
        msg = f"Unsupported device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        raise ValueError(msg)
    return device


_MODEL_TAKES = "model= takes a Hub repo id like owner/name or a local checkpoint folder"


def local_folder(model: str) -> Path | None:
    """The folder that `model` names, or ``None`` when `model` is a Hub repo id.

    A `model` that reads as a path (it starts with ``/``, ``.`` or ``~``, has a backslash or no
    or several ``/``, is no valid repo id, or its first part is a folder here) and names no
    folder is refused here, so that a typo in a path is not sent to the Hub as a repo id.

    Raises:
        ValueError: ``no such folder: ...``, for a path that is missing or is a file.
    """
    if not model.strip():
        msg = f"model={model!r} is empty ({_MODEL_TAKES})."
        raise ValueError(msg)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path.is_symlink():
        msg = (
            f"no such folder: {path.absolute()} is a file, not a folder ({_MODEL_TAKES}: "
            f"the folder that holds config.json, such as {path.absolute().parent})."
        )
        raise ValueError(msg)
    if _reads_as_path(model):
        msg = f"no such folder: {path.absolute()} (model={model!r}; {_MODEL_TAKES})."
        raise ValueError(msg)
    return None


def _reads_as_path(model: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model:
        return True
    if os.altsep and os.altsep in model:
        return True
    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return Path(model.split("/", 1)[0]).is_dir()


def resolve_checkpoint(settings: ModelSettings) -> Path:
    """Find the checkpoint folder: the given folder, or the Hub repo's branch in the HF cache.

    Raises:
        ValueError: For a bad branch name, a path that is no folder, or a folder that is not a
            GPTQ checkpoint in safetensors.
        FileNotFoundError: When the repo is not cached and downloading is off.
    """
    folder = local_folder(settings.model)
    if folder is not None:
        if settings.revision != DEFAULT_BRANCH:
            msg = (
                f"revision={settings.revision!r} applies to Hub repos, but "
                f"model={settings.model!r} is a local folder. Point model= at the folder of that "
                "branch instead."
            )
            raise ValueError(msg)
        validate_checkpoint(folder)
        return folder
    check_revision(settings.model, settings.revision)
    folder = download(
        settings.model, settings.revision, settings.cache_dir, settings.local_files_only
    )
    validate_checkpoint(folder)
    return folder


def download(
    repo_id: str,
    revision: str,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    local_dir: str | None = None,
) -> Path:
    """Fetch a branch's safetensors, configs and tokenizer into the Hugging Face cache.

    Honours ``HF_HUB_OFFLINE``/``local_files_only`` (cache only), shows huggingface-hub's
    progress bars, and resumes an interrupted download. With `local_dir`, the files land in
    that folder instead (a checkpoint folder that ``model=`` can point at).

    Raises:
        ValueError: If `repo_id` is a path (``no such folder: ...`` when it names none).
        FileNotFoundError: If the repo is not cached and downloading is off.
    """
    from huggingface_hub import snapshot_download

    if local_folder(repo_id) is not None:
        msg = f"{repo_id} is a local folder, not a Hub repo id: there is nothing to download."
        raise ValueError(msg)
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_dir=local_dir,
            local_files_only=local_files_only,
            allow_patterns=_CHECKPOINT_FILES,
        )
    except LocalEntryNotFoundError as error:
        from huggingface_hub import constants

        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "downloading is off (HF_HUB_OFFLINE=1 or local_files_only=True)"
        else:
            why = f"the Hub could not be reached ({error.__cause__ or error})"
        msg = (
            f"{repo_id} (revision {revision!r}) is not in the local Hugging Face cache and "
            f"{why}. Download it once with network access (the first load does, or "
            "`synthia download`), or point model= (`--model` on the command line) at a local "
            "checkpoint folder. To try the package without the model: `synthia chat --demo`."
        )
        raise FileNotFoundError(msg) from error
    return Path(path)


def validate_checkpoint(folder: Path) -> dict[str, Any]:
    """Check that `folder` holds a GPTQ checkpoint in safetensors; return its GPTQ settings.

    Reads the small JSON configs only, and no file that is not a regular one: config.json's
    fields must be the types and sizes the engines use (`read_model_config`).

    Raises:
        CheckpointError: A `ValueError` naming the file, the field, what it says and what was
            expected.
    """
    config_file = folder / "config.json"
    if not (config_file.exists() or config_file.is_symlink()):
        msg = f"{folder} is not a model checkpoint: it has no config.json."
        raise CheckpointError(msg)
    for pattern in _CHECKPOINT_FILES:  # what the loaders open, FIFOs and devices refused first
        for path in folder.glob(pattern):
            check_regular_file(path)
    quant, _ = quantization_config(folder)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        reason = (
            f"only pickle weights ({', '.join(pickles)}), which are refused because loading them "
            "can run arbitrary code"
            if pickles
            else "no weights (if a download was cut short, run it again: it resumes)"
        )
        msg = f"{folder} has {reason}. langchain-synthia loads safetensors only."
        raise CheckpointError(msg)
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        msg = f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)."
        raise CheckpointError(msg)
    read_model_config(folder)
    return quant


def check_weights(folder: Path, quant: dict[str, Any], fix: str) -> None:
    """Refuse a checkpoint whose safetensors are missing, cut short, corrupt, or not `quant`.

    Reads the shards' headers only (milliseconds for the 7B model), so that a bad file fails
    with its name and `fix` (how to fetch it again) before any weight is loaded, instead of
    with a parser's message from deep inside the loading stack. The tensors' names and shapes
    must be those that config.json's sizes and `quant` (the GPTQ settings
    `validate_checkpoint` returned) give.

    Raises:
        FileNotFoundError: If the safetensors index lists a shard that is not there.
        CheckpointError: For a broken shard or index, a missing tensor, or a config that does
            not describe the weights.
    """
    tensors = read_headers(folder, fix)
    config = replace(read_model_config(folder), quant=quant)
    check_tensors(config, tensors, folder, fix)


def choose_kernel(device: str, bits: int, kernel: str | None = None) -> str:
    """The gptqmodel backend for `device` and `bits`: `kernel` if given, else the table's."""
    if kernel is not None:
        if kernel == "auto":
            msg = (
                "kernel='auto' is refused: gptqmodel's automatic choice downloads CUTLASS on "
                "Hopper cards at load time. Name a kernel (e.g. 'gptq_torch', 'gptq_triton', "
                "'gptq_exllama_v2', 'gptq_marlin') or leave kernel unset."
            )
            raise ValueError(msg)
        return kernel
    kernels = KERNELS_BY_DEVICE[device.split(":", 1)[0]]
    if bits not in kernels:
        msg = (
            f"No GPTQ kernel for {bits}-bit weights on {device}: Synthia's branches are 4 or 8-bit."
        )
        raise ValueError(msg)
    return kernels[bits]


def require_gptq_stack() -> None:
    """Fail early, with the fix, when the GPTQ loading stack is not installed."""
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        msg = (
            f"Loading GPTQ weights needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed (transformers 5 loads GPTQ "
            "through optimum + gptqmodel; auto-gptq no longer works). Install them with: "
            "pip install 'gptqmodel>=7.6,<7.7' 'optimum>=2.3,<3'"
        )
        raise ImportError(msg)


def resolve_engine(engine: str, device: str) -> str:
    """``"auto"`` is the fast engine on CUDA (when Triton is there) and transformers elsewhere."""
    if engine != "auto":
        return engine
    if device.startswith("cuda") and importlib.util.find_spec("triton") is not None:
        return "fast"
    return "transformers"


def default_fast_kernel(device: str) -> str:
    """The fast engine's GPTQ kernel when none is named: Marlin once it is built, else Triton.

    gptqmodel builds Marlin with nvcc on its first use on a machine, which takes minutes: a
    first call never waits for that. Our Triton kernels need no build, so they serve until
    Marlin has been built (by a load with ``kernel="gptq_marlin"``); from then on the default
    is Marlin, faster for batches (docs/benchmarks.md).
    """
    if not device.startswith("cuda") or importlib.util.find_spec("gptqmodel") is None:
        return "triton"
    return "gptq_marlin" if marlin_is_built() else "triton"


def marlin_is_built() -> bool:
    """Whether gptqmodel's build cache holds a compiled Marlin kernel."""
    return any(kernel_build_cache().glob("marlin*/*/*marlin*.so"))


def kernel_build_cache() -> Path:
    """Where gptqmodel keeps its compiled kernels (Marlin): built once, reused by later loads."""
    root = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache/gptqmodel/torch_extensions"


def _load(settings: ModelSettings) -> LocalEngine:
    folder = resolve_checkpoint(settings)
    quant = validate_checkpoint(folder)
    check_weights(folder, quant, fetch_again(settings.model, settings.revision, folder))
    device = resolve_device(settings.device)
    if resolve_engine(settings.engine, device) == "fast":
        return _load_fast(settings, folder, device, quant)
    require_gptq_stack()
    kernel = choose_kernel(device, int(quant.get("bits", 4)), settings.kernel)
    logger.info("Loading %s on %s with the %s kernel", folder, device, kernel)

    with quiet_output(), warnings.catch_warnings():  # SYNTHIA_VERBOSE=1 shows the stack's output
        # transformers warns that only the loading attributes (our kernel) of the passed
        # GPTQConfig are used, the checkpoint's own settings for the rest: that is the intent
        warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
        import torch
        from transformers import AutoModelForCausalLM, GPTQConfig

        model = AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=GPTQConfig(bits=int(quant.get("bits", 4)), backend=kernel),
            device_map=device,
            dtype=torch.float16,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
        )
        model.eval()
        tokenizer = _tokenizer(folder)
    # no prompt plus answer past the positions the model was trained for
    positions = getattr(model.config, "max_position_embeddings", None)
    return TransformersEngine(model, tokenizer, name=settings.model, max_len=positions or 1 << 30)


def fetch_again(model: str, revision: str, folder: Path) -> str:
    """How to replace a missing or broken weights file of `folder` (for `check_weights`)."""
    if Path(model).expanduser().is_dir():
        return f"Copy or download that file into {folder} again."
    return (
        f"Download it again: hf download {model} --revision {revision} "
        "--force-download (huggingface-hub does not re-check files it already has; without "
        "--force-download it only fetches missing ones)."
    )


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    tokenizer.model_max_length = 1 << 62  # the engines check the context window themselves
    return tokenizer


def _fast_model(settings: ModelSettings, folder: Path, target: Any, kernel: str) -> Any:
    from langchain_synthia._fast_model import FastMistral

    if kernel == "gptq_marlin":
        print(
            "langchain-synthia: loading with gptqmodel's Marlin kernel (the first use on a "
            "machine builds it with nvcc, which takes minutes; later loads use the cached build)",
            file=sys.stderr,
            flush=True,
        )
    return FastMistral(
        folder, target, max_batch=settings.max_batch_size or 64,
        max_len=settings.context_window or 4096, kernel=kernel,
        dense_prefill=settings.dense_prefill,
    )  # fmt: skip


def _load_fast(
    settings: ModelSettings, folder: Path, device: str, quant: dict[str, Any] | None = None
) -> LocalEngine:
    import torch

    from langchain_synthia._fast_engine import (
        BLOCK_SIZE,
        DENSE_PREFILL_TOKENS,
        PREFILL_TOKENS,
        FastEngine,
        graph_sizes,
        kv_cache_blocks,
    )

    logger.info("Loading %s on %s with the fast engine", folder, device)
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    kernel = settings.kernel or default_fast_kernel(target.type)
    if kernel == "gptq_marlin" and (quant or {}).get("sym") is False:
        # gptqmodel's Marlin reads symmetric weights only (it ignores the zero points)
        if settings.kernel is not None:
            msg = (
                f"{quantization_config(folder)[1]} says sym=false (asymmetric weights), which "
                "kernel='gptq_marlin' cannot read: pass kernel='triton' (it honours the zero "
                "points) or engine='transformers'."
            )
            raise ValueError(msg)
        kernel = "triton"
    baseline = torch.cuda.memory_reserved(target) if target.type == "cuda" else 0
    try:
        model = _fast_model(settings, folder, target, kernel)
    except Exception as error:
        if settings.kernel is not None or kernel == "triton":
            raise
        logger.warning("gptqmodel's Marlin kernel is unavailable (%s): using Triton kernels", error)
        model = _fast_model(settings, folder, target, "triton")
    blocks = kv_cache_blocks(
        model, block_size=BLOCK_SIZE,
        prefill_tokens=DENSE_PREFILL_TOKENS if model.dense_prefill else PREFILL_TOKENS,
        graph_sizes=graph_sizes(model.max_batch),
        gpu_memory_utilization=settings.gpu_memory_utilization or 0.9,
        kv_cache_tokens=settings.kv_cache_tokens, baseline=baseline,
    )  # fmt: skip
    return FastEngine(
        model, _tokenizer(folder), name=settings.model, graphs=target.type == "cuda",
        num_blocks=blocks, block_size=BLOCK_SIZE, prefix_caching=settings.prefix_caching,
    )  # fmt: skip
