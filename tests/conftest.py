"""Shared test setup: a hermetic environment and, for the integration tier, the tiny checkpoint."""

import asyncio
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from langchain_core.caches import BaseCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation

# Never reach the Hub from tests; quantising on a small CPU needs these (see testing.py).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

DEVICE = os.environ.get("SYNTHIA_TEST_DEVICE", "cpu")
"""Where the integration tier runs the tiny checkpoint: the CPU in CI; ``cuda`` on a GPU machine."""


@functools.cache
def _checkpoints_root() -> Path:
    root = os.environ.get("SYNTHIA_TINY_DIR")
    return Path(root) if root else Path(tempfile.mkdtemp(prefix="synthia-tests-"))


@functools.cache
def tiny_model_path(seed: int = 0) -> str:
    """A tiny GPTQ checkpoint, built once per test process (reused from $SYNTHIA_TINY_DIR)."""
    from langchain_synthia.testing import make_tiny_checkpoint

    return str(make_tiny_checkpoint(_checkpoints_root() / f"tiny-seed{seed}", seed=seed))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return tiny_model_path()


@functools.cache
def real_model_path() -> str:
    """SmolLM2-135M-Instruct as GPTQ, built once (reused from $SYNTHIA_TINY_DIR)."""
    from langchain_synthia.testing import make_real_checkpoint

    return str(make_real_checkpoint(_checkpoints_root() / "real-smollm2-4bit"))


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches the transformers engine starts during the test, in order."""
    from langchain_synthia._transformers_engine import TransformersEngine

    started: list[int] = []
    original = TransformersEngine.start

    def spy(self: TransformersEngine, rows: list) -> None:
        started.append(len(rows))
        original(self, rows)

    monkeypatch.setattr(TransformersEngine, "start", spy)
    return started


class TokenCounter(BaseCallbackHandler):
    """Records every ``on_llm_new_token`` call."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


class LoopTicker:
    """Counts the event loop's turns while the block runs (a blocked loop counts none)."""

    async def __aenter__(self) -> "LoopTicker":
        self.ticks = 0
        self._running = True
        self._task = asyncio.create_task(self._tick())
        return self

    async def _tick(self) -> None:
        while self._running:
            self.ticks += 1
            await asyncio.sleep(0.001)

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        await self._task


class AnswerPerKey(BaseCache):
    """A cache that answers every lookup: the first lookup of a key gets a new numbered answer.

    Two models share an answer exactly when their cache keys are equal; no model runs.
    """

    def __init__(self, *, chat: bool) -> None:
        self.chat = chat
        self.answers: dict[tuple[str, str], list] = {}
        self.keys: list[str] = []

    def lookup(self, prompt: str, llm_string: str) -> list:
        self.keys.append(llm_string)
        key = (prompt, llm_string)
        if key not in self.answers:
            text = f"answer #{len(self.answers)}"
            generation = (
                ChatGeneration(message=AIMessage(text)) if self.chat else Generation(text=text)
            )
            self.answers[key] = [generation]
        return self.answers[key]

    def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
        pass

    def clear(self, **kwargs: Any) -> None:
        self.answers.clear()
