import pytest
from pydantic import ValidationError

from langchain_synthia import ChatSynthia, SynthiaLLM
from langchain_synthia._params import USER_TURN_STOPS


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_defaults_are_the_cards_generation_settings(cls) -> None:
    model = cls()
    assert model.model == "TheBloke/Synthia-7B-v1.3-GPTQ"
    assert model.revision == "main"
    assert (model.temperature, model.top_p, model.top_k) == (0.7, 0.95, 40)
    assert (model.repetition_penalty, model.max_tokens) == (1.1, 512)
    assert model.context_window == 4096


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("temperature", -0.1, "greater than or equal to 0"),
        ("top_p", 0.0, "greater than 0"),
        ("top_p", 1.5, "less than or equal to 1"),
        ("top_k", -1, "greater than or equal to 0"),
        ("repetition_penalty", 0, "greater than 0"),
        ("max_tokens", 0, "greater than or equal to 1"),
        ("timeout", 0, "greater than 0"),
        ("device", "gpu", "use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("stop", ["ok", ""], "non-empty strings"),
        (
            "revision",
            "gptq-4bit-16g",
            "Unknown branch 'gptq-4bit-16g'.*gptq-4bit-32g-actorder_True",
        ),
        ("temprature", 0.5, "Extra inputs are not permitted"),
    ],
)
def test_bad_construction_is_rejected_with_the_reason(cls, field, value, match) -> None:
    with pytest.raises(ValidationError, match=match):
        cls(**{field: value})


def test_a_single_stop_string_is_one_stop() -> None:
    assert ChatSynthia(stop="END").stop == ["END"]


def test_revision_accepts_a_commit_hash_and_other_repos_any_branch() -> None:
    ChatSynthia(revision="0123456789abcdef0123456789abcdef01234567")
    ChatSynthia(model="someone/other-gptq", revision="experimental")


def test_call_options_override_and_validate() -> None:
    chat = ChatSynthia(temperature=0.3, stop=["END"])
    options = chat._call_options(None, {"temperature": 0.0, "max_tokens": 7})
    assert options["temperature"] == 0.0
    assert options["max_tokens"] == 7
    assert options["top_k"] == 40
    assert options["stop"] == ["END"]
    assert chat._call_options(["x", "yz"], {})["stop"] == ["x", "yz"]
    with pytest.raises(ValueError, match=r"temperature=-1 is out of range.*greater than or equal"):
        chat._call_options(None, {"temperature": -1})
    assert chat._call_options("Observation:", {})["stop"] == ["Observation:"]
    with pytest.raises(ValueError, match="non-empty strings"):
        chat._call_options(["ok", ""], {})
    with pytest.raises(TypeError, match=r"Unknown option 'temp'.*temperature"):
        chat._call_options(None, {"temp": 1})
    with pytest.raises(ValueError, match="Unknown branch"):
        chat._call_options(None, {"revision": "nope"})


def test_request_carries_user_turn_stops_unless_disabled() -> None:
    chat = ChatSynthia(stop=["END"], seed=3)
    request = chat._request("p", chat._call_options(None, {}))
    assert request.stops == ("END", *USER_TURN_STOPS)
    assert request.sampling.seed == 3
    assert request.max_new_tokens == 512
    off = chat._request("p", chat._call_options(None, {"stop_at_user_turn": False}))
    assert off.stops == ("END",)


def test_langsmith_params() -> None:
    chat = ChatSynthia(temperature=0.2, max_tokens=10, stop=["a"])
    params = chat._get_ls_params()
    assert params == {
        "ls_provider": "synthia",
        "ls_model_name": "TheBloke/Synthia-7B-v1.3-GPTQ",
        "ls_model_type": "chat",
        "ls_temperature": 0.2,
        "ls_max_tokens": 10,
        "ls_stop": ["a"],
    }
    assert chat._get_ls_params(stop=["b"], model="x")["ls_model_name"] == "x"
    assert chat._get_ls_params(stop=["b"])["ls_stop"] == ["b"]
    assert SynthiaLLM()._get_ls_params()["ls_model_type"] == "llm"


def test_identifying_params_name_the_model_and_settings() -> None:
    params = SynthiaLLM(revision="gptq-4bit-32g-actorder_True", top_k=5)._identifying_params
    assert params["model"] == "TheBloke/Synthia-7B-v1.3-GPTQ"
    assert params["revision"] == "gptq-4bit-32g-actorder_True"
    assert params["top_k"] == 5
