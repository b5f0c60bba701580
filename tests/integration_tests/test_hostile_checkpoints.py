"""Hostile checkpoint folders: each is refused quickly, by name, before any model is built.

The checks (`validate_checkpoint` then `check_weights`, what both engines and ``synthia
download`` run first) read the JSON configs and the safetensors headers only. Whatever a
config.json or a header says (wrong types, negative, huge, strings, nested junk, missing
fields), the outcome is either a checkpoint that loads or a `CheckpointError` (a `ValueError`)
naming the file and the field, within a time and memory bound; never a raw `KeyError`,
`TypeError` or `AttributeError`, never a hang on a FIFO.
"""

import copy
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langchain_synthia import ChatSynthia, _loading
from langchain_synthia._checkpoint import CheckpointError
from langchain_synthia._loading import check_weights, validate_checkpoint
from tests.helpers import DEVICE

FIX = "Copy or download that file into the folder again."
SECONDS = 2.0
"""Loose bound on one check of a hostile folder (a good one takes milliseconds)."""
PEAK_BYTES = 64 << 20
"""Loose bound on the memory one check allocates (Python objects, as tracemalloc sees them)."""
MISSING = object()
"""A field's value that means: remove the field."""


@pytest.fixture(scope="module")
def pristine(tiny_model: str) -> dict[str, Any]:
    return json.loads((Path(tiny_model) / "config.json").read_text())


@pytest.fixture(scope="module")
def linked(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder whose files link to the tiny checkpoint's, config.json a copy."""
    folder = tmp_path_factory.mktemp("linked")
    for item in Path(tiny_model).iterdir():
        if item.name == "config.json":
            shutil.copy2(item, folder / item.name)
        else:
            (folder / item.name).symlink_to(item)
    return folder


def check(folder: Path) -> tuple[float, int]:
    """Run the load's checks on `folder`; their time and peak allocation (raises what they do)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        check_weights(folder, validate_checkpoint(folder), FIX)
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return elapsed, peak


def refused(folder: Path) -> tuple[CheckpointError | None, float, int]:
    """`check`, with the error it raised (``None`` if the folder passed).

    Anything but a `CheckpointError` fails the test, and so does a check over the bounds.
    """
    tracemalloc.start()
    start = time.perf_counter()
    error = None
    try:
        check_weights(folder, validate_checkpoint(folder), FIX)
    except CheckpointError as raised:
        error = raised
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < SECONDS, elapsed
    assert peak < PEAK_BYTES, peak
    return error, elapsed, peak


# -- the layer count of the issue -----------------------------------------------------------------


@pytest.mark.parametrize("layers", [3, 64, 3_000_000, 10**8, 2**31 - 1])
def test_a_layer_count_the_weights_do_not_have_is_refused_at_once(
    linked: Path, pristine: dict, layers: int
) -> None:
    (linked / "config.json").write_text(json.dumps({**pristine, "num_hidden_layers": layers}))
    try:
        error, _, _ = refused(linked)
    finally:
        (linked / "config.json").write_text(json.dumps(pristine))
    assert error is not None
    message = str(error)
    assert f"lacks {layers * 30 - 60} of the model's {layers * 30 + 3} tensors" in message
    assert f"{linked / 'config.json'} says num_hidden_layers={layers}" in message
    assert 'set "num_hidden_layers": 2 if the config is wrong' in message


def test_layers_the_config_does_not_count_are_refused(linked: Path, pristine: dict) -> None:
    (linked / "config.json").write_text(json.dumps({**pristine, "num_hidden_layers": 1}))
    try:
        error, _, _ = refused(linked)
    finally:
        (linked / "config.json").write_text(json.dumps(pristine))
    assert str(error) == (
        f"{linked / 'config.json'} says num_hidden_layers=1, but the safetensors in {linked} "
        'also hold model.layers.1: set "num_hidden_layers": 2 if they are the model\'s layers.'
    )


ENGINES = ["fast", "transformers"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("num_hidden_layers", 3_000_000, "num_hidden_layers=3000000"),
        ("num_hidden_layers", "2", "num_hidden_layers='2', but it must be a positive integer"),
        ("num_hidden_layers", -2, "num_hidden_layers=-2, but it must be a positive integer"),
        ("quantization_config", "gptq", "quantization_config='gptq', but it must be an object"),
        ("hidden_size", 256, "hidden_size=256, which makes model.norm.weight [256]"),
    ],
)
def test_a_load_names_the_file_and_field_and_builds_nothing(
    tiny_model: str, tmp_path: Path, engine: str, field: str, value: Any, says: str
) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "checkpoint"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    chat = ChatSynthia(model=str(folder), device=DEVICE, engine=engine, max_tokens=4)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        chat.invoke("Hi")
    assert time.perf_counter() - start < 10 * SECONDS  # the first call imports the stack
    assert f"{folder / 'config.json'} says {says}" in str(caught.value)
    assert not [s for s in _loading.loaded_engines() if s.model == str(folder)]


# -- any field, any value -------------------------------------------------------------------------

JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**31 - 8, max_value=2**70)
    | st.integers(min_value=-(2**40), max_value=0)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["32", "4096", "gptq", "", "nan", "-1"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
"""Any JSON value: scalars of every type and size, and lists and objects of them."""

SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
         "num_key_value_heads", "vocab_size")  # fmt: skip
"""Fields whose only valid value is the tiny checkpoint's own (its weights' sizes)."""
COUNTS = ("max_position_embeddings", "sliding_window")
"""Fields that may be any positive integer (sliding_window: or null)."""
QUANT_FIELDS = ("bits", "group_size", "desc_act", "sym", "quant_method")
FIELDS = (*SIZES, *COUNTS, "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta",
          "tie_word_embeddings", "quantization_config",
          *(f"quantization_config.{name}" for name in QUANT_FIELDS))  # fmt: skip
"""Every config field the engines read ("a.b": field b of the object a)."""


def _positive_int(value: Any) -> bool:
    return type(value) is int and 0 < value < 2**31


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def acceptable(field: str, value: Any, pristine: dict) -> bool:
    """Whether the tiny checkpoint with `field` set to `value` can load (an oracle)."""
    original = pristine
    for part in field.split("."):
        original = original.get(part, MISSING) if isinstance(original, dict) else MISSING
    if field in SIZES:
        return value == original and type(value) is int
    if field in COUNTS:
        return (
            value is MISSING
            or _positive_int(value)
            or (field == "sliding_window" and value is None)
        )
    if field == "head_dim":  # hidden_size / num_attention_heads when not given
        return value in (MISSING, None) or (type(value) is int and value == original)
    if field == "rms_norm_eps":
        return _positive_number(value)
    if field == "rope_parameters":
        if value is MISSING or value is None or value == {}:
            return True
        theta = value.get("rope_theta") if isinstance(value, dict) else MISSING
        return isinstance(value, dict) and (theta is None or _positive_number(theta))
    if field == "rope_theta":  # read only when rope_parameters has none
        return True
    if field == "tie_word_embeddings":
        return value is MISSING or type(value) is bool
    if field == "quantization_config":  # absent: quantize_config.json (the same settings)
        return value in (MISSING, None) or value == original
    name = field.split(".")[1]
    if name in ("desc_act", "sym"):
        return value is MISSING or type(value) is bool
    if name == "bits":
        return value is MISSING or (type(value) is int and value == 4)
    if name == "group_size":
        return type(value) is int and value == original
    return value == "gptq"  # quant_method


def with_field(pristine: dict, field: str, value: Any) -> dict:
    config = copy.deepcopy(pristine)
    *outer, name = field.split(".")
    target = config
    for part in outer:
        target = target[part]
    if value is MISSING:
        target.pop(name, None)
    else:
        target[name] = value
    return config


def test_any_value_of_any_field_loads_or_is_refused_by_name(linked: Path, pristine: dict) -> None:
    """The outcome follows `acceptable`; a refusal names config.json and the field."""
    outcomes: Counter = Counter()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(field=st.sampled_from(FIELDS), value=st.just(MISSING) | JUNK)
    def loads_or_is_refused(field: str, value: Any) -> None:
        (linked / "config.json").write_text(json.dumps(with_field(pristine, field, value)))
        error, _, _ = refused(linked)
        expected = acceptable(field, value, pristine)
        assert (error is None) == expected, (field, value, error)
        outcomes["loads" if expected else "refused"] += 1
        if error is not None:
            message = str(error)
            assert "config.json" in message
            name = field.split(".")[-1]
            named = name in message or (name == "quant_method" and "not a GPTQ" in message)
            assert named or ("quantization_config" in field and "quantization_config" in message)
            assert len(message) < 2000

    try:
        loads_or_is_refused()
    finally:
        (linked / "config.json").write_text(json.dumps(pristine))
    assert sum(outcomes.values()) == 300
    assert outcomes["refused"] >= 150


NOT_AN_OBJECT = (
    JUNK.filter(lambda value: not isinstance(value, dict)).map(json.dumps).map(str.encode)
    | st.binary(max_size=64)
    | st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth)
    | st.sampled_from([b"", b"{", b"\xff\xfe{}", b'{"a": 1e99999}', b"1" * 5000, b"NaN"])
)
"""config.json contents that are no JSON object of the fields: other JSON, bytes, deep nests."""


def test_a_config_that_is_no_json_object_is_refused_by_name(linked: Path, pristine: dict) -> None:
    tried: list[bytes] = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(content=NOT_AN_OBJECT)
    def refused_by_name(content: bytes) -> None:
        (linked / "config.json").write_bytes(content)
        tried.append(content)
        error, _, _ = refused(linked)
        assert error is not None
        assert str(error).startswith(f"{linked / 'config.json'} ")

    try:
        refused_by_name()
    finally:
        (linked / "config.json").write_text(json.dumps(pristine))
    assert len(tried) == 100


# -- safetensors headers -------------------------------------------------------------------------

ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F16", "I32", "F32", "U8", "Q4", ""]) | JUNK,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | JUNK,
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | JUNK,
    },
)
HEADER = st.dictionaries(st.text(max_size=30), ENTRY | JUNK, max_size=5)


@pytest.fixture(scope="module")
def config_only(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder with the tiny one's configs and tokenizer, and no weights yet."""
    folder = tmp_path_factory.mktemp("headers")
    for item in Path(tiny_model).iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).symlink_to(item)
    return folder


DTYPE_BYTES = {"F16": 2, "I32": 4, "F32": 4, "U8": 1, "I64": 8}


@st.composite
def shards(draw: st.DrawFn) -> bytes:
    """A safetensors file: a valid one, one cut or padded, one with a junk header, or junk."""
    kind = draw(st.sampled_from(["valid", "off by some bytes", "junk header", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=80))
    if kind == "junk header":
        header = draw(HEADER.map(lambda h: json.dumps(h).encode()) | st.just(b"[" * 100_000))
        claimed = draw(st.none() | st.integers(0, 2**64 - 1))
        length = len(header) if claimed is None else claimed
        return struct.pack("<Q", length) + header + draw(st.binary(max_size=64))
    names = draw(st.lists(st.text(min_size=1, max_size=12), max_size=4, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BYTES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), JUNK, max_size=2))
    data = draw(st.binary(min_size=offset, max_size=offset))
    if kind == "off by some bytes":
        change = draw(st.integers(-offset, 16).filter(bool))
        data = data[:change] if change < 0 else data + b"\0" * change
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_any_safetensors_file_is_read_as_safetensors_reads_it(config_only: Path) -> None:
    """The header check accepts what safetensors itself opens and refuses the rest, by name.

    No such file holds the model's tensors: the load is refused either way, for the file or for
    the tensors it lacks.
    """
    from safetensors import safe_open

    shard = config_only / "model.safetensors"
    outcomes: Counter = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(content=shards())
    def read_as_safetensors_does(content: bytes) -> None:
        shard.write_bytes(content)
        try:
            with safe_open(shard, framework="pt"):
                opens = True
        except Exception:  # any refusal of safetensors'
            opens = False
        error, _, _ = refused(config_only)
        assert error is not None
        message = str(error)
        if opens:
            assert message.startswith(f"{config_only} lacks "), message
        else:
            assert message.startswith(f"{shard} is not a readable safetensors file ("), message
            assert message.endswith(FIX)
        outcomes[opens] += 1

    try:
        read_as_safetensors_does()
    finally:
        shard.unlink(missing_ok=True)
    assert sum(outcomes.values()) == 300
    assert outcomes[True] >= 30
    assert outcomes[False] >= 150


def test_a_file_shorter_than_a_header_length_is_refused(config_only: Path) -> None:
    shard = config_only / "model.safetensors"
    for content in (b"", b"\x01", b"\x00" * 7):
        shard.write_bytes(content)
        error, _, _ = refused(config_only)
        assert f"{shard} is not a readable safetensors file (no header)" in str(error)
    shard.unlink()


# -- files that are not files ---------------------------------------------------------------------


CHILD = """
import json, sys
from pathlib import Path
folder, engine = Path(sys.argv[1]), sys.argv[2]
try:
    if engine == "none":  # the checks alone
        from langchain_synthia._loading import check_weights, validate_checkpoint
        check_weights(folder, validate_checkpoint(folder), "FIX")
    else:
        from langchain_synthia import ChatSynthia
        ChatSynthia(model=str(folder), device=sys.argv[3], engine=engine, max_tokens=4).invoke("Hi")
except Exception as error:
    print(json.dumps([type(error).__name__, str(error)]))
"""
"""Loads or checks a folder, printing the error; in a child process, as a load that blocks in
native code (safetensors opening a FIFO) holds the GIL, so no thread of the test could end it."""


def error_in_child(folder: Path, engine: str = "none") -> tuple[str, str]:
    """The class name and message of the error that loading `folder` raises (fails on a hang)."""
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), engine, DEVICE],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {folder} hung")
    assert done.stdout, done.stderr
    name, message = json.loads(done.stdout.splitlines()[-1])
    return name, message


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        ("model.safetensors", "fast"),
        ("model.safetensors", "transformers"),
        ("config.json", "fast"),
        ("tokenizer.json", "transformers"),
        ("quantize_config.json", "fast"),
    ],
)
def test_a_fifo_among_the_files_is_refused_without_waiting(
    tiny_model: str, tmp_path: Path, name: str, engine: str
) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "checkpoint"))
    (folder / name).unlink()
    os.mkfifo(folder / name)
    assert error_in_child(folder, engine) == (
        "CheckpointError",
        f"{folder / name} is a FIFO (named pipe), not a regular file: replace it with the file.",
    )


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda path: path.symlink_to("/dev/zero"), "a character device"),
        (lambda path: path.mkdir(), "a folder"),
    ],
    ids=["device", "folder"],
)
def test_a_device_or_folder_named_like_a_shard_is_refused(
    tiny_model: str, tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "checkpoint"))
    shard = folder / "model.safetensors"
    shard.unlink()
    make(shard)
    assert error_in_child(folder) == (
        "CheckpointError",
        f"{shard} is {kind}, not a regular file: replace it with the file.",
    )


def test_links_to_files_outside_the_folder_are_followed(linked: Path) -> None:
    """As in the Hugging Face cache, whose snapshots link to blobs elsewhere."""
    assert (linked / "model.safetensors").is_symlink()
    error, elapsed, _ = refused(linked)
    assert error is None
    assert elapsed < SECONDS
