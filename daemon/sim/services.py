"""Lockdown services of a simulated device: what a client reaches after lockdownd's `StartService`.

On a real device `StartService{Service}` makes lockdownd spawn the service and answer with a `Port`
(and `EnableServiceSSL`); the host then opens a *new* usbmuxd `Connect` to that port, and when
`EnableServiceSSL` is true the stream is TLS **from its first byte**
(pymobiledevice3 11.45 `LockdownClient.start_lockdown_service` →
`ServiceConnection.from_socket(ssl_context=...)`, which hands the socket to
`asyncio.open_connection(ssl=...)`). Most services then speak lockdownd's framing: a 4-byte
big-endian length and a plist (`service_connection.build_plist` / `recv_prefixed`).

This module holds the pieces every simulated service shares:

* `FrameDecoder` / `encode_frame`: the framing, sans-IO (bytes in, plists out; only
  `ServiceProtocolError` on bad input);
* `ServiceStream`: one accepted connection, plain or TLS. TLS runs through an in-memory
  `ssl.SSLObject` (`MemoryBIO`) rather than `StreamWriter.start_tls()`, because the client's
  ClientHello is usually already buffered by the time the stream is handed over (it follows
  usbmuxd's `Connect` result immediately) and `start_tls()` would not see buffered bytes;
* `DeviceService`: what the simulated usbmuxd (`daemon.sim.usbmuxd`) needs to offer a service.

The TLS server identity is the throwaway self-signed certificate lockdownd's session TLS uses;
pymobiledevice3 does not verify it (`create_ssl_context`: `CERT_NONE`).
"""

from __future__ import annotations

import asyncio
import plistlib
import ssl
import struct
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from daemon.sim.lockdownd import device_tls_context

if TYPE_CHECKING:
    from daemon.sim.usbmuxd import MuxDevice

log = structlog.get_logger("benchhub.usbmux")

MAX_FRAME: Final = 4 * 1024 * 1024
"""Largest service message accepted (profiles are small; this only bounds a corrupt length)."""

_LENGTH: Final = struct.Struct(">I")


class ServiceProtocolError(ValueError):
    """The peer sent something that is not a length-prefixed plist; the stream is out of sync."""


def encode_frame(message: Any) -> bytes:
    """One message as lockdownd-style services send it: big-endian length, then an XML plist (binary
    if XML cannot carry it, e.g. control characters that arrived in a binary-plist request)."""
    try:
        payload = plistlib.dumps(message)
    except ValueError:
        payload = plistlib.dumps(message, fmt=plistlib.FMT_BINARY)
    return _LENGTH.pack(len(payload)) + payload


def encode_raw_frame(payload: bytes) -> bytes:
    """Arbitrary bytes in a frame (used to simulate a device that sends a malformed reply)."""
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Sans-IO: feed bytes, get whole decoded plists (XML or binary, as `plistlib` reads both)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages: list[Any] = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > self._max_frame:
                raise ServiceProtocolError(f"frame of {size} bytes exceeds {self._max_frame}")
            if len(self._buffer) < _LENGTH.size + size:
                break
            payload = bytes(self._buffer[_LENGTH.size : _LENGTH.size + size])
            del self._buffer[: _LENGTH.size + size]
            try:
                messages.append(plistlib.loads(payload))
            except Exception as exc:  # plistlib raises several types for junk
                raise ServiceProtocolError(f"not a plist: {exc}") from exc
        return messages


class ServiceStream:
    """One client connection to a service, after usbmuxd's `Connect`: plain or TLS from the start.

    `initial` is whatever usbmuxd had already read past its `Connect` request; it belongs to this
    stream (for a TLS service it is usually the start of the ClientHello).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        initial: bytes = b"",
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._pending = bytes(initial)
        self._decoder = FrameDecoder()
        self._messages: list[Any] = []
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._tls: ssl.SSLObject | None = None
        if tls is not None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
            self._incoming.write(self._pending)
            self._pending = b""

    @property
    def is_tls(self) -> bool:
        return self._tls is not None

    async def handshake(self) -> None:
        """Complete the TLS handshake (a no-op for a plain service). Raises `ConnectionError` if the
        client goes away first, `ssl.SSLError` if it does not speak TLS."""
        if self._tls is None or self._incoming is None:
            return
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionError("client closed the connection during the TLS handshake") from None
                self._incoming.write(data)
            else:
                await self._flush()
                return

    async def receive(self) -> Any | None:
        """The next message, or None when the client has closed the connection."""
        while not self._messages:
            data = await self._read()
            if not data:
                return None
            self._messages.extend(self._decoder.feed(data))
        return self._messages.pop(0)

    async def send(self, message: Any) -> None:
        await self.send_raw(encode_frame(message))

    async def send_raw(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
            await self._flush()
        else:
            self._writer.write(data)
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def _read(self) -> bytes:
        if self._tls is None or self._incoming is None:
            if self._pending:
                data, self._pending = self._pending, b""
                return data
            return await self._reader.read(65536)
        while True:
            try:
                return self._tls.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._reader.read(65536)
                if not data:
                    return b""
                self._incoming.write(data)
            except ssl.SSLZeroReturnError:  # close_notify
                return b""

    async def _flush(self) -> None:
        if self._outgoing is None:
            return
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()


class DeviceService(Protocol):
    """A service lockdownd can start. `ssl` is what `StartService` answers as `EnableServiceSSL`."""

    @property
    def name(self) -> str: ...

    @property
    def ssl(self) -> bool: ...

    async def serve(self, device: MuxDevice, stream: ServiceStream) -> None:
        """Serve one connection; the caller has completed the TLS handshake and closes the stream."""
        ...


async def run_service(
    service: DeviceService,
    device: MuxDevice,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    initial: bytes,
) -> None:
    """Serve one usbmuxd `Connect` to a started service: TLS when the service says so, then its
    request loop. A client that vanishes or sends garbage only ends its own connection."""
    stream = ServiceStream(reader, writer, initial, tls=device_tls_context() if service.ssl else None)
    try:
        await stream.handshake()
        await service.serve(device, stream)
    except (ConnectionError, ssl.SSLError, ServiceProtocolError, asyncio.IncompleteReadError) as exc:
        log.debug("service_connection_ended", service=service.name, udid=device.udid, error=repr(exc))
    finally:
        stream.close()
