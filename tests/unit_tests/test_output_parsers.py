import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AIMessageChunk

from langchain_synthia import SynthiaOutputParser


def card(answer: str) -> str:
    return answer.split("USER:")[0].strip()


@pytest.mark.parametrize(
    "text",
    [
        " The answer is 42.\nUSER: And why?\nASSISTANT: Because.",
        "plain answer",
        "  padded  ",
        "USER: nothing before",
        "",
        "two USER: cuts USER: here",
        "ends with a partial US",
        "line\n\n",
    ],
)
def test_parse_is_the_cards_split_and_strip(text: str) -> None:
    assert SynthiaOutputParser().parse(text) == card(text)
    assert SynthiaOutputParser().invoke(text) == card(text)
    assert SynthiaOutputParser().invoke(AIMessage(text)) == card(text)


def test_streaming_never_emits_a_partial_user_marker() -> None:
    pieces = [" Rockets", " burn", " fuel.\n", "US", "ER", ": what", " else?"]
    out = list(SynthiaOutputParser().transform(iter(pieces)))
    assert out == ["Rockets", " burn", " fuel."]
    assert all("US" not in piece for piece in out)


def test_streamed_prefix_is_released_when_it_turns_out_to_be_text() -> None:
    out = list(SynthiaOutputParser().transform(iter(["Plug the US", "B cable in."])))
    assert "".join(out) == "Plug the USB cable in."
    assert out[0] == "Plug the"


def test_streaming_accepts_message_chunks() -> None:
    chunks = [AIMessageChunk(content=c) for c in ["Hi", " there", "\nUSE", "R: x"]]
    assert "".join(SynthiaOutputParser().transform(iter(chunks))) == "Hi there"


async def test_async_streaming_matches() -> None:
    async def pieces():
        for piece in ["  A", "nswer ", " \nUS", "ER:", " more"]:
            yield piece

    out = [p async for p in SynthiaOutputParser().atransform(pieces())]
    assert "".join(out) == "Answer"


@settings(max_examples=500)
@given(
    text=st.text(alphabet="USER: ab\n\t", max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_streamed_output_equals_parse_for_any_chunk_boundaries(text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    streamed = list(SynthiaOutputParser().transform(iter(pieces)))
    assert "".join(streamed) == card(text)
    assert all(piece for piece in streamed)
