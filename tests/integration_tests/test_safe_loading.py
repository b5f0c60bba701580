"""Safe loading on copies of the tiny checkpoint: what loads, what never runs, what stays quiet.

* Safetensors only: pickle weights are refused (there is no opt-in), and a folder that also
  holds pickles loads its safetensors without unpickling anything.
* Remote code never: an ``auto_map`` pointing at a module of the folder is ignored by both
  engines.
* ``revision``: a 40-hex commit hash is the only revision besides the six branches that the
  default repo accepts, and it reaches the Hub unchanged.
* No network for a local folder, even with the offline flags unset.
* Neither prompts, answers nor the remote API key end up in logs or in the instance's reprs.

The traps (a pickle whose unpickling, or a module whose import, touches a marker file) are
checked to spring when they are used, so that a marker that does not exist means "never used".
"""

import fnmatch
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from langchain_synthia import VARIANTS, ChatSynthia, SynthiaLLM
from langchain_synthia._loading import ModelSettings, resolve_checkpoint
from langchain_synthia.variants import DEFAULT_REPO
from tests.helpers import DEVICE

ENGINES = ["fast", "transformers"]
"""The two local engines (``engine=``; ``"auto"`` picks one of them)."""

SHA = "0123456789abcdef0123456789abcdef01234567"


def copy_checkpoint(tiny_model: str, folder: Path) -> Path:
    """A copy of the tiny checkpoint (a new folder is a new load: the registry keys on paths)."""
    shutil.copytree(tiny_model, folder)
    return folder


class _PickleTrap:
    """Unpickling this touches `marker`: the code a malicious ``pytorch_model.bin`` could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def write_pickle_trap(path: Path, marker: Path) -> Path:
    """A pickle weights file in torch's format whose loading would create `marker`."""
    torch.save({"model.embed_tokens.weight": _PickleTrap(marker)}, path)
    return path


def test_the_pickle_trap_springs_when_unpickled(tmp_path: Path) -> None:
    """Guards the tests below: their marker would exist had anything unpickled the file."""
    marker = tmp_path / "unpickled"
    trap = write_pickle_trap(tmp_path / "pytorch_model.bin", marker)
    torch.load(trap, weights_only=False)
    assert marker.exists()


# -- safetensors only ----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_pickle_only_weights_are_refused_naming_the_files_and_why(
    tiny_model: str, tmp_path: Path, engine: str
) -> None:
    folder = copy_checkpoint(tiny_model, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "model.pt", "extra.pth"):
        write_pickle_trap(folder / name, marker)
    chat = ChatSynthia(model=str(folder), device=DEVICE, engine=engine, max_tokens=1)
    with pytest.raises(ValueError, match="only pickle weights") as caught:
        chat.invoke("Hi")
    message = str(caught.value)
    assert "extra.pth, model.pt, pytorch_model.bin" in message  # every file, sorted
    assert "can run arbitrary code" in message  # the reason
    assert "safetensors only" in message  # and what is accepted
    assert str(folder) in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "opt_in",
    [{"use_safetensors": False}, {"allow_pickle": True}, {"trust_remote_code": True}],
    ids=["use_safetensors", "allow_pickle", "trust_remote_code"],
)
def test_there_is_no_opt_in_to_pickles_or_remote_code(tiny_model: str, opt_in: dict) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ChatSynthia(model=tiny_model, **opt_in)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SynthiaLLM(model=tiny_model, **opt_in)
    fields = " ".join(ChatSynthia.model_fields) + " " + " ".join(SynthiaLLM.model_fields)
    assert not any(word in fields for word in ("pickle", "safetensors", "remote_code"))


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> list:
    """Calls of `torch.load` (how transformers reads .bin weights), each one failing."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


@pytest.mark.parametrize("engine", ENGINES)
def test_a_folder_with_pickles_beside_safetensors_loads_only_the_safetensors(
    tiny_model: str, tmp_path: Path, engine: str, no_torch_load: list
) -> None:
    folder = copy_checkpoint(tiny_model, tmp_path / "both")
    marker = tmp_path / "unpickled"
    write_pickle_trap(folder / "pytorch_model.bin", marker)
    write_pickle_trap(folder / "model.pt", marker)
    chat = ChatSynthia(model=str(folder), device=DEVICE, engine=engine, max_tokens=1, temperature=0)
    message = chat.invoke("Hi")
    assert chat._engine_for(chat.model, chat.revision).kind == engine
    assert message.usage_metadata["output_tokens"] == 1
    assert not marker.exists()
    assert no_torch_load == []


# -- remote code never ---------------------------------------------------------------------------


def plant_remote_code(folder: Path, marker: Path) -> None:
    """Point config.json's and tokenizer_config.json's ``auto_map`` at evil.py in `folder`."""
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\n"
        "class EvilConfig: ...\nclass EvilModel: ...\nclass EvilTokenizer: ...\n"
    )
    tokenizer_map = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    auto_map = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilModel",
        **tokenizer_map,
    }
    for name, entry in (("config.json", auto_map), ("tokenizer_config.json", tokenizer_map)):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "auto_map": entry}))


def test_the_remote_code_trap_springs_when_trusted(tiny_model: str, tmp_path: Path) -> None:
    """Guards the test below: with trust_remote_code=True, transformers imports evil.py."""
    from transformers import AutoConfig

    folder = copy_checkpoint(tiny_model, tmp_path / "remote-code")
    marker = tmp_path / "imported"
    plant_remote_code(folder, marker)
    with pytest.raises(AttributeError):  # EvilConfig is no config class; imported all the same
        AutoConfig.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    assert marker.exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_remote_code_in_the_checkpoint_never_runs(
    tiny_model: str, tmp_path: Path, engine: str
) -> None:
    folder = copy_checkpoint(tiny_model, tmp_path / "remote-code")
    marker = tmp_path / "imported"
    plant_remote_code(folder, marker)
    chat = ChatSynthia(model=str(folder), device=DEVICE, engine=engine, max_tokens=2, temperature=0)
    message = chat.invoke("Hi")
    assert chat._engine_for(chat.model, chat.revision).kind == engine
    assert message.usage_metadata["output_tokens"] == 2
    assert not marker.exists()


# -- revision ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "revision",
    [
        SHA[:7],  # an abbreviated hash, as git and the web UI show it
        SHA[:39],
        SHA + "8",
        SHA.upper(),
        "g" + SHA[1:],
        "v1.0",  # a tag
        "refs/pr/1",
    ],
)
def test_a_revision_of_the_default_repo_must_be_a_branch_or_a_full_hash(revision: str) -> None:
    choices = ".*".join(VARIANTS)
    match = rf"Unknown branch {revision!r} of {DEFAULT_REPO}.*{choices}.*40-character commit hash"
    with pytest.raises(ValidationError, match=match):
        ChatSynthia(revision=revision)
    with pytest.raises(ValidationError, match=match):
        SynthiaLLM(revision=revision)
    with pytest.raises(ValueError, match=match):
        ChatSynthia()._call_options(None, {"revision": revision})


def test_a_revision_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTHIA_REVISION", SHA[:7])
    with pytest.raises(ValidationError, match="Unknown branch '0123456'"):
        ChatSynthia()
    monkeypatch.setenv("SYNTHIA_REVISION", SHA)
    assert ChatSynthia().revision == SHA


def test_a_pinned_hash_reaches_the_hub_unchanged_and_fetches_no_pickles(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub

    calls: list[tuple] = []

    def snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs))
        return tiny_model

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    settings = ModelSettings(model=DEFAULT_REPO, revision=SHA, cache_dir=str(tmp_path))
    assert resolve_checkpoint(settings) == Path(tiny_model)
    ((repo_id, kwargs),) = calls
    assert (repo_id, kwargs["revision"]) == (DEFAULT_REPO, SHA)
    patterns = kwargs["allow_patterns"]
    fetched = {name for name in os.listdir(tiny_model) if _matches(name, patterns)}
    assert {"model.safetensors", "config.json", "tokenizer.model"} <= fetched
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "evil.py", "model.ckpt"):
        assert not _matches(name, patterns), name


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


# -- no network unless a download is asked for ---------------------------------------------------

# loads the folder in argv[1] with every connection (and name lookup) refused and recorded
NO_NETWORK_RUNNER = """
import json, socket, sys

attempts = []

def refuse(what, method=False):
    def refused(*args, **kwargs):
        attempts.append([what, repr(args[1:] if method else args[:2])])
        raise ConnectionRefusedError(f"no network in this test: {what}")
    return refused

for name in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, name, refuse(name, method=True))
socket.getaddrinfo = refuse("getaddrinfo")
socket.create_connection = refuse("create_connection")
try:  # the refusal works, and is recorded
    socket.create_connection(("huggingface.co", 443))
except ConnectionRefusedError:
    assert attempts == [["create_connection", "(('huggingface.co', 443),)"]], attempts
    attempts.clear()
else:
    raise SystemExit("connections are not refused")

from langchain_synthia import ChatSynthia, SynthiaLLM

folder = sys.argv[1]
chat = ChatSynthia(model=folder, device="cpu").invoke("Hi", max_tokens=3)
llm = SynthiaLLM(model=folder, device="cpu").invoke("Hi", max_tokens=3)
print(json.dumps({
    "chat_tokens": chat.usage_metadata["output_tokens"],
    "llm": llm,
    "attempts": attempts,
}))
"""


def test_a_local_folder_loads_and_answers_without_touching_the_network(tiny_model: str) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    }  # no offline flags: nothing may try the network all the same
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_RUNNER, tiny_model],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert result["chat_tokens"] == 3
    assert isinstance(result["llm"], str)
    assert result["llm"]


# -- no prompts, answers or keys in logs ---------------------------------------------------------


PROMPT = "a distinctive prompt string XYZZY-123"


@pytest.fixture
def every_log_record() -> Iterator[list[logging.LogRecord]]:
    """Every record that any logger is asked for meanwhile, at any level (DEBUG included).

    Each logger is made to create records at every level, whatever its own level, the loggers'
    propagation (transformers' do not reach the root) or ``logging.disable``; the records are
    kept here, and handled as usual only where the logger's real level lets them through.
    """
    records: list[logging.LogRecord] = []
    enabled, handle = logging.Logger.isEnabledFor, logging.Logger.handle

    def handle_and_keep(self: logging.Logger, record: logging.LogRecord) -> None:
        records.append(record)
        if enabled(self, record.levelno):
            handle(self, record)

    logging.Logger.isEnabledFor = lambda self, level: True
    logging.Logger.handle = handle_and_keep
    try:
        yield records
    finally:
        logging.Logger.isEnabledFor, logging.Logger.handle = enabled, handle


def test_the_log_capture_sees_debug_records_of_every_logger(
    every_log_record: list[logging.LogRecord],
) -> None:
    """Guards the tests below: a prompt logged at DEBUG anywhere would be seen."""
    quiet = logging.getLogger("transformers.quiet.probe")
    quiet.setLevel(logging.ERROR)
    quiet.propagate = False
    for logger in (logging.getLogger("langchain_synthia._transformers_engine"), quiet):
        logger.debug("prompt: %s", PROMPT)
    assert [r.name for r in every_log_record if PROMPT in r.getMessage()] == [
        "langchain_synthia._transformers_engine",
        "transformers.quiet.probe",
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_prompts_and_answers_are_not_logged(
    tiny_model: str,
    tmp_path: Path,
    engine: str,
    every_log_record: list[logging.LogRecord],
    capfd: pytest.CaptureFixture[str],
) -> None:
    folder = copy_checkpoint(tiny_model, tmp_path / "logged")  # loads here, logging as it does
    chat = ChatSynthia(model=str(folder), device=DEVICE, engine=engine, max_tokens=16, seed=1)
    answers = [chat.invoke(PROMPT).content]
    answers.append("".join(chunk.content for chunk in chat.stream(PROMPT)))
    llm = SynthiaLLM(model=str(folder), device=DEVICE, engine=engine, max_tokens=16, seed=1)
    answers.append(llm.invoke(PROMPT))
    assert all(len(answer.strip()) >= 8 for answer in answers), answers  # distinctive enough

    loading = [r for r in every_log_record if r.name == "langchain_synthia._loading"]
    assert any(str(folder) in r.getMessage() for r in loading)  # the capture works
    for record in every_log_record:
        text = record.getMessage()
        assert "XYZZY-123" not in text, (record.name, text)
        for answer in answers:
            assert answer.strip() not in text, (record.name, text)
    out, err = capfd.readouterr()
    assert "XYZZY-123" not in out + err


SECRET = "sk-secret-value"


@pytest.mark.parametrize("cls", [ChatSynthia, SynthiaLLM])
@pytest.mark.parametrize("from_env", [False, True])
def test_the_remote_api_key_is_not_shown(
    cls: type,
    from_env: bool,
    monkeypatch: pytest.MonkeyPatch,
    every_log_record: list[logging.LogRecord],
) -> None:
    from langchain_core.load import dumpd, dumps

    base_url = "http://127.0.0.1:9/v1"  # discard port: nothing is sent (construction only)
    if from_env:
        monkeypatch.setenv("SYNTHIA_API_KEY", SECRET)
        model = cls(base_url=base_url, model="synthia")
    else:
        model = cls(base_url=base_url, model="synthia", api_key=SECRET)
    assert model.api_key.get_secret_value() == SECRET  # it is there, only hidden
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dict() is deprecated, still there
        old_dict = model.dict()

    shown = {
        "repr": repr(model),
        "str": str(model),
        "model_dump": repr(model.model_dump()),
        "model_dump_json": model.model_dump_json(),
        "dict": repr(old_dict),
        "asdict": repr(model.asdict()),
        "identifying_params": repr(model._identifying_params),
        "ls_params": repr(model._get_ls_params()),
        "dumps": dumps(model),
        "dumpd": repr(dumpd(model)),
    }
    for where, text in shown.items():
        assert SECRET not in text, where
    assert "**********" in shown["repr"]
    for record in every_log_record:
        assert SECRET not in record.getMessage(), record.name


def test_the_remote_engine_settings_do_not_show_the_key() -> None:
    chat = ChatSynthia(base_url="http://127.0.0.1:9/v1", model="synthia", api_key=SECRET)
    engine = chat._engine_for(chat.model, chat.revision)  # built, nothing sent
    assert SECRET not in repr(engine)
    assert SECRET not in repr(engine.settings)
