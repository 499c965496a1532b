"""An HTTP proxy on loopback in front of a test S3 server (moto): it records every request (method and path),
can fail a chosen share of them and can add a fixed latency to each, so tests count the storage requests of
real code paths and inject transient faults, and benchmarks see S3-like round trips, without touching the
production client."""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class S3Proxy:
    """``endpoint`` forwards to ``upstream`` (``http://host:port``).

    Attributes:
        requests: ``(method, path)`` of every request received, path unquoted, query string dropped.
        fail: ``(method, path) -> bool``; a request for which it returns True is answered with an S3
            ``503 SlowDown`` instead of being forwarded (the client's retries then try again).
        latency: seconds added to each request before it is forwarded (a loopback server answers in about a
            millisecond, S3 in tens).
    """

    def __init__(self, upstream: str, latency: float = 0.0):
        self.latency = latency
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.requests: list[tuple[str, str]] = []
        self.fail: Callable[[str, str], bool] = lambda method, path: False
        self.failed = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_share(self, share: float, seed: int = 0, methods: tuple[str, ...] | None = None) -> None:
        """Fail about ``share`` of the requests (of ``methods``, or all), pseudo-randomly from ``seed``."""
        rng = random.Random(seed)
        self.fail = lambda method, path: (methods is None or method in methods) and rng.random() < share

    def count(self, prefix: str = "", method: str | None = None) -> int:
        """Requests whose path starts with ``prefix`` (``/bucket/key...``), of ``method`` or any."""
        with self._lock:
            return sum(
                1 for m, p in self.requests if p.startswith(prefix) and (method is None or m == method)
            )

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes | None:
                """The request body, also when it comes in HTTP chunks (the AWS SDK streams uploads so)."""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                method, path = self.command, unquote(urlsplit(self.path).path)
                with proxy._lock:
                    proxy.requests.append((method, path))
                    failing = proxy.fail(method, path)
                    proxy.failed += failing
                if proxy.latency:
                    time.sleep(proxy.latency)
                if failing:
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>injected fault</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(method, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                # A HEAD answer has no body but the object's length (what the client reads as its size).
                length = response.getheader("Content-Length") if method == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
