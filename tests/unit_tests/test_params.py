import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from langchain_synthia import ChatSynthia, SynthiaLLM
from langchain_synthia._params import _CALL_OPTIONS, USER_TURN_STOPS, SynthiaParams
from langchain_synthia._sampling import BatchSampler
from langchain_synthia._token_stream import PRODUCER_CHECK, TokenStream


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


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
def test_identifying_params_keep_the_instances_stop_apart_from_the_calls(cls) -> None:
    """LangChain writes the call's ``stop`` over ``params["stop"]``; the instance's stops are
    under ``default_stop``, and nothing that cannot change an answer is there."""
    model = cls(stop=["END"], api_key="sk-x", timeout=5, max_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dict() is deprecated, still there
        params = model.dict()
    assert params["default_stop"] == ["END"]
    assert "stop" not in params
    assert not {"api_key", "timeout", "max_batch_size", "callbacks", "cache"} & set(params)
    assert {"engine", "context_window", "server", "dense_prefill"} <= set(params)


# -- numbers: bools and NaN are refused, infinite timeouts mean no limit, huge values work ------

NUMERIC_FIELDS = [
    "context_window", "gpu_memory_utilization", "kv_cache_tokens", "max_batch_size",
    "max_retries", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed",
    "timeout",
]  # fmt: skip
NUMERIC_OPTIONS = [name for name in NUMERIC_FIELDS if name in _CALL_OPTIONS]


def test_the_numeric_fields_are_every_numeric_field() -> None:
    numeric = {
        name
        for name, field in SynthiaParams.model_fields.items()
        if {int, float} & {field.annotation, *getattr(field.annotation, "__args__", ())}
    }
    assert numeric == set(NUMERIC_FIELDS)
    assert set(NUMERIC_OPTIONS) == {
        "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "timeout",
    }  # fmt: skip


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
@pytest.mark.parametrize("field", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", [True, False, float("nan")])
def test_a_numeric_field_refuses_bools_and_nan(cls, field: str, value: object) -> None:
    reason = "got NaN" if value != value else f"got the bool {value}"
    with pytest.raises(ValidationError, match=reason):
        cls(**{field: value})
    if field in _CALL_OPTIONS:
        with pytest.raises(ValueError, match=rf"{field}={value!r} is not valid.*{reason}"):
            cls()._call_options(None, {field: value})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("seed", 2**64, "less than or equal to 18446744073709551615"),
        ("seed", -1, "greater than or equal to 0"),
        ("context_window", 32769, "less than or equal to 32768"),
        ("max_batch_size", 257, "less than or equal to 256"),
    ],
)
def test_values_past_a_limit_are_refused_with_the_limit(field: str, value: int, match) -> None:
    with pytest.raises(ValidationError, match=match):
        ChatSynthia(**{field: value})
    if field in _CALL_OPTIONS:
        with pytest.raises(ValueError, match=rf"{field}={value} is out of range.*{match}"):
            ChatSynthia()._call_options(None, {field: value})


def test_an_infinite_timeout_is_no_limit_and_a_huge_one_is_kept() -> None:
    assert ChatSynthia(timeout=float("inf")).timeout is None
    assert ChatSynthia()._call_options(None, {"timeout": float("inf")})["timeout"] is None
    assert ChatSynthia(timeout=1e300).timeout == 1e300
    with pytest.raises(ValidationError, match="greater than 0"):
        ChatSynthia(timeout=float("-inf"))


OPTION_VALUES = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.sampled_from([0.0, 5e-324, 1e-45, 1e-40, 1e300, float("inf"), float("-inf")]),
)
TRIED: dict[str, int] = {"accepted": 0, "refused": 0}


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(NUMERIC_OPTIONS), value=OPTION_VALUES)
def test_a_call_option_is_refused_with_its_name_or_runs(name: str, value: object) -> None:
    """Property: any value of any numeric call option either fails at the call with a message
    naming the option, or makes a request whose sampling settings a sampler runs and whose
    deadline a stream can wait for."""
    chat = ChatSynthia(seed=1)
    try:
        options = chat._call_options(None, {name: value})
    except ValueError as error:
        refusal = str(error)
    else:
        refusal = None
    if refusal is not None:
        assert refusal.startswith(f"{name}={value!r} is ")
        TRIED["refused"] += 1
        return
    assert not isinstance(value, bool)
    request = chat._request("p", options)
    sampler = BatchSampler([request.sampling], [[1, 2]], 8, torch.device("cpu"))
    token = sampler.sample(torch.randn(1, 8))
    assert 0 <= int(token) < 8
    stream = TokenStream(request, 2)
    stream.producer = threading.current_thread()
    assert 0 <= stream._wait() <= PRODUCER_CHECK
    TRIED["accepted"] += 1


def test_the_option_property_tried_both_outcomes() -> None:
    if not sum(TRIED.values()):
        pytest.skip("run together with the property above")
    assert TRIED["accepted"] >= 50
    assert TRIED["refused"] >= 50
