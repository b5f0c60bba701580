"""A hostile OpenAI-compatible server on loopback, for remote mode's tests.

`HostileServer` listens on 127.0.0.1 in a thread and answers ``GET /v1/models``,
``POST /v1/completions`` and ``POST /tokenize`` with scripted behaviours: well-formed streams,
but also bytes dripped slowly, headers dripped slowly, a line that never ends, a stream that
never ends, malformed payloads, error pages, redirects, an echo of the API key. Every loop is
bounded in count and in time, and the server stops by itself after `HostileServer.lifetime`
seconds even if a test forgets it.
"""

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """What the client sent."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class Out:
    """The client's socket, for a behaviour to write to; every write stops with the server."""

    def __init__(self, conn: socket.socket, server: "HostileServer") -> None:
        self.conn = conn
        self.server = server
        self.sent = 0

    @property
    def alive(self) -> bool:
        return not self.server.stopped

    def send(self, data: bytes) -> bool:
        """Send `data`; false once the client has gone or the server is stopping."""
        if not self.alive:
            return False
        try:
            self.conn.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        self.server.sent += len(data)
        return True

    def drip(self, data: bytes, interval: float) -> bool:
        """Send `data` a byte at a time, `interval` seconds apart."""
        for index in range(len(data)):
            if not self.send(data[index : index + 1]):
                return False
            time.sleep(interval)
        return True


Behaviour = Callable[[Out, Request], None]


def headers(status: int = 200, kind: str = "text/event-stream", **extra: str) -> bytes:
    """A response head; the body ends when the connection closes."""
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {kind}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sse(text: str | None = "", finish: str | None = None, usage: dict | None = None) -> str:
    """One completion chunk as a ``data:`` line."""
    event: dict[str, Any] = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage:
        event["usage"] = usage
    return f"data: {json.dumps(event)}"


def stream(*lines: str, kind: str = "text/event-stream", status: int = 200) -> Behaviour:
    """Send `lines` as server-sent events (a blank line after each), then close."""

    def behave(out: Out, request: Request) -> None:
        out.send(headers(status, kind) + b"".join(f"{line}\n\n".encode() for line in lines))

    return behave


def answer(*pieces: str, finish: str = "stop", usage: dict | None = None) -> Behaviour:
    """A well-formed answer: one event per piece, the finish, the usage, ``[DONE]``."""
    usage = usage or {"prompt_tokens": 3, "completion_tokens": len(pieces)}
    lines = [sse(piece) for piece in pieces]
    return stream(*lines, sse("", finish), f"data: {json.dumps({'usage': usage})}", "data: [DONE]")


def reply(
    status: int, body: str | bytes, kind: str = "application/json", **extra: str
) -> Behaviour:
    """A whole reply with a length."""
    data = body.encode() if isinstance(body, str) else body

    def behave(out: Out, request: Request) -> None:
        out.send(headers(status, kind, Content_Length=str(len(data)), **extra) + data)

    return behave


def drip_body(interval: float, text: str = "x" * 400) -> Behaviour:
    """The head at once, then one event carrying `text`, a byte every `interval` seconds."""

    def behave(out: Out, request: Request) -> None:
        if out.send(headers()):
            out.drip(f"{sse(text)}\n\n{sse('', 'stop')}\n\ndata: [DONE]\n\n".encode(), interval)

    return behave


def slow_headers(interval: float, pad: int = 400) -> Behaviour:
    """The head a byte every `interval` seconds (padded to `pad` bytes), then an answer."""

    def behave(out: Out, request: Request) -> None:
        if out.drip(headers(X_Pad="p" * pad), interval):
            out.send(f"{sse('Hi', 'stop')}\n\ndata: [DONE]\n\n".encode())

    return behave


def silent(out: Out, request: Request) -> None:
    """Accept the request and never answer (until the server stops)."""
    while out.alive:
        time.sleep(0.02)


def no_newline(limit: int = 64 << 20) -> Behaviour:
    """A ``data:`` line that never ends: 64 KiB at a time, up to `limit` bytes."""

    def behave(out: Out, request: Request) -> None:
        chunk = b"x" * (64 << 10)
        if out.send(headers() + b"data: "):
            while out.sent < limit and out.send(chunk):
                pass

    return behave


def endless(line: str = sse("tok"), limit: int = 50_000) -> Behaviour:
    """The same event over and over, never a finish, up to `limit` events."""

    def behave(out: Out, request: Request) -> None:
        data = f"{line}\n\n".encode()
        if out.send(headers()):
            for _ in range(limit):
                if not out.send(data):
                    return

    return behave


def tokenize_words(out: Out, request: Request) -> None:
    """Tokenize as a BOS and one token per word of the text (llama-cpp-python's ``input``)."""
    words = str((request.body or {}).get("input", "")).split()
    reply(200, json.dumps({"tokens": [1] + [7] * len(words)}))(out, request)


def echo_key(status: int = 401) -> Behaviour:
    """An error whose message repeats the Authorization header it was sent."""

    def behave(out: Out, request: Request) -> None:
        given = request.headers.get("authorization", "")
        body = json.dumps({"error": {"message": f"Invalid key in header '{given}'"}})
        reply(status, body)(out, request)

    return behave


@dataclass
class HostileServer:
    """A loopback server answering with scripted behaviours; a context manager.

    `completions` answers ``POST /v1/completions``; `tokenize` answers ``POST /tokenize``
    (404 when ``None``); `models` answers ``GET /v1/models`` (a vLLM model list when ``None``).
    They may be replaced between requests.
    """

    completions: Behaviour = field(default_factory=lambda: answer("Hi", " there"))
    tokenize: Behaviour | None = None
    models: Behaviour | None = None
    lifetime: float = 60.0
    requests: list[Request] = field(default_factory=list)
    sent: int = 0
    """Bytes sent so far, over all connections."""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self._started = time.monotonic()
        self._threads: list[threading.Thread] = []

    @property
    def stopped(self) -> bool:
        if time.monotonic() - self._started > self.lifetime:
            self._stop.set()
        return self._stop.is_set()

    def __enter__(self) -> "HostileServer":
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        out = Out(conn, self)
        try:
            request = self._read(conn)
            if request is None:
                return
            self.requests.append(request)
            if request.method == "GET" and request.path.endswith("/models"):
                body = json.dumps({"data": [{"id": "m", "owned_by": "vllm"}]})
                (self.models or reply(200, body))(out, request)
            elif request.path.endswith("/completions"):
                self.completions(out, request)
            elif request.path.endswith("/tokenize") and self.tokenize is not None:
                self.tokenize(out, request)
            else:
                reply(404, '{"error": "not found"}')(out, request)
        finally:
            conn.close()

    def _read(self, conn: socket.socket) -> Request | None:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 1 << 16:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return None
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            first, *lines = head.decode("latin-1").split("\r\n")
            fields = dict(line.split(": ", 1) for line in lines if ": " in line)
            fields = {name.lower(): value for name, value in fields.items()}
            length = int(fields.get("content-length", 0))
            while len(body) < length:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return None
                body += chunk
        except OSError:
            return None
        method, path, _ = first.split(" ", 2)
        return Request(method, path, fields, json.loads(body) if body else None)
