"""`ChatSynthia`: Synthia-7B-v1.3 (GPTQ) as a LangChain chat model."""

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import (
    BaseChatModel,
    LangSmithParams,
    LanguageModelInput,
    ModelProfile,
)
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict
from typing_extensions import Self

from langchain_synthia._batching import aopen_stream, batch_group, open_stream
from langchain_synthia._engine_interface import Engine
from langchain_synthia._params import SynthiaParams, batch_configs, finish_info, usage_of
from langchain_synthia._requests import GenerationRequest, TokenEvent, whole_answer
from langchain_synthia._structured import AnswerPlan, plan_answer, structured_output
from langchain_synthia._token_stream import aread_all, read_all
from langchain_synthia.prompts import (
    DEFAULT_SYSTEM_MESSAGE,
    render_messages,
    render_messages_for_counting,
)
from langchain_synthia.tools import ToolCallReader, convert_tools, normalize_tool_choice


class ChatSynthia(SynthiaParams, BaseChatModel):
    r"""Synthia-7B-v1.3, GPTQ-quantised, as a LangChain chat model on your own GPU.

    Messages are rendered in Synthia's ``SYSTEM:/USER:/ASSISTANT:`` format (see
    `langchain_synthia.prompts`); the model loads on the first call, once per process, and is
    shared by every instance with the same loading settings.

    Setup:
        From a checkout of the repository:

        ```bash
        pip install .
        ```

        On a CUDA GPU the default ``main`` branch (downloaded into the Hugging Face cache on
        first use) loads its weights and gives the KV cache what is left of
        ``gpu_memory_utilization`` of the card (docs/loading.md, "KV memory"). Without a GPU,
        ``device="auto"`` falls back to the CPU, which is slow for a 7B model.

    Key init args — generation params:
        temperature: float
            Sampling temperature (card default 0.7; 0 is greedy).
        top_p: float
            Nucleus sampling (0.95).
        top_k: int
            Top-k sampling (40; 0 disables).
        repetition_penalty: float
            Penalty on repeated tokens (1.1; 1.0 disables).
        max_tokens: int
            Most new tokens (512).
        seed: int | None
            Sampler seed, for reproducible sampling.
        stop: list[str] | None
            Extra stop sequences, of any length. Generation also stops when the model starts a
            new ``USER:`` turn (``stop_at_user_turn=False`` turns that off).
        timeout: float | None
            Seconds a generation may run before `GenerationTimeoutError`.
        system_message: str | None
            Used when the conversation has no system message (the card's "You are Synthia..."
            sentence by default; ``None`` leaves the ``SYSTEM:`` line out).

    Key init args — loading params:
        model: str
            Hub repo id (default ``TheBloke/Synthia-7B-v1.3-GPTQ``, or ``$SYNTHIA_MODEL``) or a
            local folder.
        revision: str
            Branch (``main``, ``gptq-4bit-32g-actorder_True``, ... see ``VARIANTS``) or a
            commit hash (default ``main``, or ``$SYNTHIA_REVISION``).
        device: str
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default ``"auto"``, or
            ``$SYNTHIA_DEVICE``).
        context_window: int
            Tokens of prompt plus answer (4096); a longer prompt is refused, never truncated.
        max_batch_size: int
            Fast engine: requests decoded at once at most (64); KV memory is held by the token.
        prefix_caching: bool
            Fast engine: share the KV blocks of prompt prefixes between requests (on).
        gpu_memory_utilization: float
            Fast engine: the share of the GPU the engine may use; the KV cache takes the rest.
        engine: str
            ``"auto"`` (the fast engine on CUDA, transformers elsewhere), ``"fast"`` or
            ``"transformers"``.
        kernel: str | None
            GPTQ kernel; chosen per engine and device when unset.

        Every parameter: docs/chat-model.md.

    Instantiate:
        ```python
        from langchain_synthia import ChatSynthia

        chat = ChatSynthia(temperature=0.7, max_tokens=256)
        ```

    Invoke:
        ```python
        messages = [
            ("system", "You are a concise assistant."),
            ("human", "What is the capital of France?"),
        ]
        chat.invoke(messages).content
        ```

        ```txt
        'The capital of France is Paris.'
        ```

    Stream:
        ```python
        for chunk in chat.stream("Tell me a joke about rockets."):
            print(chunk.content, end="", flush=True)
        ```

    Async:
        ```python
        await chat.ainvoke("Hello")
        async for chunk in chat.astream("Hello"):
            print(chunk.content, end="")
        await chat.abatch(["Hello", "Bonjour"])  # decoded together as one batch
        ```

    Tool calling:
        ```python
        from typing import Literal

        from langchain_core.tools import tool


        @tool
        def get_weather(city: Literal["Paris", "Tokyo", "Lima"]) -> str:
            '''Today's weather in a city.'''
            return "sunny"


        chat.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
        ```

        ```txt
        [{'name': 'get_weather', 'args': {'city': 'Paris'}, 'id': 'call_...', 'type': 'tool_call'}]
        ```

    Structured output:
        ```python
        from pydantic import BaseModel, Field


        class Answer(BaseModel):
            city: Literal["Paris", "Lyon", "Nice"]
            reason: str = Field(max_length=100)


        chat.with_structured_output(Answer).invoke("Which city is the capital of France?")
        ```

        ```txt
        Answer(city='Paris', reason='Paris is the capital and largest city of France.')
        ```

    Token usage:
        ```python
        chat.invoke("Hello").usage_metadata
        ```

        ```txt
        {'input_tokens': 40, 'output_tokens': 12, 'total_tokens': 52}
        ```

    Response metadata:
        ```python
        chat.invoke("Hello").response_metadata
        ```

        ```txt
        {'model_name': 'TheBloke/Synthia-7B-v1.3-GPTQ', 'finish_reason': 'stop',
         'model_provider': 'synthia'}
        ```
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    system_message: str | None = DEFAULT_SYSTEM_MESSAGE
    """System message used when the conversation has none; ``None`` for no ``SYSTEM:`` line."""
    streaming: bool = False
    """Route `invoke` through streaming (token callbacks fire either way)."""

    @property
    def _llm_type(self) -> str:
        return "chat-synthia"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_model_type="chat", **self._ls_options(stop, kwargs))

    def _resolve_model_profile(self) -> ModelProfile:
        """What these settings allow, for LangChain's agents and middleware (no model loads).

        Locally: prompts of up to ``context_window - 1`` tokens (the answer needs one) and
        answers of at most what the prompt leaves of the window (``max_tokens``, 512 by
        default, caps each call); text in and out, nothing else; tool calls with every
        ``tool_choice``, streamed as whole calls, and structured output, both enforced by a
        grammar. In remote mode the window is the server's, unknown without a request, so
        the token limits are left out; tool calls and structured output are there when
        ``server`` names a kind with a grammar option (vLLM, SGLang, llama.cpp), absent when
        ``server="auto"`` (not yet read from the server) and false otherwise. System messages
        are moved to the top of the prompt, so never sent mid-conversation.
        """
        profile = ModelProfile(
            text_inputs=True,
            text_outputs=True,
            temperature=True,
            **dict.fromkeys(_NOT_SUPPORTED, False),
        )
        if not self.base_url:
            profile["max_input_tokens"] = profile["max_output_tokens"] = self.context_window - 1
            grammar: bool | None = True
        else:
            grammar = None if self.server == "auto" else self.server in _GRAMMAR_SERVERS
        if grammar is not None:
            profile.update(
                tool_calling=grammar,
                tool_choice=grammar,
                tool_call_streaming=grammar,
                structured_output=grammar,
            )
        return profile

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with `update` applied; a profile made from the settings follows the new ones.

        A profile given with ``profile=`` (or in `update`) is kept as it is.
        """
        copy = super().model_copy(update=update, deep=deep)
        if update and "profile" not in update and self.profile == self._resolve_model_profile():
            copy.profile = copy._resolve_model_profile()
        return copy

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence | None = None
    ) -> int:
        """Tokens of the prompt these messages render to: what the model reads (loads it).

        Any list has a count, so the model can be ``trim_messages``' ``token_counter``: no
        messages count 0, and system messages alone count their ``SYSTEM:`` line (the start
        of every prompt that continues them; see `render_messages_for_counting`). A count
        never shrinks as messages are appended after a history's system messages. `tools`
        add their section to the system turn, as bound tools do.

        Raises:
            ValueError: For a message that Synthia's format cannot carry (non-text content,
                unknown roles).
        """
        plan = plan_answer(tools=convert_tools(tools) if tools else None)
        text = render_messages_for_counting(
            messages, self.system_message, tools_section=plan.prompt
        )
        if not text:
            return 0
        return len(self._engine_for(self.model, self.revision).encode(text))

    # -- tools and structured output --------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Let the model call `tools` (Pydantic classes, functions, LangChain tools, dicts).

        Args:
            tools: The tools; each becomes a JSON schema the model's calls must follow.
            tool_choice: ``"auto"`` (default: answer in text or call tools), ``"any"`` or
                ``"required"`` (call at least one), ``"none"`` (answer in text; the tools are
                not shown), or a tool's name (call that one).
            parallel_tool_calls: Allow several calls in one answer (one per line); by
                default an answer holds at most one call.
            **kwargs: Other call options to bind (``temperature=0``, ...).

        Calls come back in ``AIMessage.tool_calls`` (streamed as ``tool_call_chunks``, one
        chunk per whole call). Generation follows a grammar built from the tools' schemas,
        so every call names a bound tool and its arguments validate.

        Raises:
            ValueError: For a tool that cannot be converted, a `tool_choice` naming no bound
                tool, or a schema constrained decoding cannot enforce.
        """
        formatted = convert_tools(tools)
        choice = normalize_tool_choice(tool_choice, formatted)
        plan_answer(formatted, choice, parallel_tool_calls=parallel_tool_calls)  # checks schemas
        if parallel_tool_calls:
            kwargs["parallel_tool_calls"] = True
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: Any = None,
        *,
        method: str = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers as objects of `schema`, produced under its grammar so they always validate.

        Args:
            schema: A Pydantic class (answers are instances), a TypedDict or a JSON schema
                (answers are dicts); may be ``None`` with ``method="json_mode"``.
            method: ``"json_schema"`` (default: the answer is constrained to the schema),
                ``"function_calling"`` (a forced call of a tool made from the schema) or
                ``"json_mode"`` (any JSON object; the prompt must say which keys).
            include_raw: Return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
            strict: Accepted for compatibility; output is always held to the schema.
            **kwargs: Not supported (an error names them).

        An answer cut off by ``max_tokens`` before its JSON closes raises an
        ``OutputParserException`` that says so (never a silently truncated object).
        """
        if kwargs:
            msg = f"with_structured_output got unsupported arguments: {sorted(kwargs)}."
            raise ValueError(msg)
        return structured_output(
            self, schema, method=method, include_raw=include_raw, strict=strict
        )

    # -- one generation path: every method below goes through _prepare + the engine stream ---

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[dict, str, AnswerPlan]:
        kwargs = dict(kwargs)
        plan = plan_answer(
            tools=kwargs.pop("tools", None),
            tool_choice=kwargs.pop("tool_choice", None),
            response_format=kwargs.pop("response_format", None),
            parallel_tool_calls=kwargs.pop("parallel_tool_calls", False),
        )
        options = self._call_options(stop, kwargs)
        options["grammar"] = plan.grammar
        if plan.structured:  # the grammar decides where the answer ends: no stop may cut it
            options["stop_at_user_turn"] = False
            options["stop"] = []
            if not {"repetition_penalty"} & (kwargs.keys() | self.model_fields_set):
                # the default penalty counts the prompt's tokens as repeats, and a
                # constrained answer copies its values from the prompt
                options["repetition_penalty"] = 1.0
        prompt = render_messages(messages, self.system_message, tools_section=plan.prompt)
        return options, prompt, plan

    def _answer_request(self, prompt: str, options: dict, plan: AnswerPlan) -> GenerationRequest:
        """The engine request; under ``tool_choice="auto"`` stops cut free text, never a call."""
        return replace(self._request(prompt, options), constrained_opening=plan.constrained_opening)

    def _chunk(
        self, event: TokenEvent, engine: Engine, reader: ToolCallReader | None
    ) -> ChatGenerationChunk:
        """One token's chunk: its content, the tool calls it completes, the usage at the end."""
        text, calls = (event.text, []) if reader is None else reader.feed(event.text)
        if event.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=text, tool_call_chunks=calls))
        if reader is not None:
            rest, unfinished = reader.finish(event.finish_reason)
            text, calls = text + rest, [*calls, *unfinished]
        info = finish_info(event, engine)
        message = AIMessageChunk(
            content=text,
            tool_call_chunks=calls,
            usage_metadata=usage_of(event),
            response_metadata=info,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=info)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options, prompt, plan = self._prepare(messages, stop, kwargs)
        yield from self._answer_chunks(options, prompt, plan, plan.reader(), run_manager)

    def _answer_chunks(
        self,
        options: dict,
        prompt: str,
        plan: AnswerPlan,
        reader: ToolCallReader | None,
        run_manager: CallbackManagerForLLMRun | None,
    ) -> Iterator[ChatGenerationChunk]:
        engine = self._engine_for(options["model"], options["revision"])
        for event in open_stream(engine, self._answer_request(prompt, options, plan)):
            chunk = self._chunk(event, engine, reader)
            if run_manager is not None:
                run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        options, prompt, plan = self._prepare(messages, stop, kwargs)
        async for chunk in self._aanswer_chunks(options, prompt, plan, plan.reader(), run_manager):
            yield chunk

    async def _aanswer_chunks(
        self,
        options: dict,
        prompt: str,
        plan: AnswerPlan,
        reader: ToolCallReader | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine = await self._aengine_for(options["model"], options["revision"])
        request = self._answer_request(prompt, options, plan)
        async for event in await aopen_stream(engine, request):
            chunk = self._chunk(event, engine, reader)
            if run_manager is not None:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """The whole answer; token callbacks, when any are attached, fire as it streams."""
        options, prompt, plan = self._prepare(messages, stop, kwargs)
        reader = plan.reader()
        if run_manager is not None and run_manager.handlers:
            chunks = self._answer_chunks(options, prompt, plan, reader, run_manager)
            return _with_unfinished_calls(generate_from_stream(chunks), reader)
        engine = self._engine_for(options["model"], options["revision"])
        events = read_all(open_stream(engine, self._answer_request(prompt, options, plan)))
        return self._result(events, engine, reader)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """`_generate` for async callers."""
        options, prompt, plan = self._prepare(messages, stop, kwargs)
        reader = plan.reader()
        if run_manager is not None and run_manager.handlers:
            chunks = self._aanswer_chunks(options, prompt, plan, reader, run_manager)
            return _with_unfinished_calls(await agenerate_from_stream(chunks), reader)
        engine = await self._aengine_for(options["model"], options["revision"])
        stream = await aopen_stream(engine, self._answer_request(prompt, options, plan))
        return self._result(await aread_all(stream), engine, reader)

    def _result(
        self, events: list[TokenEvent], engine: Engine, reader: ToolCallReader | None
    ) -> ChatResult:
        """The finished answer's events as one message (tool calls and usage included)."""
        chunk = self._chunk(whole_answer(events), engine, reader)
        return _with_unfinished_calls(generate_from_stream(iter([chunk])), reader)

    # -- batches decode together ------------------------------------------------------------

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Answer `inputs` as one padded GPU batch (at most ``max_concurrency`` rows at once)."""
        configs, width = batch_configs(config, len(inputs))
        with batch_group(width):
            return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """`batch` for async callers: one padded GPU batch, the event loop never blocked."""
        configs, width = batch_configs(config, len(inputs))
        with batch_group(width):
            return await super().abatch(
                inputs, configs, return_exceptions=return_exceptions, **kwargs
            )


_NOT_SUPPORTED = (
    "image_inputs",
    "image_url_inputs",
    "pdf_inputs",
    "audio_inputs",
    "video_inputs",
    "image_tool_message",
    "pdf_tool_message",
    "image_outputs",
    "audio_outputs",
    "video_outputs",
    "reasoning_output",
    "attachment",
    "mid_conversation_system_messages",
    "mid_conversation_tools",
)
"""Profile capabilities Synthia lacks: it reads and writes text only, and moves every system
message to the top of the prompt."""

_GRAMMAR_SERVERS = ("vllm", "sglang", "llama.cpp")
"""Server kinds whose completions take a grammar (see `langchain_synthia._remote`)."""


def _with_unfinished_calls(result: ChatResult, reader: ToolCallReader | None) -> ChatResult:
    """`result` whose unfinished calls are listed with their partial arguments and the error.

    Merged chunks carry such a call with its raw text and no error (chunks have no field for
    one); the reader knows both.
    """
    if reader is None or not reader.unfinished:
        return result
    message = result.generations[0].message
    ids = {call["id"] for call in reader.unfinished}
    assert isinstance(message, AIMessage)
    message.invalid_tool_calls = [
        *(call for call in message.invalid_tool_calls if call["id"] not in ids),
        *reader.unfinished,
    ]
    return result
