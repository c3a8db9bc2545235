"""USB hub class requests to one hub through pyusb: GET_DESCRIPTOR(hub), GET_STATUS(port),
SET_FEATURE / CLEAR_FEATURE(PORT_POWER), as uhubctl sends them.

Every method blocks (libusb I/O); the driver calls them through `asyncio.to_thread`. The seam is
the pyusb backend: production passes None (pyusb picks libusb1), tests pass an object that
implements the `usb.backend.IBackend` calls used here (`enumerate_devices`,
`get_device_descriptor`, `open_device`, `close_device`, `ctrl_transfer`).

Requests with recipient "device" or "other" need no claimed interface, so they work while the
kernel's hub driver stays bound; on Linux they need write access to `/dev/bus/usb/BBB/DDD`
(root, or a udev rule such as uhubctl's).
"""

from __future__ import annotations

import contextlib
from typing import Any

import usb.core
import usb.util

from hubdrivers.usbhub.descriptors import (
    HubDescriptor,
    PortStatusWord,
    hub_descriptor_request,
    parse_hub_descriptor,
    parse_port_status,
    port_power_request,
    port_status_request,
)

CONTROL_TIMEOUT_MS = 1000


class HubControlError(Exception):
    """pyusb is unusable for this hub (no backend, device not found, or a transfer failed)."""


class HubControl:
    """Class requests to one hub device, found by bus number and device address."""

    def __init__(self, device: Any, superspeed: bool) -> None:
        self._device = device
        self.superspeed = superspeed

    @classmethod
    def open(cls, busnum: int, devnum: int, superspeed: bool, backend: object | None) -> HubControl:
        try:
            device = usb.core.find(backend=backend, bus=busnum, address=devnum)
        except usb.core.NoBackendError as exc:
            raise HubControlError(f"pyusb has no libusb backend: {exc}") from exc
        except OSError as exc:
            raise HubControlError(f"pyusb could not enumerate devices: {exc}") from exc
        if device is None:
            raise HubControlError(f"pyusb sees no device at bus {busnum} address {devnum}")
        return cls(device, superspeed)

    def _transfer(self, what: str, *request: Any) -> Any:
        try:
            return self._device.ctrl_transfer(*request, timeout=CONTROL_TIMEOUT_MS)
        except OSError as exc:  # usb.core.USBError is an IOError
            raise HubControlError(f"{what} failed: {exc}") from exc

    def hub_descriptor(self) -> HubDescriptor:
        """GET_DESCRIPTOR(0x29, or 0x2A for a SuperSpeed hub); raises UsbParseError if garbled."""
        data = self._transfer("GET_DESCRIPTOR(hub)", *hub_descriptor_request(self.superspeed))
        return parse_hub_descriptor(bytes(data))

    def port_status(self, port: int) -> PortStatusWord:
        data = self._transfer(f"GET_STATUS(port {port})", *port_status_request(port))
        return parse_port_status(bytes(data), self.superspeed)

    def set_port_power(self, port: int, on: bool) -> None:
        verb = "SET_FEATURE" if on else "CLEAR_FEATURE"
        self._transfer(f"{verb}(PORT_POWER, port {port})", *port_power_request(port, on), None)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the hub is gone; nothing left to release
            usb.util.dispose_resources(self._device)
