"""The fields that `ChatSynthia` and `SynthiaLLM` share, and how a call's options become a request.

Defaults are the model card's generation settings (temperature 0.7, top_p 0.95, top_k 40,
repetition_penalty 1.1, 512 new tokens).
"""

import asyncio
import math
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from langchain_core.load import dumpd
from langchain_core.messages import UsageMetadata
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from langchain_synthia._engine_interface import Engine
from langchain_synthia._loading import ModelSettings, get_engine, loaded_engines, unload
from langchain_synthia._remote import RemoteSettings, Server, remote_engine
from langchain_synthia._requests import GenerationRequest, TokenEvent
from langchain_synthia._sampling import SEED_RANGE, SamplingParams
from langchain_synthia.variants import DEFAULT_BRANCH, DEFAULT_REPO, check_revision

USER_TURN_STOPS = ("\nUSER:", "USER:")
"""Stops that end generation when the model starts writing the user's next turn."""

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

CONTEXT_WINDOW_MAX = 32768
"""The longest context window: Synthia's (Mistral's) position embeddings end there."""


def _plain_number(value: Any) -> Any:
    """Refuse a bool (pydantic would read it as 1 or 0) and NaN where a number is expected."""
    if isinstance(value, bool):
        msg = f"expected a number, got the bool {value!r}"
        raise ValueError(msg)
    if isinstance(value, float) and math.isnan(value):
        msg = "expected a number, got NaN"
        raise ValueError(msg)
    return value


def _no_limit_if_infinite(timeout: float | None) -> float | None:
    """``timeout=float("inf")`` means no limit, as ``None`` does."""
    return None if timeout is not None and math.isinf(timeout) else timeout


Number = BeforeValidator(_plain_number)
"""Marks a numeric field (and so its call option): a bool or NaN is refused."""

_CALL_OPTIONS = (
    "model",
    "revision",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_tokens",
    "seed",
    "timeout",
    "stop_at_user_turn",
)
"""Fields that a single call may override: ``llm.invoke(prompt, temperature=0)``."""

API_KEY_ENV = "SYNTHIA_API_KEY"
"""The environment variable that holds the remote server's API key (and its secret id when a
model is serialized with `langchain_core.load.dumpd`)."""

_DEFAULTS_FROM_ENVIRONMENT = ("model", "revision", "device", "base_url", "output_version")
"""Fields whose default is read from the environment (``output_version``: LangChain's
``LC_OUTPUT_VERSION``); the API key is a secret and is left out."""

NOT_IN_CACHE_KEY = {
    "api_key": "a secret: a cache key (SQLiteCache stores it on disk) never holds it",
    "timeout": "ends a call with an error, never with another answer",
    "max_retries": "repeats a request that got no answer",
    "max_batch_size": "how many requests decode at once, not what each one answers",
    "prefix_caching": "shares a prompt prefix's KV cache instead of recomputing it",
    "gpu_memory_utilization": "how much GPU memory the engine takes, not what it computes",
    "kv_cache_tokens": "how much KV memory the engine takes, not what it computes",
    "cache_dir": "where the files of `model` at `revision` are kept",
    "local_files_only": "whether the files of `model` at `revision` may be downloaded",
    "streaming": "whether `invoke` streams the same answer",
    "disable_streaming": "whether `stream` yields the same answer in one chunk",
    "name": "the runnable's name in traces",
    "cache": "the cache itself",
    "verbose": "logging",
    "callbacks": "callbacks",
    "tags": "tracing",
    "metadata": "tracing",
    "custom_get_token_ids": "token counting only",
    "rate_limiter": "when a request starts",
    "profile": "describes the model; generation does not read it",
}
"""The fields that cannot change an answer, so are left out of LangChain's cache key, and why.

Every other field of `ChatSynthia` and `SynthiaLLM` is in the key (`_identifying_params`):
which weights answer (``model``, ``revision``), which numerics compute it (``device``,
``engine``, ``kernel``, ``dense_prefill``), which prompts are refused (``context_window``),
where a remote request goes and how its options are sent (``base_url``, ``server``), the
sampling options, the stops, the system message and the form of the answer
(``output_version``). A field added later is in the key unless it is listed here."""


class SynthiaParams(BaseModel):
    """Loading and generation settings of Synthia (a base of both LangChain classes)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    model: str = Field(default_factory=lambda: os.environ.get("SYNTHIA_MODEL") or DEFAULT_REPO)
    """A Hub repo id (downloaded once into the Hugging Face cache) or a local checkpoint folder;
    ``SYNTHIA_MODEL`` in the environment changes the default."""
    revision: str = Field(
        default_factory=lambda: os.environ.get("SYNTHIA_REVISION") or DEFAULT_BRANCH
    )
    """Branch of the Hub repo (see `langchain_synthia.VARIANTS`) or a commit hash (pin one);
    ``SYNTHIA_REVISION`` in the environment changes the default."""
    device: str = Field(default_factory=lambda: os.environ.get("SYNTHIA_DEVICE") or "auto")
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
    ``SYNTHIA_DEVICE`` in the environment changes the default."""
    kernel: str | None = None
    """GPTQ kernel. Fast engine: ``"gptq_marlin"`` or ``"triton"`` (ours); ``None`` takes Marlin
    once gptqmodel has built it on this machine, else Triton (no build on a first call).
    Transformers engine: a gptqmodel backend; ``None`` picks one per device
    (``KERNELS_BY_DEVICE``)."""
    cache_dir: str | None = None
    """Hugging Face cache folder; ``None`` uses ``HF_HOME``/``HF_HUB_CACHE`` or the default."""
    local_files_only: bool = False
    """Never download (as ``HF_HUB_OFFLINE=1`` does)."""
    context_window: Annotated[int, Number] = Field(default=4096, ge=16, le=CONTEXT_WINDOW_MAX)
    """Tokens of prompt plus answer (16 to 32,768, where Synthia's positions end; a checkpoint
    trained for fewer positions is held to its ``max_position_embeddings``); a longer prompt is
    an error, never truncated."""
    engine: Literal["auto", "fast", "transformers"] = "auto"
    """``"fast"``: langchain-synthia's CUDA engine (paged KV cache, CUDA graphs, Triton GPTQ
    kernels, continuous batching); ``"transformers"``: transformers + gptqmodel (any device);
    ``"auto"``: fast on CUDA, transformers elsewhere."""
    prefix_caching: bool = True
    """Fast engine: share the KV blocks of a prompt's prefix (system message, tools,
    documents) with later prompts that start with the same tokens, so that they skip
    computing it (answers are the same with and without a hit). Unused cached blocks are
    evicted, least recently used first, only when memory is needed. ``False`` computes every
    prompt in full."""
    gpu_memory_utilization: Annotated[float, Number] = Field(default=0.9, gt=0.0, le=1.0)
    """Fast engine: the share of the GPU's memory the engine may use (weights, working
    buffers and KV cache, which takes what is left); the rest stays free for other processes.
    A smaller ``torch.cuda.set_per_process_memory_fraction`` also bounds it
    (docs/loading.md)."""
    kv_cache_tokens: Annotated[int | None, Number] = Field(default=None, ge=16)
    """Fast engine: positions of KV cache to allocate, instead of sizing it from
    ``gpu_memory_utilization`` (``None``)."""
    dense_prefill: bool | None = None
    """Fast engine with Marlin: also keep the quantised weights in a layout that a prefill of
    256 or more tokens dequantises for cuBLAS (Hopper's tensor cores, faster than Marlin for
    such prefills), at the cost of a second copy of the weights in GPU memory (about the
    weights' size; docs/benchmarks.md). ``None`` keeps it on a Hopper GPU (where it was
    measured) with four times the checkpoint's size free, so a small card keeps its memory for
    the KV cache."""
    max_batch_size: Annotated[int, Number] = Field(default=64, ge=1, le=256)
    """Fast engine: the most requests decoded at once. KV memory is held by the token, not
    by the request, so how many run at once is bounded by the tokens they need and by this
    cap; the others wait in the queue until memory frees up."""

    base_url: str | None = Field(default_factory=lambda: os.environ.get("SYNTHIA_BASE_URL") or None)
    """Remote mode: the ``/v1`` URL of an OpenAI-compatible server that serves Synthia (vLLM,
    SGLang, TGI, llama.cpp), e.g. ``"http://localhost:8000/v1"``. Nothing loads locally;
    ``model`` is the served model's name. ``SYNTHIA_BASE_URL`` in the environment sets it."""
    api_key: SecretStr | None = Field(default_factory=lambda: _secret(os.environ.get(API_KEY_ENV)))
    """Remote mode: the server's API key, sent as a bearer token (``SYNTHIA_API_KEY``)."""
    server: Server = "auto"
    """Remote mode: ``"vllm"``, ``"sglang"``, ``"tgi"``, ``"llama.cpp"`` or ``"openai"`` (only
    the standard options); ``"auto"`` reads it from ``/v1/models``. It decides how sampling
    options and grammars (tool calls, structured output) are sent."""
    max_retries: Annotated[int, Number] = Field(default=2, ge=0, le=10)
    """Remote mode: retries of a request that could not connect or got 408/429/5xx, with
    exponential backoff, before the first token (never after)."""

    temperature: Annotated[float, Number] = Field(default=0.7, ge=0.0, le=5.0)
    """Sampling temperature; 0 is greedy decoding."""
    top_p: Annotated[float, Number] = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling: keep the fewest tokens whose probability adds up to ``top_p``."""
    top_k: Annotated[int, Number] = Field(default=40, ge=0)
    """Keep the ``top_k`` most likely tokens; 0 (or a value past the vocabulary) keeps all."""
    repetition_penalty: Annotated[float, Number] = Field(default=1.1, gt=0.0, le=10.0)
    """Penalty on tokens already in the prompt or answer; 1.0 disables it."""
    max_tokens: Annotated[int, Number] = Field(default=512, ge=1)
    """Most new tokens per answer."""
    seed: Annotated[int | None, Number] = Field(default=None, ge=0, le=SEED_RANGE[-1])
    """Seed of the sampler (0 to ``2**64 - 1``); equal seeds and inputs give equal outputs."""
    stop: list[str] | None = None
    """Extra stop sequences (any length); the stop text is not returned."""
    stop_at_user_turn: bool = True
    """Stop when the model starts a new ``USER:`` turn (no GPU time spent on it)."""
    timeout: Annotated[float | None, Number, AfterValidator(_no_limit_if_infinite)] = Field(
        default=None, gt=0
    )
    """Seconds a generation may take before `GenerationTimeoutError`; ``None`` or
    ``float("inf")`` for no limit."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            msg = f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'."
            raise ValueError(msg)
        return device

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, stop: Any) -> Any:
        return _stop_list(stop)

    @model_validator(mode="after")
    def _check_revision(self) -> Self:
        check_revision(self.model, self.revision)
        return self

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"https?://[^/\s]+", url):
            msg = f"base_url={url!r} is not an http(s) URL, e.g. 'http://localhost:8000/v1'."
            raise ValueError(msg)
        return url

    # -- serialization and cache keys (LangChain's hooks) --------------------------------------

    @classmethod
    def is_lc_serializable(cls) -> bool:
        """`langchain_core.load.dumpd` serializes the settings; the API key as a secret."""
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        """The API key serializes as the secret ``SYNTHIA_API_KEY``, never as its value."""
        return {"api_key": API_KEY_ENV}

    @property
    def lc_attributes(self) -> dict[str, Any]:
        """Fields whose default comes from the environment, serialized even at ``None``.

        A loaded model then has the saved settings, not the loading environment's defaults.
        """
        return {
            name: getattr(self, name)
            for name in _DEFAULTS_FROM_ENVIRONMENT
            if name in type(self).model_fields
        }

    @property
    def _serialized(self) -> dict[str, Any]:
        """This instance's `dumpd`, as callbacks get it at the start of a run.

        Computed at each call: LangChain's cached one would be copied by `model_copy` with
        the original's settings.
        """
        return dumpd(self)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that can change an answer (all fields but `NOT_IN_CACHE_KEY`).

        LangChain builds its cache key from these and the call's ``stop``, which it writes
        over the key ``stop``: the instance's stop sequences are under ``default_stop``. A
        password in ``base_url`` is left out.
        """
        params = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in NOT_IN_CACHE_KEY
        }
        params["default_stop"] = params.pop("stop")
        params["base_url"] = _without_password(params["base_url"])
        return params

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """The cache key of a chat call: `_identifying_params` with the call's options set.

        The call's sampling options are validated and set as fields are (``temperature=0``
        and ``temperature=0.0`` share a key); its other options (tools, tool choice, response
        format) are added as they are; LangSmith's ``ls_`` hints are left out.
        """
        model, rest = self._with_call_options(kwargs)
        params = {
            **model._identifying_params,
            "_type": type(model).__name__,
            "stop": _stop_list(stop),
            **{name: value for name, value in rest.items() if not name.startswith("ls_")},
        }
        return str(sorted(params.items()))

    def _with_call_options(self, kwargs: Mapping[str, Any]) -> tuple[Self, dict[str, Any]]:
        """A copy of this instance with the call's options in `kwargs` set, and the rest.

        The options are validated as the fields are; the rest are `kwargs`' other entries.

        Raises:
            ValueError: If an option's value is not valid for its field.
        """
        options = {name: value for name, value in kwargs.items() if name in _CALL_OPTIONS}
        rest = {name: value for name, value in kwargs.items() if name not in _CALL_OPTIONS}
        resolved = self._call_options(None, options)
        return self.model_copy(update={name: resolved[name] for name in options}), rest

    def load(self) -> Self:
        """Load the model now (it otherwise loads on the first call); returns ``self``.

        In remote mode, check that the server answers instead.
        """
        self._engine_for(self.model, self.revision).check()
        return self

    def unload(self) -> bool:
        """Free the local model these settings loaded, and its GPU memory.

        Every instance with the same loading settings shares that model
        (docs/loading.md#one-model-per-process), so it is unloaded for all of them. Calls
        still running on it end with `EngineStoppedError`; the next call loads it again.

        Returns:
            Whether a model was loaded (in remote mode there is none: False).
        """
        if self.base_url:
            return False
        return unload(self._settings(self.model, self.revision))

    def get_token_ids(self, text: str) -> list[int]:
        """Synthia's token ids of `text` (no BOS); loads the model if needed."""
        ids = self._engine_for(self.model, self.revision).encode(text)
        return ids[1:] if ids and ids[0] == _BOS else ids

    # -- turning a call into engine requests ------------------------------------------------

    def _settings(self, model: str, revision: str) -> ModelSettings:
        folder = Path(model).expanduser()
        engine = self.engine
        if engine == "auto":
            from langchain_synthia._loading import resolve_device, resolve_engine

            engine = resolve_engine("auto", resolve_device(self.device))
        fast = engine == "fast"
        return ModelSettings(
            model=str(folder.resolve()) if folder.is_dir() else model,
            revision=revision,
            device=self.device,
            kernel=self.kernel,
            cache_dir=self.cache_dir,
            local_files_only=self.local_files_only,
            engine=engine,
            max_batch_size=self.max_batch_size if fast else 0,
            context_window=self.context_window if fast else 0,
            prefix_caching=self.prefix_caching if fast else True,
            gpu_memory_utilization=self.gpu_memory_utilization if fast else 0.0,
            kv_cache_tokens=self.kv_cache_tokens if fast else None,
            dense_prefill=self.dense_prefill if fast else None,
        )

    def _engine_for(self, model: str, revision: str) -> Engine:
        if self.base_url:
            return remote_engine(self._remote_settings(model))
        return get_engine(self._settings(model, revision))

    def _remote_settings(self, model: str) -> RemoteSettings:
        return RemoteSettings(
            base_url=self.base_url or "",
            model=model,
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            server=self.server,
            max_retries=self.max_retries,
        )

    async def _aengine_for(self, model: str, revision: str) -> Engine:
        if self.base_url:
            return remote_engine(self._remote_settings(model))
        settings = self._settings(model, revision)
        if settings in loaded_engines():
            return get_engine(settings)
        return await asyncio.to_thread(get_engine, settings)  # loading takes seconds

    def _call_options(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> dict:
        """This instance's options with the call's overrides, validated like the fields."""
        options = {name: getattr(self, name) for name in _CALL_OPTIONS}
        for name, value in kwargs.items():
            if name.startswith("ls_"):  # LangSmith tracing hints, not options
                continue
            if name not in _CALL_OPTIONS:
                msg = (
                    f"Unknown option {name!r} for {type(self).__name__}. Options a call may set: "
                    f"{', '.join(_CALL_OPTIONS)}, stop."
                )
                raise TypeError(msg)
            try:
                options[name] = _validator(type(self), name).validate_python(value)
            except ValidationError as error:
                raise ValueError(_option_error(type(self), name, value, error)) from None
        check_revision(options["model"], options["revision"])
        options["stop"] = list(self.stop or []) if stop is None else _stop_list(stop)
        return options

    def _request(self, prompt: str, options: dict) -> GenerationRequest:
        stops = tuple(options["stop"]) + (USER_TURN_STOPS if options["stop_at_user_turn"] else ())
        return GenerationRequest(
            prompt=prompt,
            max_new_tokens=options["max_tokens"],
            sampling=SamplingParams(
                temperature=options["temperature"],
                top_p=options["top_p"],
                top_k=options["top_k"],
                repetition_penalty=options["repetition_penalty"],
                seed=options["seed"],
            ),
            stops=stops,
            timeout=options["timeout"],
            context_window=self.context_window,
            grammar=options.get("grammar"),
        )

    def _ls_options(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any]) -> dict:
        return {
            "ls_provider": "synthia",
            "ls_model_name": kwargs.get("model", self.model),
            "ls_temperature": kwargs.get("temperature", self.temperature),
            "ls_max_tokens": kwargs.get("max_tokens", self.max_tokens),
            **({"ls_stop": list(stop)} if stop else {"ls_stop": self.stop} if self.stop else {}),
        }


_BOS = 1
"""Synthia's (Mistral's) beginning-of-sequence token id."""


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


def _without_password(url: str | None) -> str | None:
    """`url` without the password of its user part (``http://user:***@host/v1``)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _stop_list(stop: Any) -> list[str] | None:
    """Stop sequences as a list; a single string is one stop (not one stop per character)."""
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        msg = f"stop sequences must be non-empty strings, got {stop!r}."
        raise ValueError(msg)
    return stops


def _option_error(cls: type, name: str, value: Any, error: ValidationError) -> str:
    """Why a call's option `name` was refused, in one sentence."""
    detail = error.errors()[0]
    reason = detail["msg"].removeprefix("Value error, ")
    refusal = "out of range" if detail["type"].startswith(("greater", "less")) else "not valid"
    return f"{name}={value!r} is {refusal} for {cls.__name__}: {reason}."


@cache
def _validator(cls: type[BaseModel], name: str) -> TypeAdapter:
    field = cls.model_fields[name]
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)])


def batch_configs(
    config: RunnableConfig | Sequence[RunnableConfig] | None, size: int
) -> tuple[list[RunnableConfig], int]:
    """Per-input configs of a ``.batch()`` of `size`, and the width of its engine batch.

    The width is the batch's ``max_concurrency`` (or `size`); every config's thread pool
    holds that many calls, so that they reach the engine together.
    """
    configs = get_config_list(config, size)
    width = max(1, min(size, configs[0].get("max_concurrency") or size)) if configs else 1
    return [{**c, "max_concurrency": width} for c in configs], width


def usage_of(event: TokenEvent) -> UsageMetadata:
    """Token usage of a finished generation, from its last event."""
    return UsageMetadata(
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        total_tokens=event.input_tokens + event.output_tokens,
    )


def finish_info(event: TokenEvent, engine: Engine) -> dict[str, Any]:
    """Response metadata of a finished generation: model name, finish reason, provider."""
    return {
        "model_name": engine.name,
        "finish_reason": event.finish_reason,
        "model_provider": "synthia",
    }
