"""The ``synthia`` command (the thin face over ChatSynthia), run on the tiny checkpoint."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from langchain_synthia import ChatSynthia
from langchain_synthia.cli import _MODEL_OPTIONS, _SAMPLING_OPTIONS, main
from langchain_synthia.prompts import TREE_OF_THOUGHT_SYSTEM_MESSAGE
from tests.conftest import DEVICE

COMMANDS = ("chat", "generate", "variants", "download", "info")


def run(args: list[str], input: str | None = None, **env: str):
    return CliRunner().invoke(main, args, input=input, env=env or None)


@pytest.fixture
def spy_prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt ChatSynthia renders during the test, in order."""
    from langchain_synthia import chat_models

    prompts: list[str] = []
    original = chat_models.render_messages

    def spy(*args, **kwargs) -> str:
        prompts.append(original(*args, **kwargs))
        return prompts[-1]

    monkeypatch.setattr(chat_models, "render_messages", spy)
    return prompts


@pytest.fixture
def model_args(tiny_model: str) -> list[str]:
    return ["--model", tiny_model, "--device", DEVICE, "--max-tokens", "6", "--seed", "1"]


# -- the command line as a whole ---------------------------------------------------------------


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom langchain_synthia.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'transformers', 'langchain_core') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout
    assert out.stdout.strip().endswith("[]")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = run([command, "--help"])
    assert result.exit_code == 0
    assert f"Usage: main {command}" in result.output


def test_every_model_and_sampling_option_is_a_chat_model_field() -> None:
    names = {
        decorator(lambda **_: None).__click_params__[0].name
        for decorator in (*_MODEL_OPTIONS, *_SAMPLING_OPTIONS)
    }
    assert names <= set(ChatSynthia.model_fields), names - set(ChatSynthia.model_fields)
    assert {"temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"} <= names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "9"], "--temperature: Input should be less than or equal to 5"),
        (["--top-p", "0"], "--top-p: Input should be greater than 0"),
        (["--max-tokens", "0"], "--max-tokens: Input should be greater than or equal to 1"),
        (["--device", "gpu"], "device='gpu' is not a device"),
        (["--revision", "nope"], "Unknown branch 'nope'"),
        (["--temperature", "warm"], "'warm' is not a valid float"),
    ],
)
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_bad_values_are_usage_errors_that_name_the_option(command, args, message) -> None:
    result = run([command, *args, *(["hello"] if command == "generate" else [])], input="")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_ctrl_c_at_the_prompt_leaves_with_exit_code_130(model_args, monkeypatch) -> None:
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    result = run(["chat", *model_args, "--no-log"])
    assert result.exit_code == 130
    assert "Interrupted." in result.output


# -- chat --------------------------------------------------------------------------------------


def test_chat_streams_answers_and_keeps_the_conversation(model_args, spy_prompts, tmp_path) -> None:
    log = tmp_path / "log.jsonl"
    result = run(
        ["chat", *model_args, "--tree-of-thought", "--log", str(log)],
        input="Hello\nHow are you?\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("Synthia: ") == 2
    assert len(spy_prompts) == 2
    assert spy_prompts[1].startswith("SYSTEM: Elaborate on the topic")
    assert "USER: Hello\nASSISTANT: " in spy_prompts[1]
    assert spy_prompts[1].endswith("USER: How are you?\nASSISTANT:")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "How are you?"]
    for record in records:  # the log holds what the terminal showed
        assert f"Synthia: {record['answer']}" in result.output
        assert record["system"] == TREE_OF_THOUGHT_SYSTEM_MESSAGE
    answer = records[0]["answer"]
    assert f"USER: Hello\nASSISTANT: {answer}\nUSER: How are you?" in spy_prompts[1]


def test_chat_reads_multi_line_messages(model_args, spy_prompts) -> None:
    typed = 'one \\\ntwo\n"""\nthree\n\nfour\n"""\n"""five"""\n/exit\n'
    result = run(["chat", *model_args, "--no-log"], input=typed)
    assert result.exit_code == 0, result.output
    assert spy_prompts[0].endswith("USER: one \ntwo\nASSISTANT:")
    assert spy_prompts[1].endswith("USER: three\n\nfour\nASSISTANT:")
    assert spy_prompts[2].endswith("USER: five\nASSISTANT:")


def test_chat_commands(model_args, spy_prompts, tmp_path) -> None:
    saved = tmp_path / "conversation.json"
    typed = "\n".join([
        "first",
        "/tot on", "second",
        "/tot off", "/system You are terse.", "third",
        "/reset", "fourth",
        "/system none", "fifth",
        f"/save {saved}",
        "/bogus", "/help", "/exit",
    ]) + "\n"  # fmt: skip
    result = run(["chat", *model_args, "--no-log"], input=typed)
    assert result.exit_code == 0, result.output
    first, second, third, fourth, fifth = spy_prompts
    assert first.startswith("SYSTEM: You are Synthia.")
    assert second.startswith(f"SYSTEM: {TREE_OF_THOUGHT_SYSTEM_MESSAGE}\nUSER: first\n")
    assert third.startswith("SYSTEM: You are terse.\nUSER: first\n")
    assert third.count("USER:") == 3
    assert fourth == "SYSTEM: You are terse.\nUSER: fourth\nASSISTANT:"
    assert fifth.startswith("USER: fourth\nASSISTANT:")
    assert "[Tree-of-Thought system message on]" in result.output
    assert "[Tree-of-Thought system message off]" in result.output
    assert "[unknown command /bogus: /help lists the commands]" in result.output
    assert "/reset" in result.output  # the help text
    document = json.loads(saved.read_text())
    assert document["system"] is None
    assert [m["content"] for m in document["messages"][::2]] == ["fourth", "fifth"]
    assert [m["role"] for m in document["messages"]] == ["user", "assistant"] * 2


def test_chat_log_is_on_by_default_and_off_with_no_log(model_args, tmp_path) -> None:
    default = tmp_path / "data" / "langchain-synthia" / "conversations.jsonl"
    result = run(["chat", *model_args], input="Hi\n", XDG_DATA_HOME=str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    assert len(default.read_text().splitlines()) == 1
    result = run(
        ["chat", *model_args, "--no-log"], input="Hi\n", XDG_DATA_HOME=str(tmp_path / "data")
    )
    assert result.exit_code == 0, result.output
    assert len(default.read_text().splitlines()) == 1
    assert run(["chat", "--log", "x", "--no-log"], input="").exit_code == 2
    env_log = tmp_path / "from-env.jsonl"  # --no-log overrules $SYNTHIA_CHAT_LOG
    result = run(["chat", *model_args, "--no-log"], input="Hi\n", SYNTHIA_CHAT_LOG=str(env_log))
    assert result.exit_code == 0, result.output
    assert not env_log.exists()
    result = run(["chat", *model_args], input="Hi\n", SYNTHIA_CHAT_LOG=str(env_log))
    assert len(env_log.read_text().splitlines()) == 1


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_model: str, tmp_path) -> None:
    from langchain_synthia._repl import ChatSession

    shown: list[str] = []
    interrupt = [True]

    def write(text: str = "", nl: bool = True) -> None:
        if interrupt[0] and text and not text.startswith(("Synthia", "\n[")):
            interrupt[0] = False
            raise KeyboardInterrupt
        shown.append(text)

    model = ChatSynthia(
        model=tiny_model, device=DEVICE, max_tokens=6, temperature=0, system_message=None
    )
    log = tmp_path / "log.jsonl"
    threads = threading.active_count()
    session = ChatSession(model, system_message=None, log_path=log, write=write)
    assert session.handle("first")
    assert any("[answer stopped" in text for text in shown)
    assert session.history == []
    assert not log.exists()
    assert session.handle("second")
    assert len(session.history) == 2
    assert session.history[1].text == model.invoke("second").text.strip()
    assert len(log.read_text().splitlines()) == 1
    assert threading.active_count() <= threads + 1  # at most the engine's own worker


def test_demo_mode_builds_and_uses_the_tiny_checkpoint(tiny_model: str) -> None:
    result = run(
        ["chat", "--demo", "--max-tokens", "4", "--no-log"], "Hi\n", SYNTHIA_DEMO_DIR=tiny_model
    )
    assert result.exit_code == 0, result.output
    assert "Demo mode" in result.output
    assert "Synthia: " in result.output
    assert run(["chat", "--demo", "--model", "x"], "").exit_code == 2


# -- generate ----------------------------------------------------------------------------------


def test_generate_prints_the_same_answer_as_the_library(model_args, tiny_model) -> None:
    from langchain_synthia import SynthiaOutputParser

    result = run(["generate", *model_args, "--temperature", "0", "Name a colour."])
    assert result.exit_code == 0, result.output
    chat = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=6, temperature=0)
    expected = (chat | SynthiaOutputParser()).invoke("Name a colour.")
    assert result.stdout == expected + "\n"
    assert "[cut off at 6 tokens" in result.stderr


def test_generate_reads_stdin_and_prints_json(model_args) -> None:
    piped = run(["generate", *model_args, "--temperature", "0", "--json"], input="Name a colour.")
    dashed = run(["generate", *model_args, "--temperature", "0", "--json", "-"], "Name a colour.")
    assert piped.exit_code == dashed.exit_code == 0, piped.output
    answer = json.loads(piped.stdout)
    assert answer == json.loads(dashed.stdout)
    assert answer["finish_reason"] == "length"
    assert answer["usage"]["output_tokens"] == 6
    assert answer["usage"]["total_tokens"] == answer["usage"]["input_tokens"] + 6
    assert answer["text"]


def test_generate_refuses_an_empty_prompt_and_two_system_messages(model_args) -> None:
    assert run(["generate", *model_args], input="  \n").exit_code == 2
    both = run(["generate", *model_args, "--system", "x", "--tree-of-thought", "hi"])
    assert both.exit_code == 2
    assert "pick one" in both.output


def test_a_model_not_in_the_cache_offline_exits_with_3(tmp_path) -> None:
    result = run(["generate", "--offline", "--cache-dir", str(tmp_path), "hi"])
    assert result.exit_code == 3, result.output
    assert "not in the local Hugging Face cache" in result.output


# -- variants, download, info ------------------------------------------------------------------


def test_variants_lists_the_six_branches_with_their_memory() -> None:
    result = run(["variants"])
    assert result.exit_code == 0
    for branch in ("main", "gptq-4bit-32g-actorder_True", "gptq-8bit--1g-actorder_True"):
        assert branch in result.output
    table = json.loads(run(["variants", "--json"]).output)
    main_row = table["variants"][0]
    assert main_row["branch"] == "main"
    assert abs(main_row["gpu_memory_gib"] - 4.75) < 0.1  # the peak measured on an H200
    eight = json.loads(run(["variants", "--json", "--max-batch-size", "8"]).output)
    assert eight["variants"][0]["gpu_memory_gib"] == pytest.approx(
        main_row["gpu_memory_gib"] + 3.5, abs=0.1
    )  # seven more 512 MiB cache rows


def test_variants_marks_what_fits_the_gpu(monkeypatch) -> None:
    from langchain_synthia import _sysinfo

    gpu = {"index": 0, "name": "An 8 GB card", "memory_gib": 8.0, "free_gib": 7.5}
    monkeypatch.setattr(_sysinfo, "gpus", lambda: [gpu])
    table = json.loads(run(["variants", "--json"]).output)
    fits = {row["branch"]: row["fits"] for row in table["variants"]}
    assert fits["main"]
    assert fits["gptq-4bit-32g-actorder_True"]
    assert not fits["gptq-8bit--1g-actorder_True"]
    assert "An 8 GB card, 7.5 GiB free" in run(["variants"]).output


def test_download_fetches_safetensors_only_into_the_folder(monkeypatch, tiny_model, tmp_path):
    import huggingface_hub

    calls: list[dict] = []

    def snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return tiny_model

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = run(
        ["download", "--revision", "gptq-8bit-32g-actorder_True", "--local-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == tiny_model
    assert "8.17 GB" in result.stderr
    (call,) = calls
    assert call["repo_id"] == "TheBloke/Synthia-7B-v1.3-GPTQ"
    assert call["revision"] == "gptq-8bit-32g-actorder_True"
    assert call["local_dir"] == str(tmp_path)
    assert "*.safetensors" in call["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt")) for p in call["allow_patterns"])


def test_download_errors(tmp_path) -> None:
    assert run(["download", "--revision", "nope"]).exit_code == 2
    offline = run(["download", "--cache-dir", str(tmp_path)])  # HF_HUB_OFFLINE=1 in tests
    assert offline.exit_code == 3
    assert "downloading is off" in offline.output


def test_info_reports_versions_device_kernel_and_paths() -> None:
    import importlib.metadata

    result = run(["info", "--json"], SYNTHIA_MODEL="/models/synthia")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["packages"]["torch"] == importlib.metadata.version("torch")
    assert facts["packages"]["langchain-core"] == importlib.metadata.version("langchain-core")
    assert facts["environment"]["SYNTHIA_MODEL"] == "/models/synthia"
    assert set(facts["paths"]) == {"huggingface_cache", "kernel_build_cache", "demo_checkpoint"}
    if DEVICE == "cpu":
        assert facts["gpus"] == []
        assert facts["engine"] == "transformers"
        assert "gptq_torch_aten (4-bit)" in facts["kernel"]
    text = run(["info"]).output
    assert f"torch: {facts['packages']['torch']}" in text
    assert "kernel build cache:" in text


def test_the_cli_runs_as_an_installed_command(tiny_model: str) -> None:
    synthia = Path(sys.executable).parent / "synthia"
    done = subprocess.run(
        [str(synthia), "generate", "--model", tiny_model, "--device", DEVICE, "--max-tokens", "3",
         "--json", "Hi"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["output_tokens"] <= 3
    assert "Loading" in done.stderr
