"""A small HTTP/1.1 server for the fake Apple services: h11 parses, asyncio streams carry bytes.

The fakes must speak real HTTP so that the daemon's real HTTP client (connection reuse, headers,
status codes, bodies) is what gets tested. A web framework would be a heavy dependency for a
handful of routes; h11 is the sans-IO HTTP implementation the client stack already uses, so the
server is this one loop. Handlers are plain `async (HttpRequest) -> HttpResponse` callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import structlog

log = structlog.get_logger(__name__)

MAX_BODY = 1 << 20
"""Bodies larger than this are refused (413): the fakes never need more, and a test client that
sends more is buggy."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    """The request target as sent (path plus query string)."""
    headers: dict[str, str]
    """Header names lower-cased; a repeated header keeps its last value."""
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError for anything else."""
        return json.loads(self.body)


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
        return cls(
            status,
            json.dumps(payload).encode(),
            [("Content-Type", "application/json"), *(headers or [])],
        )


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class HttpServer:
    """Serves one handler on a loopback port, with keep-alive, until closed.

    `requests` records (method, target) of every request served, in order: tests count requests
    with it (the Business Manager API is rate limited, so request counts are a product property).
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.requests: list[tuple[str, str]] = []

    def bind(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Take the port now, serve it once started: clients made before the event loop runs (a
        station's collaborators are built in its constructor) then know the URL."""
        if self._sock is None:
            self._sock = socket.create_server((host, port))
        return self.url

    @property
    def url(self) -> str:
        if self._server is not None:
            sock = self._server.sockets[0]
        elif self._sock is not None:
            sock = self._sock
        else:
            raise RuntimeError("the server is neither bound nor started")
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=self._sock)
        else:
            self._server = await asyncio.start_server(self._serve, host, port)
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, reader)
                if request is None:
                    return
                self.requests.append((request.method, request.target))
                try:
                    response = await self._handler(request)
                except Exception:  # a fake's bug must show as a 500, as a real server's would
                    log.exception("fake_http_handler_failed", target=request.target)
                    response = HttpResponse.json(500, {"error": "internal"})
                writer.write(self._encode(conn, response))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, h11.LocalProtocolError):
            return
        except asyncio.CancelledError:
            # The top of a connection task, cancelled by close(): ending quietly is the point
            # (asyncio's stream callback would otherwise log the cancellation as an error).
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> HttpRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                return HttpRequest(
                    method=head.method.decode(),
                    target=head.target.decode(),
                    headers={k.decode().lower(): v.decode("latin-1") for k, v in head.headers},
                    body=bytes(body),
                )
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    @staticmethod
    def _encode(conn: h11.Connection, response: HttpResponse) -> bytes:
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body:
            out += conn.send(h11.Data(data=response.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        return out
