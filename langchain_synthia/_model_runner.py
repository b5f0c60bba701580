"""`ModelRunner`: the device side of the fast engine's decode steps.

It owns what a captured step reads and the graphs themselves: the decode rows' tokens,
positions and busy flags (device tensors that the steps update on the device), the inputs of a
prompt's rest run as a decode-shaped step, and one CUDA graph per decode batch size and per
rest size, captured at load. The scheduler decides which rows decode; the runner runs them.
"""

from typing import Any

import torch

from langchain_synthia._fast_model import FastMistral


class ModelRunner:
    """Run `FastMistral` decode steps of the batch sizes `sizes` (graphs on CUDA)."""

    def __init__(
        self, model: FastMistral, *, sizes: list[int], rest_sizes: list[int], graphs: bool
    ) -> None:
        """Make the step inputs, and with `graphs` capture the steps.

        One graph per size of `sizes` and of `rest_sizes` (prompt rests run as one step).
        """
        device = model.device
        self.model = model
        self.sizes = sizes
        """Decode batch sizes, smallest first (a step runs the smallest that covers its rows)."""
        self.rest_sizes = rest_sizes
        """Token counts of the prompt-rest steps, smallest first (empty: none)."""
        self.tokens = torch.zeros(model.max_batch, dtype=torch.long, device=device)
        """Each decode row's next token to feed (written by the step that sampled it)."""
        self.positions = torch.zeros(model.max_batch, dtype=torch.long, device=device)
        self.busy = torch.zeros(model.max_batch, dtype=torch.long, device=device)
        """1 for rows that decode: only their positions advance (the others stay at 0)."""
        longest = max(rest_sizes, default=0)
        self.rest_inputs = torch.zeros((3, longest), dtype=torch.long, device=device)
        """The inputs of a prompt-rest step: tokens, their positions, their block-table row."""
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.rest_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self.capture()

    def start_row(self, row: int, token: int, position: int) -> None:
        """Make decode row `row` decode from the next step: feed `token` at `position`."""
        self.tokens[row] = token
        self.positions[row] = position
        self.busy[row] = 1

    def stop_row(self, row: int) -> None:
        """Stop decode row `row` (it stays at position 0, on the null block)."""
        self.positions[row] = 0
        self.busy[row] = 0

    def size_for(self, rows: int) -> int:
        """The smallest decode batch size that covers the first `rows` rows."""
        return next(size for size in self.sizes if size >= rows)

    def decode(self, size: int) -> torch.Tensor:
        """One decode step of the first `size` rows; their logits (the graph's output buffer)."""
        graph = self.graphs.get(size)
        if graph is None:
            return self.model.decode(size, self.tokens, self.positions)
        graph[0].replay()
        return graph[1]

    def advance(self, size: int, chosen: torch.Tensor) -> None:
        """Feed the `chosen` tokens to the next step; the busy rows move one position on."""
        self.tokens[:size] = chosen
        self.positions[:size] += self.busy[:size]

    def decode_rest(self, table: list[int], ids: list[int], start: int) -> torch.Tensor:
        """Compute `ids` (positions ``start...``) through block `table`; the last logits.

        It runs as one decode-shaped step (a captured graph on CUDA) on the rest row of the
        block tables, padded to a rest size with copies of the last token: they compute and
        write the same key and value at the same position, so they change nothing.
        """
        model = self.model
        row = model.max_batch
        model.tables[row].fill_(model.null_block)
        model.tables[row, : len(table)].copy_(torch.tensor(table, dtype=torch.int32))
        count = len(ids)
        size = next(s for s in self.rest_sizes if s >= count)
        pad = size - count
        inputs = torch.tensor(
            [ids + ids[-1:] * pad,
             list(range(start, start + count)) + [start + count - 1] * pad,
             [row] * size],
            dtype=torch.long,
        )  # fmt: skip
        self.rest_inputs[:, :size].copy_(inputs)
        graph = self.rest_graphs.get(size)
        if graph is None:
            logits = model.decode(size, *self.rest_inputs)
        else:
            graph[0].replay()
            logits = graph[1]
        return logits[count - 1].clone()  # the graph's output buffer is reused

    def capture(self) -> None:
        """Capture one decode graph per batch size and per rest size.

        The kernels compile on the warm-up runs. Every row's block table points at the null
        block while they are captured, so the warm-up steps write nowhere that matters.
        """
        model = self.model
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        pool = None

        def capture(size: int, *inputs: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, Any]:
            nonlocal pool
            for _ in range(2):
                model.decode(size, *inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = model.decode(size, *inputs)
            pool = graph.pool()
            return graph, logits

        with torch.cuda.stream(stream), torch.inference_mode():
            model.prepare_decode_buffers(self.sizes, tuple(self.rest_sizes))
            for size in reversed(self.sizes):  # largest first: smaller ones reuse its memory
                self.graphs[size] = capture(size, self.tokens, self.positions)
            for size in reversed(self.rest_sizes):
                self.rest_graphs[size] = capture(size, *self.rest_inputs)
        torch.cuda.current_stream(model.device).wait_stream(stream)
