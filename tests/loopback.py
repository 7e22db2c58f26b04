"""Local stand-ins that speak real protocols: an HTTP image server for img2dataset and an OpenAI-compatible
chat-completions server for the caption-edit stage. Both run in a thread of the test process on 127.0.0.1."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_bytes(fmt: str, colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=fmt)
    return buffer.getvalue()


class Server:
    """A ThreadingHTTPServer on a free port; ``routes`` maps a path to a handler(request) -> (status, type, body),
    and every request is counted in ``hits``."""

    def __init__(self, routes: dict[str, Callable], fallback: Callable | None = None):
        self.routes = routes
        self.fallback = fallback
        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                owner.hits.append(self.path)
                handler = owner.routes.get(self.path.split("?")[0], owner.fallback)
                if handler is None:
                    status, ctype, body = 404, "text/plain", b"not found"
                else:
                    status, ctype, body = handler(self)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def static(body: bytes, ctype: str = "image/jpeg", status: int = 200) -> Callable:
    return lambda request: (status, ctype, body)


def slow(body: bytes, seconds: float) -> Callable:
    def handler(request):
        time.sleep(seconds)
        return 200, "image/jpeg", body

    return handler


def chat_completions(answer: Callable[[list[dict]], str | tuple[int, str]]) -> Callable:
    """An OpenAI-compatible ``/v1/chat/completions`` handler; ``answer(messages)`` gives the reply text, or
    (status, body) to fail the request."""

    def handler(request):
        length = int(request.headers.get("Content-Length", 0))
        payload = json.loads(request.rfile.read(length) or b"{}")
        reply = answer(payload.get("messages", []))
        if isinstance(reply, tuple):
            return reply[0], "application/json", json.dumps({"error": {"message": reply[1]}}).encode()
        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": payload.get("model", "test"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        }
        return 200, "application/json", json.dumps(body).encode()

    return handler
