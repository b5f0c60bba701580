"""A loopback OpenAI-compatible completions server whose answers each test writes.

GET (the model list) says the server is vLLM; a POST to ``.../completions`` is answered by
the test's function; any other POST (``/tokenize``) gets a 404, so usage comes from the
stream or is left out.
"""

import http.server
import json
import threading
from collections.abc import Callable

Reply = tuple[int, str, bytes]
"""HTTP status, content type and body."""


def event_stream(events: list[dict]) -> Reply:
    """A 200 server-sent-event stream of `events`, then ``[DONE]``."""
    lines = [f"data: {json.dumps(event)}" for event in events] + ["data: [DONE]"]
    return 200, "text/event-stream", ("\n\n".join(lines) + "\n\n").encode()


def json_reply(status: int, body: dict) -> Reply:
    """A JSON reply (an error body, say) with `status`."""
    return status, "application/json", json.dumps(body).encode()


class CompletionsServer:
    """Serves on 127.0.0.1 until `close`; each completion request's JSON body goes to `answer`."""

    def __init__(self, answer: Callable[[dict], Reply]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._send(json_reply(200, {"data": [{"id": "m", "owned_by": "vllm"}]}))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.path.endswith("/completions"):
                    self._send(json_reply(404, {}))
                    return
                self._send(answer(body))

            def _send(self, reply: Reply) -> None:
                status, kind, data = reply
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
