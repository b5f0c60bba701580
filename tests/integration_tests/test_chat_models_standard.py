"""LangChain's standard integration suite for ChatSynthia: the tiny checkpoint and a real model.

The tiny checkpoint has random weights. Under the grammar every tool call and structured
answer it writes is valid; what it cannot do is *mean* anything. The standard tests that need
meaning and pass on a real model run in `TestChatSynthiaRealModel` (SmolLM2-135M-Instruct as
GPTQ, marked ``real_model``) and are xfailed on the tiny one; the tests marked xfail below need
more than that 135M model gives, each for the reason given (what it answered, at temperature
0 on the CPU); tests/integration_tests/test_tools.py checks the same machinery with schemas a
random model can satisfy.
"""

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_synthia import ChatSynthia
from tests.helpers import DEVICE, needs_real_model, real_model_path, tiny_model_path

_ON_THE_REAL_MODEL = (
    "copies a value from the question (magic_function(3) -> {'input': 3}), which random weights "
    "cannot; TestChatSynthiaRealModel runs it on the real model"
)
_RANDOM = "random weights: a call is schema-valid, its values are random"
_PICKS_A_STRING = (
    "random weights: with tool_choice='any' the tiny model picks get_weather, and random "
    "weights rarely close its string argument within max_tokens; TestChatSynthiaRealModel "
    "runs it on the real model"
)
_OPEN_STRINGS = (
    "the joke's strings are unbounded: random weights rarely close one within max_tokens, and "
    "SmolLM2-135M rambles on in them ('The cat was a cat. The cat was a cat. ...') past "
    "max_tokens=100 (at 512 some close)"
)
_AUTO = (
    "tool_choice is 'auto': whether to call a tool or answer in text is the model's choice, "
    "and both a random-weight model and SmolLM2-135M answer in text"
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
    @pytest.mark.xfail(reason=_ON_THE_REAL_MODEL)
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=_ON_THE_REAL_MODEL)
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=_PICKS_A_STRING)
    def test_tool_choice(self, model) -> None:
        super().test_tool_choice(model)

    @pytest.mark.xfail(
        reason=f"{_RANDOM}; SmolLM2-135M does not write the Japanese name either (its answer "
        "begins 'Hi, a Japanese company called ' and holds no Japanese character)"
    )
    def test_unicode_tool_call_integration(self, model) -> None:
        super().test_unicode_tool_call_integration(model)

    @pytest.mark.xfail(
        reason="the forced call's argument is an unbounded string: random weights rarely close "
        "it, and SmolLM2-135M's runs on to max_tokens (512 tokens, an invalid call)"
    )
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

    @pytest.mark.xfail(
        reason="the keys are asked for only in the prompt: random weights write other keys, and "
        'SmolLM2-135M writes {"setup":{"setup.setup.setup... to max_tokens'
    )
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    @pytest.mark.xfail(reason=_AUTO)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)


class _RealModelSuite(ChatModelIntegrationTests):
    """The standard suite's settings for SmolLM2-135M-Instruct (GPTQ); not collected itself."""

    @property
    def chat_model_class(self) -> type[ChatSynthia]:
        return ChatSynthia

    @property
    def chat_model_params(self) -> dict:
        # Greedy: sampled at the card's 0.7, SmolLM2-135M now and then opens a tool argument's
        # string and never closes it (about one call in twelve), which turns a pass into chance.
        # 100 tokens: a whole answer of these tests, and a bound on one that loops.
        return {"model": real_model_path(), "device": DEVICE, "max_tokens": 100, "temperature": 0}


_REAL = _RealModelSuite()


@pytest.fixture
def real_chat(request: pytest.FixtureRequest) -> ChatSynthia:
    """The real model as the standard suite's `model` fixture builds it (``param``: extras)."""
    extra = getattr(request, "param", None) or {}
    return ChatSynthia(**{**_REAL.standard_chat_model_params, **_REAL.chat_model_params, **extra})


@needs_real_model
@pytest.mark.real_model
class TestChatSynthiaRealModel:
    """The standard tests that need meaning, run as LangChain wrote them on the real model.

    Every other standard test runs on the tiny checkpoint above; those that the real model
    fails too stay xfailed there with what it answered.
    """

    @pytest.mark.parametrize("real_chat", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, real_chat: ChatSynthia) -> None:
        _REAL.test_tool_calling(real_chat)

    async def test_tool_calling_async(self, real_chat: ChatSynthia) -> None:
        await _REAL.test_tool_calling_async(real_chat)

    def test_tool_choice(self, real_chat: ChatSynthia) -> None:
        _REAL.test_tool_choice(real_chat)
