"""A first run without a GPU or the model: demo mode, the offline error, the variants table."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from langchain_synthia import ChatSynthia
from langchain_synthia.cli import DEMO_MAX_TOKENS, main


def run(args: list[str], input: str | None = None, **env: str):
    return CliRunner().invoke(main, args, input=input, env=env or None)


def demo_answer(tiny_model: str, *options: str) -> dict:
    """``synthia generate --demo --json`` on the tiny checkpoint, greedy."""
    result = run(
        ["generate", "--demo", "--json", "--temperature", "0", *options, "Hi"],
        SYNTHIA_DEMO_DIR=tiny_model,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_demo_answers_are_short_unless_max_tokens_says_otherwise(tiny_model: str) -> None:
    assert 0 < DEMO_MAX_TOKENS <= 64
    short = demo_answer(tiny_model)
    assert short["finish_reason"] == "length"
    assert short["usage"]["output_tokens"] == DEMO_MAX_TOKENS
    longer = demo_answer(tiny_model, "--max-tokens", str(DEMO_MAX_TOKENS + 8))
    assert longer["usage"]["output_tokens"] == DEMO_MAX_TOKENS + 8


def test_demo_chat_keeps_no_log_unless_log_is_given(tiny_model: str, tmp_path: Path) -> None:
    data, env_log, asked = tmp_path / "data", tmp_path / "env.jsonl", tmp_path / "asked.jsonl"
    env = {"SYNTHIA_DEMO_DIR": tiny_model, "XDG_DATA_HOME": str(data)}
    result = run(["chat", "--demo"], "Hi\n", **env, SYNTHIA_CHAT_LOG=str(env_log))
    assert result.exit_code == 0, result.output
    assert "Synthia: " in result.output
    assert "keeps no conversation log" in result.output
    assert not data.exists()
    assert not env_log.exists()
    result = run(["chat", "--demo", "--log", str(asked)], "Hi\n", **env)
    assert result.exit_code == 0, result.output
    assert len(asked.read_text().splitlines()) == 1


def test_the_offline_error_names_the_option_and_demo_mode(tmp_path: Path) -> None:
    result = run(["generate", "--offline", "--cache-dir", str(tmp_path), "hi"])
    assert result.exit_code == 3, result.output
    assert "not in the local Hugging Face cache" in result.output
    assert "--model" in result.output
    assert "synthia chat --demo" in result.output
    chat = ChatSynthia(cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(FileNotFoundError, match="point model= ") as error:
        chat.load()
    assert "synthia chat --demo" in str(error.value)


def test_variants_without_a_gpu_shows_a_dash_for_fits(monkeypatch) -> None:
    from langchain_synthia import _sysinfo

    monkeypatch.setattr(_sysinfo, "gpus", list)
    result = run(["variants"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith(("main", "gptq-"))]
    assert len(rows) == 6
    assert all(row.split()[-1] == "-" for row in rows)
    assert "'fits' shows -" in result.output
    assert all(
        row["fits"] is None for row in json.loads(run(["variants", "--json"]).output)["variants"]
    )
