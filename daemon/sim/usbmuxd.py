"""A simulated usbmuxd on a UNIX socket, speaking the real plist protocol (version 1).

Faithful enough that pymobiledevice3's `usbmux.list_devices()` and `lockdown.create_using_usbmux()`
work against it unchanged (point `USBMUXD_SOCKET_ADDRESS` at `socket_path`; pymobiledevice3 takes a
bare path, since a value with a colon is read as HOST:PORT). Answered, as `src/client.c` does:

* `ReadBUID`, `ListDevices`, `Listen` (Result 0, one `Attached` per present device, then
  `Attached` / `Detached` / `Paired` as they happen, tag 0);
* `Connect` (`PortNumber` in network byte order): port 62078 becomes a fake lockdownd
  (`daemon.sim.lockdownd`) on the same stream; a port lockdownd handed out for `StartService` (one
  connection per start, like a real device) becomes that service (`services`, see
  `daemon.sim.services`); any other port `CONNREFUSED` (3), an unknown DeviceID `BADDEV` (2), no
  PortNumber `BADCOMMAND` (1);
* `ReadPairRecord` (`Result 2`, ENOENT, when there is none: pymobiledevice3 reads the missing
  `PairRecordData` as "not paired" and moves on), `SavePairRecord` (`Paired` to listeners when the
  DeviceID is attached), `DeletePairRecord`;
* anything else: `BADCOMMAND`. Binary-protocol (version 0) requests get a version-0 `RESULT` of
  `BADVERSION` (6): the binary protocol is not implemented.

Every attach gets a new DeviceID and a new devnum on its bus, LocationID `(bus << 16) | devnum` like
Linux usbmuxd; ProductID 0x12A8 for an iPhone, 0x12AB for an iPad. Recovery and DFU devices are not on
usbmuxd (they are libusb devices), so attaching one in those modes only empties its port.

`stop()` is a usbmuxd restart: every client connection (listeners and device streams) is closed and
the socket disappears until `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import plistlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.ios.base import DeviceInfo, DeviceMode
from daemon.sim.devices import SimDevice
from daemon.sim.lockdownd import LockdownSession, LockdownState
from daemon.sim.services import DeviceService, run_service
from daemon.usb.usbmux_protocol import (
    LOCKDOWN_PORT,
    MessageType,
    Packet,
    PacketDecoder,
    Result,
    UsbmuxProtocolError,
    Version,
    bus_devnum_to_location,
    encode_plist,
    encode_result,
)

log = structlog.get_logger("benchhub.usbmux")

PRODUCT_IDS = {"iPhone": 0x12A8, "iPad": 0x12AB, "iPod": 0x12AA}
HIGH_SPEED = 480_000_000
FIRST_SERVICE_PORT = 49152
"""lockdownd hands out service ports from the dynamic range (the research trace saw 49153)."""

PortHandler = Callable[["MuxDevice", asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]
"""Serves a `Connect` to an extra device port: (device, reader, writer, bytes already received)."""


@dataclass
class MuxDevice:
    """A device as usbmuxd sees it, for one attach."""

    device_id: int
    usb_path: str
    location_id: int
    product_id: int
    connection_type: str
    speed: int
    lockdown: LockdownState

    @property
    def udid(self) -> str:
        return self.lockdown.info.udid

    def properties(self) -> dict[str, Any]:
        return {
            "ConnectionSpeed": self.speed,
            "ConnectionType": self.connection_type,
            "DeviceID": self.device_id,
            "LocationID": self.location_id,
            "ProductID": self.product_id,
            "SerialNumber": self.udid,
        }

    def attached(self) -> dict[str, Any]:
        return {"MessageType": "Attached", "DeviceID": self.device_id, "Properties": self.properties()}


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.listening = False

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)


def bus_of(usb_path: str) -> int:
    """The bus number of a Linux sysfs USB path (`3-2.4` → 3)."""
    head = usb_path.split("-", 1)[0]
    return int(head) if head.isdigit() else 1


class FakeUsbmuxd:
    def __init__(
        self, socket_path: str | Path, *, buid: str = "00000000-BE9C-4B1D-8DD7-BENCHHUB0001"
    ) -> None:
        self.socket_path = str(socket_path)
        self.buid = buid
        self.devices: dict[int, MuxDevice] = {}
        self.pair_records: dict[str, bytes] = {}
        self.lockdown: dict[str, LockdownState] = {}
        """Per-UDID lockdownd state; outlives attaches, like the device's own memory."""
        self.port_handlers: dict[int, PortHandler] = {}
        self.services: dict[str, DeviceService] = {}
        """Lockdown services every device offers, by name (`StartService`)."""
        self._service_ports: dict[tuple[int, int], DeviceService] = {}
        self._next_service_port = FIRST_SERVICE_PORT
        self.requests: list[str] = []
        """Every MessageType received, in order (for tests)."""
        self._next_device_id = 1
        self._next_devnum: dict[int, int] = {}
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._streams: dict[int, set[asyncio.StreamWriter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self, *, renumber: bool = False) -> None:
        """Listen on `socket_path`. `renumber=True` models a new usbmuxd process: DeviceIDs restart
        at 1 and the devices still plugged in get new ones (their LocationIDs do not change)."""
        if self._server is not None:
            return
        if renumber:
            self._next_device_id = 1
            old, self.devices = self.devices, {}
            for device in old.values():
                device.device_id = self._new_device_id()
                self.devices[device.device_id] = device
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.socket_path)

    async def stop(self) -> None:
        """Stop like a usbmuxd that exits: close every connection and remove the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for client in list(self._clients):
            client.writer.close()
        for streams in self._streams.values():
            for writer in streams:
                writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def __aenter__(self) -> FakeUsbmuxd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the simulated bench ----------------------------------------------------------------------

    def attach(
        self,
        device: DeviceInfo | SimDevice,
        usb_path: str,
        mode: DeviceMode | None = None,
        *,
        connection_type: str = "USB",
        speed: int = HIGH_SPEED,
        devnum: int | None = None,
    ) -> MuxDevice | None:
        """A device enumerated on `usb_path`: whatever was there leaves first. Returns the new
        usbmuxd entry, or None for Recovery/DFU (not usbmuxd devices). `devnum` is the kernel's
        device number for this enumeration (a simulated bus that also writes sysfs passes its own,
        so LocationID and sysfs agree); by default the next free one on the bus."""
        if isinstance(device, SimDevice):
            mode = mode or device.mode
            device = device.info()
        mode = mode or DeviceMode.NORMAL
        self.detach(usb_path=usb_path)
        if mode in (DeviceMode.RECOVERY, DeviceMode.DFU):
            return None
        self.detach(udid=device.udid)  # a device is on one port at a time
        state = self.lockdown.get(device.udid)
        if state is None:
            state = self.lockdown[device.udid] = LockdownState(info=device)
        state.info, state.mode = device, mode
        bus = bus_of(usb_path)
        entry = MuxDevice(
            device_id=self._new_device_id(),
            usb_path=usb_path,
            location_id=bus_devnum_to_location(bus, devnum if devnum is not None else self._new_devnum(bus)),
            product_id=PRODUCT_IDS.get(device.device_class, 0x12A8),
            connection_type=connection_type,
            speed=speed,
            lockdown=state,
        )
        self.devices[entry.device_id] = entry
        self._notify(entry.attached())
        log.debug("usbmuxd_attached", device_id=entry.device_id, udid=entry.udid, usb_path=usb_path)
        return entry

    def detach(
        self, *, usb_path: str | None = None, udid: str | None = None, device_id: int | None = None
    ) -> bool:
        """The device on `usb_path` (or with that UDID / DeviceID) left USB; False if there was none.
        Its open device streams are closed."""
        for entry in list(self.devices.values()):
            if (
                (usb_path is not None and entry.usb_path == usb_path)
                or (udid is not None and entry.udid == udid)
                or (device_id is not None and entry.device_id == device_id)
            ):
                del self.devices[entry.device_id]
                for key in [k for k in self._service_ports if k[0] == entry.device_id]:
                    del self._service_ports[key]
                for writer in self._streams.pop(entry.device_id, set()):
                    writer.close()
                self._notify({"MessageType": "Detached", "DeviceID": entry.device_id})
                log.debug("usbmuxd_detached", device_id=entry.device_id, udid=entry.udid)
                return True
        return False

    def device_at(self, usb_path: str) -> MuxDevice | None:
        return next((d for d in self.devices.values() if d.usb_path == usb_path), None)

    def usb_path_for_location(self, location_id: int) -> str | None:
        """What sysfs would say lives at this (busnum, devnum)."""
        return next((d.usb_path for d in self.devices.values() if d.location_id == location_id), None)

    def inject(self, data: bytes, *, listeners_only: bool = True) -> int:
        """Write raw bytes to connected clients (listeners only by default); returns how many."""
        targets = [c for c in self._clients if c.listening or not listeners_only]
        for client in targets:
            client.send(data)
        return len(targets)

    def inject_plist(self, message: dict[str, Any], tag: int = 0) -> int:
        return self.inject(encode_plist(message, tag))

    def _start_service(self, device: MuxDevice, name: str) -> tuple[int, bool] | None:
        """lockdownd's StartService: a port for one connection to the service, and whether it is TLS."""
        service = self.services.get(name)
        if service is None or self.devices.get(device.device_id) is not device:
            return None
        port = self._next_service_port
        self._next_service_port = port + 1 if port < 0xFFFF else FIRST_SERVICE_PORT
        self._service_ports[(device.device_id, port)] = service
        return port, service.ssl

    def _enter_recovery(self, device: MuxDevice) -> None:
        """lockdownd's EnterRecovery: the device leaves usbmuxd (Recovery is a libusb device)."""
        self.attach(device.lockdown.info, device.usb_path, DeviceMode.RECOVERY)

    def _new_device_id(self) -> int:
        device_id = self._next_device_id
        self._next_device_id += 1
        return device_id

    def _new_devnum(self, bus: int) -> int:
        """The next free device number on the bus (1 is the root hub), wrapping at 127 like Linux."""
        used = {d.location_id & 0xFFFF for d in self.devices.values() if d.location_id >> 16 == bus}
        devnum = self._next_devnum.get(bus, 2)
        while devnum in used:
            devnum = devnum + 1 if devnum < 127 else 2
        self._next_devnum[bus] = devnum + 1 if devnum < 127 else 2
        return devnum

    def _notify(self, message: dict[str, Any]) -> None:
        data = encode_plist(message, 0)
        for client in self._clients:
            if client.listening:
                client.send(data)

    # -- the socket -------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        decoder = PacketDecoder()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                try:
                    packets = decoder.feed(data)
                except UsbmuxProtocolError as exc:
                    log.warning("usbmuxd_bad_packet", error=str(exc))
                    return
                for packet in packets:
                    connected = self._handle(client, packet)
                    await writer.drain()
                    if connected is not None:
                        self._clients.discard(client)
                        await self._run_stream(connected, reader, writer, decoder.take_buffer())
                        return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(client)
            writer.close()
            self._tasks.discard(task)

    def _handle(self, client: _Client, packet: Packet) -> tuple[MuxDevice, int] | None:  # noqa: PLR0912
        """Answer one request; returns (device, port) when the connection now belongs to a device."""
        if packet.version != Version.PLIST:
            client.send(encode_result(packet.tag, Result.BADVERSION, Version.BINARY))
            return None
        if packet.message != MessageType.PLIST:
            client.send(encode_result(packet.tag, Result.BADCOMMAND))
            return None
        try:
            message = plistlib.loads(packet.payload)
        except Exception:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("MessageType"), str):
            client.send(encode_result(packet.tag, Result.BADCOMMAND))
            return None
        kind: str = message["MessageType"]
        self.requests.append(kind)
        tag = packet.tag
        if kind == "ReadBUID":
            client.send(encode_plist({"BUID": self.buid}, tag))
        elif kind == "ListDevices":
            devices = [d.attached() for d in self.devices.values()]
            client.send(encode_plist({"DeviceList": devices}, tag))
        elif kind == "Listen":
            client.send(encode_result(tag, Result.OK))
            client.listening = True
            for device in self.devices.values():
                client.send(encode_plist(device.attached(), 0))
        elif kind == "Connect":
            return self._connect(client, message, tag)
        elif kind == "ReadPairRecord":
            record = self.pair_records.get(str(message.get("PairRecordID")))
            if record is None:
                client.send(encode_result(tag, Result.BADDEV))  # ENOENT
            else:
                client.send(encode_plist({"PairRecordData": record}, tag))
        elif kind == "SavePairRecord":
            record_id, data = message.get("PairRecordID"), message.get("PairRecordData")
            if not isinstance(record_id, str) or not isinstance(data, bytes):
                client.send(encode_result(tag, Result.BADCOMMAND))
                return None
            self.pair_records[record_id] = data
            client.send(encode_result(tag, Result.OK))
            device_id = message.get("DeviceID")
            if isinstance(device_id, int) and device_id in self.devices:
                self._notify({"MessageType": "Paired", "DeviceID": device_id})
        elif kind == "DeletePairRecord":
            found = self.pair_records.pop(str(message.get("PairRecordID")), None) is not None
            client.send(encode_result(tag, Result.OK if found else Result.BADDEV))
        else:
            client.send(encode_result(tag, Result.BADCOMMAND))
        return None

    def _connect(self, client: _Client, message: dict[str, Any], tag: int) -> tuple[MuxDevice, int] | None:
        device_id = message.get("DeviceID")
        device = self.devices.get(device_id) if isinstance(device_id, int) else None
        port_number = message.get("PortNumber")
        if device is None:
            client.send(encode_result(tag, Result.BADDEV))
            return None
        if not isinstance(port_number, int) or not 0 <= port_number <= 0xFFFF:
            client.send(encode_result(tag, Result.BADCOMMAND))
            return None
        port = socket.ntohs(port_number)
        started = (device.device_id, port) in self._service_ports
        if port != LOCKDOWN_PORT and port not in self.port_handlers and not started:
            client.send(encode_result(tag, Result.CONNREFUSED))
            return None
        client.send(encode_result(tag, Result.OK))
        return device, port

    async def _run_stream(
        self,
        target: tuple[MuxDevice, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        initial: bytes,
    ) -> None:
        device, port = target
        streams = self._streams.setdefault(device.device_id, set())
        streams.add(writer)
        try:
            if port == LOCKDOWN_PORT:
                session = LockdownSession(
                    device.lockdown,
                    reader,
                    writer,
                    on_enter_recovery=lambda: self._enter_recovery(device),
                    on_start_service=lambda name: self._start_service(device, name),
                )
                await session.run(initial)
            elif (service := self._service_ports.pop((device.device_id, port), None)) is not None:
                await run_service(service, device, reader, writer, initial)
            elif (handler := self.port_handlers.get(port)) is not None:
                await handler(device, reader, writer, initial)
            # else: a second Connect to a one-shot service port; the connection is just closed
        finally:
            streams.discard(writer)
