"""A minimal asyncio HTTP endpoint for Prometheus: ``GET /metrics`` (and ``/healthz``), nothing else.

It runs on the service's own event loop, so a scrape reads the aggregates
without locks or threads. Requests are read with a size and time limit; any
malformed request gets a 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0


class MetricsServer:
    """Serves ``render()`` at ``/metrics`` on ``host:port``."""

    def __init__(self, render: Callable[[], bytes], host: str, port: int) -> None:
        self._render = render
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def start(self) -> None:
        """Bind and serve; raises ``OSError`` naming the port when it is taken."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise OSError(f"telemetry metrics port {self.host}:{self.port} unavailable: {exc.strerror}") from exc
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, content_type, body = self._respond(head[:MAX_REQUEST_BYTES])
            if head.startswith(b"HEAD "):
                body = b""
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._render()
        if path in (b"/", b"/healthz"):
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics\n"
