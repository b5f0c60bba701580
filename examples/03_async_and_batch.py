"""Async calls: ``ainvoke``, ``astream`` and ``abatch``.

The model runs on a worker thread, so none of these block the event loop. ``abatch`` decodes all
its prompts together as one padded GPU batch (at most ``max_concurrency`` rows at once when the
config sets it) instead of one after the other.

On a CUDA GPU:

    python examples/03_async_and_batch.py

Demo form (tiny offline random-weight checkpoint, CPU, gibberish output):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/03_async_and_batch.py
"""

import asyncio
import os

from langchain_synthia import ChatSynthia

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))

QUESTIONS = [
    "Name three moons of Jupiter.",
    "What is the boiling point of water at sea level, in Celsius?",
    "Give one synonym for 'quick'.",
]


async def main() -> None:
    chat = ChatSynthia(model=MODEL, device=DEVICE, max_tokens=MAX_TOKENS)

    print("== ainvoke")
    reply = await chat.ainvoke("What is the capital of France?")
    print(reply.content)

    print("== astream")
    async for chunk in chat.astream("Write a haiku about the sea."):
        print(chunk.content, end="", flush=True)
    print()

    print("== abatch (one padded batch)")
    replies = await chat.abatch(QUESTIONS)
    for question, answer in zip(QUESTIONS, replies, strict=True):
        print(f"Q: {question}\nA: {answer.content}\n   {answer.usage_metadata}")


asyncio.run(main())
