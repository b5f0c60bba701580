"""SynthiaLLM on the tiny checkpoint (LangChain has no standard LLM suite: these are ours)."""

import pytest

from langchain_synthia import GenerationTimeoutError, SynthiaLLM, synthia_prompt_template
from langchain_synthia._loading import ModelSettings, get_engine
from tests.helpers import DEVICE, LoopTicker, TokenCounter

PROMPT = synthia_prompt_template().format(question="How is a rocket launched?")


@pytest.fixture
def llm(tiny_model: str) -> SynthiaLLM:
    return SynthiaLLM(model=tiny_model, device=DEVICE, max_tokens=16, temperature=0)


def test_invoke_returns_text_and_generate_reports_usage(llm: SynthiaLLM, tiny_model: str) -> None:
    text = llm.invoke(PROMPT)
    assert isinstance(text, str)
    assert text
    result = llm.generate([PROMPT])
    generation = result.generations[0][0]
    assert generation.text == text
    prompt_tokens = len(get_engine(ModelSettings(model=tiny_model, device=DEVICE)).encode(PROMPT))
    usage = {"input_tokens": prompt_tokens, "output_tokens": 16, "total_tokens": prompt_tokens + 16}
    assert generation.generation_info["usage_metadata"] == usage
    assert generation.generation_info["finish_reason"] == "length"
    assert generation.generation_info["model_name"] == tiny_model
    assert result.llm_output == {"token_usage": usage, "model_name": tiny_model}


def test_stream_yields_tokens_with_one_callback_each(llm: SynthiaLLM) -> None:
    counter = TokenCounter()
    pieces = list(llm.stream(PROMPT, config={"callbacks": [counter]}))
    assert len(pieces) == 16
    assert counter.tokens == pieces
    assert "".join(pieces) == llm.invoke(PROMPT)
    invoke_counter = TokenCounter()
    llm.invoke(PROMPT, config={"callbacks": [invoke_counter]})
    assert invoke_counter.tokens == pieces


def test_chain_with_the_string_template(llm: SynthiaLLM) -> None:
    chain = synthia_prompt_template(tree_of_thought=True) | llm
    assert chain.invoke({"question": "Why?"}) == llm.invoke(
        synthia_prompt_template(tree_of_thought=True).format(question="Why?")
    )


def test_stop_of_several_tokens_in_invoke_stream_and_construction(
    llm: SynthiaLLM, tiny_model: str
) -> None:
    full = llm.invoke(PROMPT, max_tokens=40)
    words = full.split()
    assert len(words) > 4
    stop = " ".join(words[2:4])
    expected = full[: full.index(stop)]
    assert llm.invoke(PROMPT, stop=[stop], max_tokens=40) == expected
    assert "".join(llm.stream(PROMPT, stop=[stop], max_tokens=40)) == expected
    fixed = SynthiaLLM(model=tiny_model, device=DEVICE, temperature=0, max_tokens=40, stop=[stop])
    assert fixed.invoke(PROMPT) == expected
    info = fixed.generate([PROMPT]).generations[0][0].generation_info
    assert info["finish_reason"] == "stop"
    assert info["usage_metadata"]["output_tokens"] < 40


def test_react_style_observation_stop(llm: SynthiaLLM) -> None:
    prompt = "Question: what is 2+2?\nThought: I should use a tool.\nAction: calculator\n"
    text = llm.invoke(prompt, stop=["Observation:"], max_tokens=24)
    assert "Observation:" not in text


def test_batch_is_one_padded_batch_with_usage_per_prompt(llm: SynthiaLLM, batches) -> None:
    prompts = [PROMPT, "USER: Hi\nASSISTANT:", "Once upon a time"]
    texts = llm.batch(prompts)
    assert batches == [1 * 3]
    assert len(texts) == 3
    result = llm.generate(prompts)
    per_prompt = [g[0].generation_info["usage_metadata"] for g in result.generations]
    assert all(u["output_tokens"] == 16 for u in per_prompt)
    assert result.llm_output["token_usage"]["total_tokens"] == sum(
        u["total_tokens"] for u in per_prompt
    )


async def test_async_invoke_stream_and_batch(llm: SynthiaLLM) -> None:
    text = await llm.ainvoke(PROMPT)
    assert text == llm.invoke(PROMPT)
    pieces = [p async for p in llm.astream(PROMPT)]
    assert "".join(pieces) == text
    assert await llm.abatch([PROMPT, PROMPT]) == [text, text]


async def test_async_does_not_block_the_loop(llm: SynthiaLLM) -> None:
    async with LoopTicker() as loop:
        await llm.ainvoke(PROMPT, max_tokens=40)
    assert loop.ticks > 10


def test_timeout(llm: SynthiaLLM) -> None:
    with pytest.raises(GenerationTimeoutError):
        llm.invoke(PROMPT, max_tokens=4000, timeout=0.1)


def test_prompt_too_long_and_unknown_option(llm: SynthiaLLM) -> None:
    with pytest.raises(ValueError, match="context window is 4096 tokens"):
        llm.invoke("word " * 5000)
    with pytest.raises(TypeError, match="Unknown option 'top'"):
        llm.invoke(PROMPT, top=1)
