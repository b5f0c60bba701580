"""From a Hub repo id or a folder to a loaded `Engine`: the only module that imports the stack.

The road is the one the model card describes, on the 2026 stack: the checkpoint comes through
huggingface-hub (its cache, its progress bar, ``HF_HUB_OFFLINE``), and transformers loads the
GPTQ weights through optimum and gptqmodel (auto-gptq no longer imports under transformers 5).
The GPTQ kernel is chosen explicitly per device: gptqmodel's ``auto`` choice downloads CUTLASS
on Hopper cards, and nothing may download at load time. Safetensors only; remote code never.
"""

import importlib.util
import json
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_synthia._console import quiet_output
from langchain_synthia._engine import BaseEngine, Engine
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
    """Fast engine: cache rows, i.e. requests decoded at once (0 for the transformers engine)."""
    context_window: int = 0
    """Fast engine: tokens per cache row (0 for the transformers engine)."""
    prefix_cache_tokens: int = 0
    """Fast engine: tokens of prompt prefixes whose KV cache is kept for reuse."""
    dense_prefill: bool | None = None
    """Fast engine with Marlin: keep a second weight copy for cuBLAS prefills (None: if room)."""


_engines: dict[ModelSettings, BaseEngine] = {}
_engine_locks: dict[ModelSettings, threading.Lock] = {}
_registry_lock = threading.Lock()


def get_engine(settings: ModelSettings) -> BaseEngine:
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


def resolve_checkpoint(settings: ModelSettings) -> Path:
    """Find the checkpoint folder: the given folder, or the Hub repo's branch in the HF cache.

    Raises:
        ValueError: For a bad branch name, a missing folder, or a folder that is not a GPTQ
            checkpoint in safetensors.
        FileNotFoundError: When the repo is not cached and downloading is off.
    """
    folder = Path(settings.model).expanduser()
    if folder.is_dir():
        if settings.revision != DEFAULT_BRANCH:
            msg = (
                f"revision={settings.revision!r} applies to Hub repos, but "
                f"model={settings.model!r} is a local folder. Point model= at the folder of that "
                "branch instead."
            )
            raise ValueError(msg)
        validate_checkpoint(folder)
        return folder
    if settings.model.startswith((".", "/", "~")) or settings.model.count("/") != 1:
        msg = (
            f"model={settings.model!r} is neither an existing folder nor a Hub repo id "
            "('owner/name', e.g. 'TheBloke/Synthia-7B-v1.3-GPTQ')."
        )
        raise ValueError(msg)
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
    """
    from huggingface_hub import snapshot_download
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
            f"{why}. Download it once with network access (synthia chat does), or point "
            "model= at a local checkpoint folder."
        )
        raise FileNotFoundError(msg) from error
    return Path(path)


def validate_checkpoint(folder: Path) -> dict[str, Any]:
    """Check that `folder` holds a GPTQ checkpoint in safetensors; return its GPTQ settings."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        msg = f"{folder} is not a model checkpoint: it has no config.json."
        raise ValueError(msg)
    quant, where = _quantization_config(folder)
    if not quant or quant.get("quant_method") != "gptq":
        msg = (
            f"{folder} is not a GPTQ checkpoint (config.json has no GPTQ quantization_config and "
            "there is no quantize_config.json). langchain-synthia loads GPTQ branches of "
            "TheBloke/Synthia-7B-v1.3-GPTQ or checkpoints in the same layout."
        )
        raise ValueError(msg)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        reason = (
            f"only pickle weights ({', '.join(pickles)}), which are refused because loading them "
            "can run arbitrary code"
            if pickles
            else "no weights (if a download was cut short, run it again: it resumes)"
        )
        msg = f"{folder} has {reason}. langchain-synthia loads safetensors only."
        raise ValueError(msg)
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        msg = f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)."
        raise ValueError(msg)
    _check_quant_values(quant, where)
    return quant


def _quantization_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The GPTQ settings that loading honours, and where they are written (for messages).

    config.json's ``quantization_config`` wins, as in transformers; early TheBloke uploads keep
    them only in quantize_config.json.
    """
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config")
    legacy = folder / "quantize_config.json"
    if quant is None and legacy.is_file():
        return {"quant_method": "gptq", **json.loads(legacy.read_text())}, str(legacy)
    return quant, f"{folder / 'config.json'} (its quantization_config)"


def _check_quant_values(quant: dict[str, Any], where: str) -> None:
    """Refuse GPTQ settings that neither engine can honour (`where`: the file that says them)."""
    bits = quant.get("bits", 4)
    if isinstance(bits, bool) or bits not in (4, 8):
        msg = (
            f"{where} says bits={bits!r}, but langchain-synthia loads 4-bit or 8-bit GPTQ "
            "weights only (Synthia's branches: main and gptq-4bit-* are 4-bit, gptq-8bit-* "
            'are 8-bit). Set "bits" to the width the checkpoint was quantised with (4 or 8), '
            "or download the branch again."
        )
        raise ValueError(msg)
    group = quant.get("group_size", -1)
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        msg = (
            f"{where} says group_size={group!r}, but a GPTQ group size is -1 (one group per "
            "column) or a positive number of rows such as 128, 64 or 32 (Synthia's branches)."
        )
        raise ValueError(msg)
    for key in ("desc_act", "sym"):
        if key in quant and not isinstance(quant[key], bool):
            msg = f"{where} says {key}={quant[key]!r}, but it must be true or false (JSON)."
            raise ValueError(msg)


_LINEARS = (
    *(f"self_attn.{name}_proj" for name in "qkvo"),
    *(f"mlp.{name}_proj" for name in ("gate", "up", "down")),
)
"""A Mistral decoder layer's quantised linear layers."""

_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def check_weights(folder: Path, quant: dict[str, Any], fix: str) -> None:
    """Refuse a checkpoint whose safetensors are missing, cut short, corrupt, or not `quant`.

    Reads the shards' headers only (milliseconds for the 7B model), so that a bad file fails
    with its name and `fix` (how to fetch it again) before any weight is loaded, instead of
    with a parser's message from deep inside the loading stack.
    """
    from safetensors import SafetensorError, safe_open

    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            msg = f"{index} is not a safetensors index ({type(error).__name__}: {error}). {fix}"
            raise ValueError(msg) from error
        missing = sorted(listed - {shard.name for shard in shards})
        if missing:
            msg = (
                f"{folder} is incomplete: {index.name} lists {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not there (an interrupted download "
                f"or copy). {fix}"
            )
            raise FileNotFoundError(msg)
    shapes: dict[str, tuple[list[int], str]] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    shapes[name] = (handle.get_slice(name).get_shape(), shard.name)
        except (SafetensorError, OSError) as error:
            msg = (
                f"{shard} is not a readable safetensors file ({error}): it is truncated or "
                f"corrupt ({shard.stat().st_size:,} bytes), e.g. by an interrupted download or "
                f"copy. {fix}"
            )
            raise ValueError(msg) from error
    config = json.loads((folder / "config.json").read_text())
    layers = [f"model.layers.{i}" for i in range(int(config.get("num_hidden_layers", 0)))]
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.get("tie_word_embeddings", False):
        needed.append("lm_head.weight")
    for layer in layers:
        needed += [f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"]
        needed += [f"{layer}.{linear}.{part}" for linear in _LINEARS for part in _GPTQ_PARTS]
    absent = [name for name in needed if name not in shapes]
    if absent:
        msg = (
            f"{folder} lacks {len(absent)} of the model's {len(needed)} tensors (e.g. "
            f"{', '.join(absent[:3])}): a weights file is missing or incomplete. {fix}"
        )
        raise ValueError(msg)
    _, where = _quantization_config(folder)
    bits, group = int(quant.get("bits", 4)), int(quant.get("group_size", -1))
    for layer in layers:
        for linear in _LINEARS:
            name = f"{layer}.{linear}"
            (inputs,), _ = shapes[f"{name}.g_idx"]
            (rows, _), shard = shapes[f"{name}.qweight"]
            if rows * 32 != inputs * bits:
                msg = (
                    f"{where} says bits={bits}, but {name}.qweight in {shard} has {rows} rows "
                    f"for {inputs} input features: {rows * 32 // inputs}-bit weights. Set "
                    '"bits" to the width the weights have, or download the branch again.'
                )
                raise ValueError(msg)
            (groups, _), shard = shapes[f"{name}.scales"]
            if groups != (1 if group == -1 else -(-inputs // group)):
                actual = -1 if groups == 1 else inputs // groups
                msg = (
                    f"{where} says group_size={group}, but {name}.scales in {shard} has "
                    f"{groups} groups for {inputs} input features: group_size={actual}. Set "
                    f'"group_size": {actual}, or download the branch again.'
                )
                raise ValueError(msg)


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
    """The fast engine's GPTQ kernel when none is named: Marlin where gptqmodel can build it.

    Marlin was measured faster on Hopper (docs/benchmarks.md); our Triton kernels are the
    fallback, also when Marlin's build fails at load.
    """
    marlin = device.startswith("cuda") and importlib.util.find_spec("gptqmodel") is not None
    return "gptq_marlin" if marlin else "triton"


def kernel_build_cache() -> Path:
    """Where gptqmodel keeps its compiled kernels (Marlin): built once, reused by later loads."""
    root = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache/gptqmodel/torch_extensions"


def _load(settings: ModelSettings) -> BaseEngine:
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
    return Engine(model, tokenizer, name=settings.model)


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
            "machine builds it with nvcc, about 3 minutes; later loads use the cached build)",
            file=sys.stderr,
            flush=True,
        )
    return FastMistral(
        folder, target, max_batch=settings.max_batch_size or 8,
        max_len=settings.context_window or 4096, kernel=kernel,
        dense_prefill=settings.dense_prefill,
    )  # fmt: skip


def _load_fast(
    settings: ModelSettings, folder: Path, device: str, quant: dict[str, Any] | None = None
) -> BaseEngine:
    import torch

    from langchain_synthia._fast_engine import FastEngine

    logger.info("Loading %s on %s with the fast engine", folder, device)
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    kernel = settings.kernel or default_fast_kernel(target.type)
    if kernel == "gptq_marlin" and (quant or {}).get("sym") is False:
        # gptqmodel's Marlin reads symmetric weights only (it ignores the zero points)
        if settings.kernel is not None:
            msg = (
                f"{_quantization_config(folder)[1]} says sym=false (asymmetric weights), which "
                "kernel='gptq_marlin' cannot read: pass kernel='triton' (it honours the zero "
                "points) or engine='transformers'."
            )
            raise ValueError(msg)
        kernel = "triton"
    try:
        model = _fast_model(settings, folder, target, kernel)
    except Exception as error:
        if settings.kernel is not None or kernel == "triton":
            raise
        logger.warning("gptqmodel's Marlin kernel is unavailable (%s): using Triton kernels", error)
        model = _fast_model(settings, folder, target, "triton")
    return FastEngine(
        model, _tokenizer(folder), name=settings.model, graphs=target.type == "cuda",
        prefix_tokens=settings.prefix_cache_tokens,
    )  # fmt: skip
