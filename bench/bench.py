"""GPU benchmark: langchain-synthia's fast engine against transformers + gptqmodel, same run.

Builds a Mistral-7B-shaped GPTQ checkpoint of random quantised tensors in TheBloke's layout for
a branch (no download: kernel speed does not depend on the values), or takes a local checkpoint
(``--model``), measures the card's copy bandwidth, the baseline (transformers ``generate()`` with
a gptqmodel kernel) and ours through ``ChatSynthia.stream()`` / ``.batch()`` / ``.astream()``,
checks agreement, runs the engine-v2 scenarios, and prints a table.

    python bench/bench.py --tokenizer-from PATH [--branches main ...] [--out DIR]
    python bench/bench.py --model CHECKPOINT [--scenarios classic x128 ...]
    python bench/bench.py --device cpu --model TINY_CHECKPOINT --smoke   # every size small

``--tokenizer-from`` is any folder with Synthia's tokenizer files (the tiny checkpoint of
``langchain_synthia.testing.make_tiny_checkpoint`` has them). Scenarios (``--scenarios``,
default all): ``classic`` (batch 1 stream and first token, the batch of 32, 16 concurrent
``astream``, the transformers baseline and agreement, a reload at 4k), ``x128`` (128
concurrent ``astream`` calls sharing a 700-token prefix in 24 GiB), ``budget8`` (default
``ChatSynthia()`` in 8 GiB, 4 calls of 3,500 prompt tokens), ``prefix-ttft`` (first token of a
call sharing a 1,500-token prefix, against the first call's), ``long16k`` (a 16,000-token
prompt: decode rate, KV blocks held, agreement with transformers) and ``coldstart`` (a fresh
process with an empty Triton cache, to the first answer). On a GPU each scenario but classic
runs in a process of its own (its memory budget and peak its own).

Rows go to ``<out>/<date>-<card>.json``: card, path, branch, batch, prompt_tokens, new_tokens,
decode_tok_s, ttft_ms, total_tok_s, limit_tok_s, peak_gpu_mem_gib, and for the scenarios a
``details`` object with their own figures; the rest goes to ``<date>-<card>-notes.json``.
"""

import argparse
import asyncio
import datetime
import gc
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from langchain_synthia import VARIANTS, ChatSynthia
from langchain_synthia._gptq import pack_rows
from langchain_synthia._loading import get_engine
from langchain_synthia.engine import EngineObserver

TTFT_SAMPLES = 9
"""First-token times measured per figure (the median is reported, every sample kept)."""
RUNS = 3
"""Runs of the batch, the concurrent streams and the prefix-reuse calls (median reported)."""

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 32, 8, 32000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")  # fmt: skip


# -- the checkpoint -----------------------------------------------------------------------------


def _gptq_tensors(k: int, n: int, bits: int, group: int, perm: torch.Tensor, gen) -> dict:
    pack = 32 // bits
    size = k if group == -1 else group
    groups = k // size
    codes = torch.randint(0, 1 << bits, (k, n), dtype=torch.uint8, device="cuda", generator=gen)
    zeros = torch.full((groups, n // pack, pack), (1 << (bits - 1)) - 1, dtype=torch.int32,
                       device="cuda")  # fmt: skip
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device="cuda")
    g_idx = torch.argsort(perm) // size if group != -1 else torch.zeros(k, dtype=torch.long)
    scale = 2.0 / ((1 << bits) * k**0.5)  # keeps activations near unit size
    return {
        "qweight": pack_rows(codes, bits).cpu(),
        "qzeros": (zeros << shifts).sum(-1, dtype=torch.int32).cpu(),
        "scales": (torch.rand((groups, n), device="cuda", generator=gen) * scale + scale / 2)
        .half()
        .cpu(),
        "g_idx": g_idx.to(torch.int32).cpu(),
    }


def build_checkpoint(folder: Path, branch: str, tokenizer_from: Path) -> Path:
    """A random GPTQ Mistral-7B in TheBloke's layout for `branch` (cached in `folder`)."""
    variant = VARIANTS[branch]
    group = variant.group_size or -1
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN) * 0.02).half(),
        "model.norm.weight": torch.ones(HIDDEN).half(),
        "lm_head.weight": (torch.randn(VOCAB, HIDDEN) * 0.02).half(),
    }
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, 1024),
        "self_attn.v_proj": (HIDDEN, 1024), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
        "mlp.down_proj": (INTER, HIDDEN),
    }  # fmt: skip
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        perms = {
            "attn_in": torch.randperm(HIDDEN, device="cuda", generator=gen),
            "o_in": torch.randperm(HIDDEN, device="cuda", generator=gen),
            "mlp_in": torch.randperm(HIDDEN, device="cuda", generator=gen),
            "down_in": torch.randperm(INTER, device="cuda", generator=gen),
        }
        for name, (k, n) in shapes.items():
            perm = perms[
                "attn_in" if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
                else "o_in" if name == "self_attn.o_proj"
                else "down_in" if name == "mlp.down_proj" else "mlp_in"
            ]  # fmt: skip
            for part, tensor in _gptq_tensors(k, n, variant.bits, group, perm, gen).items():
                tensors[f"{prefix}.{name}.{part}"] = tensor
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(HIDDEN).half()
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(HIDDEN).half()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    quant = {
        "bits": variant.bits, "group_size": group, "damp_percent": 0.1, "desc_act": True,
        "static_groups": False, "sym": True, "true_sequential": True,
    }  # fmt: skip
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 32768,
        "sliding_window": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float16", "hidden_act": "silu",
        "quantization_config": {**quant, "quant_method": "gptq"},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


# -- measurements -------------------------------------------------------------------------------


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del src, dst
    return 2 * (2 << 30) / seconds


WORDS = ["rocket", "orbit", "gravity", "thrust", "fuel", "stage", "engine", "launch", "pad", "velocity", "atmosphere", "drag", "apogee", "perigee", "payload", "fairing"]  # fmt: skip


def fit_text(tokens: int, length, lead: str = "") -> str:
    """`lead` and then as many words as keep ``length(text)`` at most `tokens` (bisected)."""

    def text(words: int) -> str:
        return (lead + " ".join(WORDS[i % len(WORDS)] for i in range(words))).strip()

    low, high = 0, 2 * tokens
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if length(text(mid)) <= tokens else (low, mid - 1)
    return text(low)


def prompt_of(tokens: int, tokenizer, lead: str = "") -> str:
    """A user message whose rendered Synthia prompt is at most (about exactly) `tokens` long."""
    from langchain_core.messages import HumanMessage

    from langchain_synthia import render_messages

    return fit_text(
        tokens, lambda t: len(tokenizer(render_messages([HumanMessage(t)])).input_ids), lead
    )


def agent_messages(system: str, total: int, tokenizer, lead: str) -> list:
    """A system message and a question starting with `lead`, rendered in `total` tokens."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_synthia import render_messages

    def length(question: str) -> int:
        messages = [SystemMessage(system), HumanMessage(question)]
        return len(tokenizer(render_messages(messages)).input_ids)

    return [SystemMessage(system), HumanMessage(fit_text(total, length, lead))]


def system_of(tokens: int, tokenizer, lead: str) -> str:
    """A system message (an agent's instructions, then tool definitions) of about `tokens`."""
    tools = " ".join(
        f"Tool {name}: arguments {{'target': string, 'limit': integer}}; returns a report."
        for name in ("search", "fetch", "calculate", "schedule", "translate", "summarise")
    )
    lead = f"{lead} You are a launch-planning agent. Use the tools below. {tools} Notes: "
    return fit_text(tokens, lambda t: len(tokenizer(t).input_ids), lead)


def time_stream(chat: ChatSynthia, prompt: str, new_tokens: int) -> dict:
    """TTFT and decode rate of one ``stream()`` (first chunk = first token)."""
    started = time.perf_counter()
    first = None
    count = 0
    for chunk in chat.stream(prompt, max_tokens=new_tokens):
        count += 1
        if first is None:
            first = time.perf_counter()
        if chunk.usage_metadata:
            usage = chunk.usage_metadata
    done = time.perf_counter()
    assert first is not None
    return {
        "ttft_ms": (first - started) * 1000,
        "decode_tok_s": (usage["output_tokens"] - 1) / (done - first),
        "total_tok_s": usage["output_tokens"] / (done - started),
        "new_tokens": usage["output_tokens"],
        "prompt_tokens": usage["input_tokens"],
    }


async def stream_all(chat: ChatSynthia, prompts: list[str], new_tokens: int) -> int:
    """One ``astream`` per prompt, all at once; the output tokens of all of them."""

    async def one(prompt: str) -> int:
        count = 0
        async for chunk in chat.astream(prompt, max_tokens=new_tokens):
            if chunk.usage_metadata:
                count = chunk.usage_metadata["output_tokens"]
        return count

    return sum(await asyncio.gather(*(one(p) for p in prompts)))


def transformers_model(folder: Path, kernel: str, device: str):
    """The checkpoint in transformers with gptqmodel's `kernel`."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=GPTQConfig(bits=bits, backend=kernel), device_map=device,
        dtype=torch.float16,
    )  # fmt: skip


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def baseline(
    folder: Path, kernel: str, prompt_ids: list[int], new_tokens: int, device: str
) -> dict:
    """transformers + gptqmodel ``generate()``: greedy, batch 1."""
    model = transformers_model(folder, kernel, device)
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    synchronize(device)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    synchronize(device)
    total = time.perf_counter() - start
    return {
        "model": model,
        "ttft_ms": ttft * 1000,
        "decode_tok_s": (new_tokens - 1) / max(total - ttft, 1e-9),
        "total_tok_s": new_tokens / total,
        "tokens": out[0, len(prompt_ids) :].tolist(),
    }


def own_model(folder: Path, kernel: str, device: str, max_len: int):
    """A `FastMistral` of our own with row-owned blocks (an engine's model is its thread's)."""
    from langchain_synthia._fast_model import FastMistral

    model = FastMistral(folder, torch.device(device), max_batch=1, max_len=max_len,
                        kernel=kernel)  # fmt: skip
    model.allocate_kv_rows()
    return model


def agreement(model, fast, prompt_ids: list[int], steps: int = 32) -> dict:
    """Teacher-forced logits of ours (`fast`, a model of our own) against transformers' on the
    same tokens (transformers' greedy answer), and how far our greedy choice follows it."""
    device = fast.device
    with torch.inference_mode():
        ref_tokens = model.generate(
            torch.tensor([prompt_ids], device=device), max_new_tokens=steps, do_sample=False,
            min_new_tokens=steps, pad_token_id=0,
        )[0].tolist()  # fmt: skip
        # the logits of the last prompt position and of every answer token but the last
        ref_logits = (
            model(torch.tensor([ref_tokens[:-1]], device=device), logits_to_keep=steps)
            .logits[0]
            .float()
        )
        ours = [fast.prefill(0, ref_tokens[: len(prompt_ids)])]
        tokens = torch.zeros(fast.max_batch, dtype=torch.long, device=device)
        positions = torch.zeros_like(tokens)
        for step in range(steps - 1):
            tokens[0] = ref_tokens[len(prompt_ids) + step]
            positions[0] = len(prompt_ids) + step
            ours.append(fast.decode(1, tokens, positions)[0])
    errors = []
    for step, logits in enumerate(ours):
        ref = ref_logits[step].to(logits.device)
        errors.append(((logits.float() - ref).norm() / ref.norm()).item())
    greedy = [int(l.argmax()) for l in ours]
    expected = ref_tokens[len(prompt_ids) :]
    same = next((i for i, (a, b) in enumerate(zip(greedy, expected)) if a != b), len(greedy))
    worst = max(range(len(errors)), key=errors.__getitem__)
    return {"max_rel_logit_err": max(errors), "worst_step": worst, "greedy_equal_tokens": same,
            "greedy_equal_count": sum(a == b for a, b in zip(greedy, expected)),
            "steps": steps, "reference_tokens": expected}  # fmt: skip


def profile(engine, prompt_ids: list[int], kernel: str, folder: Path) -> dict:
    """Where a decode step's time goes: graph replays, each GEMV alone, prefill."""
    from triton.testing import do_bench

    from langchain_synthia import _kernels as K

    fast = engine.model
    # an idle engine's model; its prompts write only the null block (the timing is the same)
    table = [fast.null_block] * (len(prompt_ids) // fast.block_size + 1)
    result: dict = {}
    for size, (graph, _) in sorted(engine.runner.graphs.items()):
        result[f"graph_step_ms_b{size}"] = do_bench(graph.replay, warmup=25, rep=200,
                                                    return_mode="median")  # fmt: skip
    from langchain_synthia._linear import gemv_weights

    shapes = fast.layers[0].linears().items() if kernel == "triton" else ()
    for name, backend in shapes:
        linear = gemv_weights(getattr(backend, "inner", backend))  # the packed weights
        if linear is None:
            continue
        nbytes = linear.qweight.numel() * 4 + linear.scales.numel() * 4
        for rows in (1, 32):
            x = torch.randn(rows, linear.in_features, device="cuda").half()
            out = torch.zeros(rows, linear.out_features, device="cuda")
            ms = do_bench(lambda x=x, out=out, linear=linear: K.gptq_linear(x, linear, out),
                          warmup=25, rep=100, return_mode="median")  # fmt: skip
            result[f"{name}_m{rows}_us"] = round(ms * 1000, 1)
            result[f"{name}_m{rows}_gb_s"] = round(nbytes / ms / 1e6)
    with torch.inference_mode():
        result["prefill_512_ms"] = do_bench(lambda: fast.prefill(table, prompt_ids), warmup=3,
                                            rep=50, return_mode="median")  # fmt: skip
        result["decode_b1_kernels"] = kernel_breakdown(
            lambda: fast.decode(1, engine.runner.tokens, engine.runner.positions)
        )
        result["prefill_512_kernels"] = kernel_breakdown(lambda: fast.prefill(table, prompt_ids))
        widest = max(engine.runner.graphs, default=1)
        if widest > 1:  # the batched step: what its extra time over batch 1 is spent on
            result[f"decode_b{widest}_kernels"] = kernel_breakdown(
                lambda: fast.decode(widest, engine.runner.tokens, engine.runner.positions)
            )
    return result


def call_sections(engine, call) -> dict:
    """Where one call's first-token time goes, in ms: before the engine sees the request
    (LangChain, rendering, tokenizing), the scheduler thread's prefill work, and the rest
    (scheduling, sampling, handing out; GPU work still running when the prefill returns)."""
    times = SchedulerTimes()
    started = time.perf_counter()
    with engine.observe(times):
        call()
    total = (time.perf_counter() - started) * 1000
    before = (times.marks.get("first_request", started) - started) * 1000
    prefill = times.spent["prefill_s"] * 1000
    return {"total_ms": round(total, 2), "before_engine_ms": round(before, 2),
            "prefill_ms": round(prefill, 2), "rest_ms": round(total - before - prefill, 2)}  # fmt: skip


def kernel_breakdown(step, repeats: int = 5) -> dict:
    """GPU kernel time of one eager `step`, by kernel name (microseconds, top 12)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    try:
        return _kernel_breakdown(step, profiler, ProfilerActivity, repeats)
    except Exception as error:  # a profiler quirk must not cost the rest of the run
        return {"error": repr(error)}


def _kernel_breakdown(step, profiler, activity, repeats: int) -> dict:
    step()
    torch.cuda.synchronize()
    with profiler(activities=[activity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    launches = 0
    for event in prof.events():
        if "cuda" not in str(getattr(event, "device_type", "")).lower():
            continue
        name = event.name[:60]
        totals[name] = totals.get(name, 0.0) + event.time_range.elapsed_us() / repeats
        launches += 1
    top = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:12])
    return {"kernels_per_step": launches // repeats, "kernel_us_per_step":
            round(sum(totals.values()), 1), "top_us": {k: round(v, 1) for k, v in top.items()}}  # fmt: skip


class SchedulerTimes(EngineObserver):
    """Where the scheduler thread's time goes: prefills, waits for the device, decode steps
    launched, and when it first saw a request, finished a prefill, launched its last step."""

    def __init__(self) -> None:
        self.spent = {"prefill_s": 0.0, "device_wait_s": 0.0, "steps": 0}
        self.marks: dict[str, float] = {}

    def requests_arrived(self, *, count: int) -> None:
        self.marks.setdefault("first_request", time.perf_counter())

    def prefilled(self, *, seconds: float, chunks: int, tokens: int) -> None:
        self.spent["prefill_s"] += seconds
        self.marks.setdefault("first_prefill_done", time.perf_counter())

    def step_launched(self, *, rows: int) -> None:
        self.spent["steps"] += 1
        self.marks["last_step_launched"] = time.perf_counter()

    def waited_for_device(self, *, seconds: float) -> None:
        self.spent["device_wait_s"] += seconds


def scheduler_split(engine, run) -> tuple:
    """`run()`'s result, and where the scheduler thread's time went meanwhile: prefills, waits
    for the device, and everything else (host work: sampling launches, detokenizing, handing
    out)."""
    times = SchedulerTimes()
    start = time.perf_counter()
    with engine.observe(times):
        try:
            value = run()
        finally:
            wall = time.perf_counter() - start
    spent = {**times.spent, "wall_s": wall}
    spent["other_s"] = wall - spent["prefill_s"] - spent["device_wait_s"]
    # the timeline: before the engine saw a request, and after the last step was launched
    spent.update({f"at_{name}_s": mark - start for name, mark in times.marks.items()})
    return value, {k: round(v, 3) if isinstance(v, float) else v for k, v in spent.items()}


def grammar_overhead(chat: ChatSynthia, prompt: str, new_tokens: int) -> dict:
    """Decode rate with and without a grammar (a JSON object whose one string never closes,
    so both runs decode `new_tokens` tokens), at batch 1 and with 8 concurrent streams."""
    from concurrent.futures import ThreadPoolExecutor

    schema = {"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"]}
    constrained = chat.bind(
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    )
    result: dict = {}
    for label, runnable in (("free", chat), ("grammar", constrained)):
        runnable.invoke(prompt, max_tokens=4)  # warm: grammar compile, tokenizer bridge
        rates = [time_stream(runnable, prompt, new_tokens) for _ in range(2)]
        result[f"{label}_b1_decode_tok_s"] = round(max(r["decode_tok_s"] for r in rates), 1)
        result[f"{label}_b1_ttft_ms"] = round(min(r["ttft_ms"] for r in rates), 1)
        with ThreadPoolExecutor(8) as pool:
            started = time.perf_counter()
            counts = list(pool.map(
                lambda _, r=runnable: r.invoke(prompt, max_tokens=new_tokens)
                .usage_metadata["output_tokens"], range(8)))  # fmt: skip
            result[f"{label}_8_threads_tok_s"] = round(
                sum(counts) / (time.perf_counter() - started), 1
            )
    result["b1_overhead_pct"] = round(
        100 * (1 - result["grammar_b1_decode_tok_s"] / result["free_b1_decode_tok_s"]), 1
    )
    return result


def memory_and_reload(
    folder: Path, kernel: str, device: str, dense_prefill: bool | None = False, smoke: bool = False
) -> dict:
    """Load again (kernels already built): time to first token; peak memory at a 4k context.

    The KV cache holds one 4k window (``kv_cache_tokens``), so that the peak is what a 4k
    request needs, not what ``gpu_memory_utilization`` would take. Without the dense-prefill
    copy by default: what an 8 GB card runs (it has no room for it).
    """
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    chat = ChatSynthia(
        model=str(folder), device=device, engine="fast", kernel=kernel, temperature=0,
        stop_at_user_turn=False, max_batch_size=1, context_window=4096, kv_cache_tokens=4096,
        dense_prefill=dense_prefill,
    )  # fmt: skip
    next(iter(chat.stream("Hello", max_tokens=1)))
    load_s = time.perf_counter() - started
    engine = engine_of(chat)
    long = prompt_of(350 if smoke else 3500, engine.tokenizer)
    usage = chat.invoke(long, max_tokens=50 if smoke else 500).usage_metadata
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
    del engine
    chat.unload()
    return {"reload_to_first_token_s": round(load_s, 2), "tokens_in_context": usage["total_tokens"],
            "peak_gpu_mem_gib_4k": peak and round(peak, 2)}  # fmt: skip


# -- the scenarios of engine v2 (each alone in a process of its own on a GPU) -------------------

PATHS = {
    "x128": "ChatSynthia.astream x128 shared-prefix",
    "budget8": "ChatSynthia() 8GiB x4 3500-token prompts",
    "prefix-ttft": "ChatSynthia.stream shared 1500-token prefix",
    "long16k": "ChatSynthia.invoke 16k prompt",
    "coldstart": "ChatSynthia.invoke cold start",
}
"""The ``path`` of each scenario's row."""
SCENARIOS = ("classic", *PATHS)
RESULT_MARK = "SCENARIO-RESULT "
"""Starts the line on which a scenario's process prints its result (JSON)."""


@dataclass
class Options:
    """What every scenario is run with."""

    device: str
    smoke: bool
    """Scaled down (a tiny checkpoint on the CPU): every size and count small."""
    kernel: str | None
    """The fast engine's kernel (None: the default selection)."""
    baseline_kernel: str
    child_timeout: int
    cold_builds: bool
    """The cold start also builds gptqmodel's kernels (Marlin) again, in an empty folder."""
    profile: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def size(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def chat(self, folder: Path, **settings) -> ChatSynthia:
        """A `ChatSynthia` on the fast engine with `settings` (else its defaults)."""
        if self.kernel:
            settings.setdefault("kernel", self.kernel)
        if not self.cuda:  # the default engine on a CPU is transformers
            settings.setdefault("engine", "fast")
        return ChatSynthia(model=str(folder), device=self.device, **settings)

    def transformers_kernel(self, folder: Path) -> str:
        if self.cuda:
            return self.baseline_kernel
        from langchain_synthia._loading import choose_kernel

        bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
        return choose_kernel(self.device, bits)


def engine_of(chat: ChatSynthia):
    """The engine `chat` runs on (loads it)."""
    return get_engine(chat._settings(chat.model, chat.revision))


def limit_memory(gib: float, opts: Options) -> float | None:
    """Let this process use at most `gib` GiB of the GPU; the fraction of the card set."""
    if not opts.cuda:
        return None
    fraction = min(1.0, gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return round(fraction, 4)


def peak_gib(opts: Options) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if opts.cuda else None


def kv_tokens(engine) -> int:
    return engine.blocks.num_blocks * engine.blocks.block_size


class EngineWatch(EngineObserver):
    """While entered, samples the engine at every step it plans: the most requests decoding at
    once, waiting, and KV blocks in use; and records every request as it ends (its prompt, its
    tokens, the blocks it held at the end) in `ended`."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.peak_decoding = self.peak_waiting = self.peak_blocks_in_use = self.steps = 0
        self.ended: list[dict] = []

    def scheduled(
        self, *, decoding: int, waiting: int, blocks_in_use: int, prefill_tokens: int
    ) -> None:
        self.steps += 1
        self.peak_decoding = max(self.peak_decoding, decoding)
        self.peak_waiting = max(self.peak_waiting, waiting)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, blocks_in_use)

    def finished(self, *, prompt_ids: list[int], generated: list[int], held_blocks: int) -> None:
        self.ended.append(
            {"prompt_ids": prompt_ids, "generated": generated, "held_blocks": held_blocks}
        )

    def __enter__(self) -> "EngineWatch":
        self._watching = self.engine.observe(self)
        self._watching.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._watching.__exit__(*exc)

    def wait_ended(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` requests were recorded (the scheduler frees them after the
        caller has its last chunk)."""
        deadline = time.monotonic() + timeout
        while len(self.ended) < count and time.monotonic() < deadline:
            time.sleep(0.01)


def scenario_x128(folder: Path, opts: Options) -> dict:
    """128 concurrent ``astream`` calls of 1,100-token prompts (700 shared: a system message
    with tool definitions), 128 new tokens each, inside a 24 GiB budget."""
    count, total, shared = opts.size(128, 8), opts.size(1100, 160), opts.size(700, 100)
    new_tokens, runs = opts.size(128, 8), opts.size(RUNS, 1)
    fraction = limit_memory(24, opts)
    chat = opts.chat(folder, max_batch_size=count, temperature=0, stop_at_user_turn=False)
    engine = engine_of(chat)
    chat.invoke("Hi", max_tokens=2)  # warm
    if opts.cuda:
        torch.cuda.reset_peak_memory_stats()

    async def one(messages: list) -> tuple[int, float]:
        started, first, tokens = time.perf_counter(), None, 0
        async for chunk in chat.astream(messages, max_tokens=new_tokens):
            first = first or time.perf_counter()
            if chunk.usage_metadata:
                tokens = chunk.usage_metadata["output_tokens"]
        return tokens, (first - started) * 1000

    async def all_of(calls: list) -> list:
        return await asyncio.gather(*(one(m) for m in calls))

    results = []
    for run in range(runs):  # a new system message each run: its first request computes it
        system = system_of(shared, engine.tokenizer, f"Session {run}.")
        calls = [
            agent_messages(system, total, engine.tokenizer, f"Request {i} of run {run}:")
            for i in range(count)
        ]
        hits = engine.prefix_hit_tokens
        with EngineWatch(engine) as watch:
            started = time.perf_counter()
            answers = asyncio.run(all_of(calls))
            seconds = time.perf_counter() - started
        tokens = sum(t for t, _ in answers)
        results.append({
            "tok_s": tokens / seconds, "output_tokens": tokens, "seconds": round(seconds, 2),
            "ttft_ms_median": statistics.median(ms for _, ms in answers),
            "peak_decoding": watch.peak_decoding, "peak_waiting": watch.peak_waiting,
            "peak_kv_blocks_in_use": watch.peak_blocks_in_use,
            "prefix_hit_tokens": engine.prefix_hit_tokens - hits,
        })  # fmt: skip
    rates = [r["tok_s"] for r in results]
    best = results[rates.index(statistics.median_low(rates))]
    prompt_tokens = len(engine.encode(render_prompt(calls[0])))
    details = {
        **best, "runs_tok_s": [round(r, 1) for r in rates], "memory_fraction": fraction,
        "kv_cache_tokens": kv_tokens(engine), "max_batch_size": engine.model.max_batch,
        "shared_prefix_tokens": common_prefix(
            engine.encode(render_prompt(calls[0])), engine.encode(render_prompt(calls[1]))
        ),
        "kernel": engine.model.kernel,
    }  # fmt: skip
    return {
        "path": PATHS["x128"], "batch": count, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "decode_tok_s": best["tok_s"], "total_tok_s": best["tok_s"],
        "ttft_ms": best["ttft_ms_median"], "peak_gpu_mem_gib": peak_gib(opts), "details": details,
    }  # fmt: skip


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def render_prompt(messages: list) -> str:
    from langchain_synthia import render_messages

    return render_messages(messages)


def scenario_budget8(folder: Path, opts: Options) -> dict:
    """``ChatSynthia()`` with its default settings inside an 8 GiB budget: 4 concurrent calls
    of 3,500 prompt tokens each (the default ``max_tokens``)."""
    count, prompt_tokens = 4, opts.size(3500, 350)
    fraction = limit_memory(8, opts)
    if opts.cuda:
        torch.cuda.reset_peak_memory_stats()
    details: dict = {"memory_fraction": fraction}
    result = {"path": PATHS["budget8"], "batch": count, "prompt_tokens": prompt_tokens,
              "details": details}  # fmt: skip
    started = time.perf_counter()
    try:
        chat = opts.chat(folder)
        engine = engine_of(chat)
    except Exception as error:  # the figure is whether it loads at all
        details.update(ok=False, error=f"load: {error!r}", peak_reserved_gib=_reserved(opts))
        result["peak_gpu_mem_gib"] = peak_gib(opts)
        return result
    details.update(load_s=round(time.perf_counter() - started, 2), kv_cache_tokens=kv_tokens(engine),
                   kernel=engine.model.kernel, max_batch_size=engine.model.max_batch)  # fmt: skip
    prompts = [prompt_of(prompt_tokens, engine.tokenizer, f"Call {i}.") for i in range(count)]
    options = {"max_tokens": 16} if opts.smoke else {}  # else the default max_tokens

    async def one(prompt: str) -> int:
        tokens = 0
        async for chunk in chat.astream(prompt, **options):
            if chunk.usage_metadata:
                tokens = chunk.usage_metadata["output_tokens"]
        return tokens

    async def all_of() -> list:
        return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)

    with EngineWatch(engine) as watch:
        started = time.perf_counter()
        answers = asyncio.run(all_of())
        seconds = time.perf_counter() - started
    errors = [repr(a) for a in answers if isinstance(a, BaseException)]
    tokens = sum(a for a in answers if isinstance(a, int))
    details.update(
        ok=not errors, errors=errors, output_tokens=tokens, seconds=round(seconds, 2),
        peak_decoding=watch.peak_decoding, peak_waiting=watch.peak_waiting,
        peak_kv_blocks_in_use=watch.peak_blocks_in_use, peak_reserved_gib=_reserved(opts),
    )  # fmt: skip
    result.update(decode_tok_s=tokens / seconds, total_tok_s=tokens / seconds,
                  new_tokens=max((a for a in answers if isinstance(a, int)), default=0),
                  peak_gpu_mem_gib=peak_gib(opts))  # fmt: skip
    return result


def _reserved(opts: Options) -> float | None:
    return round(torch.cuda.max_memory_reserved() / 2**30, 2) if opts.cuda else None


def scenario_prefix_ttft(folder: Path, opts: Options) -> dict:
    """Default settings: the first-token time of a call that shares a 1,500-token system
    message with the call before it, against that first call's (a fresh message each run)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    prefix, runs = opts.size(1500, 150), opts.size(RUNS, 2)
    chat = opts.chat(folder)
    engine = engine_of(chat)
    if opts.cuda:
        torch.cuda.reset_peak_memory_stats()

    def first_token_ms(system: str, question: str) -> float:
        # a few tokens, read to the end: a call of max_tokens=1 leaves no prefix in the cache
        started, first = time.perf_counter(), None
        for _ in chat.stream([SystemMessage(system), HumanMessage(question)], max_tokens=4):
            first = first or time.perf_counter()
        return (first - started) * 1000

    # warm: the first timed call must not pay for the process's first prefill of this length
    warm = system_of(prefix, engine.tokenizer, "Warm-up.")
    first_token_ms(warm, "Hi")
    first_token_ms(warm, "Hello")  # and the path of a call that shares it
    firsts, shared, hits = [], [], []
    for run in range(runs):  # a fresh system message each run: its first call computes it all
        system = system_of(prefix, engine.tokenizer, f"Nonce {run}-{time.time_ns()}.")
        firsts.append(first_token_ms(system, "What is a payload?"))
        for question in ("How many stages?", "Why is drag bad?"):
            before = engine.prefix_hit_tokens
            shared.append(first_token_ms(system, question))
            hits.append(engine.prefix_hit_tokens - before)
    messages = [SystemMessage(system), HumanMessage("What is a payload?")]
    details = {
        "new_tokens_each_call": 4,
        "first_call_ttft_ms": round(statistics.median(firsts), 1),
        "shared_prefix_ttft_ms": round(statistics.median(shared), 1),
        "ratio": round(statistics.median(shared) / statistics.median(firsts), 3),
        "first_call_samples_ms": [round(t, 1) for t in firsts],
        "shared_prefix_samples_ms": [round(t, 1) for t in shared],
        "prefix_hit_tokens": hits, "kernel": engine.model.kernel,
        "system_tokens": len(engine.tokenizer(system).input_ids),
    }  # fmt: skip
    if opts.profile:  # where the time of a call that reuses the prefix goes
        details["reusing_call_sections_ms"] = call_sections(engine, lambda: first_token_ms(
            system, "Which stage is heaviest?"))  # fmt: skip
    return {
        "path": PATHS["prefix-ttft"], "batch": 1,
        "prompt_tokens": len(engine.encode(render_prompt(messages))), "new_tokens": 4,
        "ttft_ms": statistics.median(shared), "peak_gpu_mem_gib": peak_gib(opts),
        "details": details,
    }  # fmt: skip


def scenario_long16k(folder: Path, opts: Options) -> dict:
    """A 16,000-token prompt, 32 greedy tokens: the decode rate, the KV blocks the request
    holds against one sliding window, and agreement with transformers on the same tokens."""
    prompt_tokens, steps = opts.size(16000, 1600), opts.size(32, 8)
    context = opts.size(16384, 1664) + 256
    # a KV cache of two contexts, not the card's memory: the transformers engine loads after it
    chat = opts.chat(folder, context_window=context, kv_cache_tokens=2 * context, temperature=0,
                     stop_at_user_turn=False)  # fmt: skip
    engine = engine_of(chat)
    prompt = prompt_of(prompt_tokens, engine.tokenizer)
    chat.invoke("Hi", max_tokens=2)  # warm
    if opts.cuda:
        torch.cuda.reset_peak_memory_stats()
    with EngineWatch(engine) as watch:
        timed = time_stream(chat, prompt, steps)
        watch.wait_ended(1)
    peak = peak_gib(opts)
    done = watch.ended[-1]
    window = engine.model.sliding_window
    block = engine.blocks.block_size
    details: dict = {
        "held_blocks_at_end": done["held_blocks"],
        "peak_kv_blocks_in_use": watch.peak_blocks_in_use,
        "window_blocks": None if window is None else math.ceil(window / block) + 1,
        "all_blocks_of_request": math.ceil((len(done["prompt_ids"]) + steps) / block),
        "kv_cache_tokens": kv_tokens(engine), "kernel": engine.model.kernel,
        "engine_tokens": done["generated"],
    }  # fmt: skip
    kernel = engine.model.kernel
    del engine, watch  # the scenario's own references: the cache goes with the unload
    chat.unload()
    try:  # the transformers engine on the same checkpoint and the same prompt tokens
        reference = transformers_model(folder, opts.transformers_kernel(folder), opts.device)
        own = own_model(folder, kernel, opts.device, context)
        agreed = agreement(reference, own, done["prompt_ids"], steps)
        expected = agreed.pop("reference_tokens")
        ours = done["generated"]
        details.update(
            engine_greedy_equal_count=sum(a == b for a, b in zip(ours, expected)),
            engine_greedy_equal_prefix=common_prefix(ours, expected),
            transformers_tokens=expected,
            teacher_forced=agreed,
        )  # fmt: skip
        del reference, own
    except Exception as error:  # the engine's own figures stand
        details["agreement_error"] = repr(error)
    gc.collect()
    return {
        "path": PATHS["long16k"], "batch": 1, "peak_gpu_mem_gib": peak, "details": details,
        **timed,
    }  # fmt: skip


COLD_START = """
import json, sys, time
begun = time.perf_counter()
from langchain_synthia import ChatSynthia
from langchain_synthia._loading import get_engine
imported = time.perf_counter()
chat = ChatSynthia(**json.loads(sys.argv[1]))
chat.invoke("Hi", max_tokens=1)
done = time.perf_counter()
engine = get_engine(chat._settings(chat.model, chat.revision))
print("RESULT " + json.dumps({"import_s": imported - begun, "invoke_s": done - imported,
      "engine": engine.kind, "kernel": getattr(getattr(engine, "model", None), "kernel", None)}))
"""
"""Times ``ChatSynthia(**settings).invoke("Hi", max_tokens=1)`` in a fresh process."""


def scenario_coldstart(folder: Path, opts: Options) -> list[dict]:
    """From ``ChatSynthia(...)`` to the answer of ``.invoke("Hi", max_tokens=1)`` in a fresh
    process with an empty Triton cache: with ``kernel="triton"`` and with the default kernel."""
    import subprocess
    import sys
    import tempfile

    rows = []
    base = {"model": str(folder), "device": opts.device}
    if not opts.cuda:
        base["engine"] = "fast"
    for label, settings in (("triton", {**base, "kernel": "triton"}), ("default", base)):
        with tempfile.TemporaryDirectory(prefix="synthia-cold-") as cache:
            env = {**os.environ, "TRITON_CACHE_DIR": f"{cache}/triton"}
            if opts.cold_builds:
                env["GPTQMODEL_TORCH_EXTENSIONS_DIR"] = f"{cache}/builds"
            details: dict = {"settings": settings, "cold_builds": opts.cold_builds}
            started = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", COLD_START, json.dumps(settings)], env=env,
                    stdout=subprocess.PIPE, text=True, timeout=opts.child_timeout, check=False,
                )  # fmt: skip
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    details["error"] = f"exit status {proc.returncode}"
                else:
                    details.update(json.loads(line[len("RESULT ") :]))
            except subprocess.TimeoutExpired:
                details["error"] = f"no answer within {opts.child_timeout} s"
            details["process_s"] = round(time.perf_counter() - started, 2)
        kernel = details.get("kernel") or label
        seconds = details.get("invoke_s")
        rows.append({
            "path": f"synthia[{kernel}] {PATHS['coldstart']}" + ("" if label == "triton"
                                                               else " (default kernel)"),
            "batch": 1, "prompt_tokens": None, "new_tokens": 1,
            "ttft_ms": None if seconds is None else seconds * 1000, "details": details,
        })  # fmt: skip
    return rows


SCENARIO_RUNS = {
    "x128": scenario_x128,
    "budget8": scenario_budget8,
    "prefix-ttft": scenario_prefix_ttft,
    "long16k": scenario_long16k,
}
"""The scenarios that run in the bench's own process (on a GPU a fresh one each)."""


def run_scenario(name: str, folder: Path, opts: Options) -> list[dict]:
    """Scenario `name`'s rows: on a GPU in a child process (its memory budget and peak its
    own), on the CPU here."""
    if name == "coldstart":
        return scenario_coldstart(folder, opts)
    if not opts.cuda:
        return [SCENARIO_RUNS[name](folder, opts)]
    import subprocess
    import sys

    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", name, "--model", str(folder),
        "--device", opts.device, "--baseline-kernel", opts.baseline_kernel,
        "--child-timeout", str(opts.child_timeout),
        *(["--smoke"] if opts.smoke else []), *(["--profile"] if opts.profile else []),
        *(["--scenario-kernel", opts.kernel] if opts.kernel else []),
    ]  # fmt: skip
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False,
                              timeout=opts.child_timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return [{"path": PATHS[name], "details": {"error": f"over {opts.child_timeout} s"}}]
    found = []
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            found.append(json.loads(line[len(RESULT_MARK) :]))
        else:
            print(line, flush=True)
    return found or [{"path": PATHS[name], "details": {"error": f"exit {proc.returncode}"}}]


def child(name: str, folder: Path, opts: Options) -> None:
    """Run scenario `name` here and print its result for the parent (`run_scenario`)."""
    try:
        result = SCENARIO_RUNS[name](folder, opts)
    except Exception as error:
        logging.exception("scenario %s failed", name)
        result = {"path": PATHS[name], "details": {"error": repr(error)},
                  "peak_gpu_mem_gib": peak_gib(opts)}  # fmt: skip
    print(RESULT_MARK + json.dumps(result), flush=True)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-from", type=Path, help="to build random checkpoints")
    parser.add_argument("--model", type=Path, help="a local GPTQ checkpoint to bench instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--branches", nargs="+", default=["main"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/synthia-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--baseline-kernel", default="gptq_exllama_v2")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=None,
                        help="default: all (classic: batch 1, batch of 32, 16 astream, "
                             "agreement, reload)")  # fmt: skip
    parser.add_argument("--scenario-kernel", default=None,
                        help="the fast engine's kernel in the scenarios other than classic "
                             "(default: the engine's own choice)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="every size small (CPU check)")
    parser.add_argument("--child-timeout", type=int, default=300, help="seconds a scenario")
    parser.add_argument("--cold-builds", action="store_true",
                        help="the cold start builds gptqmodel's kernels again too")  # fmt: skip
    parser.add_argument("--child", choices=list(SCENARIO_RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="batch 1 only (branch sweeps)")
    parser.add_argument("--profile", action="store_true", help="time graphs and kernels alone")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--kernels", nargs="+", default=["triton"], help="fast-engine kernels")
    parser.add_argument("--grammar", action="store_true", help="constrained-decoding overhead")
    parser.add_argument("--prefix-only", action="store_true", help="only prefix reuse, profiled")
    parser.add_argument(
        "--batch-only",
        action="store_true",
        help="only the 32-prompt batch and 16 concurrent streams (host profiling)",
    )
    args = parser.parse_args()
    opts = Options(
        device=args.device, smoke=args.smoke, kernel=args.scenario_kernel,
        baseline_kernel=args.baseline_kernel, child_timeout=args.child_timeout,
        cold_builds=args.cold_builds, profile=args.profile or args.prefix_only,
    )  # fmt: skip
    if args.child:
        child(args.child, args.model, opts)
        return
    if args.model is None and args.tokenizer_from is None:
        parser.error("give --model (a checkpoint) or --tokenizer-from (to build random ones)")
    scenarios = args.scenarios or (
        ["prefix-ttft"] if args.prefix_only
        else ["classic"] if args.quick or args.batch_only else list(SCENARIOS)
    )  # fmt: skip
    card = (
        torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-") if opts.cuda
        else "cpu"
    )  # fmt: skip
    bandwidth = copy_bandwidth() if opts.cuda else None
    rows: list[dict] = []
    notes: dict = {"card": card, "copy_bandwidth_gb_s": bandwidth and bandwidth / 1e9,
                   "scenarios": scenarios, "smoke": args.smoke}  # fmt: skip

    def checkpoint(branch: str) -> Path:
        if args.model is not None:
            return args.model.expanduser().resolve()
        started = time.perf_counter()
        folder = build_checkpoint(args.work / branch, branch, args.tokenizer_from)
        print(f"[{branch}] checkpoint ready in {time.perf_counter() - started:.1f} s", flush=True)
        return folder

    branches = [args.model.name] if args.model is not None else args.branches

    def row(path: str, branch: str, batch: int, result: dict, limit: float | None) -> None:
        def rounded(key: str) -> float | None:
            value = result.get(key)
            return None if value is None else round(value, 1)

        peak = result.get("peak_gpu_mem_gib", "here")
        if peak == "here":
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if opts.cuda else None
        rows.append({
            "card": card, "path": path, "branch": branch, "batch": batch,
            "prompt_tokens": result.get("prompt_tokens"), "new_tokens": result.get("new_tokens"),
            "decode_tok_s": rounded("decode_tok_s"), "ttft_ms": rounded("ttft_ms"),
            "total_tok_s": rounded("total_tok_s"),
            "limit_tok_s": None if limit is None else round(limit, 1), "peak_gpu_mem_gib": peak,
            **({"details": result["details"]} if "details" in result else {}),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    if "classic" in scenarios:
        for run_index, (branch, kernel) in enumerate(
            [(b, k) for b in branches for k in args.kernels]
        ):
            classic(args, opts, checkpoint(branch), branch, kernel, bandwidth, notes, row,
                    last=run_index == len(branches) * len(args.kernels) - 1)  # fmt: skip
    for name in (n for n in scenarios if n != "classic"):
        folder = checkpoint(branches[0])
        print(f"[{name}] running", flush=True)
        for result in run_scenario(name, folder, opts):
            row(result.pop("path"), branches[0], result.pop("batch", 1), result, None)

    stamp = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{stamp}-{card}.json"
    out.write_text(json.dumps(rows, indent=2))
    (args.out / f"{stamp}-{card}-notes.json").write_text(json.dumps(notes, indent=2))
    print(f"\ncard {card}, copy bandwidth {(bandwidth or 0) / 1e9:.0f} GB/s; rows in {out}")
    header = ("path", "branch", "batch", "decode_tok_s", "ttft_ms", "total_tok_s", "limit_tok_s",
              "peak_gpu_mem_gib")  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(r[h]) for h in header))
    print(json.dumps(notes, indent=1))


def classic(args, opts: Options, folder: Path, branch: str, kernel: str, bandwidth, notes: dict,
            row, last: bool) -> None:  # fmt: skip
    """Batch 1 (rate and first token), the batch of 32, 16 concurrent ``astream`` calls, the
    transformers baseline and agreement, and a reload at a 4k context."""
    device, cuda = opts.device, opts.cuda
    prompt_len, batch_n, streams_n = opts.size(512, 64), opts.size(32, 4), opts.size(16, 4)
    new_tokens = opts.size(args.new_tokens, 8)
    runs, ttft_samples = opts.size(RUNS, 1), opts.size(TTFT_SAMPLES, 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    chat = ChatSynthia(
        model=str(folder), device=device, engine="fast", temperature=0, kernel=kernel,
        stop_at_user_turn=False, max_batch_size=1 if args.quick else batch_n,
        prefix_caching=False,  # the same prompt is timed again: no reuse here
    )  # fmt: skip
    engine = engine_of(chat)
    prompt = prompt_of(prompt_len, engine.tokenizer)
    time_stream(chat, prompt, 2)  # loads the model, captures the graphs
    load_s = time.perf_counter() - started
    print(f"[{branch}] load + graphs + first answer: {load_s:.1f} s", flush=True)
    limit = None if bandwidth is None else bandwidth / engine.model.weight_bytes()
    notes[f"{branch}_weight_gb"] = engine.model.weight_bytes() / 1e9
    notes[f"{branch}_{kernel}_load_to_first_token_s"] = load_s
    notes[f"{branch}_{kernel}_dense_prefill"] = engine.model.dense_prefill
    notes[f"{branch}_{kernel}_kv_cache_tokens"] = kv_tokens(engine)
    race = engine.model.gemv_race  # (our GEMV, the kernel's own) µs a shape
    notes[f"{branch}_{kernel}_gemv_race_us"] = race
    print("batch-1 GEMV against the kernel's own, µs:", race, flush=True)
    if not args.batch_only:
        result = time_stream(chat, prompt, new_tokens)
        # one first-token time is at the mercy of the host: report the median of several
        firsts = sorted(time_stream(chat, prompt, 2)["ttft_ms"] for _ in range(ttft_samples))
        notes[f"{branch}_{kernel}_ttft_ms_samples"] = [round(t, 2) for t in firsts]
        result["ttft_ms"] = statistics.median(firsts)
        row(f"synthia[{kernel}] ChatSynthia.stream", branch, 1, result, limit)
    # rows of one batch must decode as each would alone
    if not args.quick and not args.batch_only:
        alone = chat.invoke(prompt, max_tokens=32).content
        together = [m.content for m in chat.batch([prompt] * 4, max_tokens=32)]
        notes[f"{branch}_{kernel}_batch_rows_equal_alone"] = [t == alone for t in together]
        print("batch rows equal alone:", notes[f"{branch}_{kernel}_batch_rows_equal_alone"])
    ids = engine.encode(render_prompt([_human(prompt)]))
    if args.profile and cuda:
        notes[f"{branch}_{kernel}_profile"] = profile(engine, ids, kernel, folder)
        print(json.dumps(notes[f"{branch}_{kernel}_profile"]), flush=True)
    if args.grammar:
        notes[f"{branch}_{kernel}_grammar"] = grammar_overhead(chat, prompt, new_tokens)
        print("grammar:", notes[f"{branch}_{kernel}_grammar"], flush=True)
    if args.quick:
        del engine
        chat.unload()
        return
    prompts = [prompt_of(prompt_len - 7 * i, engine.tokenizer) for i in range(batch_n)]
    rates, splits = [], []
    for _ in range(runs):
        start = time.perf_counter()
        answers, split = scheduler_split(engine, lambda: chat.batch(prompts, max_tokens=new_tokens))
        seconds = time.perf_counter() - start
        rates.append(sum(a.usage_metadata["output_tokens"] for a in answers) / seconds)
        splits.append(split)
    rate = statistics.median(rates)
    notes[f"{branch}_{kernel}_batch{batch_n}_tok_s_runs"] = [round(r, 1) for r in rates]
    notes[f"{branch}_{kernel}_batch{batch_n}_scheduler"] = splits[rates.index(rate)]
    print(f"batch of {batch_n}, runs:", notes[f"{branch}_{kernel}_batch{batch_n}_tok_s_runs"],
          "scheduler time (median run):", splits[rates.index(rate)], flush=True)  # fmt: skip
    row(f"synthia[{kernel}] ChatSynthia.batch", branch, batch_n,
        {"decode_tok_s": rate, "total_tok_s": rate, "new_tokens": new_tokens,
         "prompt_tokens": prompt_len}, limit and limit * batch_n)  # fmt: skip

    async def concurrent(n: int) -> float:
        start = time.perf_counter()
        tokens = await stream_all(chat, prompts[:n], new_tokens)
        return tokens / (time.perf_counter() - start)

    streams = [
        scheduler_split(engine, lambda: asyncio.run(concurrent(streams_n))) for _ in range(runs)
    ]
    rates = [r for r, _ in streams]
    rate = statistics.median(rates)
    concurrent_split = streams[rates.index(rate)][1]
    notes[f"{branch}_{kernel}_astream{streams_n}_tok_s_runs"] = [round(r, 1) for r in rates]
    notes[f"{branch}_{kernel}_astream{streams_n}_scheduler"] = concurrent_split
    print(f"{streams_n} concurrent astream, runs:",
          notes[f"{branch}_{kernel}_astream{streams_n}_tok_s_runs"],
          "scheduler time (median run):", concurrent_split, flush=True)  # fmt: skip
    row(f"synthia[{kernel}] {streams_n} concurrent astream", branch, streams_n,
        {"decode_tok_s": rate, "total_tok_s": rate, "new_tokens": new_tokens,
         "prompt_tokens": prompt_len}, limit and limit * streams_n)  # fmt: skip
    del engine  # the engine's KV cache takes most of the card: free it first
    chat.unload()
    if args.batch_only:
        return
    if not args.no_baseline and last:
        try:
            base_kernel = opts.transformers_kernel(folder)
            base = baseline(folder, base_kernel, ids, new_tokens, device)
            own = own_model(folder, kernel, device, len(ids) + 64)
            notes["agreement_first"] = agreement(base["model"], own, ids)
            print("agreement (first):", notes["agreement_first"], flush=True)
            row(f"transformers generate ({base_kernel})", branch, 1,
                {**base, "new_tokens": new_tokens, "prompt_tokens": len(ids)}, limit)  # fmt: skip
            notes["agreement"] = agreement(base["model"], own, ids)
            print("agreement:", notes["agreement"], flush=True)
            del base, own
            gc.collect()
        except Exception as error:
            notes["baseline_error"] = repr(error)
            print("baseline failed:", repr(error), flush=True)
    if cuda:
        torch.cuda.empty_cache()
    notes[f"{branch}_{kernel}_memory"] = memory_and_reload(folder, kernel, device,
                                                           smoke=opts.smoke)  # fmt: skip
    print(notes[f"{branch}_{kernel}_memory"], flush=True)
    if kernel == "gptq_marlin":
        notes[f"{branch}_{kernel}_memory_dense_prefill"] = memory_and_reload(
            folder, kernel, device, True
        )
        print("with the dense-prefill copy:", notes[f"{branch}_{kernel}_memory_dense_prefill"])


def _human(text: str):
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


if __name__ == "__main__":
    main()
