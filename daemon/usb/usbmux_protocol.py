"""usbmuxd wire protocol, sans-IO: bytes in, packets and typed messages out.

Every usbmuxd packet is a 16-byte little-endian header, `length` (including the header), `version`
(0 binary, 1 plist), `message` (8 = plist) and `tag` (a reply echoes its request's tag; unsolicited
events carry 0), then the payload. In plist mode (the only one spoken here) the payload is a plist
dictionary with a `MessageType` (libimobiledevice `usbmuxd` `src/client.c`).

Nothing here does I/O and nothing raises anything but `UsbmuxProtocolError` on bad input, so both
the client (`daemon.usb.usbmux`) and the simulated usbmuxd (`daemon.sim.usbmuxd`) can log a
malformed packet and reset the connection instead of crashing.
"""

from __future__ import annotations

import enum
import plistlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from daemon.usb.sysfs import location_id, split_location_id

HEADER: Final = struct.Struct("<IIII")
HEADER_SIZE: Final = HEADER.size
MAX_PACKET: Final = 4 * 1024 * 1024
"""Largest packet accepted (a ListDevices reply for a hundred devices is ~60 KiB)."""

LOCKDOWN_PORT: Final = 62078


class Version(enum.IntEnum):
    BINARY = 0
    PLIST = 1


class MessageType(enum.IntEnum):
    RESULT = 1
    CONNECT = 2
    LISTEN = 3
    DEVICE_ADD = 4
    DEVICE_REMOVE = 5
    DEVICE_PAIRED = 6
    PLIST = 8


class Result(enum.IntEnum):
    OK = 0
    BADCOMMAND = 1
    BADDEV = 2
    """Also what ReadPairRecord answers for a missing record (ENOENT == 2)."""
    CONNREFUSED = 3
    NOSUCHSERVICE = 4
    BADVERSION = 6


class UsbmuxProtocolError(ValueError):
    """The peer sent something that is not a well-formed usbmuxd packet or message. The only
    exception this module raises; the connection it came from is out of sync and must be reset."""


@dataclass(frozen=True, slots=True)
class Packet:
    version: int
    message: int
    tag: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class UsbmuxAttached:
    """usbmuxd's `Attached`: a device became visible. `location_id` is `(bus << 16) | devnum` on
    Linux (see `location_to_bus_devnum`); Network devices have none (0)."""

    device_id: int
    udid: str
    location_id: int
    product_id: int
    connection_type: str
    speed: int


@dataclass(frozen=True, slots=True)
class UsbmuxDetached:
    """usbmuxd's `Detached`. The wire message carries only the DeviceID; the client fills in what the
    matching `Attached` said (None when it never saw one)."""

    device_id: int
    udid: str | None = None
    location_id: int | None = None
    product_id: int | None = None


@dataclass(frozen=True, slots=True)
class UsbmuxPaired:
    device_id: int


DeviceMessage = UsbmuxAttached | UsbmuxDetached | UsbmuxPaired


# On Linux usbmuxd's LocationID is `(bus << 16) | devnum` (`src/usb.c` `usb_get_location`); the
# sysfs module owns that knowledge, these names are kept for readers of the wire format.
location_to_bus_devnum = split_location_id
bus_devnum_to_location = location_id


def encode_packet(version: int, message: int, tag: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(HEADER_SIZE + len(payload), version, message, tag) + payload


def encode_plist(body: Mapping[str, Any], tag: int) -> bytes:
    """A plist-protocol packet (XML payload, as libusbmuxd and usbmuxd send)."""
    return encode_packet(Version.PLIST, MessageType.PLIST, tag, plistlib.dumps(dict(body)))


def encode_result(tag: int, number: int, version: int = Version.PLIST) -> bytes:
    """A `Result` reply; in binary mode (version 0) a RESULT packet with a u32 body."""
    if version == Version.BINARY:
        return encode_packet(Version.BINARY, MessageType.RESULT, tag, struct.pack("<I", number))
    return encode_plist({"MessageType": "Result", "Number": number}, tag)


class PacketDecoder:
    """Reassembles packets from a byte stream. After a `UsbmuxProtocolError` the stream is out of
    sync: the decoder stays failed and the caller must drop the connection."""

    def __init__(self, max_size: int = MAX_PACKET) -> None:
        self._buffer = bytearray()
        self._max_size = max_size
        self._failed = False

    def feed(self, data: bytes) -> list[Packet]:
        if self._failed:
            raise UsbmuxProtocolError("decoder already failed; reset the connection")
        self._buffer += data
        packets: list[Packet] = []
        while len(self._buffer) >= HEADER_SIZE:
            length, version, message, tag = HEADER.unpack_from(self._buffer)
            if length < HEADER_SIZE or length > self._max_size:
                self._failed = True
                raise UsbmuxProtocolError(f"bad packet length {length}")
            if len(self._buffer) < length:
                break
            payload = bytes(self._buffer[HEADER_SIZE:length])
            del self._buffer[:length]
            packets.append(Packet(version, message, tag, payload))
        return packets

    def take_buffer(self) -> bytes:
        """Bytes received past the last whole packet (after `Connect` they belong to the device)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def decode_plist(packet: Packet) -> dict[str, Any]:
    """The plist dictionary of a plist-protocol packet."""
    if packet.version != Version.PLIST:
        raise UsbmuxProtocolError(f"protocol version {packet.version}, expected plist (1)")
    if packet.message != MessageType.PLIST:
        raise UsbmuxProtocolError(f"message type {packet.message} in plist mode")
    try:
        body = plistlib.loads(packet.payload)
    except Exception as exc:  # plistlib raises a zoo of types on garbage (expat, struct, overflow...)
        raise UsbmuxProtocolError(f"unparsable plist: {exc!r}") from exc
    if not isinstance(body, dict):
        raise UsbmuxProtocolError(f"plist root is {type(body).__name__}, not a dict")
    return body


def _int(mapping: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = mapping.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsbmuxProtocolError(f"{key} is {value!r}, expected a non-negative integer")
    return value


def _str(mapping: Mapping[str, Any], key: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str):
        raise UsbmuxProtocolError(f"{key} is {value!r}, expected a string")
    return value


def parse_attached(entry: Mapping[str, Any]) -> UsbmuxAttached:
    """An `Attached` message or a ListDevices `DeviceList` entry (same shape)."""
    props = entry.get("Properties")
    if not isinstance(props, dict):
        raise UsbmuxProtocolError(f"Attached without Properties: {entry!r}")
    return UsbmuxAttached(
        device_id=_int(entry, "DeviceID"),
        udid=_str(props, "SerialNumber"),
        location_id=_int(props, "LocationID", 0),
        product_id=_int(props, "ProductID", 0),
        connection_type=_str(props, "ConnectionType"),
        speed=_int(props, "ConnectionSpeed", 0),
    )


def parse_device_message(message: Mapping[str, Any]) -> DeviceMessage:
    """An unsolicited message on a listening connection."""
    kind = message.get("MessageType")
    if kind == "Attached":
        return parse_attached(message)
    if kind == "Detached":
        return UsbmuxDetached(_int(message, "DeviceID"))
    if kind == "Paired":
        return UsbmuxPaired(_int(message, "DeviceID"))
    raise UsbmuxProtocolError(f"unexpected MessageType {kind!r} on a listening connection")


def parse_result(message: Mapping[str, Any]) -> int:
    """The `Number` of a `Result` reply."""
    if message.get("MessageType") != "Result":
        raise UsbmuxProtocolError(f"expected a Result, got {message!r}")
    return _int(message, "Number")


def parse_device_list(message: Mapping[str, Any]) -> list[UsbmuxAttached]:
    entries = message.get("DeviceList")
    if not isinstance(entries, list):
        raise UsbmuxProtocolError(f"ListDevices reply without a DeviceList: {message!r}")
    out: list[UsbmuxAttached] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise UsbmuxProtocolError(f"DeviceList entry is {entry!r}")
        out.append(parse_attached(entry))
    return out


def request(message_type: str, tag: int, **fields: Any) -> bytes:
    """A client request with the keys libusbmuxd sends along."""
    body: dict[str, Any] = {
        "MessageType": message_type,
        "ClientVersionString": "benchhub",
        "ProgName": "benchhub",
        "kLibUSBMuxVersion": 3,
        **fields,
    }
    return encode_plist(body, tag)
