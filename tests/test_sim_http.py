"""The fakes' HTTP server (`daemon.sim.http`): keep-alive, parsing, handler failures, shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from daemon.sim.http import HttpRequest, HttpResponse, HttpServer


async def echo(request: HttpRequest) -> HttpResponse:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    body = request.json() if request.body else None
    return HttpResponse.json(
        200,
        {"method": request.method, "path": request.path, "query": request.query, "body": body},
        [("X-Seen-Agent", request.headers.get("user-agent", ""))],
    )


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    async with HttpServer(echo) as srv:
        yield srv


def raw_get(path: str, *, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return status, await reader.readexactly(length)


async def test_keep_alive_serves_several_requests_on_one_connection(server: HttpServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for i in range(3):
            writer.write(raw_get(f"/n{i}"))
            status, body = await read_response(reader)
            assert status == 200
            assert json.loads(body)["path"] == f"/n{i}"
    finally:
        writer.close()
    assert server.requests == [("GET", "/n0"), ("GET", "/n1"), ("GET", "/n2")]


async def test_connection_close_is_honoured(server: HttpServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw_get("/once", close=True))
    status, _ = await read_response(reader)
    assert status == 200
    async with asyncio.timeout(2):
        assert await reader.read() == b""  # the server hung up
    writer.close()


async def test_query_headers_and_json_body_reach_the_handler(server: HttpServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        reply = await client.post(
            "/v1/x", params={"a": "1", "b": ["2", "3"]}, json={"k": [1, 2]}, headers={"User-Agent": "t/1"}
        )
    assert reply.status_code == 200
    assert reply.headers["X-Seen-Agent"] == "t/1"
    assert reply.json() == {
        "method": "POST",
        "path": "/v1/x",
        "query": {"a": ["1"], "b": ["2", "3"]},
        "body": {"k": [1, 2]},
    }
    assert server.requests == [("POST", "/v1/x?a=1&b=2&b=3")]


async def test_a_handler_exception_is_a_500_and_the_connection_survives(server: HttpServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        failed = await client.get("/boom")
        after = await client.get("/fine")
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal"}
    assert after.status_code == 200


async def test_close_ends_idle_keep_alive_connections() -> None:
    server = HttpServer(echo)
    await server.start()
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw_get("/first"))
    await read_response(reader)  # the connection is now idle, waiting for a next request
    async with asyncio.timeout(2):
        await server.close()
        assert await reader.read() == b""
    writer.close()
    with pytest.raises(RuntimeError, match="started"):
        _ = server.url
