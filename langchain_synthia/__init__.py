"""langchain-synthia: Synthia-7B-v1.3 (GPTQ) as a first-class LangChain citizen on your own GPU.

Importing this package is cheap: its names load on first use (so ``synthia --help`` stays
fast), torch, transformers and the GPTQ stack load on the first generation, and the model
loads once per process.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from langchain_synthia._version import __version__

if TYPE_CHECKING:
    from langchain_synthia._checkpoint import CheckpointError
    from langchain_synthia._fast_engine import EngineOutOfMemoryError
    from langchain_synthia._grammar import GrammarError
    from langchain_synthia._remote import RemoteEngineError
    from langchain_synthia._token_stream import EngineStoppedError, GenerationTimeoutError
    from langchain_synthia.chat_models import ChatSynthia
    from langchain_synthia.llms import SynthiaLLM
    from langchain_synthia.output_parsers import SynthiaOutputParser
    from langchain_synthia.prompts import (
        DEFAULT_SYSTEM_MESSAGE,
        TREE_OF_THOUGHT_SYSTEM_MESSAGE,
        Turn,
        neutralize_role_labels,
        render_messages,
        render_prompt,
        synthia_chat_prompt,
        synthia_prompt_template,
    )
    from langchain_synthia.variants import DEFAULT_REPO, VARIANTS, SynthiaVariant, get_variant

_MODULES = {
    "CheckpointError": "_checkpoint",
    "EngineOutOfMemoryError": "_fast_engine",
    "EngineStoppedError": "_token_stream",
    "GenerationTimeoutError": "_token_stream",
    "GrammarError": "_grammar",
    "RemoteEngineError": "_remote",
    "ChatSynthia": "chat_models",
    "SynthiaLLM": "llms",
    "SynthiaOutputParser": "output_parsers",
    "DEFAULT_SYSTEM_MESSAGE": "prompts",
    "TREE_OF_THOUGHT_SYSTEM_MESSAGE": "prompts",
    "Turn": "prompts",
    "neutralize_role_labels": "prompts",
    "render_messages": "prompts",
    "render_prompt": "prompts",
    "synthia_chat_prompt": "prompts",
    "synthia_prompt_template": "prompts",
    "DEFAULT_REPO": "variants",
    "VARIANTS": "variants",
    "SynthiaVariant": "variants",
    "get_variant": "variants",
}

__all__ = [
    "DEFAULT_REPO",
    "DEFAULT_SYSTEM_MESSAGE",
    "TREE_OF_THOUGHT_SYSTEM_MESSAGE",
    "VARIANTS",
    "ChatSynthia",
    "CheckpointError",
    "EngineOutOfMemoryError",
    "EngineStoppedError",
    "GenerationTimeoutError",
    "GrammarError",
    "RemoteEngineError",
    "SynthiaLLM",
    "SynthiaOutputParser",
    "SynthiaVariant",
    "Turn",
    "__version__",
    "get_variant",
    "neutralize_role_labels",
    "render_messages",
    "render_prompt",
    "synthia_chat_prompt",
    "synthia_prompt_template",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        msg = f"module 'langchain_synthia' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(import_module(f"langchain_synthia.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
