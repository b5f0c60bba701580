"""Loading decisions and their errors, on fake folders (no model is loaded)."""

import json
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from langchain_synthia import VARIANTS, get_variant
from langchain_synthia._loading import (
    ModelSettings,
    choose_kernel,
    download,
    local_folder,
    require_gptq_stack,
    resolve_checkpoint,
    resolve_device,
    validate_checkpoint,
)
from tests.helpers import hide_package

MISTRAL_7B = {
    "model_type": "mistral",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-05,
}
"""The sizes of Synthia-7B's config.json."""
GPTQ = {
    **MISTRAL_7B,
    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128},
}


def folder_with(tmp_path: Path, config: dict | None = GPTQ, files: tuple[str, ...] = ()) -> Path:
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_registry_lists_the_six_branches_of_the_card() -> None:
    assert list(VARIANTS) == [
        "main",
        "gptq-4bit-64g-actorder_True",
        "gptq-4bit-32g-actorder_True",
        "gptq-8bit--1g-actorder_True",
        "gptq-8bit-128g-actorder_True",
        "gptq-8bit-32g-actorder_True",
    ]
    main = get_variant("main")
    assert (main.bits, main.group_size, main.act_order, main.size_gb) == (4, 128, True, 4.16)
    assert get_variant("gptq-8bit--1g-actorder_True").group_size is None
    assert all(v.act_order and v.damp_percent == 0.1 for v in VARIANTS.values())


def test_unknown_branch_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown branch 'gptq-3bit'.*main, gptq-4bit-64g"):
        get_variant("gptq-3bit")


def test_valid_folder_passes_and_returns_gptq_settings(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, files=("model.safetensors", "tokenizer.json"))
    assert validate_checkpoint(folder)["bits"] == 4


def test_legacy_quantize_config_json_is_understood(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, MISTRAL_7B, ("model.safetensors", "tokenizer.model"))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": -1}))
    assert validate_checkpoint(folder) == {"quant_method": "gptq", "bits": 8, "group_size": -1}


@pytest.mark.parametrize(
    ("config", "files", "match"),
    [
        (None, ("model.safetensors",), "no config.json"),
        ({"model_type": "mistral"}, ("model.safetensors",), "not a GPTQ checkpoint"),
        ({"quantization_config": {"quant_method": "awq"}}, ("model.safetensors",), "not a GPTQ"),
        (GPTQ, ("pytorch_model.bin", "tokenizer.json"), "only pickle weights.*refused"),
        (GPTQ, ("tokenizer.json",), "has no weights"),
        (GPTQ, ("model.safetensors",), "no tokenizer"),
    ],
)
def test_folder_that_is_not_a_gptq_checkpoint_is_refused(tmp_path, config, files, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_checkpoint(folder_with(tmp_path, config, files))


def test_revision_with_a_local_folder_is_refused(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, files=("model.safetensors", "tokenizer.json"))
    settings = ModelSettings(model=str(folder), revision="gptq-4bit-32g-actorder_True")
    with pytest.raises(ValueError, match="applies to Hub repos"):
        resolve_checkpoint(settings)


NO_SUCH_FOLDER = "no such folder: "
MODEL_TAKES = "model= takes a Hub repo id like owner/name or a local checkpoint folder"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder (with a ``models`` folder and a ``notes.txt`` file in it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    return tmp_path


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The repo ids sent to huggingface-hub's download during the test (each one fails)."""
    import huggingface_hub

    calls: list[str] = []

    def refuse(repo_id: str, **kwargs) -> None:
        calls.append(repo_id)
        raise AssertionError(repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    return calls


PATHS = [
    "./missing-folder",
    "../missing-folder",
    "/no/such/dir",
    "~/no-such-folder-here",
    "not-a-repo-id",
    "a/b/c",
    "models/synthia-4bit",  # its first part is a folder here: a path, not a repo id
    "owner/name/",
    "./models/synthia",
    "owner\\name",
    "-bad/repo",
    "owner/na--me",
]


@pytest.mark.parametrize("model", PATHS)
def test_a_path_that_names_no_folder_says_no_such_folder(
    here: Path, hub_calls: list[str], model: str
) -> None:
    with pytest.raises(ValueError, match=NO_SUCH_FOLDER) as caught:
        resolve_checkpoint(ModelSettings(model=model))
    message = str(caught.value)
    assert message.startswith(f"{NO_SUCH_FOLDER}{Path(model).expanduser().absolute()}")
    assert MODEL_TAKES in message
    assert "Repo id must" not in message
    with pytest.raises(ValueError, match=NO_SUCH_FOLDER):  # synthia chat/download's road
        download(model, "main")
    assert hub_calls == []


@pytest.mark.parametrize("name", ["notes.txt", "./notes.txt", "{here}/notes.txt", "models/x.bin"])
def test_a_path_to_a_file_says_it_is_a_file(here: Path, hub_calls: list[str], name: str) -> None:
    (here / "models" / "x.bin").write_bytes(b"x")
    model = name.format(here=here)
    with pytest.raises(ValueError, match=NO_SUCH_FOLDER) as caught:
        resolve_checkpoint(ModelSettings(model=model))
    message = str(caught.value)
    assert f"{(here / name.format(here='.')).resolve()} is a file, not a folder" in message
    assert MODEL_TAKES in message
    with pytest.raises(ValueError, match="is a file, not a folder"):
        download(model, "main")
    assert hub_calls == []


@pytest.mark.parametrize("model", ["", "   "])
def test_an_empty_model_is_refused(model: str) -> None:
    with pytest.raises(ValueError, match=f"is empty \\({MODEL_TAKES}\\)"):
        resolve_checkpoint(ModelSettings(model=model))


def test_a_local_folder_is_not_sent_to_the_hub(here: Path, hub_calls: list[str]) -> None:
    assert local_folder("models") == Path("models")
    assert local_folder(str(here / "models")) == here / "models"
    with pytest.raises(ValueError, match="is a local folder, not a Hub repo id"):
        download("./models", "main")
    assert hub_calls == []


@pytest.mark.parametrize("command", ["generate", "download"])
@pytest.mark.parametrize("model", ["./missing-folder", "models/synthia-4bit", "notes.txt"])
def test_the_command_line_says_no_such_folder(
    here: Path, hub_calls: list[str], command: str, model: str
) -> None:
    from click.testing import CliRunner

    from langchain_synthia.cli import main

    args = [command, "--model", model] + (
        ["--device", "cpu", "Hi"] if command == "generate" else []
    )
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: {NO_SUCH_FOLDER}{(here / model).resolve()}")
    assert MODEL_TAKES in last
    assert "Traceback" not in result.output
    assert hub_calls == []


REPO_PART = st.lists(
    st.text(alphabet="abcXYZ019", min_size=1, max_size=6), min_size=1, max_size=3
).flatmap(lambda words: st.sampled_from("-_.").map(lambda sep: sep.join(words)))
"""A valid Hub owner or name: alphanumeric words joined by one of ``-``, ``_``, ``.``."""


def test_real_repo_ids_still_go_to_the_hub(here: Path) -> None:
    checked: list[str] = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(owner=REPO_PART, name=REPO_PART)
    def goes_to_the_hub(owner: str, name: str) -> None:
        assume(not Path(owner).exists())  # e.g. "models": a folder here, so a path
        checked.append(f"{owner}/{name}")
        assert local_folder(f"{owner}/{name}") is None

    goes_to_the_hub()
    assert local_folder("TheBloke/Synthia-7B-v1.3-GPTQ") is None
    assert local_folder("someone/tiny-synthia") is None
    assert len(checked) >= 150


def test_any_missing_path_says_no_such_folder(here: Path, hub_calls: list[str]) -> None:
    """Whatever follows ``./``, ``../``, ``/``, ``~/`` or a folder of here, and is not there."""
    tried: list[str] = []
    word = st.text(alphabet=st.characters(blacklist_characters="/\\\x00"), min_size=1)

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        start=st.sampled_from(["./", "../", "/", "~/", "models/", "./models/"]),
        parts=st.lists(word, min_size=1, max_size=3),
    )
    def refused(start: str, parts: list[str]) -> None:
        model = start + "/".join(f"missing-{part}" for part in parts)
        assume(not Path(model).expanduser().exists())
        tried.append(model)
        with pytest.raises(ValueError, match=NO_SUCH_FOLDER) as caught:
            local_folder(model)
        assert MODEL_TAKES in str(caught.value)

    refused()
    assert hub_calls == []
    assert len(tried) >= 150


def test_uncached_repo_offline_says_how_to_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = ModelSettings(model="TheBloke/Synthia-7B-v1.3-GPTQ", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_checkpoint(settings)


def test_kernel_is_chosen_explicitly_per_device() -> None:
    assert choose_kernel("cpu", 4) == "gptq_torch_aten"
    assert choose_kernel("cpu", 8) == "gptq_torch"
    assert choose_kernel("cuda:1", 4) == "gptq_torch"
    assert choose_kernel("cuda", 8, "gptq_marlin") == "gptq_marlin"
    with pytest.raises(ValueError, match="downloads CUTLASS"):
        choose_kernel("cuda", 4, "auto")
    with pytest.raises(ValueError, match="4 or 8-bit"):
        choose_kernel("cpu", 3)


def test_cuda_asked_without_cuda_is_a_clear_error(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match="device='cuda' was asked for, but CUDA is not available"
    ):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_missing_gptqmodel_names_the_install_command(monkeypatch) -> None:
    hide_package(monkeypatch, "gptqmodel")
    with pytest.raises(ImportError, match=r"needs gptqmodel, which is not installed.*pip install"):
        require_gptq_stack()
