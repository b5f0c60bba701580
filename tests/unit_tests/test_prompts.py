import pytest
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_synthia import (
    DEFAULT_SYSTEM_MESSAGE,
    TREE_OF_THOUGHT_SYSTEM_MESSAGE,
    Turn,
    render_messages,
    render_prompt,
    synthia_chat_prompt,
    synthia_prompt_template,
)

CARD_SYSTEM = (
    "You are Synthia. As a an AI intelligence, give helpful, detailed, accurate, uncensored "
    "responses to the user's input. Provide answers factually."
)
CARD_TOT = (
    "Elaborate on the topic using a Tree of Thoughts and backtrack when necessary to construct a "
    "clear, cohesive Chain of Thought reasoning. Always answer without hesitation."
)


def test_system_messages_are_the_cards_verbatim() -> None:
    assert DEFAULT_SYSTEM_MESSAGE == CARD_SYSTEM
    assert TREE_OF_THOUGHT_SYSTEM_MESSAGE == CARD_TOT


def test_single_turn_matches_the_card_template_byte_for_byte() -> None:
    prompt = render_prompt([Turn("user", "Tell me about AI")], DEFAULT_SYSTEM_MESSAGE)
    assert prompt == f"SYSTEM: {CARD_SYSTEM}\nUSER: Tell me about AI\nASSISTANT:"


def test_multi_turn_follows_the_cards_conversation_loop() -> None:
    turns = [
        Turn("user", "How is a rocket launched?"),
        Turn("assistant", "  With a lot of thrust.\n"),
        Turn("user", "And then?"),
    ]
    assert render_prompt(turns, CARD_TOT) == (
        f"SYSTEM: {CARD_TOT}\n"
        "USER: How is a rocket launched?\n"
        "ASSISTANT: With a lot of thrust.\n"
        "USER: And then?\n"
        "ASSISTANT:"
    )


def test_no_system_line_when_system_is_none() -> None:
    assert render_prompt([Turn("user", "hi")]) == "USER: hi\nASSISTANT:"
    assert render_prompt([Turn("user", "hi")], "") == "SYSTEM:\nUSER: hi\nASSISTANT:"


def test_last_assistant_turn_is_continued_not_closed() -> None:
    turns = [Turn("user", "Count to three."), Turn("assistant", "One, two,")]
    assert render_prompt(turns, None) == "USER: Count to three.\nASSISTANT: One, two,"


def test_empty_assistant_turn_renders_bare_label() -> None:
    assert render_prompt([Turn("user", "x"), Turn("assistant", "")], None) == "USER: x\nASSISTANT:"


def test_repeated_roles_merge_into_one_turn() -> None:
    turns = [Turn("user", "a"), Turn("user", "b"), Turn("assistant", "c"), Turn("assistant", "d")]
    assert render_prompt(turns, None) == "USER: a\nb\nASSISTANT: c\nd"


def test_empty_conversation_is_an_error() -> None:
    with pytest.raises(ValueError, match="no USER or ASSISTANT turn"):
        render_prompt([], "sys")


def test_render_messages_uses_default_system_when_none_given() -> None:
    assert render_messages([HumanMessage("hi")]) == f"SYSTEM: {CARD_SYSTEM}\nUSER: hi\nASSISTANT:"
    assert render_messages([HumanMessage("hi")], None) == "USER: hi\nASSISTANT:"


def test_render_messages_merges_system_messages_wherever_they_are() -> None:
    messages = [
        SystemMessage("first"),
        HumanMessage("q1"),
        AIMessage("a1"),
        SystemMessage("second"),
        HumanMessage("q2"),
    ]
    assert render_messages(messages) == (
        "SYSTEM: first\nsecond\nUSER: q1\nASSISTANT: a1\nUSER: q2\nASSISTANT:"
    )


def test_double_messages_conversation_of_the_standard_suite() -> None:
    messages = [
        SystemMessage("s1"),
        SystemMessage("s2"),
        HumanMessage("h1"),
        HumanMessage("h2"),
        AIMessage("a1"),
        AIMessage("a2"),
        HumanMessage("h3"),
    ]
    assert render_messages(messages) == (
        "SYSTEM: s1\ns2\nUSER: h1\nh2\nASSISTANT: a1\na2\nUSER: h3\nASSISTANT:"
    )


def test_names_do_not_break_rendering() -> None:
    assert render_messages([HumanMessage("hello", name="example_user")], None) == (
        "USER: hello\nASSISTANT:"
    )


def test_chat_message_roles_and_text_blocks() -> None:
    messages = [
        ChatMessage(role="system", content="s"),
        ChatMessage(
            role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
        ),
        ChatMessage(role="assistant", content="c"),
        HumanMessage(content=["plain ", {"type": "text", "text": "blocks"}]),
    ]
    assert (
        render_messages(messages)
        == "SYSTEM: s\nUSER: ab\nASSISTANT: c\nUSER: plain blocks\nASSISTANT:"
    )


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (FunctionMessage("42", name="f"), "cannot render a 'FunctionMessage'"),
        (ChatMessage(role="critic", content="x"), "cannot render a 'critic' message"),
        (
            HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}]),
            "'image_url' content block.*text-only",
        ),
    ],
)
def test_unsupported_messages_get_clear_errors(message, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_messages([HumanMessage("hi"), message])


def test_empty_message_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty message list"):
        render_messages([])


def test_only_system_messages_is_an_error() -> None:
    with pytest.raises(ValueError, match="no USER or ASSISTANT turn"):
        render_messages([SystemMessage("s")])


def test_chat_prompt_factory_with_tree_of_thought_and_history() -> None:
    prompt = synthia_chat_prompt(tree_of_thought=True)
    assert prompt.input_variables == ["question"]
    messages = prompt.invoke(
        {"question": "Q2", "history": [HumanMessage("Q1"), AIMessage("A1")]}
    ).to_messages()
    assert render_messages(messages) == (
        f"SYSTEM: {CARD_TOT}\nUSER: Q1\nASSISTANT: A1\nUSER: Q2\nASSISTANT:"
    )


def test_chat_prompt_without_system_leaves_it_to_the_model() -> None:
    messages = synthia_chat_prompt().invoke({"question": "q"}).to_messages()
    assert [m.type for m in messages] == ["human"]
    assert render_messages(messages) == f"SYSTEM: {CARD_SYSTEM}\nUSER: q\nASSISTANT:"


def test_chat_prompt_system_text_is_literal_not_a_template() -> None:
    prompt = synthia_chat_prompt("Answer in {braces}.", input_variable="q", history_variable=None)
    messages = prompt.invoke({"q": "x"}).to_messages()
    assert render_messages(messages) == "SYSTEM: Answer in {braces}.\nUSER: x\nASSISTANT:"


def test_chat_prompt_rejects_both_system_and_tree_of_thought() -> None:
    with pytest.raises(ValueError, match="not both"):
        synthia_chat_prompt("x", tree_of_thought=True)


def test_string_template_renders_through_the_same_renderer() -> None:
    template = synthia_prompt_template("Use {curly} braces.")
    assert template.input_variables == ["question"]
    text = template.format(question="Why {x}?")
    assert text == render_prompt([Turn("user", "Why {x}?")], "Use {curly} braces.")
    assert text == "SYSTEM: Use {curly} braces.\nUSER: Why {x}?\nASSISTANT:"
    assert synthia_prompt_template(tree_of_thought=True).format(question="q") == (
        f"SYSTEM: {CARD_TOT}\nUSER: q\nASSISTANT:"
    )


def test_tool_calls_and_results_render_in_synthia_turns() -> None:
    messages = [
        HumanMessage("What is 1 + 2?"),
        AIMessage(
            [{"type": "text", "text": "Let me add."}, {"type": "tool_use", "id": "c1"}],
            tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}],
        ),
        ToolMessage("3", name="add", tool_call_id="c1"),
        ToolMessage("oops", tool_call_id="c2", status="error"),
    ]
    assert render_messages(messages, "s", tools_section="TOOLS") == (
        "SYSTEM: s\n\nTOOLS\n"
        "USER: What is 1 + 2?\n"
        'ASSISTANT: Let me add.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
        "</tool_call>\n"
        'USER: <tool_result name="add" id="c1">\n3\n</tool_result>\n'
        '<tool_result id="c2" status="error">\noops\n</tool_result>\n'
        "ASSISTANT:"
    )


def test_string_template_shows_its_text_and_renders_empty_text_as_a_bare_label() -> None:
    template = synthia_prompt_template("Use {curly} braces.\x00", input_variable="q")
    assert template.template == "SYSTEM: Use {{curly}} braces.\x00\nUSER: {q}\nASSISTANT:"
    assert template.input_variables == ["q"]
    assert template.format(q="") == render_prompt([Turn("user", "")], "Use {curly} braces.\x00")
    assert template.format(q="") == "SYSTEM: Use {curly} braces.\x00\nUSER:\nASSISTANT:"


def test_string_template_names_its_missing_variable() -> None:
    with pytest.raises(KeyError, match="needs its variable 'question'"):
        synthia_prompt_template().format(other="x")


@pytest.mark.parametrize("name", ["a b", "x}{y", "0q", "q.attr", ""])
def test_template_variables_must_be_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="is not a variable name"):
        synthia_prompt_template(input_variable=name)
    with pytest.raises(ValueError, match="is not a variable name"):
        synthia_chat_prompt(input_variable=name)


def test_string_template_cannot_be_summed_into_an_unneutralised_one() -> None:
    with pytest.raises(TypeError, match="cannot be joined with"):
        synthia_prompt_template() + "\nMore: {question}"


@pytest.mark.parametrize(
    "block",
    [
        {"type": "reasoning", "reasoning": "Greet back."},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "x"}]},
        {"type": "thinking", "thinking": "Greet back.", "signature": "c2ln"},
        {"type": "redacted_thinking", "data": "c2ln"},
    ],
    ids=["v1", "openai-summary", "anthropic-thinking", "anthropic-redacted"],
)
def test_reasoning_blocks_of_another_model_are_skipped_with_a_warning(block: dict) -> None:
    with_reasoning = [
        HumanMessage("Hi"),
        AIMessage([block, {"type": "text", "text": "Hello!"}]),
        HumanMessage("Bye"),
    ]
    plain = [HumanMessage("Hi"), AIMessage("Hello!"), HumanMessage("Bye")]
    with pytest.warns(UserWarning, match=f"skips a '{block['type']}' content block"):
        rendered = render_messages(with_reasoning)
    assert rendered == render_messages(plain)
    assert "Greet back" not in rendered
