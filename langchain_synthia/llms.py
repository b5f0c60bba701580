"""`SynthiaLLM`: Synthia-7B-v1.3 (GPTQ) as a LangChain text-completion LLM."""

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseLLM, LangSmithParams, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.prompt_values import PromptValue, StringPromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict

from langchain_synthia._batching import aopen_stream, batch_group, open_stream
from langchain_synthia._engine_interface import Engine
from langchain_synthia._params import SynthiaParams, batch_configs, finish_info, usage_of
from langchain_synthia._requests import TokenEvent, whole_answer
from langchain_synthia._token_stream import aread_all, read_all
from langchain_synthia.prompts import render_messages


class SynthiaLLM(SynthiaParams, BaseLLM):
    r"""Synthia-7B-v1.3, GPTQ-quantised, as a LangChain LLM (text in, text out).

    A prompt string is sent to the model verbatim: build it with `synthia_prompt_template` (or
    `render_prompt`) so that it is in Synthia's ``SYSTEM:/USER:/ASSISTANT:`` format. Messages
    (a list, or a chat prompt's value: ``ChatPromptTemplate | llm``) are rendered in that
    format by `render_messages`, as `ChatSynthia` renders them, with `DEFAULT_SYSTEM_MESSAGE`
    when none is given. The model loads on the first call, once per process, shared with every
    instance (chat or LLM) that has the same loading settings.

    Setup:
        From a checkout of the repository:

        ```bash
        pip install .
        ```

        GPU memory and the first download are as for `ChatSynthia`.

    Key init args — generation params:
        temperature, top_p, top_k, repetition_penalty, max_tokens, seed, stop, timeout:
            as in `ChatSynthia` (card defaults 0.7 / 0.95 / 40 / 1.1 / 512).
        stop_at_user_turn: bool
            Stop when the completion starts a new ``USER:`` turn (default ``True``).

    Key init args — loading params:
        model, revision, device:
            as in `ChatSynthia`; they default to ``$SYNTHIA_MODEL``, ``$SYNTHIA_REVISION`` and
            ``$SYNTHIA_DEVICE`` when those are set.
        engine, kernel, context_window, max_batch_size, dense_prefill:
            as in `ChatSynthia`.
        prefix_caching, gpu_memory_utilization, kv_cache_tokens:
            as in `ChatSynthia`.
        cache_dir, local_files_only:
            as in `ChatSynthia`.

        Every parameter: docs/llm.md.

    Instantiate:
        ```python
        from langchain_synthia import SynthiaLLM, synthia_prompt_template

        llm = SynthiaLLM(max_tokens=128)
        chain = synthia_prompt_template() | llm
        ```

    Invoke:
        ```python
        chain.invoke({"question": "Why is the sky blue?"})
        ```

        ```txt
        'The sky appears blue because of Rayleigh scattering...'
        ```

    Stream:
        ```python
        for text in chain.stream({"question": "Why is the sky blue?"}):
            print(text, end="", flush=True)
        ```

    Async:
        ```python
        prompt = synthia_prompt_template().format(question="Name a moon of Mars.")
        await llm.ainvoke(prompt)
        async for text in llm.astream(prompt):
            print(text, end="")
        await llm.abatch([prompt, prompt])  # decoded together as one batch
        ```

    Token usage:
        ```python
        result = llm.generate([prompt])
        result.llm_output["token_usage"]
        result.generations[0][0].generation_info["usage_metadata"]
        ```

        ```txt
        {'input_tokens': 38, 'output_tokens': 57, 'total_tokens': 95}
        ```

    Text ReAct agents work too: bind ``stop=["Observation:"]`` so that the completion ends
    before the model invents a tool's result (docs/llm.md).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "synthia-llm"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_model_type="llm", **self._ls_options(stop, kwargs))

    # -- prompts: strings verbatim, messages in Synthia's format -----------------------------

    def _convert_input(self, model_input: LanguageModelInput) -> PromptValue:
        """A string as it is; messages or a chat prompt's value rendered by `render_messages`."""
        return _in_synthias_format(super()._convert_input(model_input))

    def generate_prompt(
        self,
        prompts: list[PromptValue],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """`generate` of `prompts`, chat prompt values rendered in Synthia's format."""
        texts = [_in_synthias_format(prompt) for prompt in prompts]
        return super().generate_prompt(texts, stop=stop, callbacks=callbacks, **kwargs)

    async def agenerate_prompt(
        self,
        prompts: list[PromptValue],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """`generate_prompt` for async callers."""
        texts = [_in_synthias_format(prompt) for prompt in prompts]
        return await super().agenerate_prompt(texts, stop=stop, callbacks=callbacks, **kwargs)

    # -- the cache key holds the call's options ----------------------------------------------

    def generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Complete `prompts` (see `BaseLLM.generate`); the call's options are checked first.

        The call runs on a copy of this instance with its options (``temperature=0``, ...)
        set, so that LangChain's cache key, built from the instance's settings, holds them:
        a call with other options never gets an answer cached without them.

        Raises:
            TypeError: For an unknown option.
            ValueError: For an option or stop sequence that is not valid.
        """
        self._call_options(stop, kwargs)
        model, rest = self._with_call_options(kwargs)
        return BaseLLM.generate(
            model,
            prompts,
            stop,
            callbacks,
            tags=tags,
            metadata=metadata,
            run_name=run_name,
            run_id=run_id,
            **rest,
        )

    async def agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """`generate` for async callers."""
        self._call_options(stop, kwargs)
        model, rest = self._with_call_options(kwargs)
        return await BaseLLM.agenerate(
            model,
            prompts,
            stop,
            callbacks,
            tags=tags,
            metadata=metadata,
            run_name=run_name,
            run_id=run_id,
            **rest,
        )

    # -- generation ----------------------------------------------------------------------------

    def _chunk(self, event: TokenEvent, engine: Engine) -> GenerationChunk:
        if event.finish_reason is None:
            return GenerationChunk(text=event.text)
        info = {**finish_info(event, engine), "usage_metadata": usage_of(event)}
        return GenerationChunk(text=event.text, generation_info=info)

    def _start(
        self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Engine, list]:
        """The engine and the streams of `prompts` (one prompt joins an active batch group)."""
        options = self._call_options(stop, kwargs)
        engine = self._engine_for(options["model"], options["revision"])
        requests = [self._request(prompt, options) for prompt in prompts]
        if len(requests) == 1 and engine.batches_locally:
            return engine, [open_stream(engine, requests[0])]
        return engine, engine.submit(requests)

    async def _astart(
        self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Engine, list]:
        options = self._call_options(stop, kwargs)
        engine = await self._aengine_for(options["model"], options["revision"])
        requests = [self._request(prompt, options) for prompt in prompts]
        if len(requests) == 1 and engine.batches_locally:
            return engine, [await aopen_stream(engine, requests[0])]
        return engine, engine.submit(requests)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        options = self._call_options(stop, kwargs)
        engine = self._engine_for(options["model"], options["revision"])
        for event in open_stream(engine, self._request(prompt, options)):
            chunk = self._chunk(event, engine)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        options = self._call_options(stop, kwargs)
        engine = await self._aengine_for(options["model"], options["revision"])
        async for event in await aopen_stream(engine, self._request(prompt, options)):
            chunk = self._chunk(event, engine)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """All `prompts` decode together as one padded batch.

        Token callbacks fire for a single prompt; LangChain hands `_generate` the run manager
        of the first prompt only, so a batch's tokens are not attributed to runs. When one
        prompt fails (its timeout, say), the call raises and the other prompts stop decoding.
        """
        engine, streams = self._start(prompts, stop, kwargs)
        per_token = _token_callbacks(run_manager, prompts)
        results = []
        with _cancelled_on_error(streams):
            for stream in streams:
                if per_token is None:
                    results.append(self._chunk(whole_answer(read_all(stream)), engine))
                    continue
                chunks = []
                for event in stream:
                    chunks.append(self._chunk(event, engine))
                    per_token.on_llm_new_token(chunks[-1].text, chunk=chunks[-1])
                results.append(_joined(chunks))
        return _llm_result(results, engine)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """`_generate` for async callers."""
        engine, streams = await self._astart(prompts, stop, kwargs)
        per_token = _token_callbacks(run_manager, prompts)
        results = []
        with _cancelled_on_error(streams):
            for stream in streams:
                if per_token is None:
                    results.append(self._chunk(whole_answer(await aread_all(stream)), engine))
                    continue
                chunks = []
                async for event in stream:
                    chunks.append(self._chunk(event, engine))
                    await per_token.on_llm_new_token(chunks[-1].text, chunk=chunks[-1])
                results.append(_joined(chunks))
        return _llm_result(results, engine)

    # -- batches decode together, each input failing alone -----------------------------------

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Complete `inputs` as one padded batch (at most ``max_concurrency`` rows at once).

        Each input is its own call, so with ``return_exceptions=True`` an input that fails (a
        prompt too long, a timeout) gets its error in its own place and the others their text.
        """
        configs, width = batch_configs(config, len(inputs))
        with batch_group(width):
            return Runnable.batch(
                self, inputs, configs, return_exceptions=return_exceptions, **kwargs
            )

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """`batch` for async callers: one padded batch, the event loop never blocked."""
        configs, width = batch_configs(config, len(inputs))
        with batch_group(width):
            return await Runnable.abatch(
                self, inputs, configs, return_exceptions=return_exceptions, **kwargs
            )


def _in_synthias_format(prompt: PromptValue) -> StringPromptValue:
    """`prompt` as text: a string's as it is, messages rendered by `render_messages`.

    Raises:
        ValueError: For no messages, or messages that the format cannot carry.
    """
    if isinstance(prompt, StringPromptValue):
        return prompt
    messages = prompt.to_messages()
    if not messages:
        msg = "SynthiaLLM got an empty message list: pass a prompt string or a HumanMessage."
        raise ValueError(msg)
    return StringPromptValue(text=render_messages(messages))


def _token_callbacks(run_manager: Any, prompts: list[str]) -> Any:
    """The run manager that gets token callbacks: one prompt's, and only if it has handlers."""
    if run_manager is None or len(prompts) != 1 or not run_manager.handlers:
        return None
    return run_manager


@contextlib.contextmanager
def _cancelled_on_error(streams: list) -> Iterator[None]:
    """Cancel every stream of a call when reading one of them raises."""
    try:
        yield
    except BaseException:
        for stream in streams:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
        raise


def _joined(chunks: list[GenerationChunk]) -> GenerationChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return total


def _llm_result(results: list[GenerationChunk], engine: Engine) -> LLMResult:
    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    for result in results:
        for key in usage:
            usage[key] += (result.generation_info or {})["usage_metadata"][key]
    return LLMResult(
        generations=[[Generation(text=r.text, generation_info=r.generation_info)] for r in results],
        llm_output={"token_usage": usage, "model_name": engine.name},
    )
