"""Which USB device is where, from the Linux sysfs tree (default `/sys/bus/usb/devices`, injectable).

Device entries are named `<bus>-<port>[.<port>...]` (`3-2.4.1`: bus 3, root port 2, hub port 4, its
port 1); interfaces (`3-2.4.1:1.0`) and root hubs (`usb3`) are skipped. The per-device attribute
reading (`busnum`, `devnum`, `idVendor`, `idProduct`, `serial`) is `hubdrivers.usbhub.sysfs.SysfsUsb`;
this module adds listing, the usbmuxd LocationID lookup and never raising on odd entries.

usbmuxd on Linux reports `LocationID = (bus << 16) | devnum` (`src/usb.c` `usb_get_location`), and
devnum changes on every enumeration, so a LocationID is only good while that enumeration lasts; the
sysfs name it resolves to is the stable, physical part.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import structlog

from daemon.usb.apple import APPLE_VID
from hubdrivers.usbhub.sysfs import SYSFS_USB_DEVICES, SysfsUsb, UsbDevice, valid_usb_path

__all__ = [
    "SYSFS_USB_DEVICES",
    "UsbDevice",
    "UsbSysfs",
    "location_id",
    "path_key",
    "split_location_id",
]

log = structlog.get_logger("benchhub.usb")

_LOCATION_MAX = 0xFFFF_FFFF
_PATH = re.compile(r"^(\d+)-(\d+(?:\.\d+)*)$")


def location_id(bus: int, devnum: int) -> int:
    """The usbmuxd LocationID of a device on Linux."""
    if not (0 <= bus <= 0xFFFF and 0 <= devnum <= 0xFFFF):
        raise ValueError(f"bus/devnum out of range: {bus}/{devnum}")
    return (bus << 16) | devnum


def split_location_id(location: int) -> tuple[int, int]:
    """`(bus, devnum)` from a Linux usbmuxd LocationID."""
    if not 0 <= location <= _LOCATION_MAX:
        raise ValueError(f"LocationID out of range: {location}")
    return location >> 16, location & 0xFFFF


def path_key(usb_path: str) -> tuple[int, ...]:
    """Sort key ordering `1-2` < `1-2.3` < `1-10` (numerically, bus first)."""
    match = _PATH.match(usb_path)
    if match is None:
        return (1 << 31,)
    return (int(match[1]), *(int(p) for p in match[2].split(".")))


class UsbSysfs:
    """Read-only queries over the sysfs USB device directory. Nothing here raises for a device that
    vanishes mid-read or has a garbled attribute: such a device is skipped (and logged)."""

    def __init__(self, root: str | os.PathLike[str] = SYSFS_USB_DEVICES) -> None:
        self.root = Path(root)
        self._sysfs = SysfsUsb(self.root)

    def available(self) -> bool:
        """Whether the directory exists and can be listed (not the case on macOS or in some containers)."""
        try:
            with os.scandir(self.root) as entries:
                next(entries, None)
        except OSError:
            return False
        return True

    def names(self) -> list[str]:
        """The USB devices present, by sysfs name, in path order; root hubs and interfaces excluded."""
        try:
            entries = os.listdir(self.root)
        except OSError as exc:
            log.warning("usb_sysfs_unreadable", root=str(self.root), error=str(exc))
            return []
        return sorted((name for name in entries if valid_usb_path(name)), key=path_key)

    def device(self, name: str) -> UsbDevice | None:
        """The device called `name`; None if it is absent, half gone, or its attributes are garbled."""
        try:
            return self._sysfs.device(name)
        except (OSError, ValueError) as exc:
            log.warning("usb_sysfs_bad_device", usb_path=name, error=str(exc))
            return None

    def devices(self, under: str | None = None) -> list[UsbDevice]:
        """All devices, or only those below hub path `under` (its descendants, not the hub itself)."""
        return list(self._iter(under))

    def _iter(self, under: str | None = None, bus: int | None = None) -> Iterator[UsbDevice]:
        prefix = f"{under}." if under else (f"{bus}-" if bus is not None else "")
        for name in self.names():
            if name.startswith(prefix) and (device := self.device(name)) is not None:
                yield device

    def apple_devices(self) -> list[UsbDevice]:
        """Every device with Apple's vendor ID (iOS devices and anything else Apple). Only `idVendor`
        is read for the others, so polling this every second stays cheap."""
        found = []
        for name in self.names():
            if self._vendor(name) == APPLE_VID and (device := self.device(name)) is not None:
                found.append(device)
        return found

    def _vendor(self, name: str) -> int | None:
        try:
            text = (self.root / name / "idVendor").read_text(encoding="ascii", errors="replace").strip()
            return int(text, 16)
        except (OSError, ValueError):
            return None

    def find_location(self, bus: int, devnum: int) -> UsbDevice | None:
        """The device currently enumerated as (bus, devnum)."""
        for device in self._iter(bus=bus):
            if device.busnum == bus and device.devnum == devnum:
                return device
        return None

    def path_for_location_id(self, location: int) -> str | None:
        """The sysfs name (`3-2.4.1`) of the device a Linux usbmuxd LocationID points at, if present."""
        try:
            bus, devnum = split_location_id(location)
        except ValueError:
            return None
        device = self.find_location(bus, devnum)
        return device.name if device else None
