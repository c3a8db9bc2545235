"""A pyusb backend double: hubs that answer hub class control requests like real ones.

It implements the `usb.backend.IBackend` calls that `usb.core.find` and `Device.ctrl_transfer`
make, so the driver's real pyusb code path runs against it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import Any

import usb.backend
import usb.core

PORT_POWER_USB2 = 0x0100
PORT_POWER_SS = 0x0200


@dataclass
class FakeHubDevice:
    bus: int
    address: int
    hub_descriptor: bytes
    superspeed: bool = False
    vid: int = 0x05E3
    pid: int = 0x0610
    port_status: dict[int, int] = field(default_factory=dict)
    switches: bool = True  # False: acknowledges PORT_POWER requests but keeps ports powered
    deny_open: bool = False  # libusb_open fails with EACCES (no permission on /dev/bus/usb)

    def __post_init__(self) -> None:
        ports = self.hub_descriptor[2]
        power = PORT_POWER_SS if self.superspeed else PORT_POWER_USB2
        for port in range(1, ports + 1):
            self.port_status.setdefault(port, power)

    @property
    def power_bit(self) -> int:
        return PORT_POWER_SS if self.superspeed else PORT_POWER_USB2


@dataclass(frozen=True)
class Request:
    bus: int
    address: int
    bmRequestType: int
    bRequest: int
    wValue: int
    wIndex: int
    wLength: int


class _DeviceDescriptor:
    def __init__(self, hub: FakeHubDevice) -> None:
        self.bLength = 18
        self.bDescriptorType = 1
        self.bcdUSB = 0x0320 if hub.superspeed else 0x0210
        self.bDeviceClass = 0x09
        self.bDeviceSubClass = 0
        self.bDeviceProtocol = 3 if hub.superspeed else 1
        self.bMaxPacketSize0 = 9 if hub.superspeed else 64
        self.idVendor = hub.vid
        self.idProduct = hub.pid
        self.bcdDevice = 0x0660
        self.iManufacturer = 1
        self.iProduct = 2
        self.iSerialNumber = 0
        self.bNumConfigurations = 1
        self.address = hub.address
        self.bus = hub.bus
        self.port_number = None
        self.port_numbers = None
        self.speed = None


def _stall() -> usb.core.USBError:
    return usb.core.USBError("Pipe error", error_code=-9, errno=errno.EPIPE)


class FakeUsbBackend(usb.backend.IBackend):  # type: ignore[misc]
    def __init__(self, *hubs: FakeHubDevice) -> None:
        super().__init__()
        self.hubs = list(hubs)
        self.requests: list[Request] = []
        self.open_handles = 0

    def enumerate_devices(self) -> Any:
        yield from self.hubs

    def get_device_descriptor(self, dev: FakeHubDevice) -> _DeviceDescriptor:
        return _DeviceDescriptor(dev)

    def open_device(self, dev: FakeHubDevice) -> FakeHubDevice:
        if dev.deny_open:
            raise usb.core.USBError(
                "Access denied (insufficient permissions)", error_code=-3, errno=errno.EACCES
            )
        self.open_handles += 1
        return dev

    def close_device(self, dev_handle: FakeHubDevice) -> None:
        self.open_handles -= 1

    def ctrl_transfer(  # noqa: PLR0917 - pyusb's IBackend signature
        self,
        dev_handle: FakeHubDevice,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: Any,
        timeout: int,
    ) -> int:
        hub = dev_handle
        self.requests.append(
            Request(hub.bus, hub.address, bmRequestType, bRequest, wValue, wIndex, len(data))
        )
        ports = hub.hub_descriptor[2]
        if (bmRequestType, bRequest) == (0xA0, 0x06):  # GET_DESCRIPTOR(hub)
            if wValue >> 8 != hub.hub_descriptor[1] or wIndex != 0:
                raise _stall()
            answer = hub.hub_descriptor[: len(data)]
        elif (bmRequestType, bRequest, wValue) == (0xA3, 0x00, 0):  # GET_STATUS(port)
            if not 1 <= wIndex <= ports:
                raise _stall()
            answer = struct.pack("<HH", hub.port_status[wIndex], 0)[: len(data)]
        elif bmRequestType == 0x23 and bRequest in (0x01, 0x03) and wValue == 8:  # PORT_POWER
            if not 1 <= wIndex <= ports:
                raise _stall()
            if hub.switches:
                if bRequest == 0x03:
                    hub.port_status[wIndex] |= hub.power_bit
                else:
                    hub.port_status[wIndex] = 0
            return 0
        else:
            raise _stall()
        data[: len(answer)] = type(data)("B", answer)
        return len(answer)
