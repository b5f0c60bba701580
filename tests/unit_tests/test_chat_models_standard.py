"""LangChain's standard unit suite for ChatSynthia (no model is loaded)."""

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_synthia import ChatSynthia


class TestChatSynthiaUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSynthia]:
        return ChatSynthia

    @property
    def standard_chat_model_params(self) -> dict:
        # The suite adds `api_key` and `max_retries`, which a local model does not have.
        # ChatSynthia forbids unknown arguments (a misspelt option is an error, not a no-op),
        # so they are left out here; `timeout`, `temperature`, `max_tokens`, `stop` are kept.
        params = dict(super().standard_chat_model_params)
        params.pop("api_key", None)
        params.pop("max_retries", None)
        return params

    @property
    def chat_model_params(self) -> dict:
        return {"model": "TheBloke/Synthia-7B-v1.3-GPTQ"}


def test_standard_params_really_include_timeout() -> None:
    params = TestChatSynthiaUnit().standard_chat_model_params
    assert params["timeout"] == 60
    assert ChatSynthia(**params).timeout == 60


def test_unknown_standard_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="api_key"):
        ChatSynthia(api_key="test")
