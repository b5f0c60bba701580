"""Streaming through callbacks, and the token usage of a call.

A callback handler receives every generated token through ``on_llm_new_token``: here one
handler prints the tokens as they arrive and counts the calls. ``invoke`` still returns the whole
message, whose ``usage_metadata`` and ``response_metadata`` are printed at the end. There is one
``on_llm_new_token`` call per generated token, so the count equals ``output_tokens`` (a token
whose text is held back, e.g. the start of a possible stop sequence, arrives as an empty string).

On a CUDA GPU:

    python examples/02_stream_with_callbacks.py

Demo form (tiny offline random-weight checkpoint, CPU, gibberish output):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/02_stream_with_callbacks.py
"""

import os
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from langchain_synthia import ChatSynthia

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))


class PrintAndCount(BaseCallbackHandler):
    """Print each new token to the console and count the ``on_llm_new_token`` calls."""

    def __init__(self) -> None:
        self.calls = 0

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.calls += 1
        print(token, end="", flush=True)


chat = ChatSynthia(model=MODEL, device=DEVICE, max_tokens=MAX_TOKENS)
handler = PrintAndCount()

message = chat.invoke(
    "Explain in three sentences what GPTQ quantisation does.",
    config={"callbacks": [handler]},
)
print()
print(f"on_llm_new_token calls: {handler.calls}")
print(f"usage_metadata:         {message.usage_metadata}")
print(f"response_metadata:      {message.response_metadata}")
