"""A multi-turn conversation kept in a list of messages, and the exact prompt each turn sends.

The conversation is a plain list of SystemMessage / HumanMessage / AIMessage. Each turn appends
the user's message, sends the whole list, and appends the answer as an AIMessage. Before each
call the script prints ``render_messages(messages, chat.system_message)``: byte for byte the
prompt that ChatSynthia gives the model.

On a CUDA GPU:

    python examples/04_multi_turn_chat.py

Demo form (tiny offline random-weight checkpoint, CPU, gibberish output):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/04_multi_turn_chat.py
"""

import os

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from langchain_synthia import ChatSynthia, SynthiaOutputParser, render_messages

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))

chat = ChatSynthia(model=MODEL, device=DEVICE, max_tokens=MAX_TOKENS)
answer_of = chat | SynthiaOutputParser()  # the reply as a stripped string

messages: list[BaseMessage] = [
    SystemMessage("You are a patient chemistry tutor. Keep answers short."),
]
for question in [
    "What is a covalent bond?",
    "Give me one example of a molecule with one.",
    "And an ionic compound, for contrast?",
]:
    messages.append(HumanMessage(question))
    print("----- prompt sent to the model -----")
    print(render_messages(messages, chat.system_message))
    print("------------------------------------")
    answer = answer_of.invoke(messages)
    print(f"Synthia: {answer}\n")
    messages.append(AIMessage(answer))
