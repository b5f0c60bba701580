"""A checkpoint folder's configs and safetensors headers, read and checked before any loading.

Both engines and ``synthia download`` run these checks first, so that a checkpoint the engines
cannot load fails in milliseconds with a `CheckpointError` that names the file, the field, what
it says and what was expected, instead of with a raw error from deep inside the loading stack
(or after building a model of whatever size the config claims). Only small files are read:
the JSON configs and each shard's header (its 8-byte length and the JSON after it), never the
tensor data. A file that is not a regular file (a FIFO, a device, a folder) is refused before
it is read. Symbolic links are followed wherever they point, as the Hugging Face cache links a
snapshot's files to blobs outside the snapshot's folder.
"""

import itertools
import json
import math
import os
import re
import reprlib
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 << 20
"""Largest JSON file (config, safetensors header, index) read: Synthia's are a few KiB."""
MAX_DIMENSION = (1 << 31) - 1
"""Largest size a config field may give (a dimension or count of the model)."""
MISTRAL_SLIDING_WINDOW = 4096
"""transformers' MistralConfig ``sliding_window`` when config.json does not give one."""
ARCHITECTURES = ("mistral", "llama")
"""The ``model_type`` values the engines run: decoders of RMSNorm, rotary attention over grouped
key/value heads (no biases) and a SiLU-gated MLP, whose weights are named as in transformers."""

LINEARS = (
    *(f"self_attn.{name}_proj" for name in "qkvo"),
    *(f"mlp.{name}_proj" for name in ("gate", "up", "down")),
)
"""A Mistral or Llama decoder layer's quantised linear layers."""
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
"""The tensors of one GPTQ linear layer."""
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")

_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_SUFFIXES = frozenset(
    (*LAYER_NORMS, *(f"{linear}.{part}" for linear in LINEARS for part in GPTQ_PARTS))
)
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
    "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64,
    "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
"""Bits per element of each safetensors dtype."""

_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 60
_shown.maxlong, _shown.maxlist, _shown.maxdict, _shown.maxlevel = 40, 4, 4, 2


class CheckpointError(ValueError):
    """A checkpoint file the engines cannot load; the message names the file and the fix."""


def show(value: Any) -> str:
    """`value` as JSON-ish text short enough for a message, whatever its size."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return _shown.repr(value)


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its shard's header describes it."""

    dtype: str
    shape: tuple[int, ...]
    shard: str
    """The file name of the shard that holds it."""


@dataclass(frozen=True)
class ModelConfig:
    """The settings of config.json (and the GPTQ settings) that the engines use, checked."""

    file: Path
    model_type: str
    """One of `ARCHITECTURES`."""
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    quant: dict[str, Any]
    """The GPTQ settings as written (``quant_method`` is ``"gptq"``)."""
    quant_file: str
    """Where the GPTQ settings are written, for messages."""
    max_position_embeddings: int | None = None
    """The positions the model was trained for (``None``: config.json does not say): the
    engines refuse a prompt plus answer longer than that."""
    sliding_window: int | None = None
    """Keys a query at position p attends to: those at positions ``p - sliding_window < j <= p``
    (``None``: every ``j <= p``), as transformers masks them: for Mistral,
    `MISTRAL_SLIDING_WINDOW` when config.json does not say; for Llama always ``None`` (a
    ``sliding_window`` in a Llama config is ignored, as transformers ignores it)."""

    @property
    def bits(self) -> int:
        """4 or 8."""
        return int(self.quant.get("bits", 4))

    @property
    def group_size(self) -> int:
        """Rows per group, or -1 for one group per column."""
        return int(self.quant.get("group_size", -1))


def _open_regular(path: Path) -> tuple[int, int]:
    """Open `path` for reading, refusing anything but a regular file; its fd and size.

    The file is opened without blocking, so that a FIFO is refused instead of waiting for a
    writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        msg = f"{path} cannot be read ({error.strerror or error})."
        raise CheckpointError(msg) from error
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        msg = f"{path} is {_kind(info.st_mode)}, not a regular file: replace it with the file."
        raise CheckpointError(msg)
    return fd, info.st_size


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def check_regular_file(path: Path) -> None:
    """Refuse `path` (following links) unless it is a regular file; nothing is read."""
    try:
        info = path.stat()
    except OSError as error:
        msg = f"{path} cannot be read ({error.strerror or error})."
        raise CheckpointError(msg) from error
    if not stat.S_ISREG(info.st_mode):
        msg = f"{path} is {_kind(info.st_mode)}, not a regular file: replace it with the file."
        raise CheckpointError(msg)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a `CheckpointError` saying what is wrong with the file."""
    fd, size = _open_regular(path)
    with os.fdopen(fd, "rb") as file:
        if size > MAX_JSON_BYTES:
            msg = (
                f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} a model's JSON "
                "file may have: it is not the checkpoint's file."
            )
            raise CheckpointError(msg)
        data = file.read(MAX_JSON_BYTES + 1)
    value, problem = _parse_json_object(data)
    if problem is not None:
        msg = f"{path} {problem}: download or copy the file again."
        raise CheckpointError(msg)
    return value


def _parse_json_object(data: bytes) -> tuple[dict[str, Any], str | None]:
    """The JSON object in `data`, or what is wrong with it ("is not valid JSON (...)")."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError too
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        return {}, f"is not valid JSON ({reason})"
    if not isinstance(value, dict):
        return {}, f"holds a JSON {_json_type(value)}, where a JSON object ({{...}}) belongs"
    return value, None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names = {str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- config.json --------------------------------------------------------------------------------


def read_model_config(folder: Path) -> ModelConfig:
    """Read and check `folder`'s config.json (and quantize_config.json, if it is used).

    Checks each field the engines use: its type and range, and that the fields agree with each
    other (not yet with the weights: see `check_tensors`).

    Raises:
        CheckpointError: Naming the file, the field, what it says and what was expected.
    """
    file = folder / "config.json"
    config = read_json_object(file)
    model_type = _architecture(config, file)

    def count(field: str, example: str, required: bool = True) -> int | None:
        if field not in config and not required:
            return None
        value = config.get(field)
        if field not in config:
            msg = f"{file} has no {field} (expected a positive integer, {example})."
            raise CheckpointError(msg)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_DIMENSION:
            msg = (
                f"{file} says {field}={show(value)}, but it must be a positive integer "
                f"(at most {MAX_DIMENSION:,}), {example}."
            )
            raise CheckpointError(msg)
        return value

    layers = count("num_hidden_layers", "32 for Synthia-7B")
    hidden = count("hidden_size", "4096 for Synthia-7B")
    intermediate = count("intermediate_size", "14336 for Synthia-7B")
    heads = count("num_attention_heads", "32 for Synthia-7B")
    kv_heads = count("num_key_value_heads", "8 for Synthia-7B")
    vocab = count("vocab_size", "32000 for Synthia-7B")
    positions = count("max_position_embeddings", "32768 for Synthia-7B", required=False)
    if config.get("head_dim") is None:
        if hidden % heads:
            msg = (
                f"{file} says hidden_size={hidden} and num_attention_heads={heads}, which do not "
                "divide: give head_dim, or the head count the weights were made with."
            )
            raise CheckpointError(msg)
        head_dim = hidden // heads
    else:
        head_dim = count("head_dim", "128 for Synthia-7B")
    if heads % kv_heads:
        msg = (
            f"{file} says num_attention_heads={heads} and num_key_value_heads={kv_heads}, but "
            "the attention heads must be a multiple of the key/value heads (32 and 8 for "
            "Synthia-7B)."
        )
        raise CheckpointError(msg)
    if model_type == "llama":  # no window: transformers' Llama ignores the field
        window = None
    elif "sliding_window" not in config:  # what transformers' MistralConfig then holds
        window = MISTRAL_SLIDING_WINDOW
    elif config["sliding_window"] is None:
        window = None
    else:
        window = count("sliding_window", "4096 for Synthia-7B, or null")
    eps = _positive_number(config, "rms_norm_eps", file, "1e-05 for Synthia-7B")
    rope = config.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        msg = (
            f"{file} says rope_parameters={show(rope)}, but it must be an object such as "
            '{"rope_theta": 10000.0, "rope_type": "default"}.'
        )
        raise CheckpointError(msg)
    if rope and rope.get("rope_theta") is not None:
        theta = _positive_number(
            rope, "rope_theta", file, "10000.0 for Synthia-7B", "rope_parameters."
        )
    elif config.get("rope_theta") is not None:
        theta = _positive_number(config, "rope_theta", file, "10000.0 for Synthia-7B")
    else:
        theta = 10000.0
    _check_rope_type(config, file)
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        msg = f"{file} says tie_word_embeddings={show(tied)}, but it must be true or false (JSON)."
        raise CheckpointError(msg)
    quant, where = quantization_config(folder, config)
    return ModelConfig(
        file=file, model_type=model_type, num_hidden_layers=layers, hidden_size=hidden,
        intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, vocab_size=vocab, rms_norm_eps=eps, rope_theta=theta,
        tie_word_embeddings=tied, quant=quant, quant_file=where, sliding_window=window,
        max_position_embeddings=positions,
    )  # fmt: skip


def _architecture(config: dict[str, Any], file: Path) -> str:
    """config.json's ``model_type`` if the engines run it; else a `CheckpointError` saying why."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        said = (
            f"says model_type={show(model_type)}" if "model_type" in config else "has no model_type"
        )
        msg = (
            f"{file} {said}, but langchain-synthia runs the Mistral and Llama architectures "
            '(model_type "mistral" or "llama") only: Synthia-7B is "mistral".'
        )
        raise CheckpointError(msg)
    # options of these architectures that change the arithmetic: the engines run the defaults
    expected = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for field, value in expected.items():
        given = config.get(field, value)
        if type(given) is not type(value) or given != value:
            msg = (
                f"{file} says {field}={show(config[field])}, but langchain-synthia runs "
                f"{model_type} models with {field}={show(value)} only (Synthia-7B's)."
            )
            raise CheckpointError(msg)
    return model_type


def _check_rope_type(config: dict[str, Any], file: Path) -> None:
    """Refuse RoPE scaling (``rope_scaling``, or a ``rope_type`` other than ``"default"``)."""
    scaling = config.get("rope_scaling")
    parameters = config.get("rope_parameters") or {}
    kind = parameters.get("rope_type", "default")
    if scaling is not None or kind != "default":
        field, value = (
            ("rope_scaling", scaling) if scaling is not None else ("rope_parameters", parameters)
        )
        msg = (
            f"{file} says {field}={show(value)}, but langchain-synthia runs plain rotary "
            'position embeddings only (rope_type "default", no rope_scaling), as Synthia-7B has.'
        )
        raise CheckpointError(msg)


def _positive_number(
    values: dict[str, Any], field: str, file: Path, example: str, prefix: str = ""
) -> float:
    value = values.get(field)
    if field not in values:
        msg = f"{file} has no {prefix}{field} (expected a positive number, {example})."
        raise CheckpointError(msg)
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not (math.isfinite(value) and value > 0):
        msg = (
            f"{file} says {prefix}{field}={show(value)}, but it must be a positive number, "
            f"{example}."
        )
        raise CheckpointError(msg)
    return float(value)


def quantization_config(
    folder: Path, config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """The checked GPTQ settings that loading honours, and where they are written.

    config.json's ``quantization_config`` wins, as in transformers; early TheBloke uploads keep
    them only in quantize_config.json.

    Raises:
        CheckpointError: If there are none, they are not GPTQ, or a value is not one the
            engines can honour.
    """
    file = folder / "config.json"
    if config is None:
        config = read_json_object(file)
    quant = config.get("quantization_config")
    legacy = folder / "quantize_config.json"
    if quant is None and legacy.exists():
        quant, where = {"quant_method": "gptq", **read_json_object(legacy)}, str(legacy)
    else:
        where = f"{file} (its quantization_config)"
    if quant is not None and not isinstance(quant, dict):
        msg = (
            f"{file} says quantization_config={show(quant)}, but it must be an object of GPTQ "
            'settings such as {"quant_method": "gptq", "bits": 4, "group_size": 128}.'
        )
        raise CheckpointError(msg)
    if not quant or quant.get("quant_method") != "gptq":
        msg = (
            f"{folder} is not a GPTQ checkpoint (config.json has no GPTQ quantization_config and "
            "there is no quantize_config.json). langchain-synthia loads GPTQ branches of "
            "TheBloke/Synthia-7B-v1.3-GPTQ or checkpoints in the same layout."
        )
        raise CheckpointError(msg)
    _check_quant_values(quant, where)
    return quant, where


def _check_quant_values(quant: dict[str, Any], where: str) -> None:
    """Refuse GPTQ settings that neither engine can honour (`where`: the file that says them)."""
    bits = quant.get("bits", 4)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
        msg = (
            f"{where} says bits={show(bits)}, but langchain-synthia loads 4-bit or 8-bit GPTQ "
            "weights only (Synthia's branches: main and gptq-4bit-* are 4-bit, gptq-8bit-* "
            'are 8-bit). Set "bits" to the width the checkpoint was quantised with (4 or 8), '
            "or download the branch again."
        )
        raise CheckpointError(msg)
    group = quant.get("group_size", -1)
    if (
        isinstance(group, bool)
        or not isinstance(group, int)
        or not (group == -1 or 0 < group <= MAX_DIMENSION)
    ):
        msg = (
            f"{where} says group_size={show(group)}, but a GPTQ group size is -1 (one group per "
            "column) or a positive number of rows such as 128, 64 or 32 (Synthia's branches)."
        )
        raise CheckpointError(msg)
    for key in ("desc_act", "sym"):
        if key in quant and not isinstance(quant[key], bool):
            msg = f"{where} says {key}={show(quant[key])}, but it must be true or false (JSON)."
            raise CheckpointError(msg)


# -- safetensors headers ------------------------------------------------------------------------


def read_header(path: Path, fix: str) -> dict[str, TensorHeader]:
    """The tensors that the safetensors file `path` holds, from its header alone.

    Checks what safetensors checks when it opens the file (the header is a JSON object of
    tensors whose dtype, shape and byte ranges agree and cover the data exactly), so that a
    truncated or corrupt file is named here, with `fix`.
    """
    fd, size = _open_regular(path)
    with os.fdopen(fd, "rb") as file:
        start = file.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
        if length is None or length > min(size - 8, MAX_JSON_BYTES):
            why = "no header" if length is None else f"a header length of {length:,} bytes"
            raise _unreadable(path, size, why, fix)
        header = file.read(length)
    if len(header) != length:
        raise _unreadable(path, size, "a header cut short", fix)
    entries, problem = _parse_json_object(header)
    if problem is not None:
        raise _unreadable(path, size, f"its header {problem}", fix)
    tensors: dict[str, TensorHeader] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in entries.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _unreadable(path, size, "__metadata__ that is not an object of strings", fix)
            continue
        tensor, begin, end = _tensor_entry(name, entry, path.name)
        if tensor is None:
            raise _unreadable(path, size, f"a header entry {show(name)} that is not a tensor", fix)
        tensors[name] = tensor
        ranges.append((begin, end, name))
    data = size - 8 - length
    covered = 0
    for begin, end, name in sorted(ranges):
        if begin != covered:
            raise _unreadable(path, size, f"tensor {show(name)} at bytes it cannot have", fix)
        covered = end
    if covered != data:
        cut = covered > data
        why = (
            f"{covered:,} bytes of tensor data in its header but {data:,} in the file"
            if cut
            else f"{data - covered:,} bytes after its last tensor"
        )
        raise _unreadable(path, size, why, fix)
    return tensors


def _tensor_entry(name: str, entry: Any, shard: str) -> tuple[TensorHeader | None, int, int]:
    """A header entry as a tensor and its byte range; ``None`` if it is not a valid one."""
    if not isinstance(entry, dict):
        return None, 0, 0
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    valid = (
        isinstance(dtype, str)
        and dtype in _DTYPE_BITS
        and isinstance(shape, list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)
    )
    if not valid or offsets[1] < offsets[0]:
        return None, 0, 0
    if math.prod(shape) * _DTYPE_BITS[dtype] != 8 * (offsets[1] - offsets[0]):
        return None, 0, 0
    return TensorHeader(dtype, tuple(shape), shard), offsets[0], offsets[1]


def _unreadable(path: Path, size: int, why: str, fix: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file ({why}): it is truncated or corrupt "
        f"({size:,} bytes), e.g. by an interrupted download or copy. {fix}"
    )


def read_headers(folder: Path, fix: str) -> dict[str, TensorHeader]:
    """Every tensor of `folder`'s safetensors shards, checked against the index if there is one.

    Raises:
        FileNotFoundError: If the index lists a shard that is not there.
        CheckpointError: For a broken index or shard (with `fix`, how to fetch it again).
    """
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        valid = isinstance(weight_map, dict) and all(
            isinstance(shard, str) and shard and Path(shard).name == shard
            for shard in weight_map.values()
        )
        if not valid:
            msg = (
                f"{index} says weight_map={show(weight_map)}, but a safetensors index maps "
                f"each tensor name to a shard's file name in the same folder. {fix}"
            )
            raise CheckpointError(msg)
        missing = sorted(set(weight_map.values()) - {shard.name for shard in shards})
        if missing:
            msg = (
                f"{folder} is incomplete: {index.name} lists {', '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not there (an interrupted download "
                f"or copy). {fix}"
            )
            raise FileNotFoundError(msg)
    tensors: dict[str, TensorHeader] = {}
    for shard in shards:
        for name, tensor in read_header(shard, fix).items():
            if name in tensors:
                msg = (
                    f"{folder} holds {name} twice, in {tensors[name].shard} and {shard.name}: "
                    f"one of them is not a shard of this checkpoint. {fix}"
                )
                raise CheckpointError(msg)
            tensors[name] = tensor
    return tensors


# -- the config against the tensors -------------------------------------------------------------


def _needed(config: ModelConfig) -> Iterator[str]:
    """The names of the tensors the model needs, in order."""
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    if not config.tie_word_embeddings:
        yield "lm_head.weight"
    for index in range(config.num_hidden_layers):
        layer = f"model.layers.{index}"
        for norm in LAYER_NORMS:
            yield f"{layer}.{norm}"
        for linear in LINEARS:
            for part in GPTQ_PARTS:
                yield f"{layer}.{linear}.{part}"


def check_tensors(
    config: ModelConfig, tensors: dict[str, TensorHeader], folder: Path, fix: str
) -> None:
    """Refuse a checkpoint whose tensors are missing, or whose shapes `config` does not give.

    Takes time in proportion to the tensors present, whatever layer count the config claims.

    Raises:
        CheckpointError: Naming the field and the tensor that disagree.
    """
    _check_tensor_names(config, tensors, folder, fix)
    file, hidden, vocab = config.file, config.hidden_size, config.vocab_size
    _expect(tensors, "model.norm.weight", (hidden,), f"{file} says hidden_size={hidden}")
    both = f"{file} says vocab_size={vocab} and hidden_size={hidden}"
    _expect(tensors, "model.embed_tokens.weight", (vocab, hidden), both)
    if "lm_head.weight" in tensors:
        _expect(tensors, "lm_head.weight", (vocab, hidden), both)
    for index in range(config.num_hidden_layers):
        layer = f"model.layers.{index}"
        for norm in LAYER_NORMS:
            _expect(tensors, f"{layer}.{norm}", (hidden,), f"{file} says hidden_size={hidden}")
        for linear in LINEARS:
            _check_linear(config, tensors, f"{layer}.{linear}", fix)


def _check_tensor_names(
    config: ModelConfig, tensors: dict[str, TensorHeader], folder: Path, fix: str
) -> None:
    layers = config.num_hidden_layers
    present = {int(match[1]) for name in tensors if (match := _LAYER_TENSOR.fullmatch(name))}
    extra = sorted(index for index in present if index >= layers)
    if extra:
        msg = (
            f"{config.file} says num_hidden_layers={layers}, but the safetensors in {folder} "
            f"also hold model.layers.{extra[0]}{' and more' if len(extra) > 1 else ''}: set "
            f'"num_hidden_layers": {max(present) + 1} if they are the model\'s layers.'
        )
        raise CheckpointError(msg)
    top = list(_needed(replace(config, num_hidden_layers=0)))
    total = len(top) + layers * len(_LAYER_SUFFIXES)
    found = sum(name in tensors for name in top) + sum(
        1
        for name in tensors
        if (match := _LAYER_TENSOR.fullmatch(name))
        and int(match[1]) < layers
        and match[2] in _LAYER_SUFFIXES
    )
    if found == total:
        return
    # the first three absent: found after at most as many names as there are tensors
    examples = list(itertools.islice((n for n in _needed(config) if n not in tensors), 3))
    hint = ""
    if present and layers > len(present):
        hint = (
            f" ({config.file} says num_hidden_layers={layers}; the safetensors hold "
            f"model.layers.0 to model.layers.{max(present)}: set "
            f'"num_hidden_layers": {len(present)} if the config is wrong)'
        )
    msg = (
        f"{folder} lacks {total - found} of the model's {total} tensors (e.g. "
        f"{', '.join(examples)}): a weights file is missing or incomplete{hint}. {fix}"
    )
    raise CheckpointError(msg)


def _expect(
    tensors: dict[str, TensorHeader], name: str, shape: tuple[int, ...], because: str
) -> None:
    tensor = tensors[name]
    if tensor.shape != shape:
        msg = (
            f"{because}, which makes {name} {list(shape)}, but {tensor.shard} has it as "
            f"{list(tensor.shape)}: the config does not describe these weights."
        )
        raise CheckpointError(msg)


def _check_linear(
    config: ModelConfig, tensors: dict[str, TensorHeader], name: str, fix: str
) -> None:
    """One GPTQ linear layer's four tensors against the config's sizes and GPTQ settings."""
    file, where = config.file, config.quant_file
    heads, kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_width = f"num_attention_heads={heads} and head_dim={head_dim}"
    kv_width = f"num_key_value_heads={kv} and head_dim={head_dim}"
    hidden = (config.hidden_size, f"hidden_size={config.hidden_size}")
    inter = (config.intermediate_size, f"intermediate_size={config.intermediate_size}")
    sizes = {
        "self_attn.q_proj": (hidden, (heads * head_dim, q_width)),
        "self_attn.k_proj": (hidden, (kv * head_dim, kv_width)),
        "self_attn.v_proj": (hidden, (kv * head_dim, kv_width)),
        "self_attn.o_proj": ((heads * head_dim, q_width), hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    (inputs, says_in), (outputs, says_out) = sizes[name.split(".", 3)[3]]
    bits, group = config.bits, config.group_size
    pack = 32 // bits
    qweight = tensors[f"{name}.qweight"]
    scales, qzeros = tensors[f"{name}.scales"], tensors[f"{name}.qzeros"]
    _expect(tensors, f"{name}.g_idx", (inputs,), f"{file} says {says_in}")
    for tensor, part in ((qweight, "qweight"), (qzeros, "qzeros")):
        if tensor.dtype != "I32" or len(tensor.shape) != 2:
            msg = (
                f"{name}.{part} in {tensor.shard} is {tensor.dtype} {list(tensor.shape)}, but "
                f"GPTQ packs it as a 2-D I32 tensor: not a GPTQ checkpoint in TheBloke's "
                f"layout. {fix}"
            )
            raise CheckpointError(msg)
    rows, shard = qweight.shape[0], qweight.shard
    if rows * 32 != inputs * bits:
        actual = f"{rows * 32 // inputs}-bit weights" if rows * 32 % inputs == 0 else "no width"
        msg = (
            f"{where} says bits={bits}, but {name}.qweight in {shard} has {rows} rows "
            f"for {inputs} input features: {actual}. Set "
            '"bits" to the width the weights have, or download the branch again.'
        )
        raise CheckpointError(msg)
    _expect(tensors, f"{name}.qweight", (inputs // pack, outputs), f"{file} says {says_out}")
    expected = 1 if group == -1 else -(-inputs // group)
    if len(scales.shape) != 2:
        _expect(tensors, f"{name}.scales", (expected, outputs), f"{file} says {says_out}")
    groups = scales.shape[0]
    if groups != expected:
        actual = -1 if groups == 1 else inputs // max(groups, 1)
        msg = (
            f"{where} says group_size={group}, but {name}.scales in {scales.shard} has "
            f"{groups} groups for {inputs} input features: group_size={actual}. Set "
            f'"group_size": {actual}, or download the branch again.'
        )
        raise CheckpointError(msg)
    _expect(tensors, f"{name}.scales", (groups, outputs), f"{file} says {says_out}")
    if outputs % pack:
        msg = f"{file} says {says_out}: {outputs} outputs, which {bits}-bit GPTQ cannot pack."
        raise CheckpointError(msg)
    _expect(tensors, f"{name}.qzeros", (groups, outputs // pack), f"{file} says {says_out}")
