"""`synthia download` against a Hub-like server on loopback: progress, filters, resume.

The server speaks the few endpoints huggingface-hub's `snapshot_download` uses (revision info,
tree listing, ``resolve`` with HEAD and ranged GET). The first GET of the weights breaks off
three quarters of the way, as a dropped connection does; the download must resume from what it
had written (a ranged request), not start over, and end with the exact bytes.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

REPO = "TheBloke/Synthia-7B-v1.3-GPTQ"
SHA = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {
    "model_type": "mistral", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 32,
    "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 393216,
    "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    "quantization_config": {"quant_method": "gptq", "bits": 4},
}  # fmt: skip
"""One layer of width 32; the embeddings make the weights 24 MiB (huggingface-hub writes 10 MiB
chunks)."""
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
WEIGHTS = save(
    {
        "model.embed_tokens.weight": torch.randint(0, 256, (24 << 20,), dtype=torch.uint8)
        .view(torch.float16)
        .reshape(393216, 32),
        "model.norm.weight": torch.ones(32, dtype=torch.float16),
        "model.layers.0.input_layernorm.weight": torch.ones(32, dtype=torch.float16),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(32, dtype=torch.float16),
    }
    | {  # 4-bit GPTQ, 32 inputs and outputs, one group
        f"model.layers.0.{linear}.{part}": make()
        for linear in _LINEARS
        for part, make in {
            "qweight": lambda: torch.zeros((4, 32), dtype=torch.int32),
            "qzeros": lambda: torch.zeros((1, 4), dtype=torch.int32),
            "scales": lambda: torch.ones((1, 32), dtype=torch.float16),
            "g_idx": lambda: torch.zeros(32, dtype=torch.int32),
        }.items()
    }
)
FILES = {
    "config.json": json.dumps(CONFIG).encode(),
    "model.safetensors": WEIGHTS,
    "tokenizer.model": os.urandom(1000),
    "pytorch_model.bin": b"pickle weights are never fetched",
}


class _Hub(http.server.BaseHTTPRequestHandler):
    ranges: list[str | None]
    broke: list[str]
    files: dict[str, bytes]
    """What the repo holds (a copy of `FILES` a test may change)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith(f"/api/models/{REPO}/revision/"):
            siblings = [{"rfilename": name} for name in self.files]
            return self._json({"id": REPO, "sha": SHA, "siblings": siblings})
        if self.path.startswith(f"/api/models/{REPO}/tree/"):
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                for name, data in self.files.items()
            ]
            return self._json(entries)
        return self._file(body=True)

    def do_HEAD(self) -> None:
        self._file(body=False)

    def _json(self, value: object) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _file(self, *, body: bool) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.files:
            self.send_error(404)
            return
        data, start = self.files[name], 0
        if body and name == "model.safetensors":
            type(self).ranges.append(self.headers.get("Range"))
        if body and self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("ETag", f'"{_oid(data)}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if name == "model.safetensors" and not type(self).broke:
            type(self).broke.append(name)  # the first time: 3/4 of the bytes, then hang up
            self.wfile.write(data[: len(data) * 3 // 4])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data[start:])


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()  # an id, as the Hub gives; not for security


@pytest.fixture
def hub() -> Iterator[type[_Hub]]:
    handler = type("Hub", (_Hub,), {"ranges": [], "broke": [], "files": dict(FILES)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()


def synthia_download(hub: type[_Hub], *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    code = "from langchain_synthia.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "download", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_an_interrupted_download_resumes_and_fetches_safetensors_only(hub, tmp_path) -> None:
    target = tmp_path / "synthia-main"
    done = synthia_download(hub, "--local-dir", str(target))
    if done.returncode != 0:  # the break ended the first run: running it again resumes
        assert done.returncode == 3, done.stderr
        done = synthia_download(hub, "--local-dir", str(target))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == target
    assert hub.broke == ["model.safetensors"]
    assert hub.ranges[0] is None
    resumed_at = int(hub.ranges[-1].removeprefix("bytes=").rstrip("-"))  # a ranged request
    assert 0 < resumed_at <= len(FILES["model.safetensors"]) * 3 // 4
    assert (target / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert (target / "tokenizer.model").read_bytes() == FILES["tokenizer.model"]
    assert not (target / "pytorch_model.bin").exists()
    assert "Downloading TheBloke/Synthia-7B-v1.3-GPTQ (main, 4.16 GB)" in done.stderr


def test_a_corrupt_file_from_the_hub_is_named_at_download(hub, tmp_path) -> None:
    """Downloaded whole but not safetensors (a bad upload, a proxy's error page): refused now,
    not at the first load, naming the file and how to fetch it again."""
    hub.broke.append("no break this time")
    hub.files["model.safetensors"] = b"<html>502 Bad Gateway</html>" + bytes(4096)
    target = tmp_path / "synthia-main"
    done = synthia_download(hub, "--local-dir", str(target))
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""  # no folder printed for a script to load
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"Error: {target / 'model.safetensors'} is not a readable ")
    assert "truncated or corrupt (4,124 bytes)" in error
    assert f"hf download {REPO} --revision main --force-download" in error
    assert "Traceback" not in done.stderr
