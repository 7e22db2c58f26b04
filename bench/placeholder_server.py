"""A loopback HTTP server that answers every GET with one small JPEG: the image host of ``bench scale --images``,
so that its memory and time figures include fetching each selected record's image (img2dataset) and writing it
into the tars, as a build over a URL-only pool does."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def placeholder_jpeg(size: int = 96, seed: int = 0) -> bytes:
    """A noisy JPEG of about 10 kB (noise: the encoder and img2dataset's resize do real work on it)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


class PlaceholderServer:
    """``with PlaceholderServer() as url:`` serves ``<url>/<anything>`` until the block ends; counts requests."""

    def __init__(self) -> None:
        body = placeholder_jpeg()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
