"""The public tiny-checkpoint helper: layout, determinism, reuse, and its errors."""

import json
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from langchain_synthia._loading import validate_checkpoint
from langchain_synthia.testing import checkpoint_digest, make_tiny_checkpoint


def test_layout_is_thebloke_s(tiny_model: str) -> None:
    folder = Path(tiny_model)
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "quantize_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".csv"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert config["vocab_size"] == 32000
    quant = config["quantization_config"]
    assert quant == {
        "bits": 4,
        "group_size": 32,
        "damp_percent": 0.1,
        "desc_act": True,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "quant_method": "gptq",
    }
    assert json.loads((folder / "quantize_config.json").read_text())["desc_act"] is True
    assert validate_checkpoint(folder)["bits"] == 4
    with safe_open(folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert {
            "model.layers.0.self_attn.q_proj.qweight",
            "model.layers.0.self_attn.q_proj.qzeros",
            "model.layers.0.self_attn.q_proj.scales",
            "model.layers.0.self_attn.q_proj.g_idx",
        } <= keys
        assert str(weights.get_slice("model.embed_tokens.weight").get_dtype()) == "F16"


def test_tokenizer_is_mistral_7b_v0_1(tiny_model: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer) == 32000
    ids = tokenizer("SYSTEM: hi\nUSER: yo\nASSISTANT:").input_ids
    assert ids == [
        1,
        17121,
        22526,
        28747,
        12014,
        13,
        11123,
        28747,
        23934,
        13,
        4816,
        8048,
        12738,
        28747,
    ]


def test_build_is_deterministic_reused_and_tidy(
    tmp_path: Path, tiny_model: str, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    again = make_tiny_checkpoint(tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # nothing left in the cwd
    assert checkpoint_digest(again) == checkpoint_digest(tiny_model)
    started = time.monotonic()
    assert make_tiny_checkpoint(tmp_path / "again") == tmp_path / "again"
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3}, "4 or 8-bit"),
        ({"group_size": 48}, "divide 128"),
        ({"num_layers": 0}, "at least 1"),
    ],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_tiny_checkpoint(tmp_path, **kwargs)
