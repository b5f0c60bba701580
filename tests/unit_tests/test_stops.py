import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_synthia._stops import StopMatcher


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, StopMatcher]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    return out, matcher


def reference(stops: list[str], text: str) -> str:
    """Generation's semantics: cut at the stop that is complete first (the longer one on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)]
    return text


def test_stop_spanning_pieces_is_cut_and_not_returned() -> None:
    out, matcher = feed_all(["USER:"], ["Hello", " wor", "ld\nUS", "ER: more"])
    assert out == "Hello world\n"
    assert matcher.matched == "USER:"


def test_possible_prefix_is_held_then_released() -> None:
    matcher = StopMatcher(["USER:"])
    assert matcher.feed("I am a US") == "I am a "
    assert matcher.feed("B stick") == "USB stick"
    assert not matcher.stopped


def test_the_stop_that_completes_first_wins() -> None:
    out, matcher = feed_all(["world", "lo w"], ["hello world"])
    assert out == "hel"
    assert matcher.matched == "lo w"
    out, matcher = feed_all([":", "E::"], ["E::"])
    assert (out, matcher.matched) == ("E", ":")
    out, matcher = feed_all(["b", "ab"], ["ab"])
    assert (out, matcher.matched) == ("", "ab")


def test_held_tail_is_text_at_the_end() -> None:
    out, matcher = feed_all(["Observation:"], ["Thought: done. Obs"])
    assert out == "Thought: done. Obs"
    assert not matcher.stopped


def test_nothing_after_the_stop() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.feed("ax") == "a"
    assert matcher.feed("more") == ""


def test_empty_stops_are_ignored() -> None:
    out, _matcher = feed_all(["", "b"], ["abc"])
    assert out == "a"


@settings(max_examples=500)
@given(
    text=st.text(alphabet="USER: abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="USER: ab\n", min_size=1, max_size=6), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_any_chunking_gives_the_unchunked_answer(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, _ = feed_all(stops, pieces)
    assert out == reference(stops, text)


# -- stops never cut an answer that opens a grammar-constrained part (a tool call) --------------

OPENING = "<tool_call>"
CALL = '<tool_call>{"name":"note","arguments":{"text":"a. USER: b</tool_call>"}}</tool_call>'


def feed_exempt(stops: list[str], pieces: list[str]) -> tuple[str, StopMatcher]:
    matcher = StopMatcher(stops, exempt_opening=OPENING)
    out = "".join(matcher.feed(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    return out, matcher


def test_a_call_is_not_cut_by_a_stop_it_contains() -> None:
    out, matcher = feed_exempt(["USER:", ".", "<", "note"], [" ", CALL[:5], CALL[5:30], CALL[30:]])
    assert out == " " + CALL
    assert not matcher.stopped


def test_free_text_is_cut_even_where_a_call_could_have_opened() -> None:
    out, matcher = feed_exempt(["USER:"], [" <", "b> USER: x"])
    assert (out, matcher.matched) == (" <b> ", "USER:")


def test_an_answer_that_ends_while_it_could_still_open_a_call_is_text() -> None:
    out, matcher = feed_exempt(["ool"], [" <t", "ool"])
    assert (out, matcher.matched) == (" <t", "ool")
    out, matcher = feed_exempt(["x"], ["\n <tool_"])
    assert (out, matcher.stopped) == ("\n <tool_", False)


def test_stops_cut_free_text_exactly_and_never_an_answer_that_opens_a_call() -> None:
    """Any answer, stops and chunking: a call passes whole, free text is cut as without it."""
    exempt_answers: list[bool] = []

    @settings(max_examples=400, deadline=None)
    @given(
        text=st.one_of(
            st.text(alphabet="<tool_cal>USER: .\n", max_size=30),
            st.builds(
                lambda pad, tail: pad + CALL[: len(CALL) - tail],
                st.sampled_from(["", " ", "\n"]),
                st.integers(0, 20),
            ),
        ),
        stops=st.lists(st.text(alphabet="<tool_cal>USER: .\n", min_size=1, max_size=6), max_size=3),
        cuts=st.lists(st.integers(min_value=0, max_value=90), max_size=8),
    )
    def check(text: str, stops: list[str], cuts: list[int]) -> None:
        bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        out, _ = feed_exempt(stops, pieces)
        exempt = text.lstrip().startswith(OPENING)
        exempt_answers.append(exempt)
        assert out == (text if exempt else reference(stops, text))

    check()
    assert exempt_answers.count(True) >= 50
    assert exempt_answers.count(False) >= 50
