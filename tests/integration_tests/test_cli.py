"""The ``synthia`` command (the thin face over ChatSynthia)."""

import subprocess
import sys

from click.testing import CliRunner

from langchain_synthia.cli import main
from tests.conftest import DEVICE


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom langchain_synthia.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "chat" in out.stdout
    assert out.stdout.strip().endswith("[]")


def test_chat_streams_answers_and_keeps_the_conversation(tiny_model: str, monkeypatch) -> None:
    from langchain_synthia import chat_models

    prompts: list[str] = []
    original = chat_models.render_messages

    def spy(*args, **kwargs) -> str:
        prompts.append(original(*args, **kwargs))
        return prompts[-1]

    monkeypatch.setattr(chat_models, "render_messages", spy)
    result = CliRunner().invoke(
        main,
        [
            "chat",
            "--model",
            tiny_model,
            "--device",
            DEVICE,
            "--max-tokens",
            "8",
            "--tree-of-thought",
        ],
        input="Hello\nHow are you?\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("Synthia: ") == 2
    assert len(prompts) == 2
    assert prompts[1].startswith("SYSTEM: Elaborate on the topic")
    assert "USER: Hello\nASSISTANT: " in prompts[1]
    assert prompts[1].endswith("USER: How are you?\nASSISTANT:")


def test_demo_mode_builds_and_uses_the_tiny_checkpoint(tiny_model: str, monkeypatch) -> None:
    from pathlib import Path

    monkeypatch.setenv("SYNTHIA_DEMO_DIR", str(Path(tiny_model)))
    result = CliRunner().invoke(main, ["chat", "--demo", "--max-tokens", "4"], input="Hi\n")
    assert result.exit_code == 0, result.output
    assert "Demo mode" in result.output
    assert "Synthia: " in result.output


def test_bad_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["chat", "--revision", "nope", "--device", DEVICE], input="")
    assert result.exit_code == 2
    assert "Unknown branch 'nope'" in result.output
