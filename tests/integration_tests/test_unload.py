"""`unload()`: a loaded model is freed, its running calls fail with a clear error, and the next
call loads it again, on both local engines.

Each test loads its own copy of the tiny checkpoint, so that unloading it touches no model that
other tests share.
"""

import gc
import shutil
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from langchain_synthia import ChatSynthia, EngineStoppedError
from langchain_synthia._loading import get_engine
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._sampling import GREEDY
from tests.helpers import DEVICE, LONG, TokenCounter, loaded_from, wait_until

pytestmark = pytest.mark.integration

ENGINES = ("transformers", "fast")
QUESTION = "What is the capital of France?"


@pytest.fixture
def own_model(tiny_model: str, tmp_path: Path) -> str:
    """A copy of the tiny checkpoint: a model that only this test loads."""
    return str(shutil.copytree(tiny_model, tmp_path / "checkpoint"))


def chat_on(model: str, engine: str, **options) -> ChatSynthia:
    settings = {"max_tokens": 8, "temperature": 0, "timeout": 60, "context_window": 4096}
    return ChatSynthia(model=model, device=DEVICE, engine=engine, **{**settings, **options})


@pytest.mark.parametrize("engine", ENGINES)
def test_unload_frees_the_model_and_the_next_call_loads_it_again(
    own_model: str, engine: str
) -> None:
    chat = chat_on(own_model, engine)
    first = chat.invoke(QUESTION).content
    (settings,) = loaded_from(own_model)
    loaded = weakref.ref(get_engine(settings))

    assert chat.unload() is True
    gc.collect()
    assert loaded_from(own_model) == []
    assert loaded() is None  # nothing holds the engine: its weights and KV cache are freed
    assert chat.unload() is False  # nothing left to unload

    assert chat.invoke(QUESTION).content == first  # loaded again, same answer
    assert loaded_from(own_model) == [settings]
    assert chat.unload() is True


@pytest.mark.parametrize("engine", ENGINES)
def test_calls_running_when_the_model_is_unloaded_fail_with_a_clear_error(
    own_model: str, engine: str
) -> None:
    chat = chat_on(own_model, engine, **LONG)
    chat.load()
    started = TokenCounter()
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(chat.invoke, QUESTION, config={"callbacks": [started]})
        assert wait_until(lambda: len(started.tokens) > 0, seconds=30)
        chunks = chat.stream("Tell me a long story.")
        next(chunks)  # the stream is running too
        assert chat.unload() is True
        with pytest.raises(EngineStoppedError, match=r"unloaded \(unload\(\)\)"):
            for _ in chunks:
                pass
        with pytest.raises(EngineStoppedError, match="Send the request again"):
            whole.result(timeout=30)  # no partial answer returned as a whole one


@pytest.mark.parametrize("engine", ENGINES)
def test_a_request_sent_to_an_unloaded_engine_fails_at_once(own_model: str, engine: str) -> None:
    chat = chat_on(own_model, engine).load()
    (settings,) = loaded_from(own_model)
    kept = get_engine(settings)  # a reference taken before the unload
    assert chat.unload() is True
    stream = kept.open(GenerationRequest("USER: hi\nASSISTANT:", 4, GREEDY, ()))
    with pytest.raises(EngineStoppedError, match="unloaded"):
        list(stream)


def test_a_remote_model_has_nothing_to_unload() -> None:
    assert ChatSynthia(base_url="http://127.0.0.1:9/v1").unload() is False
