"""GPU benchmark: langchain-synthia's fast engine against transformers + gptqmodel, same run.

Builds a Mistral-7B-shaped GPTQ checkpoint of random quantised tensors in TheBloke's layout for
a branch (no download: kernel speed does not depend on the values), measures the card's copy
bandwidth, the baseline (transformers ``generate()`` with a gptqmodel kernel) and ours through
``ChatSynthia.stream()`` / ``.batch()`` / ``.astream()``, checks agreement, and prints a table.

    python bench/bench.py --tokenizer-from PATH [--branches main ...] [--out DIR]

``--tokenizer-from`` is any folder with Synthia's tokenizer files (the tiny checkpoint of
``langchain_synthia.testing.make_tiny_checkpoint`` has them). Rows go to
``<out>/<date>-<card>.json``: card, path, branch, batch, prompt_tokens, new_tokens, decode_tok_s,
ttft_ms, total_tok_s, limit_tok_s, peak_gpu_mem_gib.
"""

import argparse
import asyncio
import datetime
import gc
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from langchain_synthia import VARIANTS, ChatSynthia
from langchain_synthia._gptq import pack_rows
from langchain_synthia._loading import get_engine

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


def prompt_of(tokens: int, tokenizer) -> str:
    """A user message whose rendered Synthia prompt is exactly `tokens` tokens long."""
    from langchain_core.messages import HumanMessage

    from langchain_synthia import render_messages

    words = ["rocket", "orbit", "gravity", "thrust", "fuel", "stage", "engine", "launch", "pad", "velocity", "atmosphere", "drag", "apogee", "perigee", "payload", "fairing"]  # fmt: skip
    text = " ".join(words[i % len(words)] for i in range(tokens))
    while len(tokenizer(render_messages([HumanMessage(text)])).input_ids) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


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


def baseline(folder: Path, kernel: str, prompt_ids: list[int], new_tokens: int) -> dict:
    """transformers + gptqmodel ``generate()``: greedy, batch 1."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=GPTQConfig(bits=4, backend=kernel), device_map="cuda",
        dtype=torch.float16,
    )  # fmt: skip
    ids = torch.tensor([prompt_ids], device="cuda")
    kwargs = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return {
        "model": model,
        "ttft_ms": ttft * 1000,
        "decode_tok_s": (new_tokens - 1) / max(total - ttft, 1e-9),
        "total_tok_s": new_tokens / total,
        "tokens": out[0, len(prompt_ids) :].tolist(),
    }


def agreement(model, engine, prompt_ids: list[int], steps: int = 32) -> dict:
    """Teacher-forced logits of ours against transformers' on the same tokens, and greedy match."""
    fast = engine.model
    with torch.inference_mode():
        ref_tokens = model.generate(
            torch.tensor([prompt_ids], device="cuda"), max_new_tokens=steps, do_sample=False,
            min_new_tokens=steps, pad_token_id=0,
        )[0].tolist()  # fmt: skip
        ref_logits = model(torch.tensor([ref_tokens], device="cuda")).logits[0].float()
        ours = [fast.prefill(0, ref_tokens[: len(prompt_ids)])]
        tokens = torch.zeros(fast.max_batch, dtype=torch.long, device="cuda")
        positions = torch.zeros_like(tokens)
        for step in range(steps - 1):
            tokens[0] = ref_tokens[len(prompt_ids) + step]
            positions[0] = len(prompt_ids) + step
            ours.append(fast.decode(1, tokens, positions)[0])
    errors = []
    for step, logits in enumerate(ours):
        ref = ref_logits[len(prompt_ids) - 1 + step]
        errors.append(((logits - ref).norm() / ref.norm()).item())
    greedy = [int(l.argmax()) for l in ours]
    expected = ref_tokens[len(prompt_ids) :]
    same = next((i for i, (a, b) in enumerate(zip(greedy, expected)) if a != b), len(greedy))
    worst = max(range(len(errors)), key=errors.__getitem__)
    return {"max_rel_logit_err": max(errors), "worst_step": worst, "greedy_equal_tokens": same,
            "steps": steps}  # fmt: skip


def profile(engine, prompt_ids: list[int], kernel: str, folder: Path) -> dict:
    """Where a decode step's time goes: graph replays, each GEMV alone, prefill."""
    from triton.testing import do_bench

    from langchain_synthia import _kernels as K

    fast = engine.model
    result: dict = {}
    for size, (graph, _) in sorted(engine._graphs.items()):
        result[f"graph_step_ms_b{size}"] = do_bench(graph.replay, warmup=25, rep=200,
                                                    return_mode="median")  # fmt: skip
    layer = fast.layers[0]
    for name, linear in () if kernel != "triton" else (("qkv", layer.qkv[0]), ("o", layer.o), ("gate_up", layer.gate_up[0]),
                         ("down", layer.down)):  # fmt: skip
        nbytes = linear.qweight.numel() * 4 + linear.scales.numel() * 4
        for rows in (1, 32):
            x = torch.randn(rows, linear.in_features, device="cuda").half()
            out = torch.zeros(rows, linear.out_features, device="cuda")
            ms = do_bench(lambda x=x, out=out, linear=linear: K.gptq_linear(x, linear, out),
                          warmup=25, rep=100, return_mode="median")  # fmt: skip
            result[f"{name}_m{rows}_us"] = round(ms * 1000, 1)
            result[f"{name}_m{rows}_gb_s"] = round(nbytes / ms / 1e6)
    with torch.inference_mode():
        result["prefill_512_ms"] = do_bench(lambda: fast.prefill(0, prompt_ids), warmup=3,
                                            rep=50, return_mode="median")  # fmt: skip
        result["decode_b1_kernels"] = kernel_breakdown(
            lambda: fast.decode(1, engine._tokens, engine._positions)
        )
        result["prefill_512_kernels"] = kernel_breakdown(lambda: fast.prefill(0, prompt_ids))
        widest = max(engine._graphs, default=1)
        if widest > 1:  # the batched step: what its extra time over batch 1 is spent on
            result[f"decode_b{widest}_kernels"] = kernel_breakdown(
                lambda: fast.decode(widest, engine._tokens, engine._positions)
            )
    return result


def call_sections(engine, call) -> dict:
    """Where one call's first-token time goes, in ms: each engine stage timed with the device
    synchronised before and after (so GPU time lands in the stage that launched it)."""
    spent: dict[str, float] = {}
    targets = {
        "prefix_lookup": (engine.prefixes, "longest"),
        "prefix_store": (engine.prefixes, "store"),
        "prefill": (engine.model, "prefill_many"),
        "sampler_assign": (engine._sampler, "assign"),
        "sampler_first_token": (engine._sampler, "sample"),
    }

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                spent[name] = spent.get(name, 0.0) + (time.perf_counter() - start) * 1000

        return wrapper

    submitted = {}
    start_rows = engine.start

    def start(rows):
        submitted.setdefault("at", time.perf_counter())
        start_rows(rows)

    for name, (owner, attr) in targets.items():
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    engine.start = start
    started = time.perf_counter()
    try:
        call()
    finally:
        first = time.perf_counter()
        for owner, attr in targets.values():
            delattr(owner, attr)
        del engine.start
    result = {name: round(ms, 2) for name, ms in spent.items()}
    result["total_ms"] = round((first - started) * 1000, 2)
    result["before_engine_ms"] = round((submitted.get("at", first) - started) * 1000, 2)
    result["unaccounted_ms"] = round(result["total_ms"] - result["before_engine_ms"]
                                     - sum(spent.values()), 2)  # fmt: skip
    return result


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


class _TimedEvent:
    """A CUDA event whose waits are timed (how long the scheduler waits for the device)."""

    def __init__(self, event, spent: dict) -> None:
        self.event, self.spent = event, spent

    def record(self) -> None:
        self.event.record()

    def synchronize(self) -> None:
        start = time.perf_counter()
        self.event.synchronize()
        self.spent["device_wait_s"] += time.perf_counter() - start


def scheduler_split(engine, run) -> tuple:
    """`run()`'s result, and where the scheduler thread's time went meanwhile: prefills, waits
    for the device, and everything else (host work: sampling launches, detokenizing, handing
    out)."""
    spent = {"prefill_s": 0.0, "device_wait_s": 0.0, "steps": 0}
    marks: dict[str, float] = {}  # when, from the start, the engine saw the first request etc.
    prefill, step, host, start_rows = engine._prefill, engine._step, engine._host, engine.start

    def timed_prefill(joining) -> None:
        begun = time.perf_counter()
        prefill(joining)
        spent["prefill_s"] += time.perf_counter() - begun
        marks.setdefault("first_prefill_done", time.perf_counter())

    def counted_step() -> None:
        spent["steps"] += 1
        step()
        marks["last_step_launched"] = time.perf_counter()

    def noted_start(rows) -> None:
        marks.setdefault("first_request", time.perf_counter())
        start_rows(rows)

    engine._prefill, engine._step, engine.start = timed_prefill, counted_step, noted_start
    engine._host = [(b, e and _TimedEvent(e, spent)) for b, e in host]  # no events on a CPU
    start = time.perf_counter()
    try:
        value = run()
    finally:
        spent["wall_s"] = time.perf_counter() - start
        del engine._prefill, engine._step, engine.start
        engine._host = host
    spent["other_s"] = spent["wall_s"] - spent["prefill_s"] - spent["device_wait_s"]
    # the timeline: before the engine saw a request, and after the last step was launched
    spent.update({f"at_{name}_s": mark - start for name, mark in marks.items()})
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


def prefix_reuse(folder: Path, kernel: str, profile_suffix: bool = False) -> dict:
    """First-token time of a call sharing a 1,500-token prefix with the one before, and alone."""
    from langchain_core.messages import HumanMessage, SystemMessage

    chat = ChatSynthia(
        model=str(folder), device="cuda", engine="fast", kernel=kernel, temperature=0,
        stop_at_user_turn=False, max_batch_size=1, prefix_cache_tokens=8192,
    )  # fmt: skip
    engine = get_engine(chat._settings(chat.model, chat.revision))
    docs = prompt_of(1500, engine.tokenizer)
    # warm: the first timed call must not pay for the process's first prefill of this length
    next(iter(chat.stream([SystemMessage("Unrelated. " + docs), HumanMessage("Hi")], max_tokens=1)))

    def first_token_ms(system: str, question: str) -> float:
        started = time.perf_counter()
        next(iter(chat.stream([SystemMessage(system), HumanMessage(question)], max_tokens=1)))
        return (time.perf_counter() - started) * 1000

    firsts, shared = [], []
    for run in range(RUNS):  # a fresh document each run: its first call computes it all
        system = f"Set {run}. {docs}"
        firsts.append(first_token_ms(system, "What is a payload?"))
        shared += [first_token_ms(system, q) for q in ("How many stages?", "Why is drag bad?")]
    result = {
        "first_call_ttft_ms": round(statistics.median(firsts), 1),
        "shared_prefix_ttft_ms": round(statistics.median(shared), 1),
        "ratio": round(statistics.median(shared) / statistics.median(firsts), 3),
        "first_call_samples_ms": [round(t, 1) for t in firsts],
        "shared_prefix_samples_ms": [round(t, 1) for t in shared],
        "reused_tokens": engine.prefixes.reused_tokens,
    }
    if profile_suffix:  # where the time of a call that reuses the prefix goes (GPU kernels)
        prompt = ChatSynthia(model=str(folder))._prepare(
            [SystemMessage(system), HumanMessage("What limits the range?")], None, {}
        )[1]
        ids = engine.encode(prompt)
        result["reusing_call_sections_ms"] = call_sections(engine, lambda: next(iter(chat.stream(
            [SystemMessage(system), HumanMessage("Which stage is heaviest?")], max_tokens=1))))  # fmt: skip
        reused = engine.prefixes.longest(ids)[0]  # a new question: the shared system message
        rest = len(ids) - reused
        size = next((s for s in engine._suffix_sizes if s >= rest), None)
        if size in engine._suffix_graphs:  # what the reusing call runs: one captured step
            from triton.testing import do_bench

            result[f"suffix_graph_ms_{size}"] = round(do_bench(
                engine._suffix_graphs[size][0].replay, warmup=10, rep=100, return_mode="median"
            ), 3)  # fmt: skip
            with torch.inference_mode():
                result["suffix_step_kernels"] = kernel_breakdown(
                    lambda: engine.model.decode(size, *engine._suffix)
                )
        with torch.inference_mode():
            result["suffix_prefill_kernels"] = kernel_breakdown(
                lambda: engine.model.prefill(0, ids[reused:], reused)
            )
            torch.cuda.synchronize()
            started = time.perf_counter()
            engine.model.prefill(0, ids[reused:], reused)
            torch.cuda.synchronize()
            result["suffix_prefill_ms"] = round((time.perf_counter() - started) * 1000, 2)
            result["suffix_tokens"] = len(ids) - reused
    _release(engine, chat)
    return result


def memory_and_reload(folder: Path, kernel: str, dense_prefill: bool | None = False) -> dict:
    """Load again (kernels already built): time to first token; peak memory at a 4k context.

    Without the dense-prefill copy by default: what an 8 GB card runs (it has no room for it).
    """
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    chat = ChatSynthia(
        model=str(folder), device="cuda", engine="fast", kernel=kernel, temperature=0,
        stop_at_user_turn=False, max_batch_size=1, context_window=4096,
        dense_prefill=dense_prefill,
    )  # fmt: skip
    next(iter(chat.stream("Hello", max_tokens=1)))
    load_s = time.perf_counter() - started
    engine = get_engine(chat._settings(chat.model, chat.revision))
    long = prompt_of(3500, engine.tokenizer)
    usage = chat.invoke(long, max_tokens=500).usage_metadata
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    _release(engine, chat)
    return {"reload_to_first_token_s": round(load_s, 2), "tokens_in_context": usage["total_tokens"],
            "peak_gpu_mem_gib_4k": round(peak, 2)}  # fmt: skip


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    parser.add_argument("--branches", nargs="+", default=["main"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/synthia-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--baseline-kernel", default="gptq_exllama_v2")
    parser.add_argument("--new-tokens", type=int, default=256)
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
    card = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")
    bandwidth = copy_bandwidth()
    rows: list[dict] = []
    notes: dict = {"card": card, "copy_bandwidth_gb_s": bandwidth / 1e9}

    def row(path: str, branch: str, batch: int, result: dict, limit: float) -> None:
        rows.append({
            "card": card, "path": path, "branch": branch, "batch": batch,
            "prompt_tokens": result.get("prompt_tokens"), "new_tokens": result.get("new_tokens"),
            "decode_tok_s": round(result["decode_tok_s"], 1),
            "ttft_ms": None if result.get("ttft_ms") is None else round(result["ttft_ms"], 1),
            "total_tok_s": round(result["total_tok_s"], 1), "limit_tok_s": round(limit, 1),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    if args.prefix_only:
        folder = build_checkpoint(args.work / "main", "main", args.tokenizer_from)
        print(json.dumps(prefix_reuse(folder, args.kernels[0], profile_suffix=True)), flush=True)
        return
    runs = [(b, k) for b in args.branches for k in args.kernels]
    for run_index, (branch, kernel) in enumerate(runs):
        started = time.perf_counter()
        folder = build_checkpoint(args.work / branch, branch, args.tokenizer_from)
        print(f"[{branch}] checkpoint ready in {time.perf_counter() - started:.1f} s", flush=True)
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        chat = ChatSynthia(
            model=str(folder), device="cuda", engine="fast", temperature=0, kernel=kernel,
            stop_at_user_turn=False, max_batch_size=1 if args.quick else 32,
            prefix_cache_tokens=0,  # the same prompt is timed again: no reuse here
        )  # fmt: skip
        engine = get_engine(chat._settings(chat.model, chat.revision))
        prompt = prompt_of(512, engine.tokenizer)
        time_stream(chat, prompt, 2)  # loads the model, captures the graphs
        load_s = time.perf_counter() - started
        print(f"[{branch}] load + graphs + first answer: {load_s:.1f} s", flush=True)
        limit = bandwidth / engine.model.weight_bytes()
        notes[f"{branch}_weight_gb"] = engine.model.weight_bytes() / 1e9
        notes[f"{branch}_{kernel}_load_to_first_token_s"] = load_s
        notes[f"{branch}_{kernel}_dense_prefill"] = getattr(engine.model, "dense_prefill", False)
        race = getattr(engine.model, "gemv_race", {})  # (our GEMV, the kernel's own) µs a shape
        notes[f"{branch}_{kernel}_gemv_race_us"] = race
        print("batch-1 GEMV against the kernel's own, µs:", race, flush=True)
        if not args.batch_only:
            result = time_stream(chat, prompt, args.new_tokens)
            # one first-token time is at the mercy of the host: report the median of several
            firsts = sorted(time_stream(chat, prompt, 2)["ttft_ms"] for _ in range(TTFT_SAMPLES))
            notes[f"{branch}_{kernel}_ttft_ms_samples"] = [round(t, 2) for t in firsts]
            result["ttft_ms"] = statistics.median(firsts)
            row(f"synthia[{kernel}] ChatSynthia.stream", branch, 1, result, limit)
        # rows of one batch must decode as each would alone
        if not args.quick and not args.batch_only:
            alone = chat.invoke(prompt, max_tokens=32).content
            together = [m.content for m in chat.batch([prompt] * 4, max_tokens=32)]
            notes[f"{branch}_{kernel}_batch_rows_equal_alone"] = [t == alone for t in together]
            print("batch rows equal alone:", notes[f"{branch}_{kernel}_batch_rows_equal_alone"])
        if args.profile:
            ids = engine.encode(
                ChatSynthia(model=str(folder))._prepare([_human(prompt)], None, {})[1]
            )
            notes[f"{branch}_{kernel}_profile"] = profile(engine, ids, kernel, folder)
            print(json.dumps(notes[f"{branch}_{kernel}_profile"]), flush=True)
        if args.grammar:
            notes[f"{branch}_{kernel}_grammar"] = grammar_overhead(chat, prompt, args.new_tokens)
            print("grammar:", notes[f"{branch}_{kernel}_grammar"], flush=True)
        if args.quick:
            _release(engine, chat)
            continue
        prompts = [prompt_of(512 - 7 * i, engine.tokenizer) for i in range(32)]
        rates, splits = [], []
        for _ in range(RUNS):
            start = time.perf_counter()
            answers, split = scheduler_split(
                engine, lambda: chat.batch(prompts, max_tokens=args.new_tokens)
            )
            seconds = time.perf_counter() - start
            rates.append(sum(a.usage_metadata["output_tokens"] for a in answers) / seconds)
            splits.append(split)
        rate = statistics.median(rates)
        notes[f"{branch}_{kernel}_batch32_tok_s_runs"] = [round(r, 1) for r in rates]
        notes[f"{branch}_{kernel}_batch32_scheduler"] = splits[rates.index(rate)]
        print("batch of 32, runs:", notes[f"{branch}_{kernel}_batch32_tok_s_runs"],
              "scheduler time (median run):", splits[rates.index(rate)], flush=True)  # fmt: skip
        row(f"synthia[{kernel}] ChatSynthia.batch", branch, 32,
            {"decode_tok_s": rate, "total_tok_s": rate,
             "new_tokens": args.new_tokens, "prompt_tokens": 512}, limit * 32)  # fmt: skip

        async def concurrent(n: int) -> float:
            start = time.perf_counter()
            tokens = await stream_all(chat, prompts[:n], args.new_tokens)
            return tokens / (time.perf_counter() - start)

        streams = [
            scheduler_split(engine, lambda: asyncio.run(concurrent(16))) for _ in range(RUNS)
        ]
        rates = [r for r, _ in streams]
        rate = statistics.median(rates)
        concurrent_split = streams[rates.index(rate)][1]
        notes[f"{branch}_{kernel}_astream16_tok_s_runs"] = [round(r, 1) for r in rates]
        notes[f"{branch}_{kernel}_astream16_scheduler"] = concurrent_split
        print("16 concurrent astream, runs:", notes[f"{branch}_{kernel}_astream16_tok_s_runs"],
              "scheduler time (median run):", concurrent_split, flush=True)  # fmt: skip
        row(f"synthia[{kernel}] 16 concurrent astream", branch, 16,
            {"decode_tok_s": rate, "total_tok_s": rate, "new_tokens": args.new_tokens,
             "prompt_tokens": 512}, limit * 16)  # fmt: skip
        if args.batch_only:
            _release(engine, chat)
            continue
        ids = engine.encode(ChatSynthia(model=str(folder))._prepare([_human(prompt)], None, {})[1])
        if not args.no_baseline and run_index == len(runs) - 1:
            try:
                base = baseline(folder, args.baseline_kernel, ids, args.new_tokens)
                notes["agreement_first"] = agreement(base["model"], engine, ids)
                print("agreement (first):", notes["agreement_first"], flush=True)
                row(f"transformers generate ({args.baseline_kernel})", branch, 1,
                    {**base, "new_tokens": args.new_tokens, "prompt_tokens": len(ids)}, limit)  # fmt: skip
                notes["agreement"] = agreement(base["model"], engine, ids)
                print("agreement:", notes["agreement"], flush=True)
                del base
            except Exception as error:
                notes["baseline_error"] = repr(error)
                print("baseline failed:", repr(error), flush=True)
        _release(engine, chat)
        if branch == "main":
            notes[f"main_{kernel}_memory"] = memory_and_reload(folder, kernel)
            print(notes[f"main_{kernel}_memory"], flush=True)
            notes[f"main_{kernel}_memory_dense_prefill"] = memory_and_reload(folder, kernel, True)
            print("with the dense-prefill copy:", notes[f"main_{kernel}_memory_dense_prefill"])
            notes[f"main_{kernel}_prefix_reuse"] = prefix_reuse(folder, kernel, args.profile)
            print(notes[f"main_{kernel}_prefix_reuse"], flush=True)

    stamp = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{stamp}-{card}.json"
    out.write_text(json.dumps(rows, indent=2))
    (args.out / f"{stamp}-{card}-notes.json").write_text(json.dumps(notes, indent=2))
    print(f"\ncard {card}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; rows in {out}")
    header = ("path", "branch", "batch", "decode_tok_s", "ttft_ms", "total_tok_s", "limit_tok_s",
              "peak_gpu_mem_gib")  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(r[h]) for h in header))
    print(json.dumps(notes, indent=1))


def _human(text: str):
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


def _release(engine, chat) -> None:
    from langchain_synthia import _loading

    _loading._engines.clear()
    engine.close()
    del engine, chat
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
