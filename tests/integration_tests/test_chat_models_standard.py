"""LangChain's standard integration suite for ChatSynthia, on the tiny checkpoint on CPU.

The tiny checkpoint has random weights. Under the grammar every tool call and structured
answer it writes is valid; what it cannot do is *mean* anything. The tests marked xfail below
assert content that needs a trained model, each for the reason given; tests/integration_tests/
test_tools.py checks the same machinery with schemas a random model can satisfy.
"""

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_synthia import ChatSynthia
from tests.conftest import DEVICE, tiny_model_path

_NEEDS_MEANING = (
    "asserts that the call copies a value from the question (magic_function(3) -> "
    "{'input': 3}); the tiny checkpoint's call is schema-valid but its value is random"
)
_OPEN_STRINGS = (
    "the schema has unbounded strings; only the few tokens holding a quote can close one, so "
    "with random weights the JSON rarely closes within max_tokens (the parser then says so)"
)
_AUTO = (
    "tool_choice is 'auto': whether to call a tool or answer in text is the model's choice, "
    "and a random-weight model answers in text"
)


class TestChatSynthiaIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSynthia]:
        return ChatSynthia

    @property
    def chat_model_params(self) -> dict:
        # 64 tokens: room for a whole tool call (about 30 tokens) under the grammar
        return {"model": tiny_model_path(), "device": DEVICE, "max_tokens": 64, "seed": 0}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        # a second checkpoint (other weights): `model=` per call loads and uses it
        return tiny_model_path(seed=1)

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(reason=_NEEDS_MEANING)
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=_NEEDS_MEANING)
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=_NEEDS_MEANING.replace("magic_function(3) -> {'input': 3}",
                                                     "'你好啊集团' -> customer_name"))  # fmt: skip
    def test_unicode_tool_call_integration(self, model) -> None:
        super().test_unicode_tool_call_integration(model)

    @pytest.mark.xfail(reason=_OPEN_STRINGS)
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    @pytest.mark.xfail(reason=_OPEN_STRINGS)
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    @pytest.mark.xfail(reason=_OPEN_STRINGS)
    async def test_structured_output_async(self, model, schema_type) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=_OPEN_STRINGS)
    def test_structured_output_pydantic_2_v1(self, model) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=_OPEN_STRINGS)
    def test_structured_output_optional_param(self, model) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(reason=_OPEN_STRINGS + "; the keys are asked for only in the prompt")
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(reason=_AUTO)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)
