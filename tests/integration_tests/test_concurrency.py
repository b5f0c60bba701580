"""Many callers at once, callers that stop early, timeouts and Ctrl-C, on the tiny checkpoint.

One shared `ChatSynthia` on the fast engine (on the CPU: the same scheduler thread and
continuous batching, without CUDA graphs) serves threads and asyncio tasks at the same time;
each answer must be the one the same call gets alone, and the engine must come back idle with
nothing left behind. A consumer that stops reading (``break``, ``task.cancel()``, ``.close()``)
or runs out of time must free its cache row within two decode steps, counted at the scheduler.
"""

import asyncio
import gc
import json
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from langchain_synthia import ChatSynthia, GenerationTimeoutError
from langchain_synthia._decoding_row import DecodingRow
from langchain_synthia._token_stream import TokenStream
from tests.helpers import (
    DEVICE,
    LONG,
    NO_STOP,
    StepLog,
    busy_rows,
    engine_of_chat,
    fast_chat,
    is_idle,
    step_log,
    wait_until,
)

pytestmark = pytest.mark.gpu  # the GPU tier: SYNTHIA_TEST_DEVICE=cuda pytest -m gpu

TOKENS = 10
"""Answer length of the concurrent calls (short: 64 of them run in a few seconds)."""

ROWS = 8
"""The engine's cache rows: 64 calls at once queue for them."""

DEADLINE = 60.0
"""Seconds the 64 concurrent calls may take in all before the run counts as deadlocked."""

_TOPICS = """rockets oceans volcanoes bees glaciers comets tigers deserts lighthouses violins
bridges tulips submarines owls canyons robots pianos coral lanterns penguins castles chess
rivers kites orchids maps dragons clocks meteors harbors bamboo falcons sails quartz llamas
tides windmills mushrooms trains thunder cactus whales parrots candles mirrors ferns saturn
anchors puzzles marble lemons igloos cobalt tundra badgers geysers origami zeppelins sonnets
pottery fjords walnuts ravens gondolas"""
TOPICS = _TOPICS.split()
PROMPTS = [f"{topic} {topic} {topic}" for topic in TOPICS]
"""64 prompts whose greedy answers all differ (checked): tokens of one answer delivered to
another's stream cannot go unnoticed."""

SAMPLED: list[dict[str, Any]] = [
    {"temperature": 0.9, "seed": 11},
    {"temperature": 1.3, "top_k": 8, "seed": 12},
    {"temperature": 0.7, "top_p": 0.6, "seed": 13},
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 14},
]
"""Seeded sampling settings, each unlike the others."""


@pytest.fixture
def chat(tiny_model: str) -> ChatSynthia:
    """The shared model: greedy unless a call says otherwise, no system message (so the short
    prompts steer the answers apart)."""
    return fast_chat(
        tiny_model, max_batch_size=ROWS, max_tokens=TOKENS, timeout=60, system_message=None
    )


HEAP_KEPT = 256 * 1024
"""Bytes the Python heap may keep after a second round of the 64 calls: 4 KiB a call. Measured
on a CPU: 8 to 54 KiB, in blocks of tens of bytes (torch's and threading's bookkeeping, sets
that grew), none a call's answer or request."""


def allocated_gpu_bytes() -> int:
    """Bytes the CUDA allocator has handed out (0 on the CPU)."""
    return torch.cuda.memory_allocated() if DEVICE.startswith("cuda") else 0


def live(kind: type) -> int:
    """Objects of `kind` alive (after a collection)."""
    gc.collect()
    # type(), not isinstance(): that reads __class__, which some of torch's deprecated
    # module-level objects answer with a warning
    return sum(issubclass(type(o), kind) for o in gc.get_objects())


# -- 64 calls at once ----------------------------------------------------------------------------


@dataclass
class Job:
    """One caller: a thread or an asyncio task making one call (a batch: one per input)."""

    side: str
    kind: str
    prompts: list[str]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    content: str
    usage: dict | None
    chunks: int | None = None
    """Chunks a stream yielded (one per token), ``None`` for whole answers."""


def plan() -> list[Job]:
    """40 calls from threads and 24 from asyncio tasks, six ways of calling, five settings."""
    prompts = iter(PROMPTS)

    def take(count: int) -> list[str]:
        return [next(prompts) for _ in range(count)]

    jobs = [Job("thread", "invoke", take(1)) for _ in range(10)]
    jobs += [Job("thread", "stream", take(1)) for _ in range(10)]
    jobs += [Job("thread", "invoke", take(1), s) for s in SAMPLED]
    jobs += [Job("thread", "stream", take(1), s) for s in SAMPLED]
    jobs += [Job("thread", "batch", take(6)), Job("thread", "batch", take(6), SAMPLED[1])]
    jobs += [Job("async", "ainvoke", take(1)) for _ in range(6)]
    jobs += [Job("async", "astream", take(1)) for _ in range(6)]
    jobs += [Job("async", "ainvoke", take(1), s) for s in SAMPLED[:2]]
    jobs += [Job("async", "astream", take(1), s) for s in SAMPLED[2:]]
    jobs += [Job("async", "abatch", take(4)), Job("async", "abatch", take(4), SAMPLED[3])]
    assert next(prompts, None) is None  # every prompt used once
    return jobs


def whole(message: Any) -> Outcome:
    return Outcome(message.content, message.usage_metadata)


def streamed(chunks: list) -> Outcome:
    usages = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usages) == 1, usages  # the last chunk only
    return Outcome("".join(c.content for c in chunks), usages[0], len(chunks))


def run_job(chat: ChatSynthia, job: Job) -> list[Outcome]:
    [prompt, *_] = job.prompts
    if job.kind == "invoke":
        return [whole(chat.invoke(prompt, **job.options))]
    if job.kind == "stream":
        return [streamed(list(chat.stream(prompt, **job.options)))]
    assert job.kind == "batch"
    return [whole(m) for m in chat.batch(job.prompts, **job.options)]


async def arun_job(chat: ChatSynthia, job: Job) -> list[Outcome]:
    [prompt, *_] = job.prompts
    if job.kind == "ainvoke":
        return [whole(await chat.ainvoke(prompt, **job.options))]
    if job.kind == "astream":
        return [streamed([c async for c in chat.astream(prompt, **job.options)])]
    assert job.kind == "abatch"
    return [whole(m) for m in await chat.abatch(job.prompts, **job.options)]


@dataclass
class Round:
    """What one round of the 64 calls at once gave."""

    results: dict[str, Outcome]
    steps: StepLog
    took: float


def all_at_once(chat: ChatSynthia, jobs: list[Job]) -> Round:
    """Start every job at one barrier (threads, and asyncio tasks on one more thread), wait for
    them all (a deadlock fails after `DEADLINE`), and return once the engine is idle."""
    engine = engine_of_chat(chat)
    results: dict[str, Outcome] = {}
    errors: list[BaseException] = []
    callers = [job for job in jobs if job.side == "thread"]
    tasks = [job for job in jobs if job.side == "async"]
    start = threading.Barrier(len(callers) + 1)

    def thread_caller(job: Job) -> None:
        try:
            start.wait(10)
            results.update(zip(job.prompts, run_job(chat, job), strict=True))
        except BaseException as error:  # reported below
            errors.append(error)

    async def all_tasks() -> None:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(arun_job(chat, job) for job in tasks)), DEADLINE
        )
        for job, outcome in zip(tasks, outcomes, strict=True):
            results.update(zip(job.prompts, outcome, strict=True))

    def task_driver() -> None:
        try:
            start.wait(10)
            asyncio.run(all_tasks())
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=thread_caller, args=(job,)) for job in callers]
    workers.append(threading.Thread(target=task_driver, name="asyncio-driver"))
    with step_log(engine, lambda e: (len(busy_rows(e)), e.num_waiting)) as steps:
        began = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(max(0.0, began + DEADLINE - time.monotonic()))
        took = time.monotonic() - began
        stuck = [worker.name for worker in workers if worker.is_alive()]
        assert not stuck, f"deadlock: {len(stuck)} callers still waiting after {DEADLINE} s"
        assert not errors, errors
        assert wait_until(lambda: is_idle(engine)), (engine._slots, engine.num_waiting)
    assert len(steps.submitted) == 64
    steps.submitted.clear()  # the log's own hold on the rows (counted by the caller)
    return Round(results, steps, took)


def test_64_concurrent_calls_from_threads_and_tasks_equal_each_call_alone(
    chat: ChatSynthia,
) -> None:
    jobs = plan()
    engine = engine_of_chat(chat)
    assert engine.model.max_batch == ROWS
    # each call made alone first, one after the other (this also warms every path up)
    alone = {p: whole(chat.invoke(p, **job.options)) for job in jobs for p in job.prompts}
    assert len(alone) == 64
    greedy = [alone[p].content for job in jobs if not job.options for p in job.prompts]
    assert len(set(greedy)) == len(greedy), "precondition: every prompt has its own answer"
    assert wait_until(lambda: is_idle(engine))  # the last step's bookkeeping ends just after

    threads_before = threading.active_count()
    names_before = {t.name for t in threading.enumerate()}
    streams_before, rows_before = live(TokenStream), live(DecodingRow)
    gpu_before = allocated_gpu_bytes()

    first = all_at_once(chat, jobs)
    queued = max(waiting for _, waiting in first.steps)
    threads = [job for job in jobs if job.side == "thread"]
    thread_calls = sum(len(job.prompts) for job in threads)
    print(f"\n64 concurrent calls ({thread_calls} from {len(threads)} threads, "
          f"{64 - thread_calls} from {len(jobs) - len(threads)} asyncio tasks) in "
          f"{first.took:.2f} s: {len(first.steps)} decode steps, up to {queued} requests "
          "queued")  # fmt: skip
    check_each_equals_alone(jobs, first.results, alone)
    # the calls really overlapped: full steps, and requests queued behind them
    assert max(busy for busy, _ in first.steps) == ROWS
    assert queued > 0
    assert first.took < DEADLINE

    # nothing left behind: the engine idle, no extra thread, no stream or row alive, the GPU
    # allocator holding what it held before
    assert engine._slots == [None] * ROWS
    assert engine.num_waiting == 0
    assert engine._pending is None
    assert engine._thread.is_alive()
    settled = wait_until(lambda: threading.active_count() <= threads_before)
    extra = {t.name for t in threading.enumerate()} - names_before
    assert settled, f"threads left running: {extra}"
    streams_after, rows_after = live(TokenStream), live(DecodingRow)
    gpu_after = allocated_gpu_bytes()
    assert streams_after <= streams_before
    assert rows_after <= rows_before
    # the GPU allocator: the first round may make a buffer once (a prefill pass or a step
    # shape first met), so the check is that the second round leaves exactly what it found

    # a decode step's buffers are made once per step size (1, 2, 4, 8 rows), when the size
    # first occurs (a bounded cache; on CUDA made at load, for the graphs): make them all now,
    # so that a size first met in the traced round does not count as left behind
    for size in engine.runner.sizes:
        engine.model._decode_buffers(size)
    # the Python heap back to its level: a second round, traced, keeps (nearly) nothing. The
    # first round warmed the interpreter's and torch's caches; leaking each call's answer,
    # usage or callbacks would keep well over a KiB a call. torch's memory is not traced:
    # its tensors are counted instead
    tensors_before = live(torch.Tensor)  # after a collection
    tracemalloc.start()
    try:
        heap_before = tracemalloc.get_traced_memory()[0]
        second = all_at_once(chat, jobs)
        check_each_equals_alone(jobs, second.results, alone)
        del second
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - heap_before
    finally:
        tracemalloc.stop()
    tensors_after = live(torch.Tensor)
    assert allocated_gpu_bytes() == gpu_after, (gpu_before, gpu_after)
    print(f"TokenStreams alive {streams_before} -> {streams_after}, rows {rows_before} -> "
          f"{rows_after}, threads {threads_before} -> {threading.active_count()}, GPU "
          f"{gpu_before} -> {gpu_after} bytes, Python heap kept by a second round "
          f"{kept / 1024:+.1f} KiB, tensors {tensors_before} -> {tensors_after}")  # fmt: skip
    assert kept < HEAP_KEPT, f"{kept} bytes still allocated after 64 more calls"
    assert tensors_after <= tensors_before, "tensors left behind by 64 more calls"


def check_each_equals_alone(
    jobs: list[Job], results: dict[str, Outcome], alone: dict[str, Outcome]
) -> None:
    assert len(results) == 64
    for job in jobs:
        for prompt in job.prompts:
            got, expected = results[prompt], alone[prompt]
            where = (job.side, job.kind, prompt, job.options)
            assert got.content == expected.content, where
            assert got.usage == expected.usage, where  # its own token counts, none of another's
            if got.chunks is not None:  # one chunk per token: no token of another stream
                assert got.chunks == expected.usage["output_tokens"], where


# -- consumers that stop reading -----------------------------------------------------------------


def consume_then_stop(chat: ChatSynthia, way: str, prompt: str, after: int) -> list[str]:
    """Read `after` chunks of a long answer to `prompt`, then stop reading in `way`."""
    pieces: list[str] = []
    if way == "break":
        for chunk in chat.stream(prompt, **LONG):
            pieces.append(chunk.content)
            if len(pieces) == after:
                break
    elif way == "close":
        stream = chat.stream(prompt, **LONG)
        pieces += [next(stream).content for _ in range(after)]
        stream.close()
    else:
        assert way == "task.cancel"

        async def reader(enough: asyncio.Event) -> None:
            async for chunk in chat.astream(prompt, **LONG):
                pieces.append(chunk.content)
                if len(pieces) == after:
                    enough.set()

        async def main() -> None:
            enough = asyncio.Event()
            task = asyncio.create_task(reader(enough))
            await asyncio.wait_for(enough.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
    return pieces


def row_of(steps: StepLog, prompt: str) -> DecodingRow:
    return next(row for row in steps.submitted if prompt in row.stream.request.prompt)


@pytest.mark.parametrize("way", ["break", "task.cancel", "close"])
def test_a_consumer_that_stops_reading_frees_its_row_within_two_steps(
    chat: ChatSynthia, way: str
) -> None:
    engine = engine_of_chat(chat)
    neighbour = "neighbour neighbour neighbour"
    expected = chat.invoke(neighbour, max_tokens=24).content
    prompt = f"stop by {way} stop by {way}"
    assert wait_until(lambda: is_idle(engine))
    answers: list[str] = []
    with step_log(engine, busy_rows) as steps:
        beside = threading.Thread(
            target=lambda: answers.append(chat.invoke(neighbour, max_tokens=24).content)
        )
        beside.start()
        pieces = consume_then_stop(chat, way, prompt, after=3)
        stopped_at = len(steps)  # steps begun before the consumer stopped
        row = row_of(steps, prompt)
        freed = wait_until(lambda: row not in engine._slots)
        beside.join(30)
        assert freed, f"the row was still decoding {len(steps) - stopped_at} steps later"
    assert len(pieces) == 3
    later = sum(row in rows for rows in steps[stopped_at:])
    print(f"\n{way}: the row was in {later} decode steps after its consumer stopped")
    assert later <= 2
    assert row.stream.cancelled.is_set()
    assert not row.done  # cancelled, not finished
    assert row.generated < 100
    beside_row = row_of(steps, neighbour)
    assert any(beside_row in rows for rows in steps[stopped_at:])  # it went on decoding
    assert answers == [expected]  # and is unaffected
    assert wait_until(lambda: is_idle(engine))


@pytest.mark.xfail(
    strict=True,
    reason="langchain-core drains a transform's input when its generator is closed "
    "(Runnable._transform_stream_with_config reads input_for_tracing to the end after "
    "GeneratorExit), so the model decodes the whole answer before `break` returns",
)
def test_breaking_out_of_a_chain_stream_stops_the_model(chat: ChatSynthia) -> None:
    """Known limitation, outside this package: ``chat | parser`` streams cannot be cut short."""
    from langchain_core.output_parsers import StrOutputParser

    engine = engine_of_chat(chat)
    prompt = "break out of a chain"
    assert wait_until(lambda: is_idle(engine))
    with step_log(engine, busy_rows) as steps:
        for piece in (chat | StrOutputParser()).stream(prompt, max_tokens=200, **NO_STOP):
            if piece:
                break
        stopped_at = len(steps)
        assert wait_until(lambda: is_idle(engine))
    row = row_of(steps, prompt)
    assert sum(row in rows for rows in steps[stopped_at:]) <= 2
    assert not row.done  # fails: all 200 tokens were decoded before `break` returned


# -- timeouts ------------------------------------------------------------------------------------


def call(chat: ChatSynthia, method: str, prompt: str, **options: Any) -> None:
    if method == "invoke":
        chat.invoke(prompt, **options)
    elif method == "stream":
        for _ in chat.stream(prompt, **options):
            pass
    else:

        async def acall() -> None:
            if method == "ainvoke":
                await chat.ainvoke(prompt, **options)
            else:
                async for _ in chat.astream(prompt, **options):
                    pass

        asyncio.run(acall())


@pytest.mark.parametrize("method", ["invoke", "stream", "ainvoke", "astream"])
def test_a_timeout_raises_a_helpful_error_frees_the_row_and_harms_nothing(
    chat: ChatSynthia, method: str
) -> None:
    engine = engine_of_chat(chat)
    reference = chat.invoke(PROMPTS[0])
    prompt = f"run out of time in {method}"
    assert wait_until(lambda: is_idle(engine))
    with step_log(engine, busy_rows) as steps:
        began = time.monotonic()
        with pytest.raises(GenerationTimeoutError) as raised:
            call(chat, method, prompt, timeout=0.05, **LONG)
        took = time.monotonic() - began
        stopped_at = len(steps)
        freed = wait_until(lambda: is_idle(engine))
    assert isinstance(raised.value, TimeoutError)  # `except TimeoutError` catches it
    assert str(raised.value) == (
        "Generation took longer than timeout=0.05s and was stopped. "
        "Raise `timeout`, lower `max_tokens`, or pass timeout=None."
    )
    assert took < 2.0  # not the ~4,000 steps the answer would take
    assert freed, engine._slots
    row = row_of(steps, prompt)
    assert sum(row in rows for rows in steps[stopped_at:]) <= 2
    assert not row.done
    assert row.generated < LONG["max_tokens"]
    again = chat.invoke(PROMPTS[0])  # the same model, right after
    assert again.content == reference.content
    assert again.usage_metadata == reference.usage_metadata


# -- Ctrl-C in the command line ------------------------------------------------------------------


def test_ctrl_c_while_the_cli_writes_an_answer_stops_the_model_within_two_steps(
    chat: ChatSynthia,
) -> None:
    """The CLI's one answer path, interrupted in `write` (where a Ctrl-C mostly lands).

    Closing the parser's generator first let langchain-core read the rest of the model's
    stream (its `_transform_stream_with_config` drains its input on GeneratorExit): the whole
    answer was generated before the command could exit.
    """
    from langchain_core.messages import HumanMessage

    from langchain_synthia._repl import stream_answer

    engine = engine_of_chat(chat)
    model = chat.model_copy(update={"max_tokens": 400, "stop_at_user_turn": False})
    prompt = "interrupted while writing"
    interrupted_at: list[int] = []

    def write(piece: str) -> None:
        if piece.strip():
            interrupted_at.append(len(steps))  # steps begun before the Ctrl-C
            raise KeyboardInterrupt

    assert wait_until(lambda: is_idle(engine))
    with step_log(engine, busy_rows) as steps:
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            stream_answer(model, [HumanMessage(prompt)], write)
        took = time.monotonic() - began
        freed = wait_until(lambda: is_idle(engine))
    row = row_of(steps, prompt)
    later = sum(row in rows for rows in steps[interrupted_at[0] :])
    print(f"\nCtrl-C in write: {later} steps after it; stream_answer returned in {took:.2f} s")
    assert freed
    assert later <= 2
    assert row.stream.cancelled.is_set()
    assert not row.done  # stopped, not run to its 400 tokens
    assert row.generated < 20


CLI = """
import atexit, json, runpy, signal, sys, threading, time

# Ctrl-C as in a terminal's foreground: a run of the tests as a background job (`cmd &`)
# starts this process with SIGINT ignored, and Python then keeps ignoring it
signal.signal(signal.SIGINT, signal.default_int_handler)

def report():  # runs last: after the library's own exit handlers
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    done = {"at": time.monotonic(), "threads": left}
    print("at exit: " + json.dumps(done), file=sys.stderr)

atexit.register(report)
runpy.run_module("langchain_synthia", run_name="__main__", alter_sys=True)
"""
"""``python -m langchain_synthia``, reporting when its exit handlers are done (the same clock
as the test's: CLOCK_MONOTONIC) and the threads still alive then; Ctrl-C handled as Python
does for a program started in a terminal, whatever the test run inherited."""


def test_ctrl_c_during_generate_exits_130_at_once_with_no_thread_left(tiny_model: str) -> None:
    """The real signal in a real process (test_cli.py raises KeyboardInterrupt in-process)."""
    args = ["generate", "--model", tiny_model, "--device", DEVICE, "--temperature", "0",
            "--max-tokens", "4000", "Tell me a long story about rockets."]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watchdog = threading.Timer(300, process.kill)  # a run that never starts fails, not hangs
    watchdog.start()
    try:
        first = process.stdout.read1(1 << 16)  # blocks until the answer starts
        assert first, process.stderr.read().decode()
        assert process.poll() is None, "the answer ended before Ctrl-C"
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = err.decode()
    assert process.returncode == 130, stderr
    assert "Interrupted." in stderr
    assert "Traceback" not in stderr
    assert "Exception ignored" not in stderr
    assert "[cut off at" not in stderr  # stopped mid-answer, not finished
    at_exit = json.loads(stderr.split("at exit: ")[1].splitlines()[0])
    handled = at_exit["at"] - sent
    print(f"\nSIGINT: exit handlers done {handled:.2f} s later, process gone {took:.2f} s later "
          f"(code {process.returncode}); threads then: {at_exit['threads']}")  # fmt: skip
    # the decode worker ended: the library's exit handler did not have to wait for it
    assert not [name for name in at_exit["threads"] if name.startswith("synthia")]
    assert handled < 2.0  # a worker stuck in its step would hold exit for its 30 s join
    assert took < 8.0  # the rest is interpreter teardown, ~2 s in a run that is not interrupted
