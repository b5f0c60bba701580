"""`TransformersEngine`: transformers' own model on any device, one worker thread per batch.

The reference path: each submitted batch is left-padded and decoded in a worker thread of its
own (model forwards are serialised), with transformers' KV cache.
"""

import atexit
import inspect
import threading
from typing import TYPE_CHECKING, Any

from langchain_synthia._decoding_row import DecodingRow, advance_or_fail, fail_row, grammar_mask
from langchain_synthia._local_engine import LocalEngine
from langchain_synthia._sampling import GREEDY, BatchSampler
from langchain_synthia._token_stream import engine_closed_error

if TYPE_CHECKING:
    import torch


class TransformersEngine(LocalEngine):
    """transformers' own model (any device, any gptqmodel kernel) and a padded decode loop.

    Each submitted batch decodes in a worker thread of its own; model forwards are serialised.
    """

    kind = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, name: str, max_len: int = 1 << 30) -> None:
        """Wrap a loaded causal LM; `langchain_synthia._loading.get_engine` builds engines."""
        super().__init__(tokenizer, name=name, device=model.device, max_len=max_len)
        self.model = model
        self._forward_lock = threading.Lock()
        self._closed = False
        # transformers renamed `past_key_values` to `cache` during 5.x; speak whichever it knows
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"

    def start(self, rows: list[DecodingRow]) -> None:
        """Decode `rows` as one padded batch, in a worker thread of its own."""
        worker = threading.Thread(
            target=self._run, args=(rows,), name="synthia-decode", daemon=True
        )
        for row in rows:
            row.stream.producer = worker
        with _workers_lock:
            if self._closed:
                for row in rows:
                    fail_row(row, engine_closed_error())
                return
            _workers[worker] = (self, rows)
        worker.start()

    def close(self) -> None:
        """Stop decoding after the forward in progress (waits for it, up to 30 s).

        Requests still open, and any submitted after, end with `EngineStoppedError`
        (`engine_closed_error`): none is cut short and returned as if it had finished.
        """
        with _workers_lock:
            self._closed = True
            mine = [(worker, rows) for worker, (engine, rows) in _workers.items() if engine is self]
        for _, rows in mine:
            for row in rows:
                row.stream.cancel()
        for worker, _ in mine:
            worker.join(timeout=30)

    def _run(self, rows: list[DecodingRow]) -> None:
        try:
            self._decode(rows)
        except BaseException as error:
            for row in rows:
                fail_row(row, error)
        finally:
            for row in rows:
                if not row.done:  # cancelled: by its reader, or by `close`
                    if self._closed:
                        fail_row(row, engine_closed_error())
                    else:
                        row.stream.put(None)
            with _workers_lock:
                _workers.pop(threading.current_thread(), None)

    def _decode(self, rows: list[DecodingRow]) -> None:
        import torch

        sampler = BatchSampler(
            [GREEDY] * len(rows), [()] * len(rows), self.model.config.vocab_size, self.device
        )
        for index, row in enumerate(rows):
            try:
                sampler.assign(index, row.stream.request.sampling, row.prompt_ids)
            except Exception as error:  # this request's settings: it fails alone
                fail_row(row, error)
        ids, mask = self._left_padded([row.prompt_ids for row in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        while True:
            live = [not (row.done or row.stream.cancelled.is_set()) for row in rows]
            if not any(live):
                return
            with self._forward_lock, torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_arg: cache},
                )
                cache = out[self._cache_arg]
                logits = out["logits"][:, -1, :]
                allowed = grammar_mask(rows, logits.shape[-1], self.device)
                tokens = sampler.sample(logits, allowed=allowed)
            for row, token, alive in zip(rows, tokens.tolist(), live, strict=True):
                if alive and not row.done:  # a row whose grammar failed has ended
                    advance_or_fail(row, token, self.eos_id)
            ids = tokens[:, None]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1

    def _left_padded(self, prompts: list[list[int]]) -> "tuple[torch.Tensor, torch.Tensor]":
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)


_workers: dict[threading.Thread, tuple[TransformersEngine, list[DecodingRow]]] = {}
"""Each running worker thread: its engine and its rows."""
_workers_lock = threading.Lock()


@atexit.register
def _stop_workers() -> None:
    """At exit, cancel what is still decoding and let it finish its step (no torch op is cut)."""
    with _workers_lock:
        running = list(_workers.items())
    for _, (_, rows) in running:
        for row in rows:
            row.stream.cancel()
    for worker, _ in running:
        worker.join(timeout=30)
