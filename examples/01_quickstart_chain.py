"""Quick start: the README's chain, streamed to the terminal.

``synthia_chat_prompt(tree_of_thought=True) | ChatSynthia(...) | SynthiaOutputParser()``: the
prompt template puts the model card's Tree-of-Thought system message in front of the question,
ChatSynthia renders it in Synthia's ``SYSTEM:/USER:/ASSISTANT:`` format and generates, and the
parser hands back the answer as plain text, piece by piece.

On a CUDA GPU (the first run downloads the 4.16 GB ``main`` branch into the Hugging Face cache):

    python examples/01_quickstart_chain.py

Demo form, on a tiny offline random-weight checkpoint on the CPU (the answer is gibberish; it
shows the plumbing, not the model):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/01_quickstart_chain.py
"""

import os

from langchain_synthia import ChatSynthia, SynthiaOutputParser, synthia_chat_prompt

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))

chain = (
    synthia_chat_prompt(tree_of_thought=True)
    | ChatSynthia(model=MODEL, device=DEVICE, max_tokens=MAX_TOKENS)
    | SynthiaOutputParser()
)

question = "How is a rocket launched from the surface of the earth to Low Earth Orbit?"
for piece in chain.stream({"question": question}):
    print(piece, end="", flush=True)
print()
