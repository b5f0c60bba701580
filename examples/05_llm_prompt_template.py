"""SynthiaLLM: text in, text out, with the prompt built by ``synthia_prompt_template``.

SynthiaLLM sends its prompt to the model verbatim, so the prompt must already be in Synthia's
format; ``synthia_prompt_template()`` produces it. The script shows:

* the chain ``synthia_prompt_template() | SynthiaLLM(...)``;
* a stop sequence: ``stop=["\\n"]`` ends the answer at its first newline;
* ``llm.generate([...])``: several prompts decoded as one batch, with per-prompt finish reasons
  and the summed token usage in ``llm_output["token_usage"]``.

On a CUDA GPU:

    python examples/05_llm_prompt_template.py

Demo form (tiny offline random-weight checkpoint, CPU, gibberish output):

    export SYNTHIA_MODEL=/tmp/tiny-synthia SYNTHIA_DEVICE=cpu SYNTHIA_MAX_TOKENS=16
    python -c "from langchain_synthia.testing import make_tiny_checkpoint as m; m('$SYNTHIA_MODEL')"
    python examples/05_llm_prompt_template.py
"""

import os

from langchain_synthia import SynthiaLLM, synthia_prompt_template

MODEL = os.environ.get("SYNTHIA_MODEL", "TheBloke/Synthia-7B-v1.3-GPTQ")
DEVICE = os.environ.get("SYNTHIA_DEVICE", "auto")
MAX_TOKENS = int(os.environ.get("SYNTHIA_MAX_TOKENS", "256"))

llm = SynthiaLLM(model=MODEL, device=DEVICE, max_tokens=MAX_TOKENS)
template = synthia_prompt_template()

print("== the prompt, as sent")
print(template.format(question="Why is the sky blue?"))

print("\n== template | llm")
chain = template | llm
print(chain.invoke({"question": "Why is the sky blue?"}).strip())

print('\n== stop=["\\n"]: the first line only')
first_line = llm.invoke(template.format(question="List the planets, one per line."), stop=["\n"])
print(repr(first_line))

print("\n== llm.generate([...]): one batch, with token usage")
questions = ["What is 12 times 12?", "Name a primary colour."]
result = llm.generate([template.format(question=q) for q in questions])
for question, (generation,) in zip(questions, result.generations, strict=True):
    finish = generation.generation_info["finish_reason"]
    print(f"Q: {question}\nA: {generation.text.strip()}  [finish_reason={finish}]")
print("token_usage:", result.llm_output["token_usage"])
