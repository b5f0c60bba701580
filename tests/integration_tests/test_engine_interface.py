"""The two local engines, loaded on the tiny checkpoint, are `Engine`s and answer through it."""

import asyncio

import pytest

from langchain_synthia._engine_interface import Engine
from langchain_synthia._requests import GenerationRequest
from langchain_synthia._sampling import SamplingParams
from tests.helpers import engine_of

GREEDY = SamplingParams(0.0, 1.0, 0, 1.0, 0)


@pytest.mark.parametrize("kind", ["transformers", "fast"])
def test_a_loaded_local_engine_is_an_engine_and_answers_through_its_members(
    tiny_model: str, kind: str
) -> None:
    engine = engine_of(tiny_model, kind)
    assert isinstance(engine, Engine)
    assert (engine.kind, engine.name, engine.batches_locally) == (kind, tiny_model, True)
    engine.check()
    request = GenerationRequest("Hello there", 5, GREEDY, timeout=60)
    ids = engine.encode(request.prompt)
    submitted = [event for stream in engine.submit([request]) for event in stream]
    opened = list(engine.open(request))

    async def read() -> list:
        return [event async for event in engine.aopen(request)]

    for events in (submitted, opened, asyncio.run(read())):
        assert events[-1].finish_reason is not None
        assert events[-1].input_tokens == len(ids)
    assert "".join(e.text for e in opened) == "".join(e.text for e in submitted)
