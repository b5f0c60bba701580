"""LangChain's standard integration suite for ChatSynthia, on the tiny checkpoint on CPU."""

from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_synthia import ChatSynthia
from tests.conftest import DEVICE, tiny_model_path


class TestChatSynthiaIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSynthia]:
        return ChatSynthia

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_model_path(), "device": DEVICE, "max_tokens": 24, "seed": 0}

    @property
    def model_override_value(self) -> str:
        # a second checkpoint (other weights): `model=` per call loads and uses it
        return tiny_model_path(seed=1)
