"""langchain-synthia: Synthia-7B-v1.3 (GPTQ) as a first-class LangChain citizen on your own GPU.

Importing this package is cheap: torch, transformers and the GPTQ stack load on the first
generation, and the model loads once per process.
"""

from langchain_synthia._engine import GenerationTimeoutError
from langchain_synthia._grammar import GrammarError
from langchain_synthia._version import __version__
from langchain_synthia.chat_models import ChatSynthia
from langchain_synthia.llms import SynthiaLLM
from langchain_synthia.output_parsers import SynthiaOutputParser
from langchain_synthia.prompts import (
    DEFAULT_SYSTEM_MESSAGE,
    TREE_OF_THOUGHT_SYSTEM_MESSAGE,
    Turn,
    render_messages,
    render_prompt,
    synthia_chat_prompt,
    synthia_prompt_template,
)
from langchain_synthia.variants import DEFAULT_REPO, VARIANTS, SynthiaVariant, get_variant

__all__ = [
    "DEFAULT_REPO",
    "DEFAULT_SYSTEM_MESSAGE",
    "TREE_OF_THOUGHT_SYSTEM_MESSAGE",
    "VARIANTS",
    "ChatSynthia",
    "GenerationTimeoutError",
    "GrammarError",
    "SynthiaLLM",
    "SynthiaOutputParser",
    "SynthiaVariant",
    "Turn",
    "__version__",
    "get_variant",
    "render_messages",
    "render_prompt",
    "synthia_chat_prompt",
    "synthia_prompt_template",
]
