"""LangChain's standard unit suite for ChatSynthia (no model is loaded)."""

from typing import Any

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_synthia import ChatSynthia


class TestChatSynthiaUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSynthia]:
        return ChatSynthia

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        env = {"SYNTHIA_BASE_URL": "http://gpu-box:8000/v1", "SYNTHIA_API_KEY": "sk-test"}
        return env, {}, {"base_url": "http://gpu-box:8000/v1", "api_key": "sk-test"}

    @property
    def chat_model_params(self) -> dict:
        return {"model": "TheBloke/Synthia-7B-v1.3-GPTQ"}

    @pytest.mark.xfail(
        reason="langchain-tests compares with a syrupy snapshot (not kept here) and loads with "
        "allowed_objects='all', which admits only langchain-core's own classes; "
        "test_serialization.py round-trips ChatSynthia as a user loads it",
        strict=True,
    )
    def test_serdes(self, model: ChatSynthia, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)


def test_standard_params_really_include_timeout() -> None:
    params = TestChatSynthiaUnit().standard_chat_model_params
    assert params["timeout"] == 60
    assert ChatSynthia(**params).timeout == 60


def test_standard_params_include_the_remote_ones() -> None:
    chat = ChatSynthia(**TestChatSynthiaUnit().standard_chat_model_params)
    assert chat.max_retries == 2
    assert chat.api_key.get_secret_value() == "test"  # used only in remote mode


def test_unknown_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="apikey"):
        ChatSynthia(apikey="test")
