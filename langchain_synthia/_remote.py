"""A remote engine: the same faces on an OpenAI-compatible completions server.

vLLM, TGI, SGLang and llama.cpp's server all serve ``POST /v1/completions``. The prompt is
rendered on our side (the faces do it as for a local model), so this engine only sends text and
reads text back over server-sent events. Stop strings are sent to the server (it stops early)
and matched again here, so the answer is cut exactly as the local engines cut it; with a
grammar they are matched here only, since a server would cut inside a tool call. Constrained
decoding (tool calls, structured output) goes through the server's own option for it:
``structured_outputs`` with our llguidance grammar on vLLM, the same grammar translated to GBNF
as ``grammar`` on llama.cpp and ``ebnf`` on SGLang (`langchain_synthia._gbnf`).

Sync calls use httpx's client; async calls use its async client on the caller's event loop.
Connection failures and 429/5xx answers are retried with exponential backoff, but only before
the first token arrives (a retry after that would repeat text).
"""

import asyncio
import functools
import json
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_synthia._engine import (
    GenerationRequest,
    GenerationTimeoutError,
    TokenEvent,
    TokenStream,
)
from langchain_synthia._stops import StopMatcher

Server = Literal["auto", "vllm", "sglang", "tgi", "llama.cpp", "openai"]

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONNECT_TIMEOUT = 10.0


class RemoteEngineError(RuntimeError):
    """The server could not be reached, answered with an error, or broke off an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        """Describe the failure; `status` is the HTTP status when the server answered."""
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RemoteSettings:
    """Everything that decides which server is talked to (instances share one engine)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a repr or a traceback
    server: Server = "auto"
    max_retries: int = 2


class RemoteEngine:
    """Completions from an OpenAI-compatible server, as `TokenEvent`s like the local engines.

    The server batches concurrent requests itself (continuous batching), so requests are sent
    as they come (`batches_locally` is false).
    """

    kind = "remote"
    batches_locally = False

    def __init__(self, settings: RemoteSettings) -> None:
        """Talk to `settings.base_url`; nothing is sent until the first request."""
        self.settings = settings
        self.name = settings.model
        self.url = settings.base_url.rstrip("/")
        self._server: str | None = None if settings.server == "auto" else settings.server
        self._client: Any = None
        self._async_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._added: int | None = None  # `_added_tokens`

    # -- the engine interface -----------------------------------------------------------------

    def open(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Stream `request`'s answer; closing the iterator closes the connection."""
        import httpx

        deadline = _deadline(request)
        response = self._sync_response(self._body(request), deadline)
        answer, lines = _Answer(request), _Lines()
        try:
            stream = response.iter_lines()
            while not answer.done:
                try:
                    line = next(stream)
                except StopIteration:
                    break
                except httpx.TimeoutException:
                    raise _timeout(request) from None
                except httpx.TransportError as error:
                    raise self._broken(error, answer) from error
                _remaining(deadline, request)
                yield from answer.feed(lines.parse(line))
            usage = lines.usage or self._usage(request, answer, lines, deadline)
            yield from answer.end(self, lines, usage)
        finally:
            response.close()

    async def aopen(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """`open` on the caller's event loop, with httpx's async client."""
        import httpx

        deadline = _deadline(request)
        if self._server is None:  # detection is one blocking GET, done once
            await asyncio.to_thread(self.server)
        response = await self._async_response(self._body(request), deadline)
        answer, lines = _Answer(request), _Lines()
        try:
            stream = response.aiter_lines()
            while not answer.done:
                try:
                    line = await asyncio.wait_for(anext(stream), _remaining(deadline, request))
                except StopAsyncIteration:
                    break
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    raise _timeout(request) from None
                except httpx.TransportError as error:
                    raise self._broken(error, answer) from error
                for event in answer.feed(lines.parse(line)):
                    yield event
            usage = lines.usage or await asyncio.to_thread(
                self._usage, request, answer, lines, deadline
            )
            for event in answer.end(self, lines, usage):
                yield event
        finally:
            await response.aclose()

    def submit(self, requests: list[GenerationRequest]) -> list[TokenStream]:
        """Send `requests` at once (the server batches them); return their streams.

        Each request streams in a thread of its own into a `TokenStream`, which its caller
        reads synchronously or with ``async for`` (``SynthiaLLM.generate`` with several
        prompts). Single calls use `open` and `aopen` instead.
        """
        streams = [TokenStream(request, 0) for request in requests]
        for stream in streams:
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()
        return streams

    def _pump(self, stream: TokenStream) -> None:
        events = self.open(stream.request)
        try:
            for event in events:
                if stream.cancelled.is_set():
                    return
                stream._put(event)
        except Exception as error:  # handed to the reader, who raises it
            stream._put(error)
        finally:
            events.close()

    def check(self) -> None:
        """Ask the server for its models; raise `RemoteEngineError` if it does not answer."""
        import httpx

        try:
            response = self._http().get(f"{self.url}/models")
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if response.status_code >= 400:
            raise self._http_error(response)

    def encode(self, text: str, timeout: Any = None) -> list[int]:
        """Token ids of `text` with BOS, from the server's tokenizer endpoint.

        ``/tokenize`` on vLLM, SGLang and llama.cpp's own server; ``/extras/tokenize`` on
        llama-cpp-python's. `timeout`: httpx's, the client's (10 s) when not given.
        """
        root = self.url.removesuffix("/v1")
        body = {
            "model": self.name,
            "prompt": text,  # vLLM, SGLang
            "content": text,  # llama.cpp
            "input": text,  # llama-cpp-python
            "add_special_tokens": True,
            "add_special": True,
        }
        extra = {} if timeout is None else {"timeout": timeout}
        for path in ("/tokenize", "/extras/tokenize"):
            response = self._http().post(f"{root}{path}", json=body, **extra)
            if response.status_code != 404:
                break
        if response.status_code >= 400:
            msg = (
                f"{root} cannot count tokens (/tokenize answered {response.status_code}). "
                "Token usage of answers still comes from the server."
            )
            raise RemoteEngineError(msg, response.status_code)
        data = response.json()
        return list(data.get("tokens") or data.get("ids") or [])

    def _usage(
        self, request: GenerationRequest, answer: "_Answer", lines: "_Lines",
        deadline: float | None,
    ) -> dict:  # fmt: skip
        """Token usage for a server that streams none (llama-cpp-python), from its tokenizer.

        The prompt and the text received are counted with the server's ``/tokenize``; an
        answer cut at ``max_tokens`` used exactly that many. Unknown counts are 0. The counts
        may wait as long as the call itself (its `deadline`, none without a timeout): a
        server that runs one request at a time answers them only after the answers queued
        before them, which 16 concurrent streams can make longer than the client's 10 s.
        """
        timeout = self._timeouts(deadline)
        try:
            prompt = len(self.encode(request.prompt, timeout))
            if lines.finish_reason == "length" and not answer.stops.stopped:
                completion = request.max_new_tokens
            else:  # without the BOS the tokenizer adds, if it adds one
                completion = len(self.encode("".join(answer.raw), timeout))
                completion -= self._added_tokens(timeout)
        except (RemoteEngineError, ValueError):  # no tokenizer endpoint, or not JSON
            return {}
        except Exception as error:  # the connection: usage is not worth failing an answer for
            if type(error).__module__.startswith(("httpx", "httpcore")):
                return {}
            raise
        return {"prompt_tokens": prompt, "completion_tokens": max(completion, 0)}

    def _added_tokens(self, timeout: Any = None) -> int:
        """Tokens the server's tokenizer adds to any text (its BOS, or none), asked once."""
        if self._added is None:
            self._added = len(self.encode("", timeout))
        return self._added

    # -- requests -----------------------------------------------------------------------------

    def server(self) -> str:
        """The server kind: the setting, or read once from ``/v1/models`` ("openai" if unsure)."""
        if self._server is None:
            try:
                response = self._http().get(f"{self.url}/models", timeout=_CONNECT_TIMEOUT)
                owners = " ".join(str(m.get("owned_by", "")) for m in response.json()["data"])
            except Exception:  # best effort: a real error surfaces on the request itself
                owners = ""
            found = (kind for kind, mark in _OWNERS.items() if mark in owners.lower())
            self._server = next(found, None) or (
                "llama.cpp" if owners.split() and set(owners.split()) == {_LLAMA_CPP_PYTHON}
                else "openai"
            )  # fmt: skip
        return self._server

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.name,
            "prompt": request.prompt,
            "max_tokens": request.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.stops and request.grammar is None:  # a server would cut inside the grammar
            body["stop"] = list(request.stops)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        server = self.server()
        if server in ("vllm", "sglang", "llama.cpp") and sampling.top_k:
            body["top_k"] = sampling.top_k
        if server in ("vllm", "sglang"):
            body["repetition_penalty"] = sampling.repetition_penalty
        elif server == "llama.cpp":
            body["repeat_penalty"] = sampling.repetition_penalty
        if request.grammar is not None:
            body.update(self._constraint(request.grammar, server))
        return body

    def _constraint(self, grammar: str, server: str) -> dict[str, Any]:
        # vLLM >= 0.12, served with --structured-outputs-config.backend guidance
        if server == "vllm":
            return {"structured_outputs": {"grammar": grammar}}
        if server in ("llama.cpp", "sglang"):
            from langchain_synthia._gbnf import lark_to_gbnf

            return {"grammar" if server == "llama.cpp" else "ebnf": lark_to_gbnf(grammar)}
        msg = (
            f"{self.url} ({server}) has no grammar option langchain-synthia can use, so tool "
            "calls and structured output cannot be enforced there. Serve the model with vLLM, "
            "SGLang or llama.cpp's server, or pass server='vllm' (etc.) if detection was wrong."
        )
        raise RemoteEngineError(msg)

    def _headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _http(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(headers=self._headers(), timeout=_CONNECT_TIMEOUT)
            return self._client

    def _async_http(self) -> Any:
        import httpx

        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(headers=self._headers(), timeout=_CONNECT_TIMEOUT)
            self._async_clients[loop] = client
        return client

    def _timeouts(self, deadline: float | None) -> Any:
        import httpx

        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        return httpx.Timeout(remaining, connect=min(_CONNECT_TIMEOUT, remaining or 1e9))

    def _sync_response(self, body: dict[str, Any], deadline: float | None) -> Any:
        import httpx

        client = self._http()
        for attempt in range(self.settings.max_retries + 1):
            request = client.build_request(
                "POST", f"{self.url}/completions", json=body, timeout=self._timeouts(deadline)
            )
            try:
                response = client.send(request, stream=True)
            except httpx.TransportError as error:
                self._after_failure(attempt, body, error=error)
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                self._after_failure(attempt, body, response=response)
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _async_response(self, body: dict[str, Any], deadline: float | None) -> Any:
        import httpx

        client = self._async_http()
        for attempt in range(self.settings.max_retries + 1):
            request = client.build_request(
                "POST", f"{self.url}/completions", json=body, timeout=self._timeouts(deadline)
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as error:
                self._after_failure(attempt, body, error=error)
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                self._after_failure(attempt, body, response=response)
            await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _after_failure(
        self, attempt: int, body: dict[str, Any], *, error: Any = None, response: Any = None
    ) -> None:
        """Return to retry a failed attempt, or raise what the caller should see."""
        import httpx

        last = attempt == self.settings.max_retries
        if isinstance(error, httpx.TimeoutException):
            raise _timeout_for(body) from error
        if error is not None:
            if last:
                raise self._unreachable(error) from error
        elif response.status_code not in _RETRY_STATUS or last:
            raise self._http_error(response)

    # -- errors -------------------------------------------------------------------------------

    def _unreachable(self, error: Exception) -> RemoteEngineError:
        tries = self.settings.max_retries + 1
        msg = (
            f"Could not connect to the server at {self.url} ({type(error).__name__}: {error}) "
            f"after {tries} attempt{'s' * (tries > 1)}. Is it running, and is base_url right "
            "(it ends in /v1)?"
        )
        return RemoteEngineError(msg)

    def _http_error(self, response: Any) -> RemoteEngineError:
        try:
            detail = response.json()
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = response.text
        msg = f"The server at {self.url} answered {response.status_code}: {detail}"
        return RemoteEngineError(msg, response.status_code)

    def _broken(self, error: Exception, matcher: "_Answer") -> RemoteEngineError:
        msg = (
            f"The server at {self.url} broke off the answer after {matcher.pieces} pieces of "
            f"text ({type(error).__name__}: {error})."
        )
        return RemoteEngineError(msg)


@functools.cache
def remote_engine(settings: RemoteSettings) -> RemoteEngine:
    """The process-wide engine for `settings` (its connection pool is shared)."""
    return RemoteEngine(settings)


_OWNERS = {"vllm": "vllm", "sglang": "sglang", "llama.cpp": "llamacpp", "tgi": "tgi"}
"""What each server writes in ``/v1/models``' ``owned_by``."""
_LLAMA_CPP_PYTHON = "me"
"""llama-cpp-python's server (llama.cpp in Python) says ``owned_by: "me"``."""


class _Lines:
    """Server-sent events: ``data: {json}`` lines, ``data: [DONE]`` at the end."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.done = False

    def parse(self, line: str) -> str:
        """The text a line adds; records the finish reason and usage when they come."""
        if not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return ""
        try:
            event = json.loads(data)
        except ValueError:
            return ""
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            msg = f"The server reported an error mid-answer: {message}"
            raise RemoteEngineError(msg)
        if event.get("usage"):
            self.usage = event["usage"]
        text = ""
        for choice in event.get("choices") or []:
            text += choice.get("text") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return text


class _Answer:
    """One answer's text, cut at the first stop string exactly as the local engines cut it.

    After a stop, the rest of the stream is read (not shown) for the server's token usage: the
    server was sent the same stops and ends there too. A server that goes on regardless is
    left after `_AFTER_STOP` more pieces.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.stops = StopMatcher(request.stops, request.constrained_opening)
        self.pieces = 0
        self.raw: list[str] = []
        """All text the server sent, stops and beyond included."""
        self._after_stop = 0

    @property
    def done(self) -> bool:
        return self._after_stop > _AFTER_STOP

    def feed(self, text: str) -> Iterator[TokenEvent]:
        if not text:
            return
        self.raw.append(text)
        if self.stops.stopped:
            self._after_stop += 1
            return
        self.pieces += 1
        if out := self.stops.feed(text):
            yield TokenEvent(out, -1)

    def end(
        self, engine: RemoteEngine, lines: _Lines, usage: dict[str, int]
    ) -> Iterator[TokenEvent]:
        """The stream ended: release held-back text, then the finish with the token usage."""
        if not (lines.done or lines.finish_reason or self.stops.stopped):
            msg = (
                f"The server at {engine.url} closed the connection before the answer finished "
                f"(after {self.pieces} pieces of text)."
            )
            raise RemoteEngineError(msg)
        stopped = self.stops.stopped or lines.finish_reason != "length"
        yield TokenEvent(
            self.stops.flush(),
            -1,
            "stop" if stopped else "length",
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
        )


_AFTER_STOP = 64


def _deadline(request: GenerationRequest) -> float | None:
    return None if request.timeout is None else time.monotonic() + request.timeout


def _remaining(deadline: float | None, request: GenerationRequest) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(request)
    return left


def _timeout(request: GenerationRequest) -> GenerationTimeoutError:
    return GenerationTimeoutError(
        f"The answer took longer than timeout={request.timeout} s; raise timeout or max_tokens."
    )


def _timeout_for(body: dict[str, Any]) -> GenerationTimeoutError:
    return GenerationTimeoutError(
        "The server did not start answering within the timeout; raise timeout, or check "
        f"that the server is not overloaded (model {body['model']!r})."
    )


def _backoff(attempt: int) -> float:
    """Seconds before retry `attempt` + 1: 0.5, 1, 2, ... with jitter, at most 8."""
    return min(0.5 * 2**attempt, 8.0) * (0.75 + random.random() / 2)
