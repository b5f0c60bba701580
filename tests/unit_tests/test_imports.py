import subprocess
import sys

import langchain_synthia

EXPECTED_ALL = [
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
    "render_messages",
    "neutralize_role_labels",
    "render_prompt",
    "synthia_chat_prompt",
    "synthia_prompt_template",
]


def test_all_exports() -> None:
    assert sorted(langchain_synthia.__all__) == sorted(EXPECTED_ALL)
    for name in EXPECTED_ALL:
        assert hasattr(langchain_synthia, name)


def test_import_and_construction_load_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "import langchain_synthia as s\n"
        "s.ChatSynthia(); s.SynthiaLLM(); s.synthia_chat_prompt()\n"
        "import langchain_synthia.testing, langchain_synthia.cli\n"
        "heavy = ('torch', 'transformers', 'optimum', 'gptqmodel')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_version_is_single_sourced() -> None:
    from importlib.metadata import version

    assert langchain_synthia.__version__ == version("langchain-synthia")
