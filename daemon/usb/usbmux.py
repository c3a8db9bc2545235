"""Our own usbmuxd `Listen` client: which device (UDID) is at which USB location.

pymobiledevice3 drops `LocationID`, `ProductID` and `ConnectionSpeed` from `Attached`; the station
needs the LocationID (`(bus << 16) | devnum` on Linux) to find the hub port. So this client speaks
the plist protocol itself (framing in `daemon.usb.usbmux_protocol`) and yields typed events:

    async for event in UsbmuxClient().events():
        match event:
            case UsbmuxAttached(device_id, udid, location_id, product_id, connection_type, speed): ...
            case UsbmuxDetached(device_id, udid, location_id, product_id): ...

Only `Listen` is sent: usbmuxd answers `Result 0` and then writes one `Attached` per present device
before any other event (`start_listen` in `src/client.c`), so there is no gap between "what is
there" and "what happens next", and no second request on the socket. That burst has no end marker,
so the client collects it until the socket has been quiet for `settle` seconds and then reconciles it
with what it knew: after a reconnect, devices that vanished while it was away get a `Detached`
(first) and new ones an `Attached` (after); devices still there with the same DeviceID, UDID and
LocationID yield nothing. A device that came and went inside the settle window is not reported.

Only USB devices are reported (`ConnectionType == "USB"`); Network (Wi-Fi sync) entries are ignored.
Any failure (usbmuxd not running, the socket dropped, which Linux usbmuxd does on replugs, or a
malformed packet) is logged and followed by a reconnect after `backoff_delay`; the iterator itself
never raises except on cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Final

import structlog

from daemon.backoff import backoff_delay
from daemon.usb.usbmux_protocol import (
    PacketDecoder,
    Result,
    UsbmuxAttached,
    UsbmuxDetached,
    UsbmuxPaired,
    UsbmuxProtocolError,
    decode_plist,
    location_to_bus_devnum,
    parse_device_list,
    parse_device_message,
    parse_result,
    request,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "UsbmuxAttached",
    "UsbmuxClient",
    "UsbmuxDetached",
    "UsbmuxError",
    "UsbmuxEvent",
    "UsbmuxProtocolError",
    "list_devices",
    "location_to_bus_devnum",
    "resolve_address",
]

log = structlog.get_logger("benchhub.usbmux")

DEFAULT_ADDRESS: Final = "/var/run/usbmuxd"
ENV_VAR: Final = "USBMUXD_SOCKET_ADDRESS"

UsbmuxEvent = UsbmuxAttached | UsbmuxDetached


class UsbmuxError(Exception):
    """usbmuxd refused a request (its Result number is `code`)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def resolve_address(address: str | Path | None = None) -> tuple[str, int] | str:
    """Where usbmuxd listens: `address`, else `$USBMUXD_SOCKET_ADDRESS`, else /var/run/usbmuxd.
    `HOST:PORT` means TCP (as in pymobiledevice3); `UNIX:/path` (libusbmuxd's spelling) and a bare
    path mean a UNIX socket."""
    if isinstance(address, Path):
        return str(address)
    value = address or os.environ.get(ENV_VAR) or DEFAULT_ADDRESS
    if value.startswith("UNIX:"):
        return value[len("UNIX:") :]
    if ":" in value:
        host, _, port = value.rpartition(":")
        return host, int(port)
    return value


async def _open(address: tuple[str, int] | str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address)
    return await asyncio.open_connection(*address)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = PacketDecoder()
        self.pending: list[dict[str, object]] = []
        self.tag = 0

    async def send(self, message_type: str) -> int:
        self.tag += 1
        self.writer.write(request(message_type, self.tag))
        await self.writer.drain()
        return self.tag

    async def receive(self, wait: float | None) -> dict[str, object] | None:
        """The next message; None on timeout. Raises ConnectionError at EOF."""
        deadline = None if wait is None else time.monotonic() + wait
        while not self.pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("usbmuxd closed the connection")
            self.pending.extend(decode_plist(p) for p in self.decoder.feed(data))
        return self.pending.pop(0)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class UsbmuxClient:
    def __init__(
        self,
        address: str | Path | None = None,
        *,
        settle: float = 0.2,
        reply_timeout: float = 5.0,
        backoff: Callable[[int], float] = backoff_delay,
    ) -> None:
        self.address = resolve_address(address)
        """Resolved once, here, so a bad `USBMUXD_SOCKET_ADDRESS` fails at construction (ValueError)."""
        self.settle = settle
        self.reply_timeout = reply_timeout
        self.backoff = backoff
        self._devices: dict[int, UsbmuxAttached] = {}
        self.connected = False
        self.connects = 0
        """Successful `Listen`s so far (tests watch it to see a reconnect)."""

    @property
    def devices(self) -> Mapping[int, UsbmuxAttached]:
        """The USB devices reported and not yet detached, by DeviceID."""
        return self._devices

    async def events(self) -> AsyncIterator[UsbmuxEvent]:
        """Attach and detach events for ever, across usbmuxd restarts, starting with the devices
        already present."""
        failures = 0
        while True:
            conn: _Connection | None = None
            try:
                conn = _Connection(*await asyncio.wait_for(_open(self.address), self.reply_timeout))
                tag = await conn.send("Listen")
                reply = await conn.receive(self.reply_timeout)
                if reply is None:
                    raise TimeoutError("no reply to Listen")
                number = parse_result(reply)
                if number != Result.OK:
                    raise UsbmuxError(f"usbmuxd refused Listen (tag {tag}): {number}", number)
                self.connected, failures = True, 0
                self.connects += 1
                log.info("usbmux_listening", address=str(self.address), known=len(self._devices))
                for event in await self._resync(conn):
                    yield event
                while True:
                    message = await conn.receive(None)
                    assert message is not None
                    for event in self._apply(parse_device_message(message)):
                        yield event
            except (OSError, UsbmuxError, UsbmuxProtocolError) as exc:
                # OSError covers ConnectionError and TimeoutError; a protocol error means the stream is
                # out of sync, so it is dropped the same way.
                delay = self.backoff(failures)
                failures += 1
                report = log.warning if isinstance(exc, UsbmuxProtocolError | UsbmuxError) else log.info
                report("usbmux_disconnected", error=f"{type(exc).__name__}: {exc}", retry_in=round(delay, 2))
            finally:
                self.connected = False
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(delay)

    async def _resync(self, conn: _Connection) -> list[UsbmuxEvent]:
        """Collect the Listen burst until the socket is quiet, then diff it with what we knew."""
        burst: dict[int, UsbmuxAttached] = {}
        while (message := await conn.receive(self.settle)) is not None:
            parsed = parse_device_message(message)
            if isinstance(parsed, UsbmuxAttached):
                if parsed.connection_type == "USB":
                    burst[parsed.device_id] = parsed
            elif isinstance(parsed, UsbmuxDetached):
                burst.pop(parsed.device_id, None)
        events: list[UsbmuxEvent] = []
        for device_id, known in list(self._devices.items()):
            if burst.get(device_id) != known:
                del self._devices[device_id]
                events.append(_detached(known))
        for device_id, device in burst.items():
            if device_id not in self._devices:
                self._devices[device_id] = device
                events.append(device)
        return events

    def _apply(self, message: UsbmuxAttached | UsbmuxDetached | UsbmuxPaired) -> list[UsbmuxEvent]:
        if isinstance(message, UsbmuxAttached):
            if message.connection_type != "USB":
                return []
            known = self._devices.get(message.device_id)
            if known == message:
                return []  # a duplicate
            self._devices[message.device_id] = message
            if known is not None:  # DeviceID reused without a Detached: should not happen
                log.warning("usbmux_device_id_reused", device_id=message.device_id)
                return [_detached(known), message]
            return [message]
        if isinstance(message, UsbmuxDetached):
            gone = self._devices.pop(message.device_id, None)
            return [] if gone is None else [_detached(gone)]
        return []  # Paired: nothing changes on USB


def _detached(device: UsbmuxAttached) -> UsbmuxDetached:
    return UsbmuxDetached(device.device_id, device.udid, device.location_id, device.product_id)


async def list_devices(
    address: str | Path | None = None, *, reply_timeout: float = 5.0
) -> list[UsbmuxAttached]:
    """A one-shot `ListDevices` (USB and Network entries, with their LocationIDs)."""
    reader, writer = await asyncio.wait_for(_open(resolve_address(address)), reply_timeout)
    conn = _Connection(reader, writer)
    try:
        await conn.send("ListDevices")
        reply = await conn.receive(reply_timeout)
        if reply is None:
            raise TimeoutError("no reply to ListDevices")
        return parse_device_list(reply)
    finally:
        await conn.close()
