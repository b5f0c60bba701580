"""Synthia's network (Mistral-7B-v0.1) written for fast decoding: no transformers at run time.

It runs any checkpoint of the Mistral or Llama architecture (`_checkpoint.ARCHITECTURES`): its
sizes, head counts, tied embeddings, RoPE theta and sliding window (or none) come from
config.json, which `_checkpoint.read_model_config` checks and refuses when it asks for more.

The weights come straight from the GPTQ safetensors (repacked by `_gptq`), the KV cache is a
pool of fixed-size blocks per layer read through block tables (`allocate_kv`), and a decode step
for a given batch size does no host work at all, so that on CUDA it is captured once as a CUDA
graph and replayed for every token. The
arithmetic (and its fp16 rounding points) follows transformers' Mistral, so that logits agree
within fp16 noise; `tests/integration_tests/test_fast_engine.py` checks that on the CPU, where
the same code runs with the plain-torch references instead of the Triton kernels.
"""

import contextlib
from pathlib import Path
from typing import Any

import torch

from langchain_synthia import _kernels as K
from langchain_synthia._checkpoint import read_model_config
from langchain_synthia._decoder_layer import DecoderLayer, InputOrder
from langchain_synthia._linear import race_gemv

KERNELS = ("triton", "gptq_marlin")
"""GPTQ kernels of the fast engine: langchain-synthia's Triton kernels or gptqmodel's Marlin
(CUDA, built with nvcc on first use, then cached by gptqmodel). `_loading.default_fast_kernel`
picks one when none is named."""

WINDOW_CHUNK = 1024
"""Most queries of one masked attention call in a prefill past the sliding window: with the
window's keys (4096 for Synthia-7B), a chunk's mask and repeated keys stay near 100 MiB."""

_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
"""Prefill attention backends on CUDA; cuDNN's is left out. (With it allowed and a boolean mask
built, a call reusing a cached prefix was many times slower: docs/benchmarks.md.)"""


def _attention_backends(device: torch.device) -> Any:
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in _SDPA_BACKENDS])


class FastMistral:
    """The network, its weights and its paged KV cache (once allocated) on one device."""

    def __init__(
        self, folder: Path, device: torch.device, *, max_batch: int, max_len: int,
        kernel: str | None = None, dense_prefill: bool | None = None,
        use_kernels: bool | None = None,
    ) -> None:  # fmt: skip
        """Load the GPTQ checkpoint in `folder` onto `device` (`kernel`: see `KERNELS`).

        `dense_prefill` (Marlin only): keep the dense-prefill copy of the weights (see
        `_linear.MarlinLinear`); ``None`` keeps it on a Hopper (or newer) GPU with four times the
        checkpoint's size free, so that small cards keep their memory for the KV cache.
        `use_kernels` (``None``: on CUDA where Triton is installed) runs our Triton kernels;
        ``True`` on the CPU runs them under Triton's interpreter (the kernel checks do).
        """
        config = read_model_config(folder)  # checked: a CheckpointError names a bad field
        self.config = config
        """The checkpoint's settings (`_checkpoint.ModelConfig`); the fields below copy them."""
        self.device = device
        self.max_batch = max_batch
        positions = config.max_position_embeddings
        self.max_len = max_len if positions is None else min(max_len, positions)
        """Positions of a request, prompt and answer: `max_len`, held to the positions the model
        was trained for (``max_position_embeddings``)."""
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.sliding_window = config.sliding_window
        """Keys a query attends to, itself included (``None``: all before it): the query at
        position p sees the keys at ``p - sliding_window < j <= p``, in prefill and decode."""
        self.use_kernels = (
            device.type == "cuda" and K.triton_available() if use_kernels is None else use_kernels
        )
        """Whether the Triton kernels run (else the plain-torch references)."""
        tensors = _Tensors(folder, device)
        bits, group = config.bits, config.group_size
        self.kernel = kernel or "triton"
        if self.kernel not in KERNELS:
            msg = (
                f"kernel={kernel!r} is not a fast-engine kernel: choose one of {KERNELS}, or pass "
                "engine='transformers' to use another gptqmodel kernel."
            )
            raise ValueError(msg)
        self.dense_prefill = self.kernel == "gptq_marlin" and (
            _dense_prefill_pays(folder, device) if dense_prefill is None else dense_prefill
        )
        layer_args = (bits, group, self.kernel, self.dense_prefill)
        self.layers = [
            DecoderLayer(tensors, f"model.layers.{i}", *layer_args, kernels=self.use_kernels)
            for i in range(config.num_hidden_layers)
        ]
        self.embed = tensors["model.embed_tokens.weight"].to(torch.float16)
        self.norm = tensors["model.norm.weight"].to(torch.float16)
        tied = config.tie_word_embeddings and "lm_head.weight" not in tensors
        self.lm_head = self.embed if tied else tensors["lm_head.weight"].to(torch.float16)
        tensors.close()
        self.gemv_race: dict[str, tuple[float, float]] = {}
        """Per layer shape: (our GEMV, the kernel's own) µs for one row, timed at load (`_race`)."""
        cuda_kernels = self.use_kernels and device.type == "cuda"  # the race times on a GPU
        if cuda_kernels and (self.dense_prefill or self.kernel == "triton"):
            self._race_gemv()
        rotary = _rotary_tables(config.rope_theta, self.head_dim, self.max_len + 1, device)
        self.cos, self.sin = rotary
        self.block_size = 0
        """Positions a KV block holds (0 until `allocate_kv`)."""
        self.null_block = 0
        """A block outside the managed ones: where a decode row that holds no request writes."""
        self.k_cache = self.v_cache = torch.empty(0, dtype=torch.float16, device=device)
        self.tables = torch.empty((0, 0), dtype=torch.int32, device=device)
        self._buffers: dict[tuple[int, bool], dict[str, Any]] = {}
        self._pool: dict[str, Any] | None = None

    # -- the paged KV cache -------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one position takes, all layers."""
        return len(self.layers) * 2 * self.kv_heads * self.head_dim * 2

    @property
    def blocks_per_row(self) -> int:
        """Block-table entries of a row: enough for every position up to `max_len`."""
        return self.max_len // self.block_size + 1

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """(Re)allocate the KV cache as `num_blocks` blocks of `block_size` positions.

        Block `num_blocks` more is the null block (`null_block`). `tables` holds one block
        table per decode row (``max_batch`` of them) and one for a prompt's rest run as a
        decode step (row ``max_batch``); every entry starts at the null block, so that a row
        that holds no request reads and writes only there.
        """
        self.k_cache = self.v_cache = torch.empty(0)  # the old cache goes first
        self.block_size = block_size
        self.null_block = num_blocks
        shape = (len(self.layers), num_blocks + 1, block_size, self.kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=torch.float16, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=torch.float16, device=self.device)
        self.tables = torch.full((self.max_batch + 1, self.blocks_per_row), num_blocks,
                                 dtype=torch.int32, device=self.device)  # fmt: skip

    def allocate_kv_rows(self, block_size: int = 16) -> None:
        """A KV cache in which decode row ``r`` owns blocks enough for `max_len` positions.

        Its block table is ``tables[r]``, blocks ``r * blocks_per_row ...``: for driving the
        model directly (tests, benchmarks) without a block manager.
        """
        self.block_size = block_size  # blocks_per_row depends on it
        per_row = self.blocks_per_row
        self.allocate_kv(self.max_batch * per_row, block_size)
        blocks = torch.arange(self.max_batch * per_row, dtype=torch.int32, device=self.device)
        self.tables[: self.max_batch] = blocks.reshape(self.max_batch, per_row)

    def _gather_kv(
        self, index: int, table: torch.Tensor, low: int, high: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values of positions ``low ... high - 1`` of a row.

        The row's block `table` is a device tensor; the result is ``[high - low, KVH, D]``
        copies.
        """
        positions = torch.arange(low, high, device=self.device)
        blocks = table.long()[positions // self.block_size]
        offsets = positions % self.block_size
        return self.k_cache[index, blocks, offsets], self.v_cache[index, blocks, offsets]

    # -- linear layers ------------------------------------------------------------------------

    def _norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        out: torch.Tensor,
        order: InputOrder | None = None,
    ) -> torch.Tensor:
        """Residual add and RMSNorm; the result in the next layer's input `order` if given."""
        if self.use_kernels:
            if order is None:
                return K.add_rms_norm(x, residual, weight, self.eps, out)
            return K.add_rms_norm(x, residual, order.norm, self.eps, out, order.gather32)
        h = x.half()
        if residual is not None:
            residual.copy_((residual.float() + h.float()).half())
            h = residual
        normed = K.rms_norm_reference(h, weight, self.eps)
        out.copy_(normed if order is None else normed[:, order.gather])
        return out

    @staticmethod
    def _attention_out(
        attn: torch.Tensor, order: InputOrder | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention's output ``[rows, H * D]`` in o_proj's input order."""
        flat = attn.reshape(attn.shape[0], -1)
        if order is None:
            return flat
        return torch.index_select(flat, 1, order.gather, out=out)

    # -- prefill ------------------------------------------------------------------------------

    def prefill(self, table: list[int] | int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Run `ids` (at positions ``start...``) through block `table`; return the last logits.

        `table` is a block table, or the index of a row of `tables`.
        """
        return self.prefill_many([(table, ids, start)])[0]

    def prefill_many(self, prompts: list[tuple[list[int] | int, list[int], int]]) -> torch.Tensor:
        """Prefill several prompts ``(block table, ids, start)`` in one pass; last logits each.

        A prompt's tokens sit at positions ``start...``; its earlier positions are in its
        blocks already. Each block table (or index of a row of `tables`) covers every position
        its prompt writes. The linear layers see all the tokens at once (one weight pass for
        the lot); attention runs per prompt over its own blocks.
        """
        device = self.device
        lists = [table for table, _, _ in prompts if not isinstance(table, int)]
        width = max([self.tables.shape[1], *(len(table) for table in lists)])
        null = self.null_block
        tables = torch.full((len(prompts), width), null, dtype=torch.int32, device=device)
        for i, (table, _, _) in enumerate(prompts):
            if isinstance(table, int):
                tables[i, : self.tables.shape[1]] = self.tables[table]
            else:
                tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        ids = [token for _, prompt, _ in prompts for token in prompt]
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        positions = torch.cat(
            [torch.arange(start, start + len(p), device=device) for _, p, start in prompts]
        )
        rows = torch.cat(
            [torch.full((len(p),), i, dtype=torch.long, device=device)
             for i, (_, p, _) in enumerate(prompts)]
        )  # fmt: skip
        residual = self.embed[tokens].clone()
        normed = torch.empty_like(residual)
        spans = [(start, len(prompt)) for _, prompt, start in prompts]
        delta = None
        with _attention_backends(device):
            for index, layer in enumerate(self.layers):
                delta = self._prefill_layer(
                    index, layer, residual, normed, delta, positions, rows, tables, spans
                )
        ends = torch.tensor([len(p) for _, p, _ in prompts], device=device).cumsum(0) - 1
        last = torch.empty((len(prompts), self.hidden), dtype=torch.float16, device=device)
        self._norm(delta[ends], residual[ends], self.norm, last)
        return (last @ self.lm_head.T).float()

    def _prefill_layer(
        self, index: int, layer: DecoderLayer, residual: torch.Tensor, normed: torch.Tensor,
        delta: torch.Tensor | None, positions: torch.Tensor, rows: torch.Tensor,
        tables: torch.Tensor, spans: list[tuple[int, int]],
    ) -> torch.Tensor:  # fmt: skip
        """Decoder layer `index` of a prefill; return its MLP output.

        The last layer's `delta` goes into `residual` first; each prompt ``(start, length)`` of
        `spans` attends over its own blocks.
        """
        if delta is None:
            self._norm(residual, None, layer.input_norm, normed, layer.qkv_order)
        else:
            self._norm(delta, residual, layer.input_norm, normed, layer.qkv_order)
        qkv = layer.qkv(normed)
        q = self._rope_and_cache(index, qkv, positions, rows, tables)
        attn = torch.empty_like(q)
        offset = 0
        for i, (start, length) in enumerate(spans):
            end = offset + length
            attn[offset:end] = self._prefill_attention(
                index, tables[i], q[offset:end], start + length
            )
            offset = end
        o = layer.o(self._attention_out(attn, layer.o_order))
        self._norm(o, residual, layer.post_norm, normed, layer.gate_up_order)
        gate_up = layer.gate_up(normed)
        return layer.down(gate_up, gated=True)

    def _prefill_attention(
        self, index: int, table: torch.Tensor, q: torch.Tensor, end: int
    ) -> torch.Tensor:
        """Causal attention of `q` (the last ``len(q)`` of ``end`` positions of block `table`).

        A whole prompt within the sliding window is plain causal attention, no mask built.
        After cached positions or past the window, the queries go in chunks under a mask
        (`_window_attention`), so that memory stays bounded by a chunk, not the prompt.
        """
        count = q.shape[0]
        if end != count or (self.sliding_window is not None and end > self.sliding_window):
            # after cached positions, or past the window: a mask, so in bounded chunks (SDPA
            # with a mask and grouped heads would build the whole score matrix)
            return self._window_attention(index, table, q, end, self.sliding_window or end)
        keys, values = self._gather_kv(index, table, 0, end)
        k = keys.transpose(0, 1)[None]  # [1, KVH, end, D]
        v = values.transpose(0, 1)[None]
        query = q.transpose(0, 1)[None]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = sdpa(query, k, v, is_causal=True, enable_gqa=True)  # no cached prefix
        return out[0].transpose(0, 1)  # [count, H, D]

    def _window_attention(
        self, index: int, table: torch.Tensor, q: torch.Tensor, end: int, window: int
    ) -> torch.Tensor:
        """`_prefill_attention` with a sliding `window`: position p sees ``p - window < j <= p``.

        The queries go in chunks of at most `WINDOW_CHUNK` (and the window), each against the
        keys its queries see (at most the chunk plus the window) under a band mask. The key and
        value heads are repeated for each query head: SDPA's memory-efficient kernel takes a
        mask but not ``enable_gqa``, which would fall back to the math kernel's full scores.
        """
        count = q.shape[0]
        start = end - count  # the first query's position
        group = self.heads // self.kv_heads
        chunk = min(WINDOW_CHUNK, window)
        out = torch.empty_like(q)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for first in range(0, count, chunk):
            last = min(first + chunk, count)
            low = max(0, start + first - window + 1)  # the first key its first query sees
            high = start + last
            q_pos = torch.arange(start + first, high, device=self.device)
            k_pos = torch.arange(low, high, device=self.device)
            distance = q_pos[:, None] - k_pos[None, :]
            mask = (distance >= 0) & (distance < window)  # [chunk, keys]
            keys, values = self._gather_kv(index, table, low, high)
            k = keys.repeat_interleave(group, dim=1)
            v = values.repeat_interleave(group, dim=1)
            query = q[first:last].transpose(0, 1)[None]  # [1, H, chunk, D]
            part = sdpa(query, k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask)
            out[first:last] = part[0].transpose(0, 1)
        return out

    # -- decode -------------------------------------------------------------------------------

    def decode(
        self, batch: int, tokens: torch.Tensor, positions: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One token for each of the first `batch` decode rows; return logits ``[batch, V]``.

        Row ``b`` reads and writes the KV cache through block table ``tables[b]``. `tokens`
        and `positions` are device tensors of at least `batch` entries; nothing here reads them
        (or the tables) on the host, so the whole step can be captured as a CUDA graph.

        With `rows` (a device tensor too), the tokens are several tokens of one prompt, all of
        block-table row ``rows[0]`` (every entry names that row), each attending up to its own
        position: a short prefill (a prompt's rest after a cached prefix) that a captured graph
        can run. Attention reads the row's keys once for a block of such tokens. These steps
        keep buffers of their own.
        """
        buf = self._decode_buffers(batch, shared=rows is not None)
        tokens, positions = tokens[:batch], positions[:batch]
        if buf["work"] is not None:
            buf["work"].zero_()
        residual = buf["residual"]
        residual.copy_(self.embed[tokens])
        normed = buf["normed"]
        lengths = buf["lengths"]
        lengths.copy_(positions + 1)
        cache_rows = None if rows is None else rows[:batch]
        if not self.use_kernels:  # the CPU references' cache row of each token
            rows = torch.arange(batch, device=self.device) if cache_rows is None else cache_rows
        delta = None
        for index, layer in enumerate(self.layers):
            delta = self._decode_layer(index, layer, buf, delta, positions, cache_rows, rows)
        self._norm(delta, residual, self.norm, normed)
        return torch.matmul(normed, self.lm_head.T, out=buf["logits"]).float()

    def _decode_layer(
        self, index: int, layer: DecoderLayer, buf: dict[str, Any], delta: torch.Tensor | None,
        positions: torch.Tensor, cache_rows: torch.Tensor | None, rows: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """Decoder layer `index` of a decode step; return its MLP output.

        The last layer's `delta` goes into the residual stream (``buf["residual"]``) first.
        `cache_rows`: a prompt's tokens of one block-table row (see `decode`); `rows`: the
        cache row of each token on the references' path.
        """
        qkv, o, gate_up, down = buf["outs"][index]
        residual, normed = buf["residual"], buf["normed"]
        if delta is None:
            self._norm(residual, None, layer.input_norm, normed, layer.qkv_order)
        else:
            self._norm(delta, residual, layer.input_norm, normed, layer.qkv_order)
        qkv = layer.qkv(normed, qkv)
        caches = (self.k_cache[index], self.v_cache[index], buf["lengths"])
        tables = self.tables
        if self.use_kernels:
            scatter = None if layer.o_order is None else layer.o_order.scatter
            attn = buf["attn"] if scatter is None else buf["o_in"]  # o_proj's order
            if cache_rows is None:  # rotary and cache write inside the attention kernel
                K.decode_attention(qkv, *caches, buf["attn_work"], attn, scatter,
                                   rope=(self.cos, self.sin), tables=tables)  # fmt: skip
            else:  # a prompt's tokens read each other's keys: all written first
                q = self._rope_and_cache(index, qkv, positions, cache_rows, tables, buf["q"])
                K.decode_attention(q, *caches, buf["attn_work"], attn, scatter,
                                   rows=cache_rows, tables=tables)  # fmt: skip
            o_in = attn.reshape(attn.shape[0], -1)
        else:
            assert rows is not None
            q = self._rope_and_cache(index, qkv, positions, rows, tables)
            attn = K.decode_attention_reference(
                q, *caches, cache_rows, self.sliding_window, tables=tables
            )
            o_in = self._attention_out(attn, layer.o_order, buf["o_in"])
        o = layer.o(o_in, o)
        self._norm(o, residual, layer.post_norm, normed, layer.gate_up_order)
        gate_up = layer.gate_up(normed, gate_up)
        return layer.down(gate_up, down, gated=True)

    def prepare_decode_buffers(self, sizes: list[int], suffix_sizes: tuple[int, ...]) -> None:
        """Allocate the decode buffers now, before the KV cache takes what memory is left.

        Those of decode steps of `sizes` rows and of prompt rests of `suffix_sizes` tokens, all
        cut from one pool of the largest.
        """
        suffixes = [size for size in suffix_sizes if size <= self.max_len]
        self._buffer_pool(max([*sizes, *suffixes]))
        for size in sizes:
            self._decode_buffers(size)
        for size in suffixes:
            self._decode_buffers(size, shared=True)

    def _decode_buffers(self, batch: int, shared: bool = False) -> dict[str, Any]:
        """The buffers of a decode step of `batch` rows (`shared`: of one prompt's tokens).

        Steps of every size take their rows from one pool of the largest size asked for so
        far (`_buffer_pool`): steps run one after the other on one stream, and each step's
        results are used before the next one starts, so they never need two at once. Only the
        attention workspace, whose shape depends on the batch, is a step size's own.
        """
        key = (batch, shared)
        buf = self._buffers.get(key)
        if buf is not None:
            return buf
        pool = self._buffer_pool(batch)
        work = outs = None
        gemv = batch == 1 and not shared and any(self.gemv_race_won().values())
        if self.kernel != "gptq_marlin" or gemv:  # fp32 accumulators, zeroed at each step
            work = pool["work"][:, :batch]
            outs = []
            for index in range(len(self.layers)):
                column, parts = 0, []
                for width in pool["widths"]:
                    parts.append(work[index, :, column : column + width])
                    column += width
                outs.append(parts)
        buf = {name: pool[name][:batch] for name in _STEP_BUFFERS}
        buf["work"] = work
        buf["outs"] = outs or [[None] * len(pool["widths"])] * len(self.layers)
        if self.use_kernels:
            buf["attn_work"] = K.AttentionWorkspace(
                batch, self.heads, self.kv_heads, self.head_dim, self.max_len + 1, self.device,
                shared_rows=shared, window=self.sliding_window,
            )  # fmt: skip
        self._buffers[key] = buf
        return buf

    def _buffer_pool(self, batch: int) -> dict[str, Any]:
        """Buffers for steps of up to `batch` rows: the current pool, or a larger new one.

        Step sizes whose buffers were cut from an earlier, smaller pool keep it.
        """
        pool = self._pool
        if pool is not None and pool["rows"] >= batch:
            return pool
        layer = self.layers[0]
        widths = [
            self._qkv_width(),
            self.hidden,
            layer.gate_up.out_features,
            self.hidden,
        ]
        device, half = self.device, torch.float16
        work_shape = (len(self.layers), batch, sum(widths))
        pool = {
            "rows": batch,
            "widths": widths,
            "work": torch.zeros(work_shape, dtype=torch.float32, device=device),
            "residual": torch.empty((batch, self.hidden), dtype=half, device=device),
            "normed": torch.empty((batch, self.hidden), dtype=half, device=device),
            "o_in": torch.empty((batch, self.heads * self.head_dim), dtype=half, device=device),
            "q": torch.empty((batch, self.heads, self.head_dim), dtype=half, device=device),
            "attn": torch.empty((batch, self.heads, self.head_dim), dtype=half, device=device),
            "lengths": torch.empty((batch,), dtype=torch.int32, device=device),
            "logits": torch.empty((batch, self.vocab_size), dtype=half, device=device),
        }
        self._pool = pool
        return pool

    # -- the batch-1 GEMV's race ----------------------------------------------------------------

    def _race_gemv(self) -> None:
        """Race our batch-1 GEMV against each layer shape's own kernel, at load.

        See `_linear.race_gemv`: the layers of a shape where the GEMV wins are wrapped in it.
        """
        per_shape = {
            name: [layer.linears()[name] for layer in self.layers]
            for name in ("qkv", "o", "gate_up", "down")
        }
        for name, (race, chosen) in race_gemv(per_shape, self.device, self.kernel).items():
            self.gemv_race[name] = race
            for layer, linear in zip(self.layers, chosen, strict=True):
                setattr(layer, name, linear)

    def gemv_race_won(self) -> dict[str, bool]:
        """Per layer shape raced at load: whether batch-1 steps use our GEMV for it."""
        return {name: ours < own for name, (ours, own) in self.gemv_race.items()}

    # -- helpers ------------------------------------------------------------------------------

    def _qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def _rope_and_cache(
        self, index: int, qkv: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
        tables: torch.Tensor, q_out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Rotate q and k of each token and write its k and v into the cache; return q (fp16).

        Token ``t`` is written at its position of block-table row ``tables[rows[t]]``.
        """
        count = qkv.shape[0]
        if self.use_kernels:
            if q_out is None:
                q_out = torch.empty((count, self.heads, self.head_dim), dtype=torch.float16,
                                    device=self.device)  # fmt: skip
            return K.rope_and_cache(qkv, self.cos, self.sin, positions, rows, q_out,
                                    self.k_cache[index], self.v_cache[index],
                                    tables=tables)  # fmt: skip
        q, k, v = self._split_qkv(qkv.half(), count)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        q, k = K.rotate(q, cos, sin), K.rotate(k, cos, sin)
        blocks = tables[rows, positions // self.block_size].long()
        offsets = positions % self.block_size
        self.k_cache[index, blocks, offsets] = k
        self.v_cache[index, blocks, offsets] = v
        return q

    def _split_qkv(self, qkv: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
        q_width = self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        q = qkv[:, :q_width].reshape(rows, self.heads, self.head_dim)
        k = qkv[:, q_width : q_width + kv_width].reshape(rows, self.kv_heads, self.head_dim)
        v = qkv[:, q_width + kv_width :].reshape(rows, self.kv_heads, self.head_dim)
        return q, k, v

    def weight_bytes(self) -> int:
        """Bytes a batch-1 decode step reads from weights (the bandwidth limit's numerator)."""
        total = self.lm_head.numel() * 2 + self.norm.numel() * 2
        for layer in self.layers:
            total += sum(linear.weight_bytes() for linear in layer.linears().values())
            total += (layer.input_norm.numel() + layer.post_norm.numel()) * 2
        return total


_STEP_BUFFERS = ("residual", "normed", "o_in", "q", "attn", "lengths", "logits")
"""A decode step's buffers with one entry per row (cut from `FastMistral._buffer_pool`)."""


def _dense_prefill_pays(folder: Path, device: torch.device) -> bool:
    """Whether `device` is a Hopper (or newer) GPU with four times the checkpoint's size free.

    Hopper is where it was measured to pay: cuBLAS reaches its tensor cores' new instructions
    and Marlin does not. Four times the size leaves room for the second copy of the quantised
    weights with the KV cache and the activations still fitting.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(shard.stat().st_size for shard in folder.glob("*.safetensors"))
    return free >= 4 * size


def _rotary_tables(theta: float, dim: int, length: int, device: torch.device) -> tuple:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.float16).to(device), emb.sin().to(torch.float16).to(device)


class _Tensors:
    """The checkpoint's tensors, each read onto the device only when asked for.

    Layers are built one after the other, so the device holds the repacked layers plus one
    layer's original tensors, never the whole checkpoint twice (the peak-memory figure of an
    8 GB card depends on it).
    """

    def __init__(self, folder: Path, device: torch.device) -> None:
        from safetensors import safe_open

        self._device = device
        self._shards = [
            safe_open(shard, framework="pt", device="cpu")
            for shard in sorted(folder.glob("*.safetensors"))
        ]
        self._where = {name: shard for shard in self._shards for name in shard.keys()}  # noqa: SIM118

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name).to(self._device)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def close(self) -> None:
        self._where.clear()
        self._shards.clear()
