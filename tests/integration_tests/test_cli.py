"""The ``synthia`` command (the thin face over ChatSynthia), run on the tiny checkpoint."""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from langchain_synthia import ChatSynthia
from langchain_synthia.cli import _MODEL_OPTIONS, _SAMPLING_OPTIONS, main
from langchain_synthia.prompts import TREE_OF_THOUGHT_SYSTEM_MESSAGE
from tests._completions_server import CompletionsServer, Reply, event_stream, json_reply
from tests.helpers import DEVICE

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


# -- a failed turn, hostile text, broken streams, the log's privacy ----------------------------

ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""What a terminal acts on instead of showing; no output of the CLI holds any."""
CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4K\x07"  # OSC 52: write the clipboard
TITLE = "\x1b]0;pwned\x1b\\"  # OSC 0: set the window title


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[error (message not kept)")]


def test_a_turn_past_the_context_window_fails_alone_and_the_chat_goes_on(
    model_args, spy_prompts, tmp_path
) -> None:
    saved = tmp_path / "conversation.json"
    typed = f"Hi\nHi\nHi\nHi\n/save {saved}\n/reset\nHi\n/exit\n"
    result = run(["chat", *model_args, "--no-log", "--system", "", "--context-window", "30"], typed)
    assert result.exit_code == 0, result.output
    errors = error_lines(result.output)
    assert errors, result.output
    assert "context window is 30 tokens" in errors[0]
    assert len(set(errors)) == 1  # each failed turn left the conversation as it was
    kept = json.loads(saved.read_text())["messages"]
    assert len(kept) == 2 * (4 - len(errors)) > 0
    assert [m["content"] for m in kept[::2]] == ["Hi"] * (4 - len(errors))
    assert spy_prompts[-1] == "USER: Hi\nASSISTANT:"  # after /reset, answered again
    assert result.output.rstrip().endswith("You:")  # and the chat went on to /exit


def fail_some_turns(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Messages that start with FAIL get a few words of answer, then `error`."""
    from langchain_synthia import _repl

    answer = _repl.stream_answer

    def failing(model, messages, write):
        if messages[-1].text.startswith("FAIL"):
            write("half an ")
            raise error
        return answer(model, messages, write)

    monkeypatch.setattr(_repl, "stream_answer", failing)


def model_failures() -> list[BaseException]:
    from langchain_synthia import GenerationTimeoutError
    from langchain_synthia._fast_engine import EngineOutOfMemoryError
    from langchain_synthia._remote import RemoteEngineError

    return [
        GenerationTimeoutError("Generation took longer than timeout=1s. Raise `timeout`."),
        ValueError("The prompt is 9000 tokens but Synthia's context window is 4096 tokens."),
        RemoteEngineError(f"The server answered 500: {TITLE}overloaded\nretry later", 500),
        EngineOutOfMemoryError("CUDA out of memory. Lower max_batch_size."),
        OverflowError("timestamp out of range for platform time_t"),
        KeyError("n_ctx"),
    ]


@pytest.mark.parametrize("error", model_failures(), ids=lambda error: type(error).__name__)
def test_any_model_error_fails_the_turn_alone_with_one_line(
    model_args, spy_prompts, monkeypatch, tmp_path, error
) -> None:
    fail_some_turns(monkeypatch, error)
    log, saved = tmp_path / "log.jsonl", tmp_path / "conversation.json"
    typed = f"first\nFAIL now\nsecond\n/save {saved}\n/exit\n"
    result = run(["chat", *model_args, "--log", str(log)], typed)
    assert result.exit_code == 0, result.output
    (line,) = error_lines(result.stderr)
    assert "half an \n" in result.stdout  # the partial answer's line is ended
    assert str(error).splitlines()[0].replace(TITLE, "") in line
    assert not ACTIVE.search(result.output)
    assert spy_prompts[1].count("USER:") == 2  # "second" follows "first": FAIL is not kept
    assert "FAIL" not in spy_prompts[1]
    assert [m["content"] for m in json.loads(saved.read_text())["messages"][::2]] == [
        "first",
        "second",
    ]
    assert [json.loads(r)["prompt"] for r in log.read_text().splitlines()] == ["first", "second"]


def test_a_timeout_in_chat_fails_the_turn_and_timeout_inf_is_no_traceback(model_args) -> None:
    timed_out = run(["chat", *model_args, "--no-log", "--timeout", "1e-9"], "Hi\nHi\n/exit\n")
    assert timed_out.exit_code == 0, timed_out.output
    assert len(error_lines(timed_out.stderr)) == 2
    assert "timeout" in error_lines(timed_out.stderr)[0]
    for value in ("inf", "1e10"):  # no limit: answered, or refused with a message
        chat = run(["chat", *model_args, "--no-log", "--timeout", value], "Hi\n/exit\n")
        assert chat.exit_code in (0, 2), chat.output
        assert chat.exception is None or isinstance(chat.exception, SystemExit), chat.exception
        generate = run(["generate", *model_args, "--timeout", value, "Hi"])
        assert generate.exception is None or isinstance(generate.exception, SystemExit), (
            generate.exception
        )
        if generate.exit_code:
            assert generate.exit_code in (1, 2)
            assert generate.stderr.count("Error: ") == 1, generate.stderr


def test_an_unexpected_error_is_one_line_and_synthia_verbose_shows_the_traceback(
    model_args, monkeypatch
) -> None:
    from langchain_synthia import _repl

    def broken(model, messages, write):
        raise LookupError(f"no such thing{CLIPBOARD}")

    monkeypatch.setattr(_repl, "stream_answer", broken)
    result = run(["generate", *model_args, "Hi"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.endswith(
        "Error: no such thing (LookupError; SYNTHIA_VERBOSE=1 shows where)\n"
    )
    verbose = run(["generate", *model_args, "Hi"], SYNTHIA_VERBOSE="1")
    assert isinstance(verbose.exception, LookupError)


def completion(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"text": text, "finish_reason": finish}]}


class _HostileServer:
    """An OpenAI-compatible server on loopback whose answers and errors carry escapes.

    A prompt whose last message starts with FAIL gets a 400 error, one with BREAK a partial
    answer and then an error event; any other gets an answer with a clipboard write and a
    window title in it.
    """

    ANSWER = ("Sure.", f"{CLIPBOARD} Here", f"{TITLE} it is\r\n\u202eok")

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.server = CompletionsServer(self._complete)
        self.url = self.server.url

    def _complete(self, body: dict) -> Reply:
        last = body["prompt"].rsplit("USER: ", 1)[-1]
        self.prompts.append(body["prompt"])
        if last.startswith("FAIL"):
            return json_reply(400, {"error": {"message": f"bad request{TITLE}: {CLIPBOARD}no"}})
        if last.startswith("BREAK"):
            error = {"error": {"message": f"engine died\x1b[2J{CLIPBOARD}"}}
            return event_stream([completion("partial"), error])
        *pieces, end = _HostileServer.ANSWER
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        return event_stream([*map(completion, pieces), completion(end, "stop") | {"usage": usage}])


@pytest.fixture
def hostile_server():
    server = _HostileServer()
    yield server
    server.server.close()


def remote_args(server: _HostileServer) -> list[str]:
    return ["--base-url", server.url, "--model", "m", "--max-tokens", "8"]


def test_a_hostile_server_reaches_chat_with_text_only(hostile_server, tmp_path) -> None:
    remote = remote_args(hostile_server)
    saved = tmp_path / "conversation.json"
    typed = f"Hi\nFAIL\nBREAK\nagain\n/save {saved}\n/exit\n"
    chat = run(["chat", *remote, "--no-log"], typed)
    assert chat.exit_code == 0, chat.output
    assert not ACTIVE.search(chat.output), ascii(chat.output)
    assert chat.stdout.count("Synthia: Sure. Here it is\nok") == 2
    bad, broken = error_lines(chat.stderr)
    assert bad.endswith("answered 400: bad request: no]")
    assert broken.endswith("reported an error mid-answer: engine died]")
    assert "USER: Hi\nASSISTANT: Sure." in hostile_server.prompts[-1]
    assert "FAIL" not in hostile_server.prompts[-1]
    assert "BREAK" not in hostile_server.prompts[-1]
    document = saved.read_text()
    assert not ACTIVE.search(document)  # escaped in the JSON: the file is safe to cat
    answers = [m["content"] for m in json.loads(document)["messages"][1::2]]
    assert answers == ["".join(_HostileServer.ANSWER)] * 2  # kept as the server sent it


def test_a_hostile_server_reaches_generate_with_text_only(hostile_server) -> None:
    remote = remote_args(hostile_server)
    generate = run(["generate", *remote, "Hi"])
    assert generate.exit_code == 0, generate.output
    assert generate.stdout == "Sure. Here it is\nok\n"
    as_json = run(["generate", *remote, "--json", "Hi"])
    assert not ACTIVE.search(as_json.stdout)
    assert json.loads(as_json.stdout)["text"] == "".join(_HostileServer.ANSWER)  # escaped
    failed = run(["generate", *remote, "FAIL"])
    assert failed.exit_code == 1
    assert failed.stderr.endswith("answered 400: bad request: no\n")
    assert not ACTIVE.search(failed.output)


# -- what does not decode, and standard streams that are closed or break -----------------------


def test_a_prompt_that_is_not_utf8_is_read_with_its_bad_bytes_replaced(model_args, spy_prompts):
    argv = run(["generate", *model_args, "caf\udce9 au lait"])  # as Python decodes argv
    piped = CliRunner().invoke(main, ["generate", *model_args], input=b"caf\xe9 au lait")
    typed = CliRunner().invoke(main, ["chat", *model_args, "--no-log"], input=b"caf\xe9\n")
    for result in (argv, piped, typed):
        assert result.exit_code == 0, result.output
        assert "not valid utf-8: 1 undecodable byte replaced with U+FFFD" in result.stderr
    assert spy_prompts[0] == spy_prompts[1]
    assert "USER: caf\ufffd au lait\n" in spy_prompts[0]
    assert spy_prompts[2].endswith("USER: caf\ufffd\nASSISTANT:")


def synthia(*args: str, **options) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "synthia"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **options)


def close(*descriptors: int):
    return lambda: [os.close(descriptor) for descriptor in descriptors]


def test_closed_standard_streams_give_a_message_not_a_traceback(model_args) -> None:
    no_input = synthia("chat", *model_args, "--no-log", preexec_fn=close(0))
    assert no_input.returncode == 2, no_input.stderr
    assert "Standard input is closed" in no_input.stderr
    no_output = synthia("generate", *model_args, "Hi", preexec_fn=close(1))
    assert no_output.returncode == 1, no_output.stderr
    assert "Error: Standard output is closed" in no_output.stderr
    # standard input and error closed: the answer still comes (its notes go nowhere)
    answered = synthia("generate", *model_args, "--json", "Hi", preexec_fn=close(0, 2))
    assert answered.returncode == 0
    assert json.loads(answered.stdout)["usage"]["output_tokens"] == 6
    for done in (no_input, no_output, answered):
        assert "Traceback" not in done.stderr


def test_a_reader_that_stops_ends_generate_quietly(model_args) -> None:
    command = [str(Path(sys.executable).parent / "synthia"), "generate", *model_args, "Hi"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `| head -c 0` does: every write to the pipe fails with EPIPE
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert b"Traceback" not in stderr
    assert b"Exception ignored" not in stderr
    assert b"BrokenPipe" not in stderr


def test_a_broken_pipe_in_chat_ends_the_chat(tiny_model: str) -> None:
    from langchain_synthia._repl import ChatSession

    def write(text: str = "", nl: bool = True, err: bool = False) -> None:
        if text and text != "Synthia: ":
            raise BrokenPipeError(32, "Broken pipe")

    model = ChatSynthia(model=tiny_model, device=DEVICE, max_tokens=6, system_message=None)
    session = ChatSession(model, system_message=None, log_path=None, write=write)
    with pytest.raises(BrokenPipeError):
        session.handle("Hi")


def test_the_log_and_saved_files_are_private_whatever_the_umask(model_args, tmp_path) -> None:
    data = tmp_path / "data"
    saved = tmp_path / "saved.json"
    shared = tmp_path / "shared.jsonl"
    shared.write_text('{"prompt": "old"}\n')
    shared.chmod(0o644)
    umask = os.umask(0)
    try:
        fresh = run(["chat", *model_args], f"Hi\n/save {saved}\n", XDG_DATA_HOME=str(data))
        tightened = run(["chat", *model_args, "--log", str(shared)], "Hi\n")
    finally:
        os.umask(umask)
    assert fresh.exit_code == tightened.exit_code == 0, fresh.output + tightened.output
    log = data / "langchain-synthia" / "conversations.jsonl"
    assert len(log.read_text().splitlines()) == 1
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.parent.stat().st_mode & 0o777 == 0o700
    assert data.stat().st_mode & 0o777 == 0o700
    assert saved.stat().st_mode & 0o777 == 0o600
    assert shared.stat().st_mode & 0o777 == 0o600
    assert len(shared.read_text().splitlines()) == 2


def test_a_model_folder_that_is_missing_is_one_error_line(tmp_path) -> None:
    missing = str(tmp_path / "no-such-folder")
    for command in (["generate", "Hi"], ["chat"]):
        result = run([*command[:1], "--model", missing, "--device", "cpu", *command[1:]], "")
        assert result.exit_code in (1, 2, 3), result.output
        assert isinstance(result.exception, SystemExit), result.exception
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert "no-such-folder" in line
