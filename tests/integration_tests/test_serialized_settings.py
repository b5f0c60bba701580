"""What callbacks get as the serialized model at the start of a run (on the tiny checkpoint)."""

from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from langchain_synthia import ChatSynthia, SynthiaLLM
from tests.helpers import DEVICE


class Started(BaseCallbackHandler):
    """The serialized model that each run started with."""

    def __init__(self) -> None:
        self.serialized: list[dict] = []

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        self.serialized.append(serialized)

    def on_chat_model_start(self, serialized: Any, messages: list, **kwargs: Any) -> None:
        self.serialized.append(serialized)


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_callbacks_get_a_copys_own_settings(cls: type, tiny_model: str) -> None:
    """``model_copy`` after a run: the copy's runs are reported with the copy's settings
    (LangChain keeps the serialized model once per instance, and a copy would take it)."""
    model = cls(model=tiny_model, device=DEVICE, max_tokens=1, temperature=0)
    started = Started()
    model.invoke("Hi", config={"callbacks": [started]})
    copy = model.model_copy(update={"top_k": 3})
    copy.invoke("Hi", config={"callbacks": [started]})
    assert [s["kwargs"]["top_k"] for s in started.serialized] == [40, 3]
