"""Loading decisions and their errors, on fake folders (no model is loaded)."""

import json
from pathlib import Path

import pytest

from langchain_synthia import VARIANTS, get_variant
from langchain_synthia._loading import (
    ModelSettings,
    choose_kernel,
    require_gptq_stack,
    resolve_checkpoint,
    resolve_device,
    validate_checkpoint,
)

GPTQ = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}


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
    folder = folder_with(
        tmp_path, {"model_type": "mistral"}, ("model.safetensors", "tokenizer.model")
    )
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


@pytest.mark.parametrize("model", ["./missing-folder", "/no/such/dir", "not-a-repo-id", "a/b/c"])
def test_model_that_is_neither_folder_nor_repo_id(model: str) -> None:
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        resolve_checkpoint(ModelSettings(model=model))


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
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gptqmodel" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"needs gptqmodel, which is not installed.*pip install"):
        require_gptq_stack()
