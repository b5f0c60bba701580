"""A remote engine: the same faces on an OpenAI-compatible completions server.

vLLM, TGI, SGLang and llama.cpp's server all serve ``POST /v1/completions``. The prompt is
rendered on our side (the faces do it as for a local model), so this engine only sends text and
reads text back over server-sent events. Stop strings are sent to the server (it stops early)
and matched again here, so the answer is cut exactly as the local engines cut it; with a
grammar they are matched here only, since a server would cut inside a tool call. Constrained
decoding (tool calls, structured output) goes through the server's own option for it:
``structured_outputs`` with our llguidance grammar on vLLM, the same grammar translated to GBNF
as ``grammar`` on llama.cpp and ``ebnf`` on SGLang (`langchain_synthia._gbnf`). The text that
comes back is checked against the grammar here as well, so a server that ignores the option
cannot hand back a call of a tool that was never bound.

Sync calls use httpx's client; async calls use its async client on the caller's event loop.
Connection failures and 429/5xx answers are retried with exponential backoff, but only before
the first token arrives (a retry after that would repeat text).

A server is not trusted to be well-behaved: a call's ``timeout`` is a deadline for the whole
exchange (connecting, the headers, every byte of the body), lines and answers are bounded in
size, an answer ends at ``max_tokens`` pieces of text even if the server goes on, and every
malformed reply is a `RemoteEngineError` whose text never contains the API key.
"""

import asyncio
import contextlib
import functools
import json
import random
import re
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_synthia._requests import GenerationRequest, TokenEvent
from langchain_synthia._stops import StopMatcher
from langchain_synthia._token_stream import GenerationTimeoutError, TokenStream

Server = Literal["auto", "vllm", "sglang", "tgi", "llama.cpp", "openai"]

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONNECT_TIMEOUT = 10.0
_REPLY_TIMEOUT = 60.0
"""Seconds a whole reply outside an answer (``/tokenize``, ``/models``) may take."""
_MAX_LINE_BYTES = 1 << 20
"""The longest line of server-sent events read (an event carries a few tokens' text)."""
_MAX_REPLY_BYTES = 1 << 20
"""The most of a reply that is not an answer (an error page, ``/tokenize``) that is read."""
_MAX_CHARS_PER_TOKEN = 1024
"""More text than this per token of ``max_tokens`` cannot be an answer the server was asked for."""
_SPARE_EVENTS = 64
"""Events a stream may carry beyond one per token (the finish, the usage, keep-alives)."""
_DETAIL_CHARS = 500
"""The most of a server's own message shown in an error."""


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

    An `langchain_synthia._engine_interface.Engine`. The server batches concurrent requests
    itself (continuous batching), so requests are sent as they come (`batches_locally` is
    false).
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
        """Stream `request`'s answer; closing the iterator closes the connection.

        Raises:
            GenerationTimeoutError: When the whole exchange runs past ``request.timeout``.
            RemoteEngineError: When the server fails, breaks off or sends what is not an answer.
        """
        import httpx

        deadline = _Deadline(request.timeout)
        try:
            body = self._body(request, deadline.at)
            response = self._sync_response(body, deadline)
            answer = _Answer(request, self, _sent_grammar(request, body))
            lines = _Lines(self, request)
            try:
                chunks, split, tail = response.iter_bytes(), _LineSplitter(self), []
                while not (answer.done or lines.complete):
                    try:
                        chunk = next(chunks)
                    except StopIteration:
                        tail = split.rest()
                        break
                    except httpx.TransportError as error:
                        if deadline.expired or isinstance(error, httpx.TimeoutException):
                            raise _timeout(request) from None
                        raise self._broken(error, answer) from error
                    deadline.check(request)
                    for line in split.feed(chunk):
                        if answer.done or lines.complete:
                            break
                        yield from answer.feed(lines.parse(line))
                deadline.check(request)  # the watchdog's shutdown reads as the stream's end
                for line in tail:
                    yield from answer.feed(lines.parse(line))
            finally:
                response.close()
            usage = lines.usage or self._usage(request, answer, lines, deadline.at)
            yield from answer.end(lines, usage)
        finally:
            deadline.cancel()

    async def aopen(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """`open` on the caller's event loop, with httpx's async client."""
        import httpx

        deadline = _Deadline(request.timeout)
        try:
            if self._server is None:  # detection is one blocking GET, done once
                await asyncio.to_thread(self.server, deadline.at)
            body = self._body(request, deadline.at)
            response = await self._async_response(body, deadline)
            answer = _Answer(request, self, _sent_grammar(request, body))
            lines = _Lines(self, request)
            try:
                chunks, split, tail = response.aiter_bytes(), _LineSplitter(self), []
                while not (answer.done or lines.complete):
                    try:
                        chunk = await asyncio.wait_for(anext(chunks), deadline.left(request))
                    except StopAsyncIteration:
                        tail = split.rest()
                        break
                    except (asyncio.TimeoutError, httpx.TimeoutException):
                        raise _timeout(request) from None
                    except httpx.TransportError as error:
                        raise self._broken(error, answer) from error
                    for line in split.feed(chunk):
                        if answer.done or lines.complete:
                            break
                        for event in answer.feed(lines.parse(line)):
                            yield event
                for line in tail:
                    for event in answer.feed(lines.parse(line)):
                        yield event
            finally:
                await response.aclose()
            usage = lines.usage or await asyncio.to_thread(
                self._usage, request, answer, lines, deadline.at
            )
            for event in answer.end(lines, usage):
                yield event
        finally:
            deadline.cancel()

    def submit(self, requests: Sequence[GenerationRequest]) -> list[TokenStream]:
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
                stream.put(event)
        except Exception as error:  # handed to the reader, who raises it
            stream.put(error)
        finally:
            events.close()

    def check(self) -> None:
        """Ask the server for its models; raise `RemoteEngineError` if it does not answer."""
        reply = self._fetch_or_raise("GET", f"{self.url}/models")
        if reply.status >= 300:
            raise self._http_error(reply.status, reply.content, reply.location)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with BOS, from the server's tokenizer endpoint.

        ``/tokenize`` on vLLM, SGLang and llama.cpp's own server; ``/extras/tokenize`` on
        llama-cpp-python's.

        Raises:
            RemoteEngineError: If the server has no tokenizer endpoint, answers with something
                other than a list of token ids, or does not answer in time.
        """
        import httpx

        try:
            return self._tokenize(text, time.monotonic() + _REPLY_TIMEOUT)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        except _ExchangeTimeout:
            raise self._too_slow("/tokenize") from None

    def _tokenize(self, text: str, deadline: float | None) -> list[int]:
        """`encode`, with the whole reply due by `deadline` (``time.monotonic()``; none: none)."""
        root = self.url.removesuffix("/v1")
        body = {
            "model": self.name,
            "prompt": text,  # vLLM, SGLang
            "content": text,  # llama.cpp
            "input": text,  # llama-cpp-python
            "add_special_tokens": True,
            "add_special": True,
        }
        for path in ("/tokenize", "/extras/tokenize"):
            reply = self._fetch("POST", f"{root}{path}", deadline, body)
            if reply.status != 404:
                break
        if reply.status >= 300:
            msg = (
                f"{root} cannot count tokens (/tokenize answered {reply.status}). "
                "Token usage of answers still comes from the server."
            )
            raise RemoteEngineError(msg, reply.status)
        data = _json_or_none(reply.content)
        tokens = data.get("tokens", data.get("ids")) if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(_is_count(token) for token in tokens):
            msg = (
                f"{root}{path} answered with no list of token ids "
                f"({self.server_message(reply.content)}). Token usage of answers still comes "
                "from the server."
            )
            raise RemoteEngineError(msg, reply.status)
        return tokens

    def _usage(
        self, request: GenerationRequest, answer: "_Answer", lines: "_Lines",
        deadline: float | None,
    ) -> dict:  # fmt: skip
        """Token usage for a server that streams none (llama-cpp-python), from its tokenizer.

        An answer cut at ``max_tokens`` used exactly that many; the prompt and any other
        answer are counted with the server's ``/tokenize``. Unknown counts are 0. The counts
        may wait as long as the call itself (its `deadline`, none without a timeout): a
        server that runs one request at a time answers them only after the answers queued
        before them, which 16 concurrent streams can make longer than the client's 10 s.
        """
        counts = {}
        if answer.finish_reason(lines) == "length":
            counts["completion_tokens"] = request.max_new_tokens
        try:
            counts["prompt_tokens"] = len(self._tokenize(request.prompt, deadline))
            if "completion_tokens" not in counts:  # without the BOS the tokenizer adds, if any
                completion = len(self._tokenize("".join(answer.raw), deadline))
                counts["completion_tokens"] = max(completion - self._added_tokens(deadline), 0)
        except (RemoteEngineError, _ExchangeTimeout):  # no tokenizer endpoint, or too late
            pass
        except Exception as error:  # the connection: usage is not worth failing an answer for
            if not type(error).__module__.startswith(("httpx", "httpcore")):
                raise
        return counts

    def _added_tokens(self, deadline: float | None) -> int:
        """Tokens the server's tokenizer adds to any text (its BOS, or none), asked once."""
        if self._added is None:
            self._added = len(self._tokenize("", deadline))
        return self._added

    # -- requests -----------------------------------------------------------------------------

    def server(self, deadline: float | None = None) -> str:
        """The server kind: the setting, or read once from ``/v1/models`` ("openai" if unsure).

        The question waits at most 10 s, and not past `deadline` (``time.monotonic()``), the
        deadline of the call that asks.

        Raises:
            GenerationTimeoutError: If `deadline` passes first (nothing is remembered then).
        """
        if self._server is None:
            due = time.monotonic() + _CONNECT_TIMEOUT
            try:
                reply = self._fetch("GET", f"{self.url}/models", min(due, deadline or due))
                models = _json_or_none(reply.content)
                owners = " ".join(str(m.get("owned_by", "")) for m in models["data"])
            except _ExchangeTimeout:
                if deadline is not None and deadline <= due:
                    msg = "The server did not answer within the timeout; raise timeout."
                    raise GenerationTimeoutError(msg) from None
                owners = ""
            except Exception:  # best effort: a real error surfaces on the request itself
                owners = ""
            found = (kind for kind, mark in _OWNERS.items() if mark in owners.lower())
            self._server = next(found, None) or (
                "llama.cpp" if owners.split() and set(owners.split()) == {_LLAMA_CPP_PYTHON}
                else "openai"
            )  # fmt: skip
        return self._server

    def _body(self, request: GenerationRequest, deadline: float | None = None) -> dict[str, Any]:
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
        server = self.server(deadline)
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
        """The sync client: it keeps no idle connections, so that `_Deadline` sees each socket."""
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    headers=self._headers(),
                    timeout=_CONNECT_TIMEOUT,
                    limits=httpx.Limits(max_keepalive_connections=0),
                )
            return self._client

    def _async_http(self) -> Any:
        import httpx

        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(headers=self._headers(), timeout=_CONNECT_TIMEOUT)
            self._async_clients[loop] = client
        return client

    def _fetch(self, method: str, url: str, deadline: float | None, body: Any = None) -> "_Reply":
        """One whole small reply (at most `_MAX_REPLY_BYTES` are read), due by `deadline`.

        Raises:
            _ExchangeTimeout: If `deadline` passes first.
            httpx.TransportError: If the server cannot be reached or breaks off.
        """
        import httpx

        watchdog = _Deadline(None if deadline is None else deadline - time.monotonic())
        client = self._http()
        try:
            request = client.build_request(
                method, url, json=body, timeout=watchdog.timeouts(),
                extensions={"trace": watchdog.trace},
            )  # fmt: skip
            try:
                response = client.send(request, stream=True)
                try:
                    content = _read_capped(response.iter_bytes(), _MAX_REPLY_BYTES)
                finally:
                    response.close()
            except httpx.TransportError as error:
                if watchdog.expired or isinstance(error, httpx.TimeoutException):
                    raise _ExchangeTimeout from None
                raise
            if watchdog.expired:
                raise _ExchangeTimeout
            return _Reply(response.status_code, content, response.headers.get("location"))
        finally:
            watchdog.cancel()

    def _fetch_or_raise(self, method: str, url: str) -> "_Reply":
        """`_fetch` within `_REPLY_TIMEOUT`, its failures as `RemoteEngineError`."""
        import httpx

        try:
            return self._fetch(method, url, time.monotonic() + _REPLY_TIMEOUT)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        except _ExchangeTimeout:
            raise self._too_slow(url.removeprefix(self.url)) from None

    def _sync_response(self, body: dict[str, Any], deadline: "_Deadline") -> Any:
        import httpx

        client = self._http()
        for attempt in range(self.settings.max_retries + 1):
            request = client.build_request(
                "POST", f"{self.url}/completions", json=body, timeout=deadline.timeouts(),
                extensions={"trace": deadline.trace},
            )  # fmt: skip
            try:
                response = client.send(request, stream=True)
            except httpx.TransportError as error:
                self._after_failure(attempt, body, deadline, error=error)
            else:
                deadline.watch(response.extensions.get("network_stream"))
                if (failure := self._not_a_stream(response)) is None:
                    return response
                try:
                    content = _read_capped(response.iter_bytes(), _MAX_REPLY_BYTES)
                except httpx.TransportError as error:
                    self._after_failure(attempt, body, deadline, error=error)
                else:
                    self._after_failure(attempt, body, deadline, failure=(failure, content))
                finally:
                    response.close()
            time.sleep(min(_backoff(attempt), deadline.seconds_left()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _async_response(self, body: dict[str, Any], deadline: "_Deadline") -> Any:
        import httpx

        client = self._async_http()
        for attempt in range(self.settings.max_retries + 1):
            request = client.build_request(
                "POST", f"{self.url}/completions", json=body, timeout=deadline.timeouts()
            )
            try:
                response = await asyncio.wait_for(
                    client.send(request, stream=True), deadline.left(None)
                )
            except (httpx.TransportError, asyncio.TimeoutError) as error:
                self._after_failure(attempt, body, deadline, error=error)
            else:
                if (failure := self._not_a_stream(response)) is None:
                    return response
                try:
                    content = await asyncio.wait_for(
                        _aread_capped(response.aiter_bytes(), _MAX_REPLY_BYTES),
                        deadline.left(None),
                    )
                except (httpx.TransportError, asyncio.TimeoutError) as error:
                    self._after_failure(attempt, body, deadline, error=error)
                else:
                    self._after_failure(attempt, body, deadline, failure=(failure, content))
                finally:
                    await response.aclose()
            await asyncio.sleep(min(_backoff(attempt), deadline.seconds_left()))
        raise AssertionError("unreachable")  # pragma: no cover

    def _not_a_stream(self, response: Any) -> tuple[int, str | None, str] | None:
        """Why `response` is not a stream of events to read: status, redirect, content type."""
        kind = response.headers.get("content-type", "").lower()
        if response.status_code >= 300:
            return response.status_code, response.headers.get("location"), kind
        if kind.startswith(("application/json", "text/html", "application/xhtml")):
            return response.status_code, None, kind
        return None

    def _after_failure(
        self, attempt: int, body: dict[str, Any], deadline: "_Deadline", *, error: Any = None,
        failure: tuple[tuple[int, str | None, str], bytes] | None = None,
    ) -> None:  # fmt: skip
        """Return to retry a failed attempt, or raise what the caller should see."""
        import httpx

        last = attempt == self.settings.max_retries
        timed_out = isinstance(error, httpx.TimeoutException | asyncio.TimeoutError)
        if timed_out or deadline.expired or deadline.seconds_left() <= 0:
            raise _timeout_for(body) from None
        if error is not None:
            if last:
                raise self._unreachable(error) from error
            return
        (status, location, kind), content = failure
        if status < 300:
            msg = (
                f"The server at {self.url} answered {status} with {kind or 'no content type'} "
                f"instead of a stream of server-sent events: {self.server_message(content)}"
            )
            raise RemoteEngineError(msg, status)
        if status not in _RETRY_STATUS or last:
            raise self._http_error(status, content, location)

    # -- errors -------------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """`text` without the API key, cut to `_DETAIL_CHARS` (for an error message)."""
        key = self.settings.api_key
        if key:
            text = text.replace(key, "[api key]")
        return text if len(text) <= _DETAIL_CHARS else f"{text[:_DETAIL_CHARS]}..."

    def server_message(self, content: Any) -> str:
        """A server's own message from a reply body, an error object or any JSON value."""
        if isinstance(content, bytes):
            content = content.decode("utf-8", "replace")
        if isinstance(content, str):
            parsed = _json_or_none(content)
            if parsed is None:  # not JSON: an HTML page or plain text, without the markup
                text = re.sub(r"<(script|style)\b.*?</\1>|<[^>]*>", " ", content, flags=re.S)
                return self.redact(" ".join(text.split()) or "(no text)")
            content = parsed
        for key in ("error", "message", "detail"):
            if isinstance(content, dict) and content.get(key) not in (None, "", {}):
                content = content[key]
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        return self.redact(" ".join(text.split()))

    def _unreachable(self, error: Exception) -> RemoteEngineError:
        tries = self.settings.max_retries + 1
        msg = (
            f"Could not connect to the server at {self.url} "
            f"({type(error).__name__}: {self.redact(str(error))}) "
            f"after {tries} attempt{'s' * (tries > 1)}. Is it running, and is base_url right "
            "(it ends in /v1)?"
        )
        return RemoteEngineError(msg)

    def _http_error(self, status: int, content: bytes, location: str | None) -> RemoteEngineError:
        if 300 <= status < 400:
            msg = (
                f"The server at {self.url} answered {status}, a redirect to "
                f"{self.redact(location or '(no location)')}. Redirects are not followed (the "
                "prompt and the API key would go elsewhere): set base_url to where it points."
            )
            return RemoteEngineError(msg, status)
        msg = f"The server at {self.url} answered {status}: {self.server_message(content)}"
        return RemoteEngineError(msg, status)

    def _too_slow(self, path: str) -> RemoteEngineError:
        msg = f"The server at {self.url} did not answer {path} within {_REPLY_TIMEOUT:.0f} s."
        return RemoteEngineError(msg)

    def _broken(self, error: Exception, matcher: "_Answer") -> RemoteEngineError:
        msg = (
            f"The server at {self.url} broke off the answer after {matcher.pieces} pieces of "
            f"text ({type(error).__name__}: {self.redact(str(error))})."
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


@dataclass(frozen=True)
class _Reply:
    """A whole small reply: its status, its body (capped), and where a redirect points."""

    status: int
    content: bytes
    location: str | None


class _ExchangeTimeout(Exception):
    """A `RemoteEngine._fetch` reply did not come by its deadline."""


class _Deadline:
    """One call's deadline over a whole exchange: connecting, the headers and every byte.

    httpx's timeouts bound each read, so a server that sends a byte now and then is never
    timed out by them. On the sync path, each new connection's socket is watched (through
    httpcore's ``trace`` extension; the sync client keeps no idle connections, so every
    exchange connects): at the deadline a timer shuts the sockets down, which ends a blocked
    read at once, and `expired` tells the reader why the stream ended. The async path bounds
    each await with `left` instead.
    """

    def __init__(self, timeout: float | None) -> None:
        """A deadline `timeout` seconds from now (``None``: none)."""
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def seconds_left(self) -> float:
        """Seconds until the deadline (never negative; infinite without one)."""
        return float("inf") if self.at is None else max(self.at - time.monotonic(), 0.0)

    def left(self, request: GenerationRequest | None) -> float | None:
        """Seconds left for the next await (``None``: no limit).

        Raises:
            GenerationTimeoutError: If the deadline has passed (`request` names the timeout).
        """
        if self.at is None:
            return None
        if self.expired or (left := self.at - time.monotonic()) <= 0:
            raise _timeout(request) if request is not None else asyncio.TimeoutError
        return left

    def check(self, request: GenerationRequest) -> None:
        """Raise `GenerationTimeoutError` if the deadline has passed."""
        self.left(request)

    def timeouts(self) -> Any:
        """Per-read timeouts for httpx: none past the deadline, connecting at most 10 s."""
        import httpx

        remaining = None if self.at is None else max(self.seconds_left(), 0.001)
        return httpx.Timeout(remaining, connect=min(_CONNECT_TIMEOUT, remaining or 1e9))

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """The ``trace`` hook httpcore calls: watch each connection as it opens."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.watch(info.get("return_value"))

    def watch(self, stream: Any) -> None:
        """Shut `stream`'s socket down at the deadline (at once, if it has passed)."""
        if self.at is None or stream is None:
            return
        sock = stream.get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            if sock not in self._sockets:
                self._sockets.append(sock)
            if self._timer is None and not self.expired:
                self._timer = threading.Timer(self.seconds_left(), self._expire)
                self._timer.daemon = True
                self._timer.start()
            expired = self.expired
        if expired:
            _shut_down(sock)

    def cancel(self) -> None:
        """The exchange is over: stop the timer."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._sockets.clear()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _LineSplitter:
    """Bytes into lines (ended by LF, CR LF or CR), none longer than `_MAX_LINE_BYTES`."""

    def __init__(self, engine: RemoteEngine) -> None:
        self._engine = engine
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> list[str]:
        """The lines `chunk` completes.

        Raises:
            RemoteEngineError: If a line grows past `_MAX_LINE_BYTES`.
        """
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._partial += chunk
            self._check(self._partial)
            return []
        whole = bytes(self._partial) + chunk[: end + 1]
        self._partial = bytearray(chunk[end + 1 :])
        self._check(self._partial)
        lines = whole.splitlines()
        for line in lines:
            self._check(line)
        return [line.decode("utf-8", "replace") for line in lines]

    def rest(self) -> list[str]:
        """The last line, at the stream's end, if it ended without a line break."""
        rest, self._partial = bytes(self._partial), bytearray()
        return [rest.decode("utf-8", "replace")] if rest else []

    def _check(self, line: bytes | bytearray) -> None:
        if len(line) > _MAX_LINE_BYTES:
            msg = (
                f"The server at {self._engine.url} sent a line of more than "
                f"{_MAX_LINE_BYTES >> 20} MiB without a line break: not a stream of "
                "server-sent events. Is base_url an OpenAI-compatible server?"
            )
            raise RemoteEngineError(msg)


class _Lines:
    """Server-sent events: ``data: {json}`` lines, ``data: [DONE]`` at the end.

    Every event must be a completion chunk: a JSON object whose ``choices`` is a list of
    objects with a string ``text`` and ``finish_reason``. Anything else is a
    `RemoteEngineError` that shows the event (without the API key). Lines that are not
    server-sent events are kept (the first 2,000 characters) to say what the server sent
    instead, should the stream end without an answer.
    """

    def __init__(self, engine: RemoteEngine, request: GenerationRequest) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.done = False
        self.events = 0
        self.other = ""
        """The start of whatever was not a server-sent event."""
        self._engine = engine
        self._max_events = request.max_new_tokens + _AFTER_STOP + _SPARE_EVENTS

    @property
    def complete(self) -> bool:
        """Nothing more is needed: the stream said it is done, or sent the finish and usage."""
        return self.done or (self.finish_reason is not None and self.usage is not None)

    def parse(self, line: str) -> str:
        """The text a line adds; records the finish reason and usage when they come.

        Raises:
            RemoteEngineError: For an error event, or an event that is not a completion chunk.
        """
        if not line.startswith("data:"):
            if line.strip() and not line.startswith((":", "event:", "id:", "retry:")):
                self.other = (self.other + line + "\n")[:2000]
            return ""
        data = line[5:].strip()
        if not data:
            return ""
        if data == "[DONE]":
            self.done = True
            return ""
        self.events += 1
        if self.events > self._max_events:
            msg = (
                f"The server at {self._engine.url} sent {self.events} events without ending "
                "the answer, more than its max_tokens allows."
            )
            raise RemoteEngineError(msg)
        event = _json_or_none(data)
        if not isinstance(event, dict):
            raise self._malformed("is not a JSON object", data)
        if event.get("error") is not None:
            msg = (
                f"The server at {self._engine.url} reported an error mid-answer: "
                f"{self._engine.server_message(event)}"
            )
            raise RemoteEngineError(msg)
        if event.get("usage") is not None:  # a malformed count is counted again instead
            self.usage = _usage_counts(event["usage"]) or self.usage
        choices = event.get("choices")
        if choices is None:
            return ""
        if not isinstance(choices, list):
            raise self._malformed("has 'choices' that is not a list", data)
        text = ""
        for choice in choices:
            if not isinstance(choice, dict):
                raise self._malformed("has a choice that is not an object", data)
            piece, finish, index = (choice.get(k) for k in ("text", "finish_reason", "index"))
            if not isinstance(piece, str | None) or not isinstance(finish, str | None):
                raise self._malformed("has a 'text' or 'finish_reason' that is not a string", data)
            if index is not None and (type(index) is not int or index != 0):
                raise self._malformed("has a second choice, which was not asked for", data)
            text += piece or ""
            self.finish_reason = finish or self.finish_reason
        return text

    def _malformed(self, what: str, data: str) -> RemoteEngineError:
        msg = (
            f"The server at {self._engine.url} sent an event that {what}, so it is not an "
            f"OpenAI completion chunk: {self._engine.redact(data)}"
        )
        return RemoteEngineError(msg)


class _Answer:
    """One answer's text, cut at the first stop string exactly as the local engines cut it.

    After a stop, the rest of the stream is read (not shown) for the server's token usage: the
    server was sent the same stops and ends there too, except under a grammar, where it is sent
    none (it would cut inside the constrained part). A server that goes on regardless is
    left after `_AFTER_STOP` more pieces. A server that sends more than ``max_tokens`` pieces
    of text (each piece is at least one token) is left there too: the answer ends with finish
    reason ``"length"``, as it would had the server kept to ``max_tokens``. Under a `grammar`
    (the one the server was sent), every piece of text is checked against it before it is
    shown (`_GrammarCheck`).
    """

    def __init__(
        self, request: GenerationRequest, engine: RemoteEngine, grammar: str | None = None
    ) -> None:
        self.stops = StopMatcher(request.stops, request.constrained_opening)
        self.pieces = 0
        self.raw: list[str] = []
        """All text the server sent, stops and beyond included."""
        self.over_budget = False
        """The server sent more than ``max_tokens`` pieces; the rest was not read."""
        self._engine = engine
        self._max_pieces = request.max_new_tokens
        self._max_chars = request.max_new_tokens * _MAX_CHARS_PER_TOKEN
        self._chars = 0
        self._after_stop = 0
        self._grammar = None if grammar is None else _GrammarCheck(grammar)

    @property
    def done(self) -> bool:
        return self._after_stop > _AFTER_STOP or self.over_budget

    def feed(self, text: str) -> Iterator[TokenEvent]:
        if not text or self.done:
            return
        if not self.stops.stopped and self.pieces >= self._max_pieces:
            self.over_budget = True
            return
        self._chars += len(text)
        if self._chars > self._max_chars:
            msg = (
                f"The server at {self._engine.url} sent {self._chars} characters for "
                f"max_tokens={self._max_pieces}, more than that many tokens can hold."
            )
            raise RemoteEngineError(msg)
        self.raw.append(text)
        if self.stops.stopped:
            self._after_stop += 1
            return
        self.pieces += 1
        if out := self.stops.feed(text):
            self._follow(out)
            yield TokenEvent(out, -1)

    def finish_reason(self, lines: _Lines) -> str:
        """``"length"`` for an answer cut at ``max_tokens``; ``"stop"`` otherwise."""
        if self.stops.stopped:
            return "stop"
        return "length" if self.over_budget or lines.finish_reason == "length" else "stop"

    def end(self, lines: _Lines, usage: dict[str, int]) -> Iterator[TokenEvent]:
        """The stream ended: release held-back text, then the finish with the token usage.

        Raises:
            RemoteEngineError: If the stream ended without a finish, or (under a grammar) the
                answer ended before the grammar was complete.
        """
        url = self._engine.url
        if not (lines.done or lines.finish_reason or self.stops.stopped or self.over_budget):
            sent = self._engine.server_message(lines.other) if lines.other else ""
            instead = f" Instead of server-sent events it sent: {sent}" if lines.other else ""
            msg = (
                f"The server at {url} closed the connection before the answer finished "
                f"(after {self.pieces} pieces of text).{instead}"
            )
            raise RemoteEngineError(msg)
        rest = self.stops.flush()
        self._follow(rest)
        finish = self.finish_reason(lines)
        grammar = self._grammar
        if grammar and finish == "stop" and not self.stops.stopped and not grammar.complete:
            msg = (
                f"The server at {url} ended the answer before it completed the grammar it "
                f"was sent (an unfinished tool call or JSON value): "
                f"{self._engine.redact(''.join(self.raw))}"
            )
            raise RemoteEngineError(msg)
        yield TokenEvent(
            rest,
            -1,
            finish,  # type: ignore[arg-type]
            input_tokens=usage.get("prompt_tokens", 0),
            output_tokens=usage.get("completion_tokens", 0),
        )

    def _follow(self, text: str) -> None:
        """Check `text`, about to be shown, against the grammar (if any)."""
        if self._grammar is not None and text and not self._grammar.feed(text):
            msg = (
                f"The server at {self._engine.url} sent an answer that breaks the grammar it "
                "was sent (a call of a tool that is not bound, arguments outside the tool's "
                "schema, or JSON outside the requested schema), so it is not returned: "
                f"{self._engine.redact(''.join(self.raw))}. Check that the server applies "
                "the grammar option (vLLM: --structured-outputs-config.backend guidance)."
            )
            raise RemoteEngineError(msg)


class _GrammarCheck:
    """Follows an answer's text, byte by byte, through the llguidance grammar it must match."""

    def __init__(self, grammar: str) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar)

    def feed(self, text: str) -> bool:
        """Take `text`; false if the grammar does not allow it here."""
        data = list(text.encode("utf-8"))
        return self._matcher.try_consume_tokens(data) == len(data)

    @property
    def complete(self) -> bool:
        """The text so far is a whole answer under the grammar."""
        return self._matcher.is_accepting()


def _sent_grammar(request: GenerationRequest, body: dict[str, Any]) -> str | None:
    """The grammar the server was sent in `body`, as llguidance reads it.

    vLLM gets the request's own grammar. llama.cpp and SGLang get it translated to GBNF, whose
    JSON allows a little more (any Unicode escape) and enforces a little less (no numeric
    bounds, no ``pattern``): their answers are held to that GBNF, read back into llguidance.
    """
    gbnf = body.get("grammar") or body.get("ebnf")
    if request.grammar is None or gbnf is None:
        return request.grammar
    try:
        return _gbnf_grammar(gbnf)
    except ValueError:  # a GBNF llguidance does not read: hold the answer to the original
        return request.grammar


@functools.lru_cache(maxsize=64)
def _gbnf_grammar(gbnf: str) -> str:
    from llguidance.gbnf_to_lark import gbnf_to_lark

    from langchain_synthia._grammar import lark_grammar

    return lark_grammar(gbnf_to_lark(gbnf))


@functools.cache
def _byte_tokenizer() -> Any:
    """An llguidance tokenizer whose 256 tokens are the 256 bytes (and one EOS)."""
    import llguidance

    class _Bytes:
        eos_token_id = 256
        bos_token_id = None

        def __init__(self) -> None:
            self.tokens = [bytes([byte]) for byte in range(256)] + [b""]
            self.special_token_ids = [256]

        def __call__(self, text: str | bytes) -> list[int]:
            return list(text.encode("utf-8") if isinstance(text, str) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), slices=[])


_AFTER_STOP = 64


def _read_capped(chunks: Iterator[bytes], limit: int) -> bytes:
    """The first `limit` bytes of a body; the rest is left unread."""
    content = bytearray()
    for chunk in chunks:
        content += chunk
        if len(content) >= limit:
            break
    return bytes(content[:limit])


async def _aread_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """`_read_capped` for an async body."""
    content = bytearray()
    async for chunk in chunks:
        content += chunk
        if len(content) >= limit:
            break
    return bytes(content[:limit])


def _json_or_none(content: bytes | str) -> Any:
    """`content` parsed as JSON, or ``None`` if it is not JSON."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _usage_counts(usage: Any) -> dict[str, int] | None:
    """A usage object's prompt and completion counts, or ``None`` if either is not a count."""
    if not isinstance(usage, dict):
        return None
    counts = {key: usage.get(key) for key in ("prompt_tokens", "completion_tokens")}
    return counts if all(_is_count(count) for count in counts.values()) else None


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
