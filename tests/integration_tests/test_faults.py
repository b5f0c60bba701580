"""Faults, on the CPU: out of memory mid-generation, broken checkpoints, downloads cut short.

* Out of memory (simulated: the model's prefill or decode step raises `torch.OutOfMemoryError`
  once): every request in flight gets an error that names the settings that make the model
  fit, still a `torch.OutOfMemoryError` (and a `MemoryError`) caused by the original, and the
  same engine then answers as before the fault, with every cache row free.
* A checkpoint with a truncated, garbage or missing shard, or GPTQ settings that its weights
  do not match, is refused with the file and the fix; nothing stays loaded, and once the folder
  is repaired the same settings load and answer.
* A download cut short: huggingface-hub resumes it (``test_download.py`` proves that against a
  Hub on loopback). Here, offline: what a cut leaves in the Hugging Face cache is refused,
  not loaded, and nothing we pass to huggingface-hub turns resuming off.
"""

import functools
import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from langchain_synthia import ChatSynthia
from langchain_synthia._fast_engine import EngineOutOfMemoryError
from langchain_synthia._loading import loaded_engines, unload
from tests.helpers import DEVICE, fast_chat, loaded_from

pytestmark = pytest.mark.gpu  # the GPU tier: SYNTHIA_TEST_DEVICE=cuda pytest -m gpu

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 7.79 GiB "
    "of which 3.19 MiB is free."
)
FIXES = ("gpu_memory_utilization", "max_batch_size", "revision='main'", "4-bit")
"""What an out-of-memory error must name: less memory for the KV cache, a smaller batch, a
smaller branch."""

DOING = {"prefill": "prefilling", "decode": "decoding"}


def engine_for(chat: ChatSynthia):
    return chat._engine_for(chat.model, chat.revision)


def out_of_memory_once(engine, monkeypatch, phase: str, rows: int = 1) -> list[BaseException]:
    """Make the engine's next prefill or decode step with `rows` busy rows run out of memory.

    A prefill that runs out of memory is tried again in smaller passes: here they run out of
    memory too, until the engine gives the request up. Returns the list that receives the
    errors raised (empty while none was).
    """
    raised: list[BaseException] = []
    armed = [True]
    method = "prefill_many" if phase == "prefill" else "decode"
    original = getattr(engine.model, method)

    def fail(*args):
        if armed[0] and sum(row is not None for row in engine._slots) >= rows:
            raised.append(torch.OutOfMemoryError(CUDA_OOM))
            armed[0] = phase == "prefill"
            raise raised[-1]
        return original(*args)

    def give_up(*args):
        armed[0] = False
        return report(*args)

    report = engine._out_of_memory
    monkeypatch.setattr(engine, "_out_of_memory", give_up)
    monkeypatch.setattr(engine.model, method, fail)
    monkeypatch.setattr(engine.runner, "graphs", {})  # on CUDA: decode steps eagerly, patched
    return raised


@pytest.fixture
def empty_cache(monkeypatch) -> list[int]:
    """Calls of `torch.cuda.empty_cache` during the test (passed on to it)."""
    calls: list[int] = []
    original = torch.cuda.empty_cache
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (calls.append(1), original())[1])
    return calls


def assert_names_the_fixes(error: BaseException, cause: BaseException) -> None:
    assert isinstance(error, EngineOutOfMemoryError)
    assert isinstance(error, torch.OutOfMemoryError)  # what callers catch today still catches it
    assert isinstance(error, MemoryError)
    assert error.__cause__ is cause
    message = str(error)
    assert CUDA_OOM.removesuffix(".") in message
    assert all(fix in message for fix in FIXES), message


def answer(chat: ChatSynthia, question: str, call: str) -> str:
    if call == "invoke":
        return chat.invoke(question).content
    return "".join(chunk.content for chunk in chat.stream(question))


def assert_rows_free(engine) -> None:
    assert engine._slots == [None] * len(engine._slots)
    assert engine.num_waiting == 0
    assert not engine.runner.busy.any()
    assert engine.blocks.num_committed_blocks == 0  # every request's blocks given back


# -- out of memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["invoke", "stream"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_out_of_memory_names_the_fixes_and_the_engine_serves_on(
    tiny_model: str, monkeypatch, empty_cache: list[int], phase: str, call: str
) -> None:
    chat = fast_chat(tiny_model, prefix_caching=False)  # every call prefills
    engine = engine_for(chat)
    question = "Why is the sky blue?"
    before = chat.invoke(question).content
    emptied = len(empty_cache)  # loading a CUDA engine empties it too
    raised = out_of_memory_once(engine, monkeypatch, phase)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        answer(chat, question, call)
    assert raised, "no fault was injected"
    assert_names_the_fixes(caught.value, raised[-1])
    message = str(caught.value)
    assert f"while {DOING[phase]} (1 request stopped)" in message
    assert "max_batch_size (64 now)" in message
    assert_rows_free(engine)
    if DEVICE.startswith("cuda"):  # at each smaller pass, and when the request is given up
        assert len(empty_cache) - emptied >= 1
    else:
        assert len(empty_cache) == emptied
    assert answer(chat, question, call) == before  # the same engine, as before the fault
    assert engine_for(chat) is engine


def test_out_of_memory_stops_every_request_in_flight_and_frees_their_rows(
    tiny_model: str, monkeypatch
) -> None:
    chat = fast_chat(tiny_model, max_tokens=200, stop_at_user_turn=False, prefix_caching=False)
    engine = engine_for(chat)
    questions = ["Tell me a long story", "Why is the sky blue?"]
    alone = [chat.invoke(q).content for q in questions]
    raised = out_of_memory_once(engine, monkeypatch, "decode", rows=2)
    results = chat.batch(questions, return_exceptions=True)
    assert raised, "the two requests never decoded together"
    assert all(isinstance(result, EngineOutOfMemoryError) for result in results), results
    for result in results:
        assert_names_the_fixes(result, raised[-1])
        assert "while decoding (2 requests stopped)" in str(result)
    assert_rows_free(engine)
    assert [m.content for m in chat.batch(questions)] == alone


def test_out_of_memory_on_cuda_hands_the_cached_memory_back(tiny_model: str, monkeypatch) -> None:
    """On a CUDA engine the allocator's cache is emptied (the CPU engine plays one here: the
    fault comes before anything else reads its device)."""
    chat = fast_chat(tiny_model, prefix_caching=False)  # every call prefills
    engine = engine_for(chat)  # loaded (on CUDA that empties the cache too) before the spy
    device = engine.device
    empty_cache: list[int] = []
    monkeypatch.setattr(engine, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: empty_cache.append(1))
    raised = out_of_memory_once(engine, monkeypatch, "prefill")
    with pytest.raises(EngineOutOfMemoryError, match="Out of GPU memory while prefilling"):
        chat.invoke("Hi")
    assert raised
    assert empty_cache[-1:] == [1]  # when the request is given up (after the smaller passes)
    monkeypatch.setattr(engine, "device", device)
    assert chat.invoke("Hi", max_tokens=3).usage_metadata["output_tokens"] == 3


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="a real CUDA allocator is needed")
def test_a_real_cuda_out_of_memory_is_survived(tiny_model: str, monkeypatch) -> None:
    """The allocator's own error (a prefill asking for far more than the card has): once, the
    prefill goes on in smaller passes and answers; every time, the call fails alone."""
    chat = fast_chat(tiny_model, prefix_caching=False)  # every call prefills
    engine = engine_for(chat)
    before = chat.invoke("Hi").content
    prefill = engine.model.prefill_many
    asked: list[int] = []
    always = [False]

    def too_big(*args):
        if always[0] or not asked:
            asked.append(torch.cuda.get_device_properties(engine.device).total_memory * 2)
            torch.empty(asked[-1], dtype=torch.uint8, device=engine.device)
        return prefill(*args)

    monkeypatch.setattr(engine.model, "prefill_many", too_big)
    splits = engine.prefill_splits
    assert chat.invoke("Hi").content == before
    assert engine.prefill_splits > splits
    always[0] = True
    with pytest.raises(
        torch.OutOfMemoryError, match="Out of GPU memory while prefilling"
    ) as caught:
        chat.invoke("Hi")
    assert type(caught.value.__cause__) is torch.OutOfMemoryError
    assert all(fix in str(caught.value) for fix in FIXES)
    assert_rows_free(engine)
    always[0] = False
    asked.append(0)
    assert chat.invoke("Hi").content == before


# -- broken checkpoints --------------------------------------------------------------------------

ENGINES = ["fast", "transformers"]
QUESTION = "Why is the sky blue?"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def chat_on(model: str | Path, engine: str, **kwargs) -> ChatSynthia:
    options = {"max_tokens": 8, "temperature": 0, "timeout": 60, "context_window": 256,
               "max_batch_size": 1, **kwargs}  # fmt: skip
    return ChatSynthia(model=str(model), device=DEVICE, engine=engine, **options)


@functools.cache
def intact_answer(tiny_model: str, engine: str) -> str:
    return chat_on(tiny_model, engine).invoke(QUESTION).content


@pytest.fixture
def folder(tiny_model: str, tmp_path: Path) -> Iterator[Path]:
    """A copy of the tiny checkpoint to break; what loads from it is closed and forgotten after."""
    copy = Path(shutil.copytree(tiny_model, tmp_path / "checkpoint"))
    yield copy
    for settings in loaded_engines():
        if settings.model.startswith(str(tmp_path)):
            unload(settings)


def split_in_two(folder: Path) -> dict[str, torch.Tensor]:
    """Make `folder` a sharded checkpoint (two shards and an index); the second shard's tensors."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for shard, part in zip(SHARDS, halves, strict=True):
        save_file({name: tensors[name] for name in part}, folder / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return {name: tensors[name] for name in halves[1]}


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (cut_in_half, "is not a readable safetensors file .*: it is truncated or corrupt"),
        (garbage, "is not a readable safetensors file .*: it is truncated or corrupt"),
    ],
    ids=["truncated", "garbage"],
)
def test_a_broken_shard_is_named_and_nothing_stays_loaded(
    tiny_model: str, folder: Path, engine: str, damage: Callable, match: str
) -> None:
    shard = folder / "model.safetensors"
    damage(shard)
    with pytest.raises(ValueError, match=match) as caught:
        chat_on(folder, engine).invoke(QUESTION)
    message = str(caught.value)
    assert str(shard) in message
    assert f"Copy or download that file into {folder} again." in message
    assert loaded_from(folder) == []
    shutil.copy2(Path(tiny_model) / "model.safetensors", shard)  # repaired
    assert chat_on(folder, engine).invoke(QUESTION).content == intact_answer(tiny_model, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_shard_missing_from_a_sharded_checkpoint_is_named(
    tiny_model: str, folder: Path, engine: str
) -> None:
    second = split_in_two(folder)
    (folder / SHARDS[1]).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        chat_on(folder, engine).invoke(QUESTION)
    message = str(caught.value)
    assert f"{folder} is incomplete: model.safetensors.index.json lists {SHARDS[1]}" in message
    assert "Copy or download that file into" in message
    assert loaded_from(folder) == []
    save_file(second, folder / SHARDS[1], {"format": "pt"})  # repaired: a whole sharded checkpoint
    assert chat_on(folder, engine).invoke(QUESTION).content == intact_answer(tiny_model, engine)


def test_a_shard_missing_without_an_index_is_refused(tiny_model: str, folder: Path) -> None:
    """No index to name the file: the tensors that are missing are named instead."""
    split_in_two(folder)
    (folder / SHARDS[1]).unlink()
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"lacks \d+ of the model's \d+ tensors \(e\.g\. model\."):
        chat_on(folder, "fast").invoke(QUESTION)
    assert loaded_from(folder) == []


def set_quantization(folder: Path, legacy: bool = False, **values) -> None:
    """Change the GPTQ settings where loading reads them (config.json, or quantize_config.json
    alone in the legacy layout)."""
    config = json.loads((folder / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    if legacy:
        legacy_quant = json.loads((folder / "quantize_config.json").read_text())
        (folder / "quantize_config.json").write_text(json.dumps({**legacy_quant, **values}))
    else:
        config["quantization_config"] = {**quant, **values}
    (folder / "config.json").write_text(json.dumps(config))


QUANT_FAULTS = {
    "bits3": ({"bits": 3}, r"says bits=3, but langchain-synthia loads 4-bit or 8-bit"),
    "bits8": (
        {"bits": 8},
        r"says bits=8, but model\.layers\.0\.self_attn\.q_proj\.qweight in model\.safetensors "
        r"has 16 rows for 128 input features: 4-bit weights",
    ),
    "group64": (
        {"group_size": 64},
        r"says group_size=64, but model\.layers\.0\.self_attn\.q_proj\.scales in "
        r"model\.safetensors has 4 groups for 128 input features: group_size=32",
    ),
    "group_text": ({"group_size": "32"}, r"says group_size='32', but a GPTQ group size is -1"),
    "desc_act_text": ({"desc_act": "yes"}, r"says desc_act='yes', but it must be true or false"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", list(QUANT_FAULTS))
def test_gptq_settings_the_weights_do_not_match_are_refused(
    tiny_model: str, folder: Path, engine: str, fault: str
) -> None:
    values, match = QUANT_FAULTS[fault]
    original = (folder / "config.json").read_text()
    set_quantization(folder, **values)
    with pytest.raises(ValueError, match=match) as caught:
        chat_on(folder, engine).invoke(QUESTION)
    assert f"{folder / 'config.json'} (its quantization_config) says" in str(caught.value)
    assert loaded_from(folder) == []
    (folder / "config.json").write_text(original)  # repaired
    assert chat_on(folder, engine).invoke(QUESTION).content == intact_answer(tiny_model, engine)


def test_a_wrong_legacy_quantize_config_json_is_named(tiny_model: str, folder: Path) -> None:
    """Early uploads keep the GPTQ settings in quantize_config.json only (the fast engine reads
    them there; the transformers engine does not load that layout)."""
    set_quantization(folder, legacy=True, group_size=128)
    with pytest.raises(ValueError, match="group_size=32") as caught:
        chat_on(folder, "fast").invoke(QUESTION)
    assert str(caught.value).startswith(f"{folder / 'quantize_config.json'} says group_size=128")
    assert loaded_from(folder) == []
    set_quantization(folder, legacy=True, group_size=32)
    assert chat_on(folder, "fast").invoke(QUESTION).content == intact_answer(tiny_model, "fast")


def test_asymmetric_weights_are_refused_by_the_marlin_kernel(folder: Path) -> None:
    """gptqmodel's Marlin ignores zero points: ``sym: false`` with it would load wrong weights."""
    set_quantization(folder, sym=False)
    with pytest.raises(ValueError, match=r"sym=false .*kernel='gptq_marlin' cannot read: pass "):
        chat_on(folder, "fast", kernel="gptq_marlin").invoke(QUESTION)
    assert loaded_from(folder) == []


# -- downloads cut short -------------------------------------------------------------------------

REPO = "someone/tiny-synthia"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("layout", ["one file", "sharded"])
def test_a_download_cut_short_is_refused_from_the_cache(
    tiny_model: str, tmp_path: Path, monkeypatch, layout: str
) -> None:
    """huggingface-hub writes a file as ``blobs/<hash>.incomplete`` and links it into the
    snapshot once complete: a cut leaves the snapshot without it. Such a snapshot is refused
    (not taken for the checkpoint) and loads once the file is there."""
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = Path(shutil.copytree(tiny_model, repo / "snapshots" / SHA))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    (repo / "blobs").mkdir()
    if layout == "sharded":
        second = split_in_two(snapshot)
        cut = snapshot / SHARDS[1]
    else:
        cut = snapshot / "model.safetensors"
    data = cut.read_bytes()
    (repo / "blobs" / "0123abcd.incomplete").write_bytes(data[: len(data) // 2])
    cut.unlink()
    calls: list[dict] = []
    fetch = huggingface_hub.snapshot_download
    spy = lambda *args, **kwargs: (calls.append(kwargs), fetch(*args, **kwargs))[1]  # noqa: E731
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    chat = chat_on(REPO, "fast", cache_dir=str(cache), local_files_only=True)
    with pytest.raises((FileNotFoundError, ValueError)) as caught:
        chat.invoke(QUESTION)
    message = str(caught.value)
    assert str(snapshot) in message
    if layout == "sharded":
        assert f"lists {SHARDS[1]}, which is not there" in message
        assert f"hf download {REPO} --revision main --force-download" in message
    else:
        assert "has no weights (if a download was cut short, run it again: it resumes)" in message
    assert [s for s in loaded_engines() if s.model == REPO] == []
    assert calls
    assert not any(kw.get("force_download") for kw in calls)  # resuming stays on
    assert all(kw.get("resume_download") in (None, True) for kw in calls)
    if layout == "sharded":  # the download finished
        save_file(second, cut, {"format": "pt"})
    else:
        cut.write_bytes(data)
    try:
        assert chat.invoke(QUESTION).content == intact_answer(tiny_model, "fast")
    finally:
        for settings in loaded_engines():
            if settings.model == REPO:
                unload(settings)
