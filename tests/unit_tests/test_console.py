"""What the CLI shows of the model's, a server's or a file's text: nothing a terminal acts on.

The fuzz tests count the cases they ran and assert the count.
"""

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langchain_synthia._console import printable, printable_json, printable_line

SAFE_CASES = 1_000
HOSTILE_CASES = 2_000
SEQUENCE_CASES = 1_000
JSON_CASES = 1_000

ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""What must never reach the terminal: C0 but tab and newline, DEL, C1, bidi overrides."""


def fuzz(cases: int) -> settings:
    return settings(max_examples=cases, deadline=None, suppress_health_check=[HealthCheck.too_slow])


safe_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)).filter(
        lambda c: not ACTIVE.match(c) and c != "\r"
    )
    | st.sampled_from("\n\t []\\;:PX^_0123456789\u200e\u200f\u061c\u00e9\u4e2d")
)
"""Text with nothing to take out: printable characters, newline, tab, bidi marks."""

ESC = "\x1b"
hostile_text = st.text(
    st.sampled_from([ESC, "\x9b", "\x9d", "\x90", "\x9c", "\x07", "\r", "\x08", "\x7f", "\u202e"])
    | st.sampled_from("[]P\\;0123456789mJHc(B_^X?")
    | st.characters(codec="utf-8", exclude_categories=("Cs",)),
    max_size=60,
)
"""Text made mostly of escape-sequence material: introducers, terminators, parameters."""

payload = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)).filter(
        lambda c: c not in "\x07\x1b\x9c"
    ),
    max_size=30,
)
sequences = st.one_of(
    # OSC (title, clipboard: 52), DCS, SOS, PM, APC, by ESC or C1, ended by BEL or ST
    st.tuples(
        st.sampled_from([ESC + "]", ESC + "P", ESC + "X", ESC + "^", ESC + "_", "\x9d", "\x90"]),
        payload,
        st.sampled_from(["\x07", ESC + "\\", "\x9c"]),
    ).map("".join),
    # CSI: parameters, intermediates, a final byte
    st.tuples(
        st.sampled_from([ESC + "[", "\x9b"]),
        st.text(st.characters(min_codepoint=0x30, max_codepoint=0x3F), max_size=8),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2F), max_size=2),
        st.characters(min_codepoint=0x40, max_codepoint=0x7E),
    ).map("".join),
    # two-character and nF sequences: ESC c, ESC ( B, ESC 7...
    st.tuples(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2F), max_size=2),
        st.characters(min_codepoint=0x30, max_codepoint=0x7E).filter(lambda c: c not in "[]PX^_"),
    ).map(lambda parts: ESC + "".join(parts)),
)


# -- examples --------------------------------------------------------------------------------


def test_a_clipboard_write_a_title_and_colours_are_taken_out_whole() -> None:
    clipboard = f"{ESC}]52;c;cm0gLXJmIH4K\x07"
    title = f"{ESC}]0;pwned{ESC}\\"
    assert printable(f"Sure.{clipboard} Here{title} it is.") == "Sure. Here it is."
    assert printable(f"{ESC}[31mred{ESC}[0m and \x9b2Jcleared") == "red and cleared"
    assert printable(f"a{ESC}P1$qm{ESC}\\b{ESC}(Bc{ESC}7d") == "abcd"


def test_line_overwrites_and_reordering_are_taken_out_and_text_kept() -> None:
    assert printable("ls\rrm -rf ~\r\nnext\tcol") == "lsrm -rf ~\nnext\tcol"
    assert printable("a\x08\x08b\x7fc\x00") == "abc"
    assert printable("abc\u202edcba\u2066x\u2069") == "abcdcbax"
    assert printable("שלום \u200f café 中文") == "שלום \u200f café 中文"


def test_an_unfinished_sequence_loses_its_introducer_and_keeps_its_text() -> None:
    assert printable(f"{ESC}]0;never ended") == "0;never ended"
    assert printable(f"end{ESC}") == "end"
    split = [f"Hi {ESC}", "]0;title\x07 there"]  # a sequence split between stream pieces
    assert "".join(map(printable, split)) == "Hi ]0;title there"


def test_an_error_line_is_one_line() -> None:
    assert printable_line(f"Bad request:\n  {ESC}]0;x\x07detail\r\n  hint ") == (
        "Bad request: detail hint"
    )


def test_json_escapes_what_a_terminal_acts_on_and_reads_back_the_same() -> None:
    value = {"text": f"a{ESC}]52;c;x\x07\x9b\u202e\x7fé\n"}
    document = printable_json(value)
    assert not ACTIVE.search(document)
    assert "\\u009b" in document
    assert "\\u202e" in document
    assert "é" in document
    assert json.loads(document) == value
    assert "\n" in printable_json(value, indent=2)  # options are json.dumps'


# -- properties -------------------------------------------------------------------------------


def test_fuzz_printable_text_is_kept_unchanged() -> None:
    ran = 0

    @fuzz(SAFE_CASES)
    @given(text=safe_text)
    def check(text: str) -> None:
        nonlocal ran
        ran += 1
        assert printable(text) == text

    check()
    assert ran >= SAFE_CASES


def test_fuzz_nothing_a_terminal_acts_on_survives() -> None:
    ran = 0

    @fuzz(HOSTILE_CASES)
    @given(text=hostile_text, cut=st.integers(0, 60))
    def check(text: str, cut: int) -> None:
        nonlocal ran
        ran += 1
        out = printable(text)
        assert not ACTIVE.search(out), ascii(out)
        assert "\r" not in out
        assert printable(out) == out
        streamed = printable(text[:cut]) + printable(text[cut:])  # pieces cleaned one by one
        assert not ACTIVE.search(streamed)
        assert not ACTIVE.search(printable_line(text))
        assert "\n" not in printable_line(text)

    check()
    assert ran >= HOSTILE_CASES


def test_fuzz_a_sequence_goes_whole_and_the_text_around_it_stays() -> None:
    ran = 0

    @fuzz(SEQUENCE_CASES)
    @given(before=safe_text, sequence=sequences, after=safe_text)
    def check(before: str, sequence: str, after: str) -> None:
        nonlocal ran
        ran += 1
        assert printable(before + sequence + after) == before + after

    check()
    assert ran >= SEQUENCE_CASES


def test_fuzz_json_reads_back_the_same_and_shows_nothing_active() -> None:
    ran = 0

    @fuzz(JSON_CASES)
    @given(value=st.dictionaries(st.text(max_size=5), hostile_text | safe_text, max_size=3))
    def check(value: dict[str, str]) -> None:
        nonlocal ran
        ran += 1
        document = printable_json(value)
        assert not ACTIVE.search(document)
        assert json.loads(document) == value

    check()
    assert ran >= JSON_CASES
